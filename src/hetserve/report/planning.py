"""What ``hetserve plan`` reports: the chosen plan's figures as JSON (``--json``) or, for a terminal, a
table of what the workload asks and what the plan sustains, its cost and GPUs, its instances (each chain's
servers with their layers and bits) and the planner's reasons in sentences."""

from __future__ import annotations

from dataclasses import asdict
from typing import TYPE_CHECKING

from .tables import console, key_values, table

if TYPE_CHECKING:
    from ..plan import Deployment
    from ..planner.candidate import PlanResult
    from ..specs.workloads import Workload

#: What each objective chooses, in words, for the title.
OBJECTIVE_WORDS = {
    "cost": "the cheapest plan that carries the workload within its SLOs",
    "power": "the plan of least power that carries the workload within its SLOs",
    "goodput": "the plan with the highest request rate within the SLOs",
    "throughput": "the plan with the most output tokens per second (SLOs not judged)",
    "latency": "the plan with the least mean response time at the workload's rate within its SLOs",
}


def server_bits(bits: int | list[int] | tuple[int, ...]) -> str:
    """A server's weight bits in words: '16', or the widths it mixes ('8/16': some layers at each)."""
    if isinstance(bits, int):
        return str(bits)
    return "/".join(str(b) for b in sorted(set(bits)))


def gpus_in_words(counts: dict[str, int]) -> str:
    """'8 x h100-sxm, 4 x l40s' (most first)."""
    return ", ".join(f"{n} x {g}" for g, n in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))


def weights_in_words(dep: Deployment) -> str:
    """'16-bit (lossless)', '8-bit', or which share of the layers each width holds."""
    layers: dict[int, int] = {}
    for s in dep.servers.values():
        for x in s.plan.layer_bits():
            layers[x] = layers.get(x, 0) + 1
    if set(layers) == {16}:
        return "16-bit (lossless)"
    if len(layers) == 1:
        bits = next(iter(layers))
        released = bits == dep.model.checkpoint_bits
        return f"{bits}-bit" + (" (as released, lossless)" if released else "")
    total = sum(layers.values())
    return ", ".join(f"{b}-bit {n / total:.0%} of layers" for b, n in sorted(layers.items(), reverse=True))


def plan_report(result: PlanResult, written: str, workload: Workload) -> dict:
    """The plan verb's JSON: what the workload asks and what the plan sustains, the objective, the chosen
    plan's simulated figures (units in the names), the search and where the plan was ``written``."""
    s, dep = result.summary, result.deployment
    c = result.carrying
    return {
        "objective": result.objective,
        "objective_value": result.value,
        "objective_unit": result.unit,
        "objective_sense": result.sense,
        "workload": workload.name,
        "workload_rps": c.workload_rps if c else workload.mean_rate,
        "target_rps": c.target_rps if c else None,
        "headroom": c.headroom if c else None,
        "sustained_rps": c.sustained_rps if c else None,
        "sustained_is_lower_bound": c.sustained_is_lower_bound if c else None,
        "steady_window_s": c.steady_window_s if c else None,
        "carries_workload": c.carries if c else None,
        "verdict": c.sentence() if c else None,
        "fixes": c.fixes if c else [],
        "slo": workload.slo.model_dump(),
        "simulated_rps": result.simulated_rps,
        "throughput_tok_s": s.throughput_tok_s,
        "goodput_rps": s.goodput_rps,
        "cost_per_hour": s.cost_per_hour,
        "gpus_used": dep.gpus_used(),
        "gpus_by_type": dep.gpu_counts(),
        "weights": weights_in_words(dep),
        "instances": len(dep.instances),
        "ttft_p90_ms": s.ttft_p90_ms,
        "tpot_p90_ms": s.tpot_p90_ms,
        "slo_attainment": s.slo_attainment,
        "joules_per_token": s.joules_per_token,
        "search_seconds": result.seconds,
        "searched": asdict(result.searched),
        "predicted": asdict(result.predicted),
        "reasons": result.reasons,
        "plan": written,
        "alternatives": [asdict(a) for a in result.alternatives],
        "servers": [
            {
                "server": srv.name,
                "node": srv.node.name,
                "gpu": srv.node.gpu.name,
                "tp": srv.plan.tp,
                "layers": list(srv.plan.layers),
                "bits": srv.plan.bits,
            }
            for srv in dep.servers.values()
        ],
    }


def print_plan(result: PlanResult, report: dict, title: str, cluster_gpus: int) -> None:
    """For a terminal: the figures with their units, the instances (each chain's servers) and the reasons."""
    s, dep = result.summary, result.deployment
    c = result.carrying
    rows: list[tuple[str, str]] = [("workload", f"{report['workload']}: SLOs {slo_in_words(report)}")]
    if c is not None:
        sized = f"planned for {c.target_rps:.3g} req/s (--headroom {c.headroom:g})" if c.headroom else ""
        rows.append(("asks", f"{c.workload_rps:.3g} req/s"))
        sustains = f"{c.sustains()} ({c.room()})" if c.sustained_rps > 0 else "no rate tried within the SLOs"
        rows.append(("sustains", sustains + (f"; {sized}" if sized else "")))
    elif result.objective == "throughput":
        rows.append(("output", f"{s.throughput_tok_s:,.0f} tok/s"))
    rows += [
        ("cost", f"${s.cost_per_hour:,.2f}/h"),
        ("GPUs", f"{dep.gpus_used()} of {cluster_gpus}: {gpus_in_words(dep.gpu_counts())}"),
        ("instances", instances_in_words(dep)),
        ("weights", report["weights"]),
        ("simulated", simulated_in_words(result)),
        (
            "search",
            f"{result.seconds:.1f} s: {result.searched.templates} candidate instances, "
            f"{result.searched.allocations} allocations, {result.searched.simulated} plans simulated",
        ),
    ]
    key_values(title, rows)
    table(
        "Instances",
        ["instance", "role", "servers (node, GPUs, layers, weight bits)"],
        [
            (
                i.name,
                i.role,
                " -> ".join(
                    f"{srv.node.name} {srv.plan.tp} x {srv.node.gpu.name} layers {srv.plan.layers[0]}-"
                    f"{srv.plan.layers[1] - 1} {server_bits(srv.plan.bits)}-bit"
                    + (" expert-parallel" if srv.plan.expert_parallel else "")
                    for srv in i.servers
                ),
            )
            for i in dep.instances.values()
        ],
    )
    console.print("Why this plan", style="bold", highlight=False)
    for r in result.reasons:
        console.print(f"- {r}", highlight=False)
    if c is not None:
        style = "bold green" if c.carries else "bold red"
        console.print(c.sentence(), style=style, highlight=False)
        for fix in c.fixes:
            console.print(f"  to carry it: {fix}", highlight=False)
    written = [report["plan"], *report.get("pictures", [])]
    console.print(f"wrote {', '.join(written)}", highlight=False)


def slo_in_words(report: dict) -> str:
    slo = report["slo"]
    q = f"p{slo['percentile']:g}"
    parts = [
        f"{name} {q} <= {slo[key]:,.0f} ms"
        for name, key in (("TTFT", "ttft_ms"), ("TPOT", "tpot_ms"), ("E2E", "e2e_ms"))
        if slo.get(key) is not None
    ]
    return ", ".join(parts) or "none"


def instances_in_words(dep: Deployment) -> str:
    """'17: 9 prefill, 7 decode, 1 mixed'."""
    roles: dict[str, int] = {}
    for i in dep.instances.values():
        roles[i.role] = roles.get(i.role, 0) + 1
    return f"{len(dep.instances)}: " + ", ".join(f"{n} {r}" for r, n in roles.items())


def simulated_in_words(result: PlanResult) -> str:
    """The confirming simulation's figures at the rate it was offered, with units."""
    s = result.summary
    q = f"p{s.slo_percentile:g}"
    parts = [f"at {result.simulated_rps:.3g} req/s"]
    if s.ttft_q_ms is not None:
        parts.append(f"TTFT {q} {s.ttft_q_ms:,.0f} ms")
    if s.tpot_q_ms is not None:
        parts.append(f"TPOT {q} {s.tpot_q_ms:,.1f} ms")
    parts.append(f"{s.slo_attainment:.1%} of requests within the SLOs")
    parts.append(f"{s.throughput_tok_s:,.0f} output tok/s")
    if s.dropped:
        parts.append(f"{s.dropped} requests dropped")
    return ", ".join(parts)
