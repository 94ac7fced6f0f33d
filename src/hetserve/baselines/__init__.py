"""Every strategy ``hetserve compare`` runs: hetserve's planner and the published systems it is compared
with (docs/baselines.md), each as its authors' setting describes it.

Every strategy takes one ``StrategyContext`` and returns a ``PlanFile`` that ``hetserve.plan.Deployment``
accepts. ``get_strategy(name)`` looks one up by name. The chain and
Helix placements are parts of hetserve's own planner (``planner.placement``); here they are also
strategies of their own.
"""

from __future__ import annotations

from ..errors import HetserveError, suggest
from ..planner.placement.chain import ChainComposition
from ..planner.placement.helix import Helix
from ..planner.strategy import Strategy, StrategyContext
from .helix_published import HelixPublished
from .hexgen import HexGen
from .homogeneous import Homogeneous
from .llmpq import LLMPQ
from .ours import Hetserve, HetserveQuantised
from .pdhetero import PDHetero
from .petals import Petals
from .splitwise import Splitwise
from .uniform import Uniform

#: Every strategy by name: ours first, then the baselines.
STRATEGIES: dict[str, Strategy] = {
    s.name: s
    for s in (
        Hetserve(),
        HetserveQuantised(),
        Homogeneous(),
        Uniform(),
        HexGen(),
        LLMPQ(),
        Splitwise(),
        PDHetero(),
        Helix(),
        HelixPublished(),
        Petals(),
        ChainComposition(),
    )
}


def get_strategy(name: str) -> Strategy:
    """The strategy called ``name``; a clear error naming the known ones otherwise."""
    try:
        return STRATEGIES[name]
    except KeyError:
        raise HetserveError(
            f"unknown strategy '{name}'{suggest(name, STRATEGIES)}; known: {', '.join(STRATEGIES)}"
        ) from None


__all__ = ["STRATEGIES", "Strategy", "StrategyContext", "get_strategy"]
