"""What ``hetserve export --nearest`` costs: the nearest expressible plan written back as a plan, and both
plans simulated on the same requests (``export --workload W``), so the change an engine forces is
reported as figures, not only as a list of edits."""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import HetserveError
from ..plan import Deployment, InstancePlan, PlanFile, ServerPlan
from .common import InstanceAsk


def plan_of_asks(dep: Deployment, asks: list[InstanceAsk]) -> PlanFile:
    """The plan the (nearest) asks describe: their servers and instances, the plan's routing kept for the
    instances that remain."""
    servers: dict[str, ServerPlan] = {}
    instances = []
    for a in asks:
        for s in a.stages:
            bits = s.bits[0] if len(set(s.bits)) == 1 else list(s.bits)
            servers.setdefault(
                s.server,
                ServerPlan(
                    name=s.server,
                    node=s.node,
                    gpus=list(s.gpus),
                    layers=s.layers,
                    bits=bits,
                    kv_dtype=s.kv_dtype,
                    kv_layout=s.kv_layout,
                    expert_parallel=s.expert_parallel,
                ),
            )
        share = {s.server: s.kv_share for s in a.stages}
        instances.append(
            InstancePlan(
                name=a.name,
                role=a.role,
                chain=[s.server for s in a.stages],
                max_batch_size=a.max_batch_size,
                max_batch_tokens=a.max_batch_tokens,
                chunk_size=a.chunk_size,
                policy=a.policy,
                micro_batches=a.micro_batches,
                pipelining=a.pipelining,
                kv_share=share if len(set(share.values())) > 1 else next(iter(share.values())),
                block_size=a.block_size,
            )
        )
    kept = {a.name for a in asks}
    r = dep.spec.routing
    prefill = {a.name for a in asks if a.role == "prefill"}
    routing = r.model_copy(
        update={
            "weights": {k: w for k, w in r.weights.items() if k in kept},
            "handoff_weights": {
                p: {d: w for d, w in ws.items() if d in kept}
                for p, ws in r.handoff_weights.items()
                if p in prefill
            },
        }
    )
    return dep.spec.model_copy(
        update={
            "name": f"{dep.spec.name}-nearest",
            "servers": list(servers.values()),
            "instances": instances,
            "routing": routing,
            "predicted": {},
        }
    )


@dataclass(frozen=True)
class PlanFigures:
    """One plan simulated on the export's workload."""

    goodput_rps: float  # highest offered rate within the SLOs
    throughput_tok_s: float  # at the workload's rate
    ttft_p90_ms: float | None
    tpot_p90_ms: float | None
    cost_per_hour: float


@dataclass(frozen=True)
class NearestCost:
    workload: str
    offered_rps: float
    planned: PlanFigures
    nearest: PlanFigures | None
    #: why the nearest plan cannot run at all (None when it can)
    unusable: str | None = None

    def lines(self) -> list[str]:
        """The comparison, a line per figure, for the README and the terminal."""
        p, n = self.planned, self.nearest
        if n is None:
            return [
                f"Simulated on `{self.workload}`: the plan reaches {p.goodput_rps:,.2f} req/s within its SLOs; "
                f"the nearest plan cannot run at all ({self.unusable}).",
            ]

        def row(what: str, a: float | None, b: float | None, unit: str, digits: int = 1) -> str:
            if a is None or b is None:
                return f"- {what}: {_fmt(a, digits)} -> {_fmt(b, digits)} {unit}"
            change = f" ({(b / a - 1) * 100:+.0f}%)" if a else ""
            return f"- {what}: {a:,.{digits}f} -> {b:,.{digits}f} {unit}{change}"

        return [
            f"Simulated on `{self.workload}` (the same requests for both plans, hetserve's cost model):",
            "",
            row("goodput (highest rate within the SLOs)", p.goodput_rps, n.goodput_rps, "req/s", 2),
            row(f"output at {self.offered_rps:.3g} req/s", p.throughput_tok_s, n.throughput_tok_s, "tok/s"),
            row("TTFT p90", p.ttft_p90_ms, n.ttft_p90_ms, "ms", 0),
            row("TPOT p90", p.tpot_p90_ms, n.tpot_p90_ms, "ms", 0),
            row("cost", p.cost_per_hour, n.cost_per_hour, "$/h", 2),
        ]


def _fmt(x: float | None, digits: int) -> str:
    return "-" if x is None else f"{x:,.{digits}f}"


def simulate_change(
    dep: Deployment, asks: list[InstanceAsk], workload_path: str, seed: int = 0
) -> NearestCost:
    """Both plans on the workload: the planned one and the nearest expressible one."""
    from ..compare import Evaluator
    from ..specs.workloads import Workload

    workload = Workload.load(workload_path)
    ev = Evaluator(workload, seed, workload.spec.duration_s)

    def figures(d: Deployment) -> PlanFigures:
        base = ev.run(d)
        rate, _ = ev.max_rate(d, base.slo_met)
        s = base.summary
        return PlanFigures(rate, s.throughput_tok_s, s.ttft_p90_ms, s.tpot_p90_ms, s.cost_per_hour)

    planned = figures(dep)
    try:
        near = Deployment(plan_of_asks(dep, asks), dep.cluster, dep.model, source="nearest plan")
    except HetserveError as exc:  # e.g. a stage whose TP was cut no longer holds its layers
        return NearestCost(workload.name, ev.rate, planned, None, str(exc).removeprefix("nearest plan: "))
    return NearestCost(workload.name, ev.rate, planned, figures(near))
