"""What a search's time limit counts: wall time, or work charged at fixed rates, so that a search counting
work makes the same decisions on any machine and under any load."""

import time

import numpy as np
import pytest

from hetserve import clock
from hetserve.errors import OutOfTime
from hetserve.planner.allocate import solve
from hetserve.planner.pools import pools_of
from hetserve.sim import Simulator
from hetserve.specs.workloads import Requests
from tests.contexts import context, plan_of

NODES = [{"name": "a", "gpu": "a100-80gb", "count": 4}, {"name": "l", "gpu": "l4", "count": 4}]


def test_the_clock_is_the_wall_clock_unless_work_is_counted():
    before = time.perf_counter()
    assert before <= clock.now() <= time.perf_counter() and not clock.counting()
    clock.charge(5.0)  # no effect on the wall clock
    assert clock.now() < before + 5.0
    assert clock.milp_limits(2.5) == {"time_limit": 2.5}


def test_counted_work_is_what_was_charged_and_an_inner_block_shares_the_outer_clock():
    with clock.counting_work() as outer:
        assert clock.counting() and clock.now() == 0.0
        clock.charge(1.5)
        with clock.counting_work() as inner:
            clock.charge(0.5)
        assert inner is outer and clock.now() == 2.0
    assert not clock.counting()
    with clock.counting_work_if(False) as none:
        assert none is None and not clock.counting()


def test_counting_work_a_milp_is_limited_by_nodes_not_seconds():
    with clock.counting_work():
        limits = clock.milp_limits(clock.SOLVE_S + 10 * clock.MILP_NODE_S)
        assert limits["node_limit"] == 10 and limits["time_limit"] == clock.MILP_GUARD_S
        assert clock.milp_limits(0.0)["node_limit"] == 1
        clock.charge_solve(nodes=3, iterations=100)
        assert clock.now() == pytest.approx(
            clock.SOLVE_S + 3 * clock.MILP_NODE_S + 100 * clock.SIMPLEX_ITERATION_S
        )


def test_the_allocation_milp_is_charged_when_work_is_counted():
    ctx = context(NODES)
    templates = ctx.factory().all()
    pools = {p.key: p.total for p in pools_of(ctx.cluster)}
    with clock.counting_work() as work:
        assert solve(templates, pools, "goodput", time_limit=1.0) is not None
    assert work.spent >= clock.SOLVE_S


def _requests(n=400):
    rng = np.random.default_rng(0)
    return Requests(np.sort(rng.uniform(0, 60, n)), rng.integers(100, 1500, n), rng.integers(20, 300, n))


def test_a_simulation_charges_the_same_work_each_time_and_runs_out_at_the_same_point():
    ctx = context(NODES)
    dep = plan_of("homogeneous", ctx)[1]
    reqs = _requests()
    with clock.counting_work() as first:
        sim = Simulator(dep, reqs, ctx.slo)
        done = sim.run().summary.completed
    with clock.counting_work() as second:
        Simulator(dep, reqs, ctx.slo).run()
    assert done == len(reqs) and first.spent == second.spent
    assert first.spent >= sim.events * clock.SIM_EVENT_S + sim.items * clock.SIM_ITEM_S
    stopped = []
    for _ in range(2):  # half the work: out of time, at the same simulated moment both times
        with clock.counting_work(), pytest.raises(OutOfTime) as exc:
            Simulator(dep, reqs, ctx.slo, deadline=first.spent / 2).run()
        stopped.append(str(exc.value))
    assert stopped[0] == stopped[1]
