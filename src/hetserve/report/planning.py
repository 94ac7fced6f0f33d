"""What ``hetserve plan`` reports: the chosen plan's figures as JSON (``--json``) or as a table of its
figures and instances followed by the planner's reasons."""

from __future__ import annotations

from dataclasses import asdict
from typing import TYPE_CHECKING

from .tables import key_values, table

if TYPE_CHECKING:
    from ..planner.candidate import PlanResult

#: The figures the table shows, in order.
TABLE_FIGURES = (
    "objective_value",
    "throughput_tok_s",
    "goodput_rps",
    "cost_per_hour",
    "gpus_used",
    "gpus_by_type",
    "instances",
    "ttft_p90_ms",
    "tpot_p90_ms",
    "slo_attainment",
    "search_seconds",
)


def plan_report(result: PlanResult, written: str) -> dict:
    """The plan verb's JSON: the objective, the chosen plan's simulated figures, the search and where
    the plan was ``written``."""
    s, dep = result.summary, result.deployment
    return {
        "objective": result.objective,
        "objective_value": result.value,
        "objective_sense": result.sense,
        "throughput_tok_s": s.throughput_tok_s,
        "goodput_rps": s.goodput_rps,
        "cost_per_hour": s.cost_per_hour,
        "gpus_used": dep.gpus_used(),
        "gpus_by_type": dep.gpu_counts(),
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
    }


def print_plan(result: PlanResult, report: dict, title: str) -> None:
    """The figures, the instances (each chain's servers) and the reasons, for a terminal."""
    key_values(title, [(k, report[k]) for k in TABLE_FIGURES])
    table(
        "Instances",
        ["instance", "role", "chain (server: node, GPUs, layers, bits)"],
        [
            (
                i.name,
                i.role,
                "; ".join(
                    f"{srv.name}: {srv.node.name} x{srv.plan.tp} L{srv.plan.layers[0]}-"
                    f"{srv.plan.layers[1] - 1} {srv.plan.bits if isinstance(srv.plan.bits, int) else 'mixed'}"
                    for srv in i.servers
                ),
            )
            for i in result.deployment.instances.values()
        ],
    )
    for r in result.reasons:
        print(f"- {r}")
    print(f"wrote {report['plan']}")
