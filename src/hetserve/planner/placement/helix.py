"""``helix``: max-flow layer placement over the network, and per-hop weighted routing (Helix, ASPLOS 2025).

Helix sees the cluster as a flow network. Every machine (a node; its GPUs are one tensor-parallel
group) holds one contiguous range of layers; a request enters at a machine holding layer 0, moves to
a machine that starts where the previous one ended, and leaves at a machine holding the last layer.
The placement maximises the flow (requests/s) from source to sink, as one MILP (HiGHS, through its
own Python interface ``highspy``, which takes a starting solution). Helix writes it per machine (a
start layer, binaries for the layers held and for every edge); here identical machines (same GPU, node
size and zone) are one class, which is exact for them and removes the symmetry branch-and-bound cannot
prune:

- integers y[class, s, e]: how many machines of the class hold layers [s, e), at most the class's size,
  with e - s at most what fits in half of a GPU's memory at 16 bits (Helix's rule, the rest is KV cache)
  and at least ``MIN_SPAN_SHARE`` of that; flows g[class, s, e] <= y x the machine's throughput with
  e - s layers (from the roofline cost model: the largest decode batch its KV room holds, plus its share
  of prefill);
- flow conserved at every layer boundary per (zone, vendor), with crossing flows h between groups of one
  vendor; the crossings between two zones are bounded by their link's bandwidth over the activation bytes
  a request sends ((prompt + output) x hidden x 2 bytes), times the smaller zone's machine count;
- objective: the flow into layer L, with tiny costs on machines and on crossings between zones.

As Helix's MILP starts from a heuristic layout (``start_from_heuristic``), this one starts from Petals'
placement rule applied to the same machines, with the largest flow that layout carries; branch-and-bound
then explores at most ``MILP_NODES`` nodes, on one thread with a fixed seed, so the placement is the same
on every run. Counting work (``hetserve.clock``), it explores no more nodes than its share of the time
limit buys (in the planner, a quarter of what is left), so that a short search is cut the same way on
any machine.

The flow is then decomposed into source -> sink paths: each path is a chain (an instance), and
requests are spread over the chains in proportion to their flows, which gives every machine the same
share of next hops as Helix's per-hop weighted routing. A machine on several chains is shared: each
chain gets a KV share in proportion to its flow there. Plain 16-bit weights; colocated instances.
"""

from __future__ import annotations

import math
import os
import sys
from contextlib import contextmanager
from dataclasses import dataclass

import highspy
import numpy as np
from scipy.sparse import coo_array, csc_array

from ... import clock
from ...costmodel.roofline import ServerShape
from ...errors import HetserveError
from ...plan import PlanFile, RoutingPlan
from ..capacity import KV_HEADROOM
from ..pools import SETTINGS, tp_choices
from ..strategy import (
    PlanWriter,
    Spot,
    Strategy,
    StrategyContext,
    lanes_holding_long_requests,
    per_request_engine,
    spot,
)

#: Helix caps a machine's weights at half of its GPU memory (the rest is KV cache).
WEIGHT_SHARE = 0.5
MILP_GAP = 0.01
#: Branch-and-bound nodes the placement MILP may explore (HiGHS's ``mip_max_nodes``): a budget in work,
#: so the placement (and every figure made from it) is the same on any machine and under any load. The
#: time limit left to the strategy (80% of it) only guards a machine too slow to explore them; the notes
#: say which one stopped it.
MILP_NODES = 100
#: Most (class, start, end) choices before starts and ends move to a coarser layer grid.
MAX_ARCS = 2500
#: A machine holds at least this share of the layers it could hold (long spans keep the MILP small and
#: its solutions made of few, long chains). Helix allows any length from one layer; with the Petals start
#: and the same node budget, spans of any length leave helix-24's placement as it is and make
#: helix-24-geo's worse (its grid coarsens to 2 layers; docs/baselines.md), so the floor stays.
MIN_SPAN_SHARE = 0.5
#: Step budget of a machine pipelining per request: Helix's prototype schedules each node with budgets of
#: 1-3 prompts and 300-480 decode tokens (Helix-ASPLOS25 artifact); here 128-token prompt chunks in steps
#: of 256 tokens, the grid point nearest those (``planner.engine_settings.TOKEN_GRID``).
HELIX_CHUNK_TOKENS, HELIX_STEP_TOKENS = 128, 256
#: HiGHS's random seed: fixed, with one thread, so branch-and-bound takes the same path on every run.
MILP_SEED = 0


@dataclass
class Machine:
    node: str
    gpus: tuple[int, ...]
    caps: list[float]  # caps[k-1]: requests/s when holding k layers
    kind: tuple  # (GPU, GPUs per node, zone): identical machines share it

    @property
    def kmax(self) -> int:
        return len(self.caps)


@dataclass
class HelixPlacement:
    """What the MILP chose (kept for inspection and tests)."""

    ranges: dict[str, tuple[int, int]]  # node -> [start, end)
    flows: dict[tuple[str, str], float]  # edge -> requests/s ("source"/"sink" at the ends)
    max_flow: float
    step: int = 1  # layer granularity of starts and ends
    gap: float | None = None  # MILP optimality gap where it stopped
    stopped_by: str = "gap"  # what ended the MILP: "gap" (optimal within MILP_GAP), "nodes" or "time"
    nodes: int | None = None  # branch-and-bound nodes explored
    start_flow: float | None = None  # flow of the starting solution (None: the MILP started from nothing)


@dataclass
class _Milp:
    """The placement MILP in HiGHS's column form: rows ``lo <= a x <= hi``, columns ``0 <= x <= upper``,
    the machine counts ("y") integer, minimising ``cost . x``; ``col`` names the columns: ("y" | "g",
    class, start, end) and ("h", layer, group, group)."""

    col: dict[tuple, int]
    classes: list[list[Machine]]  # identical machines, by class index
    cuts: list[int]  # where spans may start and end
    step: int
    cost: np.ndarray
    a: csc_array
    lo: np.ndarray
    hi: np.ndarray
    upper: np.ndarray

    def highs(self, fixed: dict[int, float] | None = None) -> highspy.Highs:
        """A silent HiGHS holding the model; with ``fixed`` (column -> value), those columns fixed and
        no column integer (an LP)."""
        lp = highspy.HighsLp()
        lp.num_col_, lp.num_row_ = len(self.cost), len(self.lo)
        lp.col_cost_ = self.cost
        lower, upper = np.zeros(len(self.cost)), self.upper.copy()
        for k, v in (fixed or {}).items():
            lower[k] = upper[k] = v
        lp.col_lower_, lp.col_upper_ = lower, upper
        lp.row_lower_, lp.row_upper_ = self.lo, self.hi
        lp.a_matrix_.format_ = highspy.MatrixFormat.kColwise
        lp.a_matrix_.num_col_, lp.a_matrix_.num_row_ = len(self.cost), len(self.lo)
        lp.a_matrix_.start_ = self.a.indptr
        lp.a_matrix_.index_ = self.a.indices
        lp.a_matrix_.value_ = self.a.data
        if fixed is None:
            kind = {True: highspy.HighsVarType.kInteger, False: highspy.HighsVarType.kContinuous}
            integer = {k for key, k in self.col.items() if key[0] == "y"}
            lp.integrality_ = [kind[k in integer] for k in range(len(self.cost))]
        h = _silent_highs()
        h.passModel(lp)
        return h

    def label(self, x: np.ndarray) -> tuple[dict[str, tuple[int, int]], dict[str, float]]:
        """Machines' spans and flows from a solution: each (class, start, end) takes that many machines
        of its class, in cluster-file order, sharing its flow evenly."""
        ranges: dict[str, tuple[int, int]] = {}
        server_flow: dict[str, float] = {}
        ys = sorted(key for key in self.col if key[0] == "y")
        for t, ms in enumerate(self.classes):
            free = list(ms)
            for key in (k for k in ys if k[1] == t):
                n = round(x[self.col[key]])
                _, _, s, e = key
                g = x[self.col[("g", t, s, e)]]
                for _ in range(n):
                    mach = free.pop(0)
                    ranges[mach.node] = (s, e)
                    server_flow[mach.node] = g / n
        return ranges, server_flow


@contextmanager
def _stdout_silenced():
    """The process's standard output (file descriptor 1) goes to the null device meanwhile: HiGHS writes
    its banner there from highspy's constructor (once per process, before any option can be set) and,
    with ``output_flag`` off, still some messages of its MIP solver, which would break ``--json``
    output."""
    sys.stdout.flush()
    saved = os.dup(1)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 1)
            yield
    finally:
        os.dup2(saved, 1)
        os.close(saved)


def _silent_highs() -> highspy.Highs:
    """A HiGHS instance that logs nothing (``_stdout_silenced``)."""
    with _stdout_silenced():
        h = highspy.Highs()
    h.setOptionValue("output_flag", False)
    return h


def _run(h: highspy.Highs) -> None:
    """Solve, with standard output silenced."""
    with _stdout_silenced():
        h.run()


def _solution(x: np.ndarray) -> highspy.HighsSolution:
    sol = highspy.HighsSolution()
    sol.col_value = list(x)
    sol.value_valid = True
    return sol


class Helix(Strategy):
    name = "helix"
    summary = "max-flow layer placement (MILP, HiGHS) and per-hop weighted routing"

    def __init__(self):
        self.last: HelixPlacement | None = None

    def machines(self, ctx: StrategyContext) -> list[Machine]:
        m, cm = ctx.model, ctx.cost_model
        P, O = ctx.prompt, ctx.output
        max_batch, max_tokens, _ = ctx.settings("mixed")  # a machine's batch, within the engine's limit
        out = []
        by_kind: dict[tuple[str, int], list[float]] = {}  # identical nodes have identical capacities
        for node in ctx.cluster.nodes.values():
            tp = tp_choices(node.count, m)[-1]
            gpu = node.gpu
            kind = (gpu.name, node.count)
            if kind in by_kind:
                if by_kind[kind]:
                    out.append(
                        Machine(node.name, tuple(range(tp)), by_kind[kind], (gpu.name, node.count, node.zone))
                    )
                continue
            kmax = int(WEIGHT_SHARE * gpu.memory_gb * 1e9 * tp // m.layer_weight_bytes(16))
            caps = []
            for k in range(1, min(kmax, m.num_layers) + 1):
                shape = ServerShape(gpu, tp, (16,) * k, first=False, last=False)
                mem = cm.memory(shape, max_tokens, max_batch)
                if not mem.fits:
                    break
                B = min(float(max_batch), KV_HEADROOM * mem.kv_capacity_tokens / (P + O / 2 + 1))
                if B < 1:
                    break
                timer = cm.timer(shape)
                n = max(1, min(int(max_tokens // max(P, 1)), max_batch))
                pre = timer.time(n * P, n, n * P * (P + 1) / 2, n * P) / n
                kv = B * (P + O / 2 + 1)
                step = timer.time(B, B, kv, kv)
                caps.append(1.0 / (pre + O * step / B))
            by_kind[kind] = caps
            if caps:
                out.append(Machine(node.name, tuple(range(tp)), caps, (gpu.name, node.count, node.zone)))
        return out

    def plan(self, ctx: StrategyContext) -> PlanFile:
        m = ctx.model
        L = m.num_layers
        machines = self.machines(ctx)
        if sum(x.kmax for x in machines) < L:
            raise HetserveError(
                f"helix: the machines of {ctx.cluster.name} hold {sum(x.kmax for x in machines)} "
                f"layers of {m.name} within half of their memory, fewer than its {L}; add GPUs"
            )
        per_request = (ctx.prompt + ctx.output) * m.hidden_size * 2.0
        placement = self._solve(ctx, machines, per_request, max(0.1, ctx.time_left() * 0.8))
        self.last = placement
        if placement is None or placement.max_flow <= 0:
            raise HetserveError(
                f"helix: the placement MILP found no source-to-sink flow for {m.name} on "
                f"{ctx.cluster.name} within {ctx.time_limit:g} s"
            )
        gpus = {x.node: x.gpus for x in machines}
        paths = [
            ([spot(n, gpus[n], *placement.ranges[n]) for n in path], f)
            for path, f in decompose(placement.flows)
        ]
        stop = {"gap": "", "nodes": f" after its {placement.nodes} nodes", "time": " at its time guard"}
        gap = "" if placement.gap is None else f", MILP gap {placement.gap:.0%}{stop[placement.stopped_by]}"
        if placement.start_flow is None:
            gap += ", started from no layout"
        else:
            gap += f", started from Petals' layout at {placement.start_flow:.3f} req/s"
        used = {s.node for chain, _ in paths for s in chain}
        return write_chains(
            ctx,
            f"helix-{m.name}",
            paths,
            notes=f"Helix baseline: max flow {placement.max_flow:.3f} req/s over "
            f"{len(paths)} chains on {len(used)} machines (layer grid "
            f"{placement.step}{gap}).",
        )

    # ---- the MILP --------------------------------------------------------------------------------------
    def _solve(
        self, ctx, machines: list[Machine], per_request: float, time_limit: float
    ) -> HelixPlacement | None:
        """Max-flow placement: the MILP (``_model``), started from Petals' placement rule on the same
        machines (``_start``), within its node budget."""
        L = ctx.model.num_layers
        model = self._model(ctx, machines, per_request)
        start = self._start(model, L)
        h = model.highs()
        # counting work, the nodes its allowance buys cap MILP_NODES, and time is only a guard
        limits = clock.milp_limits(time_limit, h.getNumRow())
        for option, value in (
            ("mip_rel_gap", MILP_GAP),
            ("mip_max_nodes", min(MILP_NODES, limits.get("node_limit", MILP_NODES))),
            ("threads", 1),
            ("random_seed", MILP_SEED),
            ("time_limit", limits["time_limit"]),
        ):
            h.setOptionValue(option, value)
        if start is not None:
            h.setSolution(_solution(start[0]))
        _run(h)
        info = h.getInfo()
        clock.charge_solve(nodes=info.mip_node_count, iterations=info.simplex_iteration_count)
        stopped_by = {
            highspy.HighsModelStatus.kOptimal: "gap",
            highspy.HighsModelStatus.kSolutionLimit: "nodes",
            highspy.HighsModelStatus.kTimeLimit: "time",
        }.get(h.getModelStatus())
        if stopped_by is None or info.primal_solution_status != highspy.kSolutionStatusFeasible:
            return None
        ranges, server_flow = model.label(np.asarray(h.getSolution().col_value))
        flows = self._edges(ctx, ranges, server_flow, L)
        return HelixPlacement(
            ranges,
            flows,
            float(sum(f for (a, b), f in flows.items() if b == "sink")),
            model.step,
            float(info.mip_gap),
            stopped_by,
            int(info.mip_node_count),
            None if start is None else start[1],
        )

    def _model(self, ctx, machines: list[Machine], per_request: float) -> _Milp:
        """The MILP. Identical machines (same GPU, node size and zone) are one class, so it counts
        machines per (class, start, end) instead of labelling them (the labels are symmetric); flow is
        conserved per (zone, vendor) at every layer boundary, may cross between zones of one vendor, and
        crossings are bounded by the zones' links."""
        L = ctx.model.num_layers
        by_kind: dict[tuple, list[Machine]] = {}
        for x in machines:
            by_kind.setdefault(x.kind, []).append(x)
        kinds = sorted(by_kind)
        classes = [by_kind[k] for k in kinds]
        vendor = {k: ctx.vendor_of(by_kind[k][0].node) for k in kinds}
        group = {k: (k[2], vendor[k]) for k in kinds}
        groups = sorted(set(group.values()))
        zone_nodes: dict[str, int] = {}
        for k in kinds:
            zone_nodes[k[2]] = zone_nodes.get(k[2], 0) + len(by_kind[k])
        step = self._grid(L, [ms[0].kmax for ms in classes])
        cuts = sorted(set(range(0, L, step)) | {L})
        col: dict[tuple, int] = {}
        for t, ms in enumerate(classes):
            kmax = ms[0].kmax
            kmin = self._shortest(kmax)
            for s in cuts[:-1]:
                for e in cuts:
                    if s + kmin <= e <= s + kmax or (e == L and s < e <= s + kmax):
                        col[("y", t, s, e)] = len(col)
                        col[("g", t, s, e)] = len(col)
        crossings = [(a, b) for a in groups for b in groups if a != b and a[1] == b[1]]
        for r in cuts[1:-1]:
            for a, b in crossings:
                col[("h", r, a, b)] = len(col)
        nv = len(col)
        entries: dict[tuple[int, int], float] = {}
        lo, hi = [], []

        def add(terms, lb, ub):
            row = len(lo)
            for key, v in terms:
                entries[(row, col[key])] = entries.get((row, col[key]), 0.0) + v
            lo.append(lb), hi.append(ub)

        ys = [key for key in col if key[0] == "y"]
        for t, ms in enumerate(classes):  # machines per class
            add([(key, 1) for key in ys if key[1] == t], 0, len(ms))
        for key in ys:  # a server's throughput
            _, t, s, e = key
            add([(("g", t, s, e), 1), (key, -classes[t][0].caps[e - s - 1])], -np.inf, 0)
        ending: dict[tuple, list] = {}
        starting: dict[tuple, list] = {}
        for _, t, s, e in ys:
            ending.setdefault((e, group[kinds[t]]), []).append(("g", t, s, e))
            starting.setdefault((s, group[kinds[t]]), []).append(("g", t, s, e))
        for r in cuts[1:-1]:  # conservation per (zone, vendor)
            for gr in groups:
                terms = [(key, 1) for key in ending.get((r, gr), [])]
                terms += [(key, -1) for key in starting.get((r, gr), [])]
                terms += [(("h", r, gr, b), -1) for a, b in crossings if a == gr]
                terms += [(("h", r, a, gr), 1) for a, b in crossings if b == gr]
                if terms:
                    add(terms, 0, 0)
        zone_pairs: dict[tuple[str, str], list] = {}
        for a, b in crossings:
            if a[0] != b[0]:
                zone_pairs.setdefault((a[0], b[0]), []).append((a, b))
        for (za, zb), members in zone_pairs.items():  # links between zones
            na = next(by_kind[k][0].node for k in kinds if k[2] == za)
            nb = next(by_kind[k][0].node for k in kinds if k[2] == zb)
            link = ctx.cluster.link(na, nb)
            add(
                [(("h", r, a, b), 1) for r in cuts[1:-1] for a, b in members],
                0,
                link.bandwidth / per_request * min(zone_nodes[za], zone_nodes[zb]),
            )
        cost = np.zeros(nv)
        for key in ys:
            _, t, s, e = key
            if e == L:
                cost[col[("g", t, s, e)]] = -1.0
            cost[col[key]] = 1e-6  # among equal flows, fewer machines
        for key, k in col.items():
            if key[0] == "h":
                cost[k] = 1e-3  # and fewer crossings between zones
        upper = np.full(nv, np.inf)
        for key in ys:
            upper[col[key]] = len(classes[key[1]])
        ij = np.array(list(entries), dtype=int).reshape(-1, 2)
        a = coo_array((np.array(list(entries.values())), (ij[:, 0], ij[:, 1])), shape=(len(lo), nv))
        return _Milp(col, classes, cuts, step, cost, a.tocsc(), np.array(lo), np.array(hi), upper)

    def _start(self, model: _Milp, L: int) -> tuple[np.ndarray, float] | None:
        """The MILP's starting solution and its flow: Helix starts its MILP from a heuristic layout
        (``start_from_heuristic``; its example starts from its Petals layout, Helix-ASPLOS25
        ``examples/simulation/step2_model_placement.py``). Here that layout is Petals' placement rule on
        the MILP's own machines, spans and grid (``_petals_layout``), with the largest flow it carries:
        the MILP with every machine count fixed to the layout's, an LP. None, and the MILP starts from
        nothing, where that LP has no solution or the layout carries no flow (no chain of its spans meets
        from the first layer to the last)."""
        counts = self._petals_layout(model, L)
        fixed = {k: float(counts.get(key[1:], 0)) for key, k in model.col.items() if key[0] == "y"}
        h = model.highs(fixed)
        h.setOptionValue("threads", 1)
        _run(h)
        clock.charge_solve(iterations=h.getInfo().simplex_iteration_count)
        if h.getModelStatus() != highspy.HighsModelStatus.kOptimal:
            return None
        x = np.asarray(h.getSolution().col_value, dtype=float)
        for k, v in fixed.items():
            x[k] = v
        flow = float(sum(x[k] for key, k in model.col.items() if key[0] == "g" and key[3] == L))
        if flow <= 1e-9:
            return None
        return x, flow

    def _petals_layout(self, model: _Milp, L: int) -> dict[tuple[int, int, int], int]:
        """Petals' placement rule (``baselines/petals.py``) on the MILP's machines: they join fastest
        first (layers x requests/s at their longest span), each taking the span whose layers' current
        throughputs, sorted, are lexicographically smallest (the weakest layers; a layer's throughput is
        the sum of the requests/s of the machines holding it). Spans start or end at an existing boundary
        (the first or last layer, or a placed span's end) and reach as far as the machine holds or, where
        another boundary lies within that reach, to the farthest one, so that spans meet end to start;
        only spans the MILP offers (its grid, its shortest span) are taken. Petals' periodic
        rebalancing is left out. Returns machines per (class, start, end)."""
        cuts = model.cuts
        order = sorted(
            ((t, x) for t, ms in enumerate(model.classes) for x in ms),
            key=lambda tx: -tx[1].kmax * tx[1].caps[-1],
        )
        tput = [0.0] * L
        bounds = {0, L}
        counts: dict[tuple[int, int, int], int] = {}
        for t, x in order:
            k = x.kmax
            candidates = set()
            for c in sorted(bounds):
                if c < L:  # start at c
                    inside = [b for b in bounds if c < b <= c + k]
                    reach = max(e for e in cuts if e <= min(c + k, L))
                    for e in ([max(inside)] if inside else []) + [reach]:
                        if ("y", t, c, e) in model.col:
                            candidates.add((c, e))
                            break
                if c > 0:  # end at c
                    inside = [b for b in bounds if c - k <= b < c]
                    reach = min(s for s in cuts if s >= max(c - k, 0))
                    for s in ([min(inside)] if inside else []) + [reach]:
                        if ("y", t, s, c) in model.col:
                            candidates.add((s, c))
                            break
            if not candidates:
                continue
            s, e = min(
                candidates,
                key=lambda se: (
                    sorted(tput[se[0] : se[1]]),
                    -((se[0] in bounds) + (se[1] in bounds)),
                    -(se[1] - se[0]),
                    se,
                ),
            )
            for layer in range(s, e):
                tput[layer] += x.caps[e - s - 1]
            bounds |= {s, e}
            counts[(t, s, e)] = counts.get((t, s, e), 0) + 1
        return counts

    @staticmethod
    def _shortest(kmax: int) -> int:
        """Shortest span a machine is offered: at least MIN_SPAN_SHARE of what it holds at most."""
        return max(1, math.ceil(kmax * MIN_SPAN_SHARE))

    def _grid(self, L: int, kmax: list[int]) -> int:
        """Layer granularity of starts and ends: 1 unless that makes the MILP too large."""
        step = 1
        while True:
            cuts = sorted(set(range(0, L, step)) | {L})
            arcs = sum(
                sum(
                    1
                    for s in cuts[:-1]
                    for e in cuts
                    if s + self._shortest(k) <= e <= s + k or (e == L and s < e <= s + k)
                )
                for k in kmax
            )
            if arcs <= MAX_ARCS or step >= L:
                return step
            step += 1

    @staticmethod
    def _edges(ctx, ranges, server_flow, L) -> dict[tuple[str, str], float]:
        """Machine-to-machine flows: at every layer boundary, the flow of the servers ending there goes to
        the servers starting there, same zone first (largest first), then across zones."""
        flows: dict[tuple[str, str], float] = {}
        zone = lambda n: ctx.cluster.nodes[n].zone
        for n, (s, e) in ranges.items():
            if s == 0 and server_flow[n] > 1e-9:
                flows[("source", n)] = server_flow[n]
            if e == L and server_flow[n] > 1e-9:
                flows[(n, "sink")] = server_flow[n]
        for r in range(1, L):
            ins = {n: server_flow[n] for n, (s, e) in ranges.items() if e == r and server_flow[n] > 1e-9}
            outs = {n: server_flow[n] for n, (s, e) in ranges.items() if s == r and server_flow[n] > 1e-9}
            for same in (True, False):
                for a in sorted(ins, key=lambda n: -ins[n]):
                    for b in sorted(outs, key=lambda n: -outs[n]):
                        if (zone(a) == zone(b)) != same or ins[a] <= 1e-9 or outs[b] <= 1e-9:
                            continue
                        f = min(ins[a], outs[b])
                        flows[(a, b)] = flows.get((a, b), 0.0) + f
                        ins[a] -= f
                        outs[b] -= f
        return flows


def write_chains(
    ctx: StrategyContext, name: str, paths: list[tuple[list[Spot], float]], notes: str
) -> PlanFile:
    """The plan of Helix-style chains: each (servers, flow) path an instance, requests weighted by the
    flows (every machine then sends each next hop its share of the flow, as Helix's per-hop weighted
    routing), a machine on several chains keeping one KV pool for them (``kv_pool: server``; each
    chain's share, in proportion to its flow there, adds to the pool), and each chain pipelining every
    request on its own with Helix's step budget as Helix's runtime does
    (``per_request_engine``, ``HELIX_STEP_TOKENS``), or, where the scenario caps a batch's sequences, as
    many lanes as leave room for a long request (``lanes_holding_long_requests``)."""
    through: dict[Spot, float] = {}
    for chain, f in paths:
        for s in chain:
            through[s] = through.get(s, 0.0) + f
    writer = PlanWriter(ctx, name)
    weights = {}
    for i, (chain, f) in enumerate(paths):
        shares = [f / through[s] for s in chain]
        lanes = lanes_holding_long_requests(ctx, chain, shares)
        per_request = per_request_engine(ctx)
        settings = (SETTINGS["mixed"][0], HELIX_STEP_TOKENS, HELIX_CHUNK_TOKENS) if per_request else None
        inst = writer.instance(
            f"chain-{i}",
            "mixed",
            chain,
            settings=settings,
            micro_batches=lanes,
            kv_share=shares,
            per_request=per_request,
            pooled_kv=True,
        )
        weights[inst] = round(f, 6)
    return writer.plan(RoutingPlan(policy="weighted", weights=weights), notes=notes)


def decompose(flows: dict[tuple[str, str], float], tol: float = 1e-7) -> list[tuple[list[str], float]]:
    """Split a source -> sink flow into paths with their flows: follow the largest remaining flow out of
    every machine, take the path's bottleneck, subtract it, repeat (layers only increase along an edge,
    so there are no cycles)."""
    rest = {e: f for e, f in flows.items() if f > tol}
    paths = []
    while True:
        hops, node = ["source"], "source"
        while node != "sink":
            out = [(f, b) for (a, b), f in rest.items() if a == node and f > tol]
            if not out:
                break
            node = max(out)[1]
            hops.append(node)
        if node != "sink":
            return paths
        width = min(rest[(a, b)] for a, b in zip(hops, hops[1:]))
        for a, b in zip(hops, hops[1:]):
            rest[(a, b)] -= width
        paths.append((hops[1:-1], width))
