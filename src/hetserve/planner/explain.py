"""The planner's explanations: why it chose a plan (the plan's notes and ``hetserve plan``'s reasons) and
why no plan exists (the errors a user sees when nothing fits, the SLOs are out of reach or the rate is)."""

from __future__ import annotations

import math

from ..sim.metrics import SimSummary
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
    weight_bits: int | None = None,
    bits_asked: bool = True,
) -> list[str]:
    """Why ``best`` was chosen among ``cands``, in sentences: the design and what it beat, the
    bottleneck, utilisation by GPU type, GPUs left unused, precision traded, pipelines."""
    out = []
    used = [templates[j] for j in best.alloc.counts]
    design = design_of(best)
    unit = objective.unit
    value = lambda c: f"{objective.value(c.run):.4g}"
    others = [c for c in cands if design_of(c) != design]
    same = [
        c for c in cands if c is not best and design_of(c) == design and c.alloc.counts != best.alloc.counts
    ]
    comp = []
    if others:
        o = max(others, key=lambda c: c.score)
        comp.append(f"the best {design_of(o).split(' (')[0]} plan simulated {value(o)} {unit}")
    if same:
        comp.append(f"another allocation of this design {value(max(same, key=lambda c: c.score))} {unit}")
    if best.searched is None:
        figure = f"this plan {value(best)} {unit}" + (f"; against it {', '.join(comp)}" if comp else "")
    else:  # its figure is a steady window's; the others' are the search's short windows'
        searched = f"{objective.value(best.searched):.4g} {unit} in the search's short windows"
        figure = f"this plan {value(best)} {unit} over a steady window ({searched}" + (
            f", where {', '.join(comp)})" if comp else ")"
        )
    out.append(
        f"Chose {design} ({roles_in_words(best)}): {figure}; "
        f"requests are routed {ROUTING_WORDS.get(best.label.split('/')[1], best.label.split('/')[1])}."
    )
    memory = memory_in_words(best)
    if memory:
        out.append(memory)
    limits = {}
    for t in used:
        limits[t.cap.limit] = limits.get(t.cap.limit, 0) + 1
    if limits:
        main = max(limits, key=limits.get)
        out.append(f"What binds: {limit_text(main)}; {LIMIT_FIX.get(main, '')}".rstrip("; ") + ".")
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
        if weight_bits and not bits_asked:
            out.append(
                f"Every layer's weights at {weight_bits} bits, as released: {best.dep.model.name}'s checkpoint "
                f"is FP8, so this is lossless (--weight-bits 16 would upcast it)."
            )
        elif weight_bits:
            out.append(
                f"Every layer's weights at {weight_bits} bits, as asked (--weight-bits {weight_bits})."
            )
        else:
            out.append(
                f"Traded precision for memory/speed as asked (the quality budget {quality:g}): "
                f"{describe_bits(bits)} on {quant[0].describe().split(': ')[1]}; "
                f"{sensitivity_basis(best.dep.model)}."
            )
    pipes = [t for t in used if len(t.stages) > 1]
    if pipes:
        out.append(f"Pipelines: {pipes[0].describe().split(': ')[1]}.")
    return out


#: How a plan's requests are routed, in words.
ROUTING_WORDS = {
    "least-work": "to the instance with the least outstanding work",
    "weighted": "in proportion to each instance's capacity",
    "jffc": "to the fastest chain with a free slot (JFFC)",
}

#: What raises a plan's capacity when this limit binds.
LIMIT_FIX = {
    "ttft": "more prefill capacity (faster GPUs or more of them for prefill) or a looser TTFT target",
    "tpot": "smaller decode batches on more GPUs, faster GPUs, or a looser TPOT target",
    "e2e": "faster GPUs or a looser E2E target",
    "kv": "GPUs with more memory, fewer layers per GPU (more pipeline stages) or lower-bit weights",
    "batch": "a higher --max-batch-size if the engine allows it",
    "compute": "faster GPUs or more of them",
    "prefill": "faster GPUs or more of them for prefill",
    "link": "a faster network between the prefill and decode servers, or placing them on one node",
}


def roles_in_words(cand: Candidate) -> str:
    """'prefill on 1 x mi300x, decode on 1 x mi300x' or '4 instances on 8 x h100-sxm'."""
    by_role: dict[str, dict[str, int]] = {}
    count: dict[str, int] = {}
    seen: set[tuple[str, str]] = set()  # a server shared by chains counts once per role
    for inst in cand.dep.instances.values():
        count[inst.role] = count.get(inst.role, 0) + 1
        gpus = by_role.setdefault(inst.role, {})
        for srv in inst.servers:
            if (inst.role, srv.name) not in seen:
                seen.add((inst.role, srv.name))
                gpus[srv.node.gpu.name] = gpus.get(srv.node.gpu.name, 0) + srv.num_gpus
    parts = []
    for role, gpus in by_role.items():
        on = ", ".join(f"{n} x {g}" for g, n in sorted(gpus.items(), key=lambda kv: -kv[1]))
        what = "serving both phases" if role == "mixed" else role
        parts.append(f"{count[role]} instance{'s' if count[role] > 1 else ''} {what} on {on}")
    return "; ".join(parts)


def memory_in_words(cand: Candidate) -> str:
    """Why the instances span the GPUs they do: the weights' size against a GPU's memory."""
    m = cand.dep.model
    sizes = []
    for inst in cand.dep.instances.values():
        sizes.append((len(inst.servers), sum(s.num_gpus for s in inst.servers), inst))
    if not sizes:
        return ""
    stages, gpus, inst = max(sizes, key=lambda x: (x[1], x[0]))
    gpu = inst.servers[0].node.gpu
    widths = {b for srv in inst.servers for b in srv.plan.layer_bits()}
    bits = widths.pop() if len(widths) == 1 else 16
    weights = m.weight_bytes(bits) / 1e9
    if gpus == 1:
        return (
            f"One {gpu.name} ({gpu.memory_gb:g} GB) holds the whole model ({weights:.0f} GB at {bits} bits) "
            "and its KV cache, so no instance needs tensor or pipeline parallelism."
        )
    shape = "tensor-parallel" if stages == 1 else f"a {stages}-stage pipeline"
    if any(srv.plan.expert_parallel for srv in inst.servers):
        shape += (
            " with expert parallelism (the routed experts spread whole over the GPUs, attention data-parallel: "
            "each GPU keeps its own sequences' KV instead of a copy of every one"
            + (", as multi-head latent attention would need under tensor parallelism)" if m.mla else ")")
        )
    why = (
        f"the weights ({weights:.0f} GB at {bits} bits) and KV cache need more than one {gpu.name} "
        f"({gpu.memory_gb:g} GB)"
        if weights > gpu.memory_gb * 0.8
        else "splitting the work makes each request's steps faster (the SLOs) or leaves more room for "
        "the KV cache (batch size)"
    )
    return f"The largest instance, {inst.name}, runs on {gpus} GPUs as {shape}: {why}."


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


def why_nothing_fits(
    cluster: Cluster,
    model: ModelSpec,
    quality: float,
    weight_bits: int | None = None,
    bits_asked: bool = True,
) -> str:
    """Why no instance holds ``model`` on ``cluster``, and what would."""
    m = model
    gb = 1e9
    total = sum(n.gpu.memory_gb * n.count for n in cluster.nodes.values()) * 0.9
    w16, w4 = m.weight_bytes(16) / gb, m.weight_bytes(4) / gb
    biggest = max(cluster.gpus[g].memory_gb for g in cluster.gpu_counts())
    if weight_bits is not None:
        w = m.weight_bytes(weight_bits) / gb
        need = w - total * 0.85
        lower = " or fewer --weight-bits" if weight_bits > 4 else ""
        at = (
            f"--weight-bits {weight_bits}"
            if bits_asked
            else f"{weight_bits} bits (its checkpoint's, lossless)"
        )
        return (
            f"{m.name} does not fit at {at}: {w:.0f} GB of weights against "
            f"~{total:.0f} GB usable in the cluster (less room for the KV cache); add "
            f"{max(1, math.ceil(max(need, 0) / (biggest * 0.9)))} or more {biggest:.0f} GB GPUs{lower}"
        )
    if w4 < total * 0.85 and quality < 0.75:
        need = w16 - total * 0.85
        lossless = "lossless (16-bit weights)" if quality == 0 else f"quality budget {quality:g}"
        return (
            f"{m.name} does not fit {lossless}: {w16:.0f} GB of weights at 16 bits against "
            f"~{total:.0f} GB usable in the cluster; add {math.ceil(max(need, 0) / (biggest * 0.9))} or more "
            f"{biggest:.0f} GB GPUs, or allow lower-bit weights: --weight-bits 8 or 4 (every layer; "
            f"{w4:.0f} GB at 4 bits) or --quality Q (the planner picks the layers, up to 0.75)"
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
    templates: list[Template],
    pools: dict[str, int],
    rate: float,
    headroom: float,
    budget: float | None,
    time_limit: float,
) -> str:
    """The highest rate the cluster sustains within the SLOs, against the workload's ``rate`` plus the
    ``headroom`` (its MILP given ``time_limit`` seconds), and what would carry it."""
    best = solve(templates, pools, "goodput", budget=budget, time_limit=time_limit)
    if best is None:
        return "no allocation meets the SLOs within the inventory and budget"
    within = f" within ${budget:.2f}/h" if budget else ""
    asked = f"{rate:.3g} req/s"
    if headroom > 0:
        asked += f" (with --headroom {headroom:g}: {rate * (1 + headroom):.3g} req/s)"
    fixes = []
    if headroom > 0 and best.rate >= rate:
        fixes.append(f"lower --headroom to {max(best.rate / rate - 1, 0):.2f} or less")
    fixes += how_to_carry(templates, pools, rate * (1 + headroom), budget, time_limit)
    return (
        f"the workload asks for {asked} but the cluster sustains at most {best.rate:.3g} req/s within "
        f"the SLOs{within} (at ${best.price:.2f}/h, analytic); to carry it: " + "; or ".join(fixes)
    )


def how_to_carry(
    templates: list[Template],
    pools: dict[str, int],
    rate: float,
    budget: float | None,
    time_limit: float,
) -> list[str]:
    """The nearest changes that let an allocation carry ``rate`` within the SLOs (analytically): the
    budget it needs when the budget binds, else the GPUs to add (the instance type carrying the most
    requests per dollar) and, always, lowering the rate or relaxing the SLOs."""
    fixes = []
    if budget is not None:
        free = solve(templates, pools, "cost", rate=rate, time_limit=time_limit)
        if free is not None and free.price > budget:
            fixes.append(f"raise --budget to ${math.ceil(free.price * 100 - 1e-6) / 100:.2f}/h")
    most = solve(templates, pools, "goodput", time_limit=time_limit)
    have = most.rate if most is not None else 0.0
    whole = [t for t in templates if t.role == "mixed" and t.cap.rate > 0]
    if have < rate and whole:
        t = max(whole, key=lambda t: (t.cap.rate / t.price, t.cap.rate))
        count = math.ceil((rate - have) / t.cap.rate)
        per_type: dict[str, int] = {}
        for st in t.stages:
            per_type[st.pool.gpu.name] = per_type.get(st.pool.gpu.name, 0) + st.tp
        gpus = ", ".join(f"{n * count} x {g}" for g, n in sorted(per_type.items()))
        fixes.append(
            f"add GPUs: about {gpus} ({count} more instance{'s' if count > 1 else ''} of "
            f"{t.describe().split(': ')[-1]}, {t.cap.rate:.3g} req/s each at ${t.price:.2f}/h)"
        )
    fixes.append("lower the workload's rate or relax its SLOs")
    return fixes


def slo_reached(summary: SimSummary, slo: SLO, rate: float) -> str:
    """The SLO a plan would need at ``rate``: its simulated percentiles there, against the targets."""
    q = f"p{slo.percentile:g}"
    parts = []
    for name, target, got in (
        ("TTFT", slo.ttft_ms, summary.ttft_q_ms),
        ("TPOT", slo.tpot_ms, summary.tpot_q_ms),
        ("E2E", slo.e2e_ms, summary.e2e_q_ms),
    ):
        if target is not None and (got is None or got > target):
            shown = "unfinished requests" if got is None else f"{got:,.0f} ms"
            parts.append(f"{name} {q} {shown} (target {target:,.0f} ms)")
    dropped = f", {summary.dropped} requests dropped" if summary.dropped else ""
    return (
        f"relax the SLOs: at {rate:.3g} req/s this plan simulates "
        + ("; ".join(parts) or "within the percentiles")
        + dropped
    )
