"""Engines a plan can be held to (``hetserve plan --target vllm|sglang``).

The planner asks an ``EngineTarget`` two things: whether a candidate instance (a template) is worth
building at all (one TP degree for every stage, one weight format the engine loads without a
pre-quantised checkpoint, a GPU vendor the exports address) and, for every plan it builds, what the
engine still cannot express (``plan_gaps``: shared servers, cross-vendor or converting P/D hand-offs,
uneven stages per node, ...). A plan with a gap is never confirmed, so the plan written is one that
``hetserve export --to`` the same engine writes without ``--nearest``: what is simulated is what runs.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import HetserveError
from ..plan import Deployment
from . import sglang, vllm
from .common import GPU_RESOURCE, asks_from
from .gaps import EngineCaps, fp8_weights_ok, plan_gaps

#: The engines ``--target`` accepts, by the name the CLI uses.
ENGINE_CAPS: dict[str, EngineCaps] = {"vllm": vllm.CAPS, "sglang": sglang.CAPS}


@dataclass(frozen=True)
class EngineTarget:
    """What one engine runs, as the planner asks it."""

    name: str
    caps: EngineCaps

    @property
    def label(self) -> str:
        return self.caps.name

    def template_ok(self, template) -> bool:
        """Whether an instance of this shape (``planner.templates.Template``) can be expressed at all."""
        stages = template.stages
        if len({s.tp for s in stages}) > 1:
            return False  # one TP degree for every pipeline stage
        if any(s.pool.gpu.vendor not in GPU_RESOURCE for s in stages):
            return False
        bits = {b for s in stages for b in s.bits}
        if len(bits) > 1 or min(bits) < 8:
            return False  # one weight format; below 8 bits needs a pre-quantised checkpoint
        return min(bits) == 16 or all(fp8_weights_ok(s.pool.gpu) for s in stages)

    def gaps(self, dep: Deployment) -> list[str]:
        """What the engine cannot express of a built plan, a line per gap (empty: it runs as planned)."""
        return [g.line() for g in plan_gaps(asks_from(dep), self.caps)]


def engine_target(name: str) -> EngineTarget:
    """The target called ``name``; one clear error naming the known ones otherwise."""
    try:
        return EngineTarget(name, ENGINE_CAPS[name])
    except KeyError:
        raise HetserveError(
            f"--target: unknown engine '{name}'; use one of {', '.join(ENGINE_CAPS)}"
        ) from None
