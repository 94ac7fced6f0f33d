"""The one evaluation path (planner/evaluate.py): the goodput search finds the SLO boundary from either
side to its precision, the objectives know their sense and rank simulations, and a simulation at a rate
spans the window its objective needs."""

import math
from types import SimpleNamespace

import pytest

from hetserve.planner.evaluate import (
    BRACKET_STEPS,
    MAX_SEARCH_WINDOW_S,
    MIN_DRAIN_S,
    MIN_WINDOW_S,
    OBJECTIVES,
    arrival_window_s,
    max_rate_within_slo,
    simulate_at_rate,
)
from hetserve.specs.workloads import Workload, WorkloadFile
from tests.sim.conftest import make_deployment


def boundary_probe(limit: float, calls: list[float]):
    """A probe whose SLOs hold at rates up to ``limit``."""

    def probe(rate: float):
        calls.append(rate)
        return SimpleNamespace(rate=rate, slo_met=rate <= limit)

    return probe


@pytest.mark.parametrize("start, holds", [(1.0, True), (10.0, False)])
def test_the_goodput_search_brackets_the_boundary_from_either_side_and_bisects_it(start, holds):
    calls: list[float] = []
    found = max_rate_within_slo(boundary_probe(3.0, calls), start, holds, bisection_steps=5)
    assert 3.0 / 2 ** (1 / 32) <= found.rate <= 3.0  # 5 geometric bisections of a factor-2 bracket
    assert found.run.rate == found.rate and found.run.slo_met  # the simulation at the rate found
    assert found.simulations == len(calls) == 2 + 5  # two to bracket (1 -> 2 -> 4; 10 -> 5 -> 2.5)
    assert min(r for r in calls if r > 3.0) == pytest.approx(found.rate * 2 ** (1 / 32))  # the bracket's top


def test_the_goodput_search_judges_the_start_when_not_told():
    calls: list[float] = []
    found = max_rate_within_slo(boundary_probe(3.0, calls), 1.0, bisection_steps=0)
    assert calls[:3] == [1.0, 2.0, 4.0] and found.rate == 2.0


def test_the_goodput_search_stops_after_its_bracket_steps():
    calls: list[float] = []
    assert max_rate_within_slo(boundary_probe(math.inf, calls), 1.0, True, bisection_steps=5).rate == (
        2.0**BRACKET_STEPS
    )
    never = max_rate_within_slo(boundary_probe(0.0, []), 1.0, False, bisection_steps=5)
    assert never.rate == 0.0 and never.run is None and never.simulations == BRACKET_STEPS


def run_of(slo_met: bool, offered: float = 2.0, **summary):
    figures = dict(
        throughput_tok_s=500.0, goodput_rps=1.5, throughput_rps=2.0, cost_per_hour=10.0, power_w=800.0
    )
    figures.update(summary)
    return SimpleNamespace(slo_met=slo_met, offered_rps=offered, summary=SimpleNamespace(**figures))


def test_objectives_carry_their_sense_unit_and_label():
    assert {n: o.sense for n, o in OBJECTIVES.items()} == {
        "throughput": "max",
        "goodput": "max",
        "cost": "min",
        "power": "min",
        "latency": "min",
    }
    assert OBJECTIVES["goodput"].unit == "req/s" and "SLO" in OBJECTIVES["goodput"].label
    assert OBJECTIVES["cost"].better(9.0, 10.0) and OBJECTIVES["goodput"].better(2.0, 1.0)
    assert not OBJECTIVES["throughput"].judges_slo and OBJECTIVES["power"].judges_slo


def test_one_score_ranks_every_simulation():
    goodput, cost, power = OBJECTIVES["goodput"], OBJECTIVES["cost"], OBJECTIVES["power"]
    # goodput: the offered rate when the SLOs hold, half the requests within them when they fail
    assert goodput.value(run_of(True)) == 2.0 and goodput.value(run_of(False)) == 1.5
    assert goodput.score(run_of(False), 2.0) == pytest.approx(0.5 * goodput.score(run_of(True), 2.0))
    # cost and power only count when the plan carries the rate within the SLOs
    assert cost.score(run_of(True), 2.0) == -10.0 and power.score(run_of(True), 2.0) == -800.0
    assert cost.score(run_of(False), 2.0) < -1e9 and cost.score(run_of(True), 4.0) < -1e9
    assert OBJECTIVES["throughput"].score(None, 2.0) == -math.inf


def test_latency_ranks_by_mean_response_and_counts_only_plans_that_carry_the_rate():
    latency = OBJECTIVES["latency"]
    fast, slow = run_of(True), run_of(True)
    fast.e2e_mean_s, slow.e2e_mean_s = 3.0, 5.0
    assert latency.value(fast) == 3.0 and latency.better(3.0, 5.0)
    assert latency.score(fast, 2.0) > latency.score(slow, 2.0)
    failed = run_of(False)
    failed.e2e_mean_s = 1.0  # fast but outside the SLOs: ranked below every plan that holds them
    assert latency.score(failed, 2.0) < latency.score(slow, 2.0)
    dropped = run_of(True)
    dropped.e2e_mean_s = math.inf  # a dropped request makes the mean infinite
    assert latency.score(dropped, 2.0) < latency.score(slow, 2.0)


WORKLOAD = Workload(
    WorkloadFile.model_validate(
        {
            "arrivals": {"kind": "poisson", "rate": 1.0},
            "prompt": {"kind": "fixed", "value": 256},
            "output": {"kind": "fixed", "value": 16},
            "slo": {"ttft_ms": 5000, "percentile": 90},
            "duration_s": 10,
        }
    )
)


def test_the_window_spans_the_deadlines_only_when_the_slos_are_judged():
    assert arrival_window_s(WORKLOAD, 10.0, 50) == 10 * 5.0  # ten TTFT deadlines
    assert arrival_window_s(WORKLOAD, 100.0, 50) == 50.0 and MIN_WINDOW_S <= 50.0
    assert arrival_window_s(WORKLOAD, 10.0, 50, judge_slo=False) == 5.0  # the requests asked for
    assert arrival_window_s(WORKLOAD, 0.01, 50) == MAX_SEARCH_WINDOW_S


def test_a_simulation_at_a_rate_offers_that_rate_and_drains():
    dep = make_deployment(
        [{"name": "s", "node": "n", "gpus": [0], "layers": [0, 32]}],
        [{"name": "i", "role": "mixed", "chain": ["s"]}],
    )
    run = simulate_at_rate(dep, WORKLOAD, 2.0, seed=0, requests=40)
    rec = run.result.records
    assert run.offered_rps == pytest.approx(2.0, rel=0.25) and rec.n == pytest.approx(100, rel=0.25)
    assert run.summary.dropped == 0 and run.slo_met and MIN_DRAIN_S > 0
    assert run.e2e_mean_s == pytest.approx(float(rec.e2e()[rec.completed].mean()))
