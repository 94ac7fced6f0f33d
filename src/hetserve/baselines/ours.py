"""``hetserve``: ours, the planner of ``hetserve plan`` (docs/planner.md), as a strategy."""

from __future__ import annotations

from ..plan import PlanFile
from ..planner.search import Planner
from ..planner.strategy import Strategy, StrategyContext


class Hetserve(Strategy):
    name = "hetserve"
    summary = "hetserve's planner: templates, allocation MILP, simulated confirmation"

    def plan(self, ctx: StrategyContext) -> PlanFile:
        planner = Planner(
            ctx.cluster,
            ctx.model,
            ctx.workload,
            ctx.objective,
            cluster_ref=ctx.cluster_ref,
            model_ref=ctx.model_ref,
            budget=ctx.budget,
            quality=ctx.quality,
            seed=ctx.seed,
            time_limit=max(ctx.time_left(), 1.0),
            max_seqs=ctx.max_seqs,
        )
        return planner.run().plan
