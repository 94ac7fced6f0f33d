"""``homogeneous``: the best single GPU type at the same budget, replicas only.

What an operator without a heterogeneity-aware planner deploys: identical replicas of one instance
shape (tensor parallel inside a node; pipeline stages over nodes of that type only when one node
cannot hold the model), colocated prefill and decode, 16-bit weights (the quality budget is used only
when no GPU type holds the model at 16 bits). For every GPU type the allocation MILP picks the number
of replicas (and the TP degree) for the objective within the budget; the type with the best analytic
objective wins. Requests go to the replica with the least outstanding work.
"""

from __future__ import annotations

from ..errors import HetserveError
from ..plan import PlanFile
from ..planner.allocate import solve
from ..planner.build import PlacementError
from ..planner.evaluate import OBJECTIVES
from ..planner.pools import pools_of
from ..planner.strategy import Strategy, StrategyContext


class Homogeneous(Strategy):
    name = "homogeneous"
    summary = "the best single GPU type at the same budget, identical replicas, 16-bit"

    def plan(self, ctx: StrategyContext) -> PlanFile:
        for quality in (0.0, ctx.quality) if ctx.quality > 0 else (0.0,):
            best = self._best(ctx, quality)
            if best is not None:
                gpu, templates, alloc = best
                notes = (
                    f"Homogeneous baseline: {sum(alloc.counts.values())} replicas on {gpu} "
                    f"(${alloc.price:.2f}/h)."
                )
                try:
                    return ctx.build_plan(templates, alloc, f"homogeneous-{gpu}", notes=notes)
                except PlacementError as exc:
                    raise HetserveError(
                        f"homogeneous: replicas on {gpu} do not pack into its nodes: {exc}"
                    ) from None
        within = f" within ${ctx.budget:.2f}/h" if ctx.budget else ""
        raise HetserveError(
            f"homogeneous: no single GPU type of {ctx.cluster.name} holds a replica of "
            f"{ctx.model.name} that serves the workload{within}; it needs a heterogeneous plan"
        )

    def _best(self, ctx: StrategyContext, quality: float):
        factory = ctx.factory(quality)
        by_type: dict[str, list] = {}
        for pool in pools_of(ctx.cluster):
            by_type.setdefault(pool.gpu.name, []).append(pool)
        objective = OBJECTIVES[ctx.objective]
        best = None
        for gpu, pools in sorted(by_type.items()):
            templates = [t for p in pools for t in factory.single_pool(p) if t.role == "mixed"]
            if not templates:
                continue
            fewest = min(len(t.stages) for t in templates)
            templates = [t for t in templates if len(t.stages) == fewest]  # replicas: no needless pipelines
            alloc = solve(
                templates,
                {p.key: p.total for p in pools},
                ctx.objective,
                rate=ctx.rate,
                budget=ctx.budget,
                time_limit=max(1.0, ctx.time_limit / 10),
                roles={"mixed"},
            )
            if alloc is None:
                continue
            if best is None or objective.better(alloc.objective, best[2].objective):
                best = (gpu, templates, alloc)
        return best
