"""``uniform``: all GPUs in one pipeline, layers split evenly, one precision (PipeEdge-style).

The reference LLM-PQ measures itself against: every GPU is one pipeline stage (in the cluster file's
node order, GPUs of a node next to each other), each stage holds the same number of layers, and every
layer has the same bit-width: the widest of 16/8/4/3 at which every stage fits in memory with room for
a request's KV cache (and which the quality budget allows). A pipeline never spans vendors, so a
multi-vendor cluster gets one such pipeline per vendor. The pipeline keeps one micro-batch per stage in
flight, or fewer if each micro-batch's share of the KV cache would not hold a request. Nothing here
looks at how fast a GPU is: that is the point of the baseline.
"""

from __future__ import annotations

from ..errors import HetserveError
from ..plan import PlanFile, RoutingPlan
from ..planner.pools import SETTINGS, split_even
from ..planner.strategy import PlanWriter, Strategy, StrategyContext, estimate, spot


def node_gpus(ctx: StrategyContext, vendor: str) -> list[tuple[str, int]]:
    """(node, GPU index) of every GPU of ``vendor``, in the cluster file's order."""
    return [(n.name, g) for n in ctx.cluster.nodes.values() if n.gpu.vendor == vendor for g in range(n.count)]


class Uniform(Strategy):
    name = "uniform"
    summary = "all GPUs in one pipeline, layers split evenly, one precision (PipeEdge-style)"

    def plan(self, ctx: StrategyContext) -> PlanFile:
        vendors = sorted({n.gpu.vendor for n in ctx.cluster.nodes.values()})
        writer = PlanWriter(ctx, f"uniform-{ctx.model.name}")
        L = ctx.model.num_layers
        chosen = []
        problems = []
        for vendor in vendors:
            gpus = node_gpus(ctx, vendor)[:L]
            spans = split_even(L, len(gpus))
            settings = SETTINGS["mixed"]
            for bits in ctx.uniform_bit_choices():
                chain = [spot(node, [g], a, b, bits) for (node, g), (a, b) in zip(gpus, spans)]
                lanes = next(
                    (
                        m
                        for m in range(len(chain), 0, -1)
                        if estimate(ctx, "mixed", chain, settings=settings, micro_batches=m).fits
                    ),
                    0,
                )
                if lanes:
                    chosen.append((vendor, chain, bits, lanes))
                    break
            else:
                problems.append(
                    f"{vendor}: {len(gpus)} GPUs with {L} layers split evenly do not fit at any "
                    f"one precision in {ctx.uniform_bit_choices()}"
                )
        if not chosen:
            raise HetserveError("uniform: " + "; ".join(problems) + " (raise the quality budget or add GPUs)")
        for vendor, chain, _bits, lanes in chosen:
            writer.instance(
                f"pipeline-{vendor}", "mixed", chain, settings=SETTINGS["mixed"], micro_batches=lanes
            )
        desc = ", ".join(
            f"{len(c)} stages of {c[0].layers}-{max(s.layers for s in c)} layers at {b}-bit on {v}"
            for v, c, b, _ in chosen
        )
        return writer.plan(RoutingPlan(), notes=f"Uniform baseline: {desc}.")
