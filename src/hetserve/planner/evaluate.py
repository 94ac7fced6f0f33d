"""How a plan is judged: simulated at a rate, searched for the highest rate its SLOs hold at, and scored
against an objective. The planner's confirmations, every strategy's own search and ``hetserve compare``
judge plans with these functions and nothing else, so a plan is judged the same way by all of them.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import numpy as np

from .. import clock
from ..errors import OutOfTime
from ..plan import Deployment
from ..sim import SimResult, simulate
from ..sim.metrics import MAX_SEARCH_WINDOW_S, SimSummary, probe_window_s
from ..specs.workloads import Requests, Workload

#: Shortest arrival window of a simulation at a fixed rate: shorter bursts are absorbed by queues and KV
#: caches and would overstate the sustainable rate.
MIN_WINDOW_S = 20.0
#: Shortest time a simulation drains after its last arrival, so that the longest requests of a load the
#: plan sustains finish (an unfinished request counts as dropped, which fails the SLOs).
MIN_DRAIN_S = 300.0
#: Doublings or halvings of the rate while the goodput search brackets the SLO boundary.
BRACKET_STEPS = 8
#: A steady-state check spans this many times the time a long request decodes for (its output at the
#: SLO percentile, at the TPOT target): decode batches and KV caches fill over about that long, so a
#: shorter window can hold its SLOs at a rate the plan does not sustain.
STEADY_DECODES = 3
#: TPOT assumed for the steady window when the SLO sets no TPOT target (s per token).
STEADY_TPOT_S = 0.05
#: A reported rate that fails the steady-state check is lowered by ``STEADY_FACTOR`` at most
#: ``STEADY_STEPS`` times until it holds (``steady_rate``).
STEADY_STEPS = 6
STEADY_FACTOR = 0.93


@dataclass(frozen=True)
class Run:
    """One simulation of a plan: the rate its requests were offered at and what happened."""

    offered_rps: float
    result: SimResult

    @property
    def summary(self) -> SimSummary:
        return self.result.summary

    @property
    def slo_met(self) -> bool:
        return self.summary.slo_met

    @property
    def e2e_mean_s(self) -> float:
        """Mean end-to-end time of the completed requests (inf if any was dropped)."""
        rec = self.result.records
        e2e = rec.e2e()[rec.completed]
        e2e = e2e[~np.isnan(e2e)]
        return float(e2e.mean()) if len(e2e) and self.summary.dropped == 0 else math.inf


@dataclass(frozen=True)
class Objective:
    """What a plan is chosen for: its sense, its unit and label, the figure a run shows for it and a score
    (higher is better) that ranks runs against a target rate."""

    name: Literal["throughput", "goodput", "cost", "power", "latency"]
    sense: Literal["max", "min"]
    unit: str
    label: str  # what the figure is, in words

    @property
    def judges_slo(self) -> bool:
        """Whether the SLOs decide the figure (all but throughput, which counts every output token)."""
        return self.name != "throughput"

    def value(self, run: Run) -> float:
        """The objective's figure for ``run``: output tokens/s; requests/s within the SLOs (the offered
        rate when they held); $/h; mean W; mean seconds from arrival to last token (inf if any request
        was dropped)."""
        s = run.summary
        if self.name == "throughput":
            return s.throughput_tok_s
        if self.name == "goodput":
            return run.offered_rps if run.slo_met else s.goodput_rps
        if self.name == "cost":
            return s.cost_per_hour
        if self.name == "latency":
            return run.e2e_mean_s
        return s.power_w

    def score(self, run: Run | None, target_rate: float) -> float:
        """``run`` ranked for this objective, higher is better. Goodput counts half when the SLO
        percentiles failed (a plan that holds them at a lower rate ranks above one that does not); cost,
        power and latency count only when the SLOs held with requests offered at 95% of ``target_rate`` or
        more."""
        if run is None:
            return -math.inf
        s = run.summary
        if self.name == "throughput":
            return s.throughput_tok_s
        if self.name == "goodput":
            return s.goodput_rps if run.slo_met else s.goodput_rps * 0.5
        penalty = 0.0 if self.carries(run, target_rate) else 1e12
        figure = {"cost": s.cost_per_hour, "power": s.power_w}.get(self.name)
        if figure is None:  # latency
            figure = run.e2e_mean_s if math.isfinite(run.e2e_mean_s) else 1e9
        return -(figure + penalty)

    @staticmethod
    def carries(run: Run, target_rate: float) -> bool:
        """Whether ``run`` held the SLOs with requests offered at 95% of ``target_rate`` or more: the
        offered rate, not completions over the makespan (which includes the drain after the last
        arrival and so reads low on a short window)."""
        return run.slo_met and run.offered_rps >= 0.95 * target_rate

    def better(self, a: float, b: float) -> bool:
        """Whether figure ``a`` beats figure ``b``."""
        return a > b if self.sense == "max" else a < b


OBJECTIVES: dict[str, Objective] = {
    o.name: o
    for o in (
        Objective("throughput", "max", "tok/s", "output tokens per second"),
        Objective("goodput", "max", "req/s", "highest request rate within the SLOs"),
        Objective("cost", "min", "$/h", "dollars per hour at the workload's rate within the SLOs"),
        Objective("power", "min", "W", "average watts at the workload's rate within the SLOs"),
        Objective(
            "latency",
            "min",
            "s",
            "mean response time (arrival to last token) at the workload's rate within the SLOs",
        ),
    )
}


def arrival_window_s(workload: Workload, rate: float, requests: int, *, judge_slo: bool = True) -> float:
    """Seconds of arrivals a simulation of about ``requests`` requests at ``rate`` spans: when the SLOs
    are judged, no shorter than ``MIN_WINDOW_S`` nor than the SLO's deadlines need to expose an overload
    (``probe_window_s``); at most ``MAX_SEARCH_WINDOW_S``."""
    window = requests / rate
    if judge_slo:
        window = max(window, MIN_WINDOW_S, probe_window_s(workload.slo))
    return min(window, MAX_SEARCH_WINDOW_S)


def steady_window_s(workload: Workload, output_q: float) -> float:
    """Seconds of arrivals a steady-state check of a rate replays: ``STEADY_DECODES`` times a long
    request's decode (``output_q`` tokens at the TPOT target), at least the search's probe window, at
    most ``MAX_SEARCH_WINDOW_S``."""
    slo = workload.slo
    tpot = slo.tpot_ms / 1e3 if slo.tpot_ms else STEADY_TPOT_S
    window = max(MIN_WINDOW_S, probe_window_s(slo), STEADY_DECODES * output_q * tpot)
    return min(window, MAX_SEARCH_WINDOW_S)


def simulate_at_rate(
    dep: Deployment,
    workload: Workload,
    rate: float,
    *,
    seed: int,
    requests: int,
    judge_slo: bool = True,
    deadline: float | None = None,
    window_s: float | None = None,
) -> Run | None:
    """Simulate ``dep`` on ``workload``'s request mix arriving at ``rate`` (requests/s), about ``requests``
    requests over ``arrival_window_s`` (``judge_slo`` False: the SLOs do not decide the figure, e.g.
    throughput, and the window need not span their deadlines); drained for twice as long as it arrived
    (at least ``MIN_DRAIN_S``). None when no request arrives. ``deadline`` (a ``clock.now()``
    value): past it, ``OutOfTime`` is raised. ``window_s``: this arrival window instead (a steady-state
    check, ``steady_window_s``)."""
    rate = max(rate, 1e-3)
    duration = window_s or arrival_window_s(workload, rate, requests, judge_slo=judge_slo)
    if deadline is not None and clock.now() > deadline:
        raise OutOfTime("no time left to sample the requests")
    reqs = workload.sample(seed=seed, duration_s=duration, rate=rate)
    if len(reqs) == 0:
        return None
    result = simulate(
        dep, reqs, workload.slo, seed=seed, drain_s=max(MIN_DRAIN_S, 2 * duration), deadline=deadline
    )
    return Run(len(reqs) / duration, result)


def simulate_requests(
    dep: Deployment,
    workload: Workload,
    reqs: Requests,
    duration: float,
    *,
    seed: int,
    deadline: float | None = None,
) -> Run:
    """Simulate ``dep`` on the given requests (the workload as it arrives over ``duration`` seconds),
    drained until every request finishes or the simulator's limit (``deadline``: as ``simulate_at_rate``)."""
    return Run(
        len(reqs) / max(duration, 1e-9), simulate(dep, reqs, workload.slo, seed=seed, deadline=deadline)
    )


@dataclass(frozen=True)
class GoodputSearch:
    rate: float  # the highest offered rate found at which the SLOs hold (0: none)
    run: Run | None  # the simulation at that rate, when the search ran one
    simulations: int


def max_rate_within_slo(
    probe: Callable[[float], Run | None],
    start: float,
    holds_at_start: bool | None = None,
    *,
    bisection_steps: int,
    bracket_steps: int = BRACKET_STEPS,
) -> GoodputSearch:
    """The highest rate at which ``probe(rate)`` meets the SLOs: from ``start`` (whose verdict may be given)
    double while they hold or halve until they do, then bisect the bracket geometrically
    ``bisection_steps`` times. Assumes the SLOs hold below some rate and fail above it."""
    sims = 0
    best: Run | None = None
    best_rate = 0.0

    def holds(rate: float) -> bool:
        nonlocal sims, best, best_rate
        sims += 1
        run = probe(rate)
        ok = run is not None and run.slo_met
        if ok and rate > best_rate:
            best, best_rate = run, rate
        return ok

    if holds_at_start is None:
        holds_at_start = holds(start)
    lo = hi = None
    if holds_at_start:
        lo = start
        for _ in range(bracket_steps):
            if not holds(lo * 2):
                hi = lo * 2
                break
            lo *= 2
        if hi is None:
            return GoodputSearch(lo, best, sims)
    else:
        hi = start
        for _ in range(bracket_steps):
            if holds(hi / 2):
                lo = hi / 2
                break
            hi /= 2
        if lo is None:
            return GoodputSearch(0.0, None, sims)
    for _ in range(bisection_steps):
        mid = math.sqrt(lo * hi)
        if holds(mid):
            lo = mid
        else:
            hi = mid
    return GoodputSearch(lo, best if best_rate == lo else None, sims)


@dataclass(frozen=True)
class SteadyCheck:
    rate: float  # the highest rate tried at which the SLOs held over the steady window (0: none)
    run: Run | None  # its simulation (the first sample's)
    window_s: float
    simulations: int


def steady_rate(
    dep: Deployment,
    workload: Workload,
    rate: float,
    window_s: float,
    *,
    seed: int,
    deadline: float | None = None,
) -> SteadyCheck:
    """``rate`` if ``dep`` holds the SLOs there over ``window_s`` of arrivals on two request samples
    (``seed`` and the next), else the first of ``STEADY_STEPS`` lower rates (each ``STEADY_FACTOR`` times
    the last) where both hold; 0 when none does. The check of every rate a plan or a comparison reports
    (``Planner._steady``, ``compare.Evaluator.steady``). ``deadline``: as ``simulate_at_rate``."""
    sims = 0
    for _ in range(STEADY_STEPS):
        runs = []
        for sd in (seed, seed + 1):
            sims += 1
            run = simulate_at_rate(
                dep, workload, rate, seed=sd, requests=0, window_s=window_s, deadline=deadline
            )
            if run is None or not run.slo_met:
                break
            runs.append(run)
        if len(runs) == 2:
            return SteadyCheck(rate, runs[0], window_s, sims)
        rate *= STEADY_FACTOR
    return SteadyCheck(0.0, None, window_s, sims)
