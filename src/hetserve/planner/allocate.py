"""How many of each template to deploy: a small MILP solved by HiGHS (scipy.optimize.milp).

Variables: ``x_j`` (integer) instances of template j; ``r_j`` (continuous) requests/s served by
mixed template j; ``f`` requests/s through the prefill -> decode pools. Constraints:

- GPU inventory per pool: sum_j gpus_j(pool) x_j <= GPUs in the pool;
- capacity: r_j <= cap_j x_j (mixed); f <= sum_prefill cap_j x_j; f <= sum_decode cap_j x_j;
- budget (if given): sum_j price_j x_j <= budget;
- for ``cost`` / ``power``: sum_j r_j + f >= the workload's rate.

Objectives: ``throughput`` and ``goodput`` maximise sum r + f (throughput with capacities that ignore
the SLOs, goodput with SLO-bound capacities), breaking ties by price; ``cost`` minimises $/hour;
``power`` minimises idle watts plus busy energy per request times the rate. ``enumerate_best``
solves the same problem by brute force, for tests on small clusters.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy.optimize import Bounds, LinearConstraint, milp

from .. import clock
from .evaluate import OBJECTIVES
from .templates import Template


@dataclass
class Allocation:
    counts: dict[int, int]  # template index -> instances
    flows: dict[int, float]  # template index -> requests/s (mixed: own; prefill/decode: share of f)
    rate: float  # requests/s served
    price: float  # $/hour
    power_w: float  # average watts at that rate
    objective: float  # in the objective's unit


def _cap(t: Template, objective: str) -> float:
    return t.cap_free.rate if objective == "throughput" else t.cap.rate


def _power(templates, counts, flows) -> float:
    idle = sum(templates[j].idle_w * n for j, n in counts.items())
    busy = sum(
        templates[j].dynamic_w * templates[j].cap.busy_per_request * f
        for j, f in flows.items()
        if math.isfinite(templates[j].cap.busy_per_request)
    )
    return idle + busy


#: Objectives the MILP solves as another (``solve``).
MILP_OBJECTIVE = {"latency": "goodput"}


def solve(
    templates: list[Template],
    pools: dict[str, int],
    objective: str,
    *,
    rate: float | None = None,
    budget: float | None = None,
    time_limit: float = 30.0,
    roles: set[str] | None = None,
    exclude: set[int] | None = None,
) -> Allocation | None:
    """The optimal allocation, or None if nothing is feasible. ``exclude``: template indices not to use.
    ``latency`` (least mean response at the workload's rate) allocates as ``goodput`` does, the most
    capacity within the SLOs and the budget: what lowers queueing; the simulation then ranks the designs
    by their mean response."""
    objective = MILP_OBJECTIVE.get(objective, objective)
    idx = [
        j
        for j, t in enumerate(templates)
        if _cap(t, objective) > 0
        and (roles is None or t.role in roles)
        and (exclude is None or j not in exclude)
    ]
    if not idx:
        return None
    n = len(idx)
    mixed = [k for k, j in enumerate(idx) if templates[j].role == "mixed"]
    pre = [k for k, j in enumerate(idx) if templates[j].role == "prefill"]
    dec = [k for k, j in enumerate(idx) if templates[j].role == "decode"]
    nv = n + len(mixed) + 1  # x..., r (mixed)..., f
    f_col = nv - 1
    r_col = {k: n + i for i, k in enumerate(mixed)}
    rows, lo, hi = [], [], []

    def row():
        return np.zeros(nv)

    for pool, avail in pools.items():
        a = row()
        for k, j in enumerate(idx):
            a[k] = templates[j].gpus.get(pool, 0)
        if a.any():
            rows.append(a), lo.append(-np.inf), hi.append(avail)
    for k in mixed:
        a = row()
        a[r_col[k]] = 1
        a[k] = -_cap(templates[idx[k]], objective)
        rows.append(a), lo.append(-np.inf), hi.append(0)
    for group in (pre, dec):
        a = row()
        a[f_col] = 1
        for k in group:
            a[k] = -_cap(templates[idx[k]], objective)
        rows.append(a), lo.append(-np.inf), hi.append(0)
    price = np.array([templates[j].price for j in idx])
    if budget is not None:
        a = row()
        a[:n] = price
        rows.append(a), lo.append(-np.inf), hi.append(budget)
    served = row()
    for k in mixed:
        served[r_col[k]] = 1
    served[f_col] = 1
    c = row()
    if OBJECTIVES[objective].sense == "max":
        c -= served
        c[:n] += 1e-7 * price  # among equal rates, the cheaper
    else:
        if rate is None:
            raise ValueError(f"objective {objective} needs the workload's rate")
        rows.append(served), lo.append(rate), hi.append(np.inf)
        if objective == "cost":
            c[:n] = price
        else:
            for k, j in enumerate(idx):
                t = templates[j]
                c[k] = t.idle_w
                e = t.dynamic_w * t.cap.busy_per_request if math.isfinite(t.cap.busy_per_request) else 1e9
                if k in r_col:
                    c[r_col[k]] = e
            # decode and prefill energy per request through f
            ef = min(
                (templates[idx[k]].dynamic_w * templates[idx[k]].cap.busy_per_request for k in pre), default=0
            )
            ed = min(
                (templates[idx[k]].dynamic_w * templates[idx[k]].cap.busy_per_request for k in dec), default=0
            )
            c[f_col] = (ef if math.isfinite(ef) else 1e9) + (ed if math.isfinite(ed) else 1e9)
            c[:n] += 1e-6 * price
    ub = np.full(nv, np.inf)
    for k, j in enumerate(idx):
        t = templates[j]
        ub[k] = min(pools.get(p, 0) // g for p, g in t.gpus.items())
    integrality = np.zeros(nv)
    integrality[:n] = 1
    res = milp(
        c,
        constraints=LinearConstraint(np.array(rows), lo, hi),
        integrality=integrality,
        bounds=Bounds(np.zeros(nv), ub),
        options={**clock.milp_limits(time_limit, len(rows)), "disp": False},
    )
    clock.charge_solve(nodes=getattr(res, "mip_node_count", 0) or 0, rows=len(rows))
    if res.x is None or res.status not in (0, 1):
        return None
    x = np.round(res.x[:n]).astype(int)
    counts = {idx[k]: int(x[k]) for k in range(n) if x[k] > 0}
    if not counts:
        return None
    return _finish(templates, counts, objective, rate)


def _finish(templates, counts: dict[int, int], objective: str, rate: float | None) -> Allocation:
    """Flows and figures of an allocation: mixed instances take their capacity; the P/D pools carry
    the smaller of their two capacities; with a target rate, flows are scaled down to it."""
    flows: dict[int, float] = {}
    for j, n in counts.items():
        if templates[j].role == "mixed":
            flows[j] = _cap(templates[j], objective) * n
    pcap = sum(_cap(templates[j], objective) * n for j, n in counts.items() if templates[j].role == "prefill")
    dcap = sum(_cap(templates[j], objective) * n for j, n in counts.items() if templates[j].role == "decode")
    f = min(pcap, dcap)
    for j, n in counts.items():
        t = templates[j]
        if t.role == "prefill" and pcap > 0:
            flows[j] = f * _cap(t, objective) * n / pcap
        elif t.role == "decode" and dcap > 0:
            flows[j] = f * _cap(t, objective) * n / dcap
    served = sum(v for j, v in flows.items() if templates[j].role == "mixed") + f
    if rate is not None and OBJECTIVES[objective].sense == "min" and served > rate > 0:
        scale = rate / served
        flows = {j: v * scale for j, v in flows.items()}
        served = rate
    price = sum(templates[j].price * n for j, n in counts.items())
    power = _power(templates, counts, flows)
    value = {"throughput": served, "goodput": served, "cost": price, "power": power}[objective]
    return Allocation(counts, flows, served, price, power, value)


def objective_value(templates, counts, objective, rate=None, budget=None, pools=None) -> float | None:
    """The objective of a given allocation, or None if it breaks a constraint (for enumeration)."""
    if pools is not None:
        use: dict[str, int] = {}
        for j, n in counts.items():
            for p, g in templates[j].gpus.items():
                use[p] = use.get(p, 0) + g * n
        if any(use[p] > pools.get(p, 0) for p in use):
            return None
    if budget is not None and sum(templates[j].price * n for j, n in counts.items()) > budget + 1e-9:
        return None
    alloc = _finish(templates, counts, objective, rate)
    if OBJECTIVES[objective].sense == "min" and (rate is None or alloc.rate < rate * (1 - 1e-9)):
        return None
    return alloc.objective


def undominated(templates: list[Template], objective: str) -> list[int]:
    """Indices of templates not dominated by another of the same role and GPU use (at least the
    capacity, at most the price and idle power, with a strict gain somewhere): dropping dominated
    ones never changes an optimum, which keeps brute force small."""
    keep = []
    for j, t in enumerate(templates):
        cj = _cap(t, objective)
        if cj <= 0:
            continue
        dominated = False
        for k, u in enumerate(templates):
            if k == j or u.role != t.role or u.gpus != t.gpus:
                continue
            ck = _cap(u, objective)
            if (
                ck >= cj
                and u.price <= t.price
                and u.idle_w <= t.idle_w
                and (ck > cj or u.price < t.price or u.idle_w < t.idle_w or k < j)
            ):
                dominated = True
                break
        if not dominated:
            keep.append(j)
    return keep


def enumerate_best(
    templates: list[Template], pools: dict[str, int], objective: str, *, rate=None, budget=None
) -> float | None:
    """Brute force over every count vector that fits the inventory (small clusters only)."""
    idx = undominated(templates, objective)
    sense = max if OBJECTIVES[objective].sense == "max" else min
    best = [None]
    counts: dict[int, int] = {}

    def visit(pos: int, left: dict[str, int]) -> None:
        if pos == len(idx):
            if counts:
                v = objective_value(templates, counts, objective, rate, budget, pools)
                if v is not None:
                    best[0] = v if best[0] is None else sense(best[0], v)
            return
        j = idx[pos]
        most = min(left.get(p, 0) // g for p, g in templates[j].gpus.items())
        for n in range(most + 1):
            if n:
                counts[j] = n
            rest = {p: left[p] - templates[j].gpus.get(p, 0) * n for p in left}
            visit(pos + 1, rest)
        counts.pop(j, None)

    visit(0, dict(pools))
    return best[0]
