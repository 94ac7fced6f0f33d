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
    #: The confirming simulation of the search's short windows, when a steady-window check replaced
    #: ``run`` (the chosen goodput plan): the figure to set beside the other candidates'.
    searched: Run | None = None

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
    """A candidate the search simulated, with its objective figure in the search's short windows (the
    chosen plan's too, whose reported figure may be a steady window's)."""

    label: str
    value: float
    gpus: int
    cost_per_hour: float


@dataclass
class Carrying:
    """Whether a plan carries its workload: the rate the workload asks, the rate the plan was sized for
    (the workload's plus the headroom), the highest rate the simulation held the SLOs at, and, when it
    falls short, the nearest changes that would carry it."""

    workload_rps: float
    target_rps: float
    headroom: float  # share above the workload's rate the plan was sized for
    sustained_rps: float  # highest offered rate found within the SLO percentiles (0: none)
    sustained_is_lower_bound: bool  # the search ran out of time above this rate
    fixes: list[str]
    #: Seconds of arrivals the sustained rate held its SLOs over (None: the check ran out of time, and the
    #: rate is from the search's shorter windows).
    steady_window_s: float | None = None

    @property
    def carries(self) -> bool:
        return self.sustained_rps >= self.workload_rps * (1 - 1e-9)

    @property
    def headroom_reached(self) -> float:
        """Share by which the sustained rate exceeds the workload's (negative: short of it)."""
        return self.sustained_rps / self.workload_rps - 1

    def room(self) -> str:
        """'headroom x%' above the workload's rate, or 'x% of it' when short of it."""
        share = self.headroom_reached
        return (
            f"headroom {share:.0%}" if share >= 0 else f"{self.sustained_rps / self.workload_rps:.0%} of it"
        )

    def sustains(self) -> str:
        """'[at least ]S req/s within the SLOs' (the sustained rate, in words)."""
        at_least = "at least " if self.sustained_is_lower_bound else ""
        return f"{at_least}{self.sustained_rps:.3g} req/s within the SLOs"

    def sentence(self) -> str:
        """'workload asks R req/s; this plan sustains S req/s within the SLOs over W s of arrivals
        (headroom x%)'."""
        if self.sustained_rps <= 0:
            return f"workload asks {self.workload_rps:.3g} req/s; this plan meets the SLOs at no rate tried"
        over = (
            f" over {self.steady_window_s:.0f} s of arrivals"
            if self.steady_window_s
            else " in the search's short windows (the steady-state check ran out of time)"
        )
        asks = f"workload asks {self.workload_rps:.3g} req/s"
        return f"{asks}; this plan sustains {self.sustains()}{over} ({self.room()})"


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
    carrying: Carrying | None = None  # None: the throughput objective or a workload without a rate
    unit: str = ""  # the objective's unit
    simulated_rps: float = 0.0  # the rate the chosen plan's reported simulation was offered
