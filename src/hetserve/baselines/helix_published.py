"""``helix-published``: the layout Helix's authors published for their 24-machine cluster, as a plan.

Helix's artifact (github.com/Thesys-lab/Helix-ASPLOS25, ``artifact_evaluation/single_cluster/
layout_llama70b/ilp/ilp_solution.sol`` with the machine types of ``config/cluster24.ini``) gives the
placement its MILP found for Llama-2-70B (80 layers, 16-bit) on 4 A100-40GB, 8 L4 and 12 T4 machines:
each machine's first layer and layer count, and the flow (tokens/s in Helix's profile) on every edge.
The flow is one trunk through layers 0-26, three paths through the middle and one tail from layer 60;
decomposed into source-to-sink paths it is the three chains below, with flows 226.15, 531.70 and
531.70. Every machine's span meets the next one's start exactly, so each chain is a plan instance as
written, and a machine on several chains gives each a KV share in proportion to its flow there, as the
``helix`` strategy does for the flows its own MILP finds.

The strategy runs only where the layout applies: Llama-2-70B (or a model of the same 80-layer layout)
on a cluster with at least 4 single-GPU A100-40GB, 8 L4 and 12 T4 machines, taken in cluster-file order.
"""

from __future__ import annotations

from ..errors import HetserveError
from ..plan import PlanFile
from ..planner.placement.helix import write_chains
from ..planner.strategy import Strategy, StrategyContext, spot

#: The published machines: (GPU, first layer, layers held), keyed by the artifact's compute node id.
MACHINES: dict[int, tuple[str, int, int]] = {
    0: ("l4", 7, 4),
    1: ("t4", 34, 4),
    2: ("t4", 23, 2),
    3: ("l4", 53, 7),
    4: ("t4", 77, 3),
    5: ("l4", 53, 7),
    6: ("a100-40gb", 68, 9),
    7: ("t4", 26, 4),
    8: ("t4", 30, 4),
    9: ("a100-40gb", 37, 12),
    10: ("a100-40gb", 60, 8),
    11: ("l4", 42, 7),
    12: ("t4", 33, 4),
    13: ("t4", 38, 4),
    14: ("l4", 3, 4),
    15: ("t4", 0, 3),
    16: ("t4", 11, 3),
    17: ("a100-40gb", 14, 9),
    18: ("l4", 46, 7),
    19: ("t4", 42, 4),
    20: ("t4", 25, 1),
    21: ("l4", 53, 7),
    22: ("t4", 49, 4),
    23: ("l4", 26, 7),
}
_TRUNK = (15, 14, 0, 16, 17, 2, 20)
_TAIL = (10, 6, 4)
#: The published flow decomposed into chains of machine ids, with each chain's flow.
CHAINS: tuple[tuple[tuple[int, ...], float], ...] = (
    (_TRUNK + (7, 8, 1, 13, 11, 22, 3) + _TAIL, 226.15),
    (_TRUNK + (7, 8, 1, 13, 19, 18, 21) + _TAIL, 531.70),
    (_TRUNK + (23, 12, 9, 22, 5) + _TAIL, 531.70),
)
LAYERS = 80


class HelixPublished(Strategy):
    name = "helix-published"
    summary = "the layout Helix's authors published for Llama-2-70B on their 24-machine cluster"

    def applies(self, ctx: StrategyContext) -> bool:
        try:
            self._check_model(ctx)
            self.machines(ctx)
        except HetserveError:
            return False
        return True

    @staticmethod
    def _check_model(ctx: StrategyContext) -> None:
        if ctx.model.num_layers != LAYERS:
            raise HetserveError(
                f"helix-published: the published layout places Llama-2-70B's {LAYERS} layers; "
                f"{ctx.model.name} has {ctx.model.num_layers}"
            )

    def machines(self, ctx: StrategyContext) -> dict[int, str]:
        """Published machine id -> a node of the cluster with the same GPU (single-GPU nodes, in
        cluster-file order); a clear error when the cluster lacks them."""
        wanted: dict[str, list[int]] = {}
        for mid, (gpu, _, _) in sorted(MACHINES.items()):
            wanted.setdefault(gpu, []).append(mid)
        free: dict[str, list[str]] = {}
        for node in ctx.cluster.nodes.values():
            if node.count == 1:
                free.setdefault(node.gpu.name, []).append(node.name)
        short = {g: len(ids) - len(free.get(g, [])) for g, ids in wanted.items()}
        short = {g: n for g, n in short.items() if n > 0}
        if short:
            need = ", ".join(f"{len(ids)} {g}" for g, ids in wanted.items())
            raise HetserveError(
                f"helix-published: the published layout runs on single-GPU machines ({need}); "
                f"{ctx.cluster.name} lacks " + ", ".join(f"{n} {g}" for g, n in short.items())
            )
        return {mid: free[g][i] for g, ids in wanted.items() for i, mid in enumerate(ids)}

    def plan(self, ctx: StrategyContext) -> PlanFile:
        m = ctx.model
        self._check_model(ctx)
        node_of = self.machines(ctx)
        spots = {
            mid: spot(node_of[mid], (0,), first, first + count) for mid, (_, first, count) in MACHINES.items()
        }
        paths = [([spots[mid] for mid in ids], flow) for ids, flow in CHAINS]
        return write_chains(
            ctx,
            f"helix-published-{m.name}",
            paths,
            notes="Helix's published layout for its 24-machine cluster (artifact ilp_solution.sol): "
            f"{len(paths)} chains over {len(MACHINES)} machines, flows "
            + ", ".join(f"{f:g}" for _, f in CHAINS)
            + " tokens/s in Helix's profile.",
        )
