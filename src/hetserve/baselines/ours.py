"""``hetserve``: ours, the planner of ``hetserve plan`` (docs/planner.md), as a strategy."""

from __future__ import annotations

from ..plan import PlanFile
from ..planner.search import Planner
from ..planner.strategy import Strategy, StrategyContext

#: Quality budget of ``hetserve-q`` when the scenario keeps 16-bit weights: up to 30% of the
#: sensitivity-weighted weight bits may be removed (docs/planner.md, "Quality").
QUANTISED_QUALITY = 0.3


class Hetserve(Strategy):
    name = "hetserve"
    summary = (
        "hetserve's planner at the scenario's quality: templates, allocation MILP, simulated confirmation"
    )

    def quality(self, ctx: StrategyContext) -> float:
        return ctx.quality

    def plan(self, ctx: StrategyContext) -> PlanFile:
        planner = Planner(
            ctx.cluster,
            ctx.model,
            ctx.workload,
            ctx.objective,
            cluster_ref=ctx.cluster_ref,
            model_ref=ctx.model_ref,
            budget=ctx.budget,
            quality=self.quality(ctx),
            seed=ctx.seed,
            time_limit=max(ctx.time_left(), 1.0),
            max_seqs=ctx.max_seqs,
        )
        return planner.run().plan


class HetserveQuantised(Hetserve):
    """hetserve's planner allowed to quantise where the scenario keeps 16-bit weights: a labelled row of
    its own, never the headline (the baselines it is compared with run at the scenario's quality)."""

    name = "hetserve-q"
    summary = f"hetserve's planner with quality budget {QUANTISED_QUALITY} (or the scenario's, if higher)"

    def quality(self, ctx: StrategyContext) -> float:
        return max(ctx.quality, QUANTISED_QUALITY)
