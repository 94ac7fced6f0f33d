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


@dataclass(frozen=True)
class Analytic:
    """What the capacity model predicts for the chosen allocation."""

    requests_per_s: float
    output_tok_s: float
    cost_per_hour: float
    power_w: float


@dataclass(frozen=True)
class Searched:
    """How much the search looked at."""

    templates: int
    allocations: int
    simulated: int
    pools: int


@dataclass(frozen=True)
class Alternative:
    """A candidate the search simulated, with its objective figure."""

    label: str
    value: float
    gpus: int
    cost_per_hour: float


@dataclass
class PlanResult:
    plan: PlanFile
    deployment: Deployment
    objective: str
    sense: str
    value: float
    summary: SimSummary  # simulated metrics of the chosen plan
    predicted: Analytic  # analytic figures of the chosen allocation
    reasons: list[str]
    searched: Searched
    seconds: float
    alternatives: list[Alternative] = field(default_factory=list)
