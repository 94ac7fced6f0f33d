"""The planner's explanations: why it chose a plan (the plan's notes and ``hetserve plan``'s reasons) and
why no plan exists (the errors a user sees when nothing fits, the SLOs are out of reach or the rate is)."""

from __future__ import annotations

import math

from ..specs.clusters import Cluster
from ..specs.models import ModelSpec
from ..specs.workloads import SLO
from .allocate import solve
from .candidate import Candidate
from .evaluate import Objective
from .quality import describe_bits, sensitivity_basis
from .templates import Template


def design_of(cand: Candidate) -> str:
    """What kind of plan a candidate is, in words."""
    if not cand.alloc.counts:
        return {
            "chain": "server chain composition (chains sharing servers, JFFC dispatch)",
            "helix": "Helix-style max-flow layer placement",
        }.get(cand.label.split("/")[0], cand.label)
    roles = {i.role for i in cand.dep.instances.values()}
    return (
        "disaggregated prefill/decode"
        if roles <= {"prefill", "decode"}
        else ("colocated (mixed) instances" if roles == {"mixed"} else "mixed and disaggregated instances")
    )


def explain_choice(
    best: Candidate,
    cands: list[Candidate],
    templates: list[Template],
    objective: Objective,
    cluster: Cluster,
    budget: float | None,
    quality: float,
) -> list[str]:
    """Why ``best`` was chosen among ``cands``, in sentences: the design and what it beat, the
    bottleneck, utilisation by GPU type, GPUs left unused, precision traded, pipelines."""
    out = []
    used = [templates[j] for j in best.alloc.counts]
    design = design_of(best)
    value = lambda c: f"{objective.value(c.run):.4g}"
    others = [c for c in cands if design_of(c) != design]
    same = [
        c for c in cands if c is not best and design_of(c) == design and c.alloc.counts != best.alloc.counts
    ]
    comp = []
    if others:
        o = max(others, key=lambda c: c.score)
        comp.append(f"the best {design_of(o).split(' (')[0]} plan simulated {value(o)}")
    if same:
        comp.append(f"the next allocation of this design {value(max(same, key=lambda c: c.score))}")
    vs = f" ({'; '.join(comp)}; this plan {value(best)} {objective.unit})" if comp else ""
    source = f" from the {best.label.split('/')[0]} allocation" if used else ""
    out.append(f"Chose {design}{source}{vs}, routing {best.label.split('/')[1]}.")
    limits = {}
    for t in used:
        limits[t.cap.limit] = limits.get(t.cap.limit, 0) + 1
    if limits:
        main = max(limits, key=limits.get)
        out.append(f"Bottleneck: {limit_text(main)}.")
    by_type: dict[str, list[float]] = {}
    for name, u in best.summary.utilisation.items():
        g = best.dep.servers[name].node.gpu.name
        by_type.setdefault(g, []).append(u)
    util = ", ".join(f"{g} {sum(v) / len(v):.0%}" for g, v in sorted(by_type.items()))
    out.append(f"Utilisation by GPU type: {util}.")
    cluster_types = cluster.gpu_counts()
    used_types = best.dep.gpu_counts()
    idle = [
        f"{n - used_types.get(g, 0)} x {g}"
        for g, n in sorted(cluster_types.items())
        if n > used_types.get(g, 0)
    ]
    if idle:
        out.append(
            f"Left unused: {', '.join(idle)} (adding them did not improve the objective"
            f"{' within the budget' if budget else ''})."
        )
    quant = [t for t in used if t.quantised]
    if quant:
        bits = [b for s in quant[0].stages for b in s.bits]
        out.append(
            f"Traded precision for memory/speed within the quality budget {quality:g}: "
            f"{describe_bits(bits)} on {quant[0].describe().split(': ')[1]}; "
            f"{sensitivity_basis(best.dep.model)}."
        )
    pipes = [t for t in used if len(t.stages) > 1]
    if pipes:
        out.append(f"Pipelines: {pipes[0].describe().split(': ')[1]}.")
    return out


def limit_text(limit: str) -> str:
    """What a capacity limit means, in words."""
    return {
        "ttft": "the TTFT target (prefill queueing)",
        "tpot": "the TPOT target (decode batch size)",
        "e2e": "the E2E target (prefill queueing and decode batch size)",
        "kv": "KV-cache memory",
        "batch": "the maximum batch size",
        "compute": "compute",
        "prefill": "prefill compute",
        "link": "the network carrying KV caches",
    }.get(limit, limit)


def why_nothing_fits(cluster: Cluster, model: ModelSpec, quality: float) -> str:
    """Why no instance holds ``model`` on ``cluster``, and what would."""
    m = model
    gb = 1e9
    total = sum(n.gpu.memory_gb * n.count for n in cluster.nodes.values()) * 0.9
    w16, w4 = m.weight_bytes(16) / gb, m.weight_bytes(4) / gb
    biggest = max(cluster.gpus[g].memory_gb for g in cluster.gpu_counts())
    if w4 < total * 0.85 and quality < 0.75:
        need = w16 - total * 0.85
        return (
            f"{m.name} does not fit at this quality budget: {w16:.0f} GB of weights at 16 bits against "
            f"~{total:.0f} GB usable in the cluster; it fits with 4-bit weights on more layers "
            f"(--quality 0.75 allows all layers at 4 bits, {w4:.0f} GB), or add "
            f"{math.ceil(max(need, 0) / (biggest * 0.9))} more {biggest:.0f} GB GPUs"
        )
    need = w4 - total * 0.85
    return (
        f"{m.name} does not fit: even at 4 bits its weights take {w4:.0f} GB and the cluster has ~{total:.0f} GB "
        f"usable; needs {max(1, math.ceil(need / (biggest * 0.9)))} more {biggest:.0f} GB GPUs"
    )


def why_slo_unreachable(
    templates: list[Template], slo: SLO, model: ModelSpec, prompt: float, output: float, output_q: float
) -> str:
    """Which SLO target no instance reaches, and the best each reaches."""
    q = f"p{slo.percentile:g}"
    best_ttft = (
        min(t.cap.ttft for t in templates if t.role != "decode" and t.cap.ttft > 0)
        if any(t.role != "decode" for t in templates)
        else math.inf
    )
    best_tpot = min(
        (t.cap.tpot for t in templates if t.role != "prefill" and t.cap.tpot > 0), default=math.inf
    )

    def least(role):
        return min((t.cap.e2e for t in templates if t.role == role and t.cap.e2e > 0), default=math.inf)

    best_e2e = min(least("mixed"), least("prefill") + least("decode"))
    parts = []
    if slo.ttft_ms and best_ttft * 1e3 > slo.ttft_ms:
        parts.append(f"best reachable TTFT {q} is {best_ttft:.2f} s (target {slo.ttft_ms / 1e3:.2f} s)")
    if slo.tpot_ms and best_tpot * 1e3 > slo.tpot_ms:
        parts.append(f"best reachable TPOT {q} is {best_tpot * 1e3:.0f} ms (target {slo.tpot_ms:.0f} ms)")
    if slo.e2e_ms and best_e2e * 1e3 > slo.e2e_ms:
        parts.append(
            f"best reachable E2E {q} is {best_e2e:.2f} s for a {q} output of {output_q:.0f} tokens "
            f"(target {slo.e2e_ms / 1e3:.2f} s)"
        )
    if not parts:
        parts.append("no instance meets all of the SLOs at once")
    return (
        f"the workload's SLOs cannot be met on this cluster for {model.name} (mean prompt "
        f"{prompt:.0f}, output {output:.0f} tokens): "
        + "; ".join(parts)
        + "; relax the SLO or add faster GPUs"
    )


def why_rate_unreachable(
    templates: list[Template], pools: dict[str, int], rate: float, budget: float | None, time_limit: float
) -> str:
    """The highest rate the cluster sustains within the SLOs, against the workload's ``rate`` (its MILP
    given ``time_limit`` seconds)."""
    best = solve(templates, pools, "goodput", budget=budget, time_limit=time_limit)
    if best is None:
        return "no allocation meets the SLOs within the inventory and budget"
    within = f" within ${budget:.2f}/h" if budget else ""
    return (
        f"the workload asks for {rate:.2f} req/s but the cluster sustains at most "
        f"{best.rate:.2f} req/s within the SLOs{within} (at ${best.price:.2f}/h); lower the rate, relax the "
        "SLOs, raise the budget or add GPUs"
    )
