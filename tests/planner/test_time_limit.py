"""The planner honours its time limit whatever the inputs: every phase stops at the deadline (templates,
MILPs, plan building, simulations), a short limit still gives a simulated plan when one can be had, and
a limit too short for any gives one clear error instead of running on."""

import time

import numpy as np
import pytest

from hetserve import clock
from hetserve.errors import HetserveError, OutOfTime
from hetserve.planner import Planner, search
from hetserve.planner.build import MAX_HANDOFF_PAIRS, handoff_weights, place
from hetserve.planner.templates import TemplateFactory
from hetserve.sim import simulate
from hetserve.specs.models import load_model
from hetserve.specs.workloads import Requests, Workload, WorkloadFile
from tests.contexts import WORKLOAD, cluster, context

NODES = [{"name": "a", "gpu": "a100-80gb", "count": 4}, {"name": "l", "gpu": "l4", "count": 4}]


def planner(nodes=NODES, workload=WORKLOAD, time_limit=30.0, model="llama-3.1-8b"):
    return Planner(
        cluster(nodes),
        load_model(model),
        Workload(WorkloadFile.model_validate(workload)),
        "goodput",
        cluster_ref="c.yaml",
        model_ref=model,
        time_limit=time_limit,
    )


def test_a_simulation_past_its_deadline_stops():
    ctx = context(NODES)
    dep = _one_plan(ctx)
    reqs = Requests(np.arange(50) * 0.1, np.full(50, 100), np.full(50, 20))
    with pytest.raises(OutOfTime):
        simulate(dep, reqs, ctx.slo, deadline=time.perf_counter() - 1)
    assert simulate(dep, reqs, ctx.slo, deadline=time.perf_counter() + 60).summary.completed == 50


def _one_plan(ctx):
    from tests.contexts import plan_of

    return plan_of("homogeneous", ctx)[1]


def test_templates_stop_at_the_deadline():
    ctx = context(NODES)
    args = (ctx.cluster, ctx.model, ctx.prompt, ctx.output, ctx.slo, 0.3)
    every = TemplateFactory(*args).all()
    none = TemplateFactory(*args, deadline=time.perf_counter() - 1)
    assert every and none.all() == [] and none.cut_short


def test_a_limit_too_short_for_anything_is_one_clear_error():
    p = planner(time_limit=1e-6)
    with pytest.raises(HetserveError, match=r"--time-limit 1e-06 s ran out .*raise --time-limit"):
        p.run()


@pytest.mark.parametrize("limit", [float("inf"), float("nan"), 0.0, -1.0])
def test_time_limit_must_be_positive_and_finite(limit):
    with pytest.raises(HetserveError, match="--time-limit"):
        planner(time_limit=limit)


def test_first_confirmation_falls_back_to_a_quick_one(monkeypatch):
    """When the full-size first confirmation cannot finish in its share of the limit, a quick one of
    QUICK_REQUESTS confirms the first plan (the search then goes on as usual)."""
    monkeypatch.setattr(search, "FIRST_SHARE", 0.0)  # the full-size one is out of time at once
    calls = []
    real = search.simulate_at_rate

    def spy(*args, requests, **kw):
        try:
            run = real(*args, requests=requests, **kw)
        except OutOfTime:
            calls.append((requests, "out of time"))
            raise
        calls.append((requests, run.summary.requests if run else 0))
        return run

    monkeypatch.setattr(search, "simulate_at_rate", spy)
    result = planner(time_limit=20).run()
    assert calls[0] == (search.CONFIRM_REQUESTS, "out of time")
    assert calls[1][0] == search.QUICK_REQUESTS and 0 < calls[1][1] <= 2 * search.QUICK_REQUESTS
    assert result.summary.completed > 0


def test_a_huge_cluster_stays_within_the_limit():
    """A 10,000-node cluster: candidate generation, the MILPs, building a plan of thousands of instances
    and its simulation all stop at the deadline (a plan or the time-limit error, not a run past it)."""
    nodes = [
        {"name": "t4", "gpu": "t4", "count": 4, "replicas": 5000},
        {"name": "l4", "gpu": "l4", "count": 8, "replicas": 5000, "zone": "z2"},
    ]
    p = planner(nodes=nodes, time_limit=1.5)
    start = time.perf_counter()
    try:
        p.run()
    except HetserveError as exc:
        assert "--time-limit 1.5 s ran out" in str(exc)
    assert time.perf_counter() - start < 1.5 * 1.25 + 0.5


def test_placement_is_best_fit_by_name():
    ctx = context([{"name": "n", "gpu": "l4", "count": 4, "replicas": 3}])
    factory = ctx.factory()
    templates = factory.all()
    tp2 = next(j for j, t in enumerate(templates) if len(t.stages) == 1 and t.stages[0].tp == 2)
    tp1 = next(j for j, t in enumerate(templates) if len(t.stages) == 1 and t.stages[0].tp == 1)
    from hetserve.planner.allocate import Allocation

    placed = place(ctx.cluster, templates, Allocation({tp2: 3, tp1: 2}, {}, 1.0, 1.0, 0.0, 0.0))
    spots = [spot for _, stages in placed for spot in stages]
    # TP-2 groups first: n-0 (4 free, first name), then n-0 again (2 free: the best fit), then n-1;
    # the TP-1 groups then fill n-1's last two GPUs before touching n-2
    assert spots == [("n-0", [0, 1]), ("n-0", [2, 3]), ("n-1", [0, 1]), ("n-1", [2]), ("n-1", [3])]


def test_handoff_weights_split_each_prefill_and_stop_at_the_pair_cap():
    ctx = context(NODES)
    pre = [("p0", "a", 2.0), ("p1", "l", 1.0)]
    dec = [("d0", "a", 2.0), ("d1", "l", 2.0)]
    w = handoff_weights(ctx.cluster, ctx.model, 500, pre, dec)
    assert set(w) == {"p0", "p1"}
    for shares in w.values():
        assert sum(shares.values()) == pytest.approx(1.0, abs=1e-3)
    assert w["p0"] == {"d0": 1.0} and w["p1"] == {"d1": 1.0}  # each stays on its own node
    many = [(f"d{k}", "a", 1.0) for k in range(MAX_HANDOFF_PAIRS // 2 + 1)]
    assert handoff_weights(ctx.cluster, ctx.model, 500, pre, many) == {}


def test_counting_work_the_plan_is_the_same_on_a_machine_fifty_times_slower(monkeypatch):
    """``--deterministic``: every phase's deadline counts work, so a wall clock running 50x faster (a
    slower or loaded machine) leaves the plan and its figures unchanged; a deadline still read from the
    wall clock would cut the search short there."""

    def plan():
        with clock.counting_work():
            result = planner(time_limit=3.0).run()
        return result.plan.model_dump(), result.value

    first = plan()
    real = time.perf_counter
    start = real()
    monkeypatch.setattr(time, "perf_counter", lambda: start + 50 * (real() - start))
    assert plan() == first
