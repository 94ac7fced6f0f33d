"""What the planner's search weighs and returns: a candidate (a plan, its allocation, its confirming
simulation and score) and the search's result."""

from __future__ import annotations

from dataclasses import dataclass, field

from ..plan import Deployment, PlanFile
from ..sim.metrics import SimSummary
from .allocate import Allocation
from .evaluate import Run


@dataclass
class Candidate:
    label: str
    alloc: Allocation
    plan: PlanFile
    dep: Deployment
    run: Run  # its confirming simulation (for goodput, at the highest rate found within the SLOs)
    score: float

    @property
    def summary(self) -> SimSummary:
        return self.run.summary


@dataclass
class PlanResult:
    plan: PlanFile
    deployment: Deployment
    objective: str
    sense: str
    value: float
    summary: SimSummary  # simulated metrics of the chosen plan
    predicted: dict  # analytic figures of the chosen allocation
    reasons: list[str]
    searched: dict
    seconds: float
    alternatives: list[dict] = field(default_factory=list)
