"""The engine-settings grid: what each setting changes in a plan, and that the comparison and the planner
keep the best-scoring setting (a plan's figure is then its own, not a fixed setting's)."""

from dataclasses import replace
from types import SimpleNamespace

from hetserve.compare import Evaluator
from hetserve.plan import InstancePlan, PlanFile, RoutingPlan, ServerPlan
from hetserve.planner.engine_settings import (
    AS_WRITTEN,
    TOKEN_GRID,
    grid,
    has_chains,
    lane_variant,
    refused,
    request_variant,
    token_variants,
    with_setting,
)
from hetserve.planner.evaluate import OBJECTIVES
from hetserve.sim.metrics import DROP_TOO_LONG, DROP_UNFINISHED


def plan_with(*instances):
    servers = [
        ServerPlan(name=f"s{i}", node=f"n{i}", gpus=[0], layers=(8 * i, 8 * i + 8), bits=16) for i in range(4)
    ]
    return PlanFile(
        name="p",
        model="llama-3.1-8b",
        cluster="c.yaml",
        servers=servers,
        instances=list(instances),
        routing=RoutingPlan(),
    )


CHAIN = InstancePlan(
    name="chain", role="mixed", chain=["s0", "s1", "s2", "s3"], micro_batches=2, max_batch_tokens=4096
)
DECODE = InstancePlan(name="dec", role="decode", chain=["s0"], max_batch_tokens=8192)


def test_a_step_budget_changes_the_instances_that_prefill_and_leaves_decode_alone():
    small = TOKEN_GRID[0]
    plan = with_setting(plan_with(CHAIN, DECODE), small)
    chain, dec = plan.instances
    assert (chain.chunk_size, chain.max_batch_tokens) == (small.chunk_size, small.max_batch_tokens)
    assert chain.micro_batches == 2 and chain.chunk_size <= chain.max_batch_tokens
    assert dec == DECODE
    assert [s for s, _ in token_variants(plan_with(CHAIN))] == list(TOKEN_GRID)


def test_a_lane_per_stage_only_for_chains_with_fewer_lanes_than_stages():
    plan = plan_with(CHAIN, DECODE)
    assert has_chains(plan)
    setting, laned = lane_variant(TOKEN_GRID[0], plan)
    assert setting.lane_per_stage and setting.max_batch_tokens == TOKEN_GRID[0].max_batch_tokens
    assert laned.instances[0].micro_batches == 4 and laned.instances[0].max_batch_tokens == 256
    assert lane_variant(AS_WRITTEN, plan)[0].name == "one lane per stage"
    assert lane_variant(AS_WRITTEN, plan_with(DECODE)) is None


def test_per_request_pipelining_for_chains_in_lanes_and_back_to_lanes_from_it():
    plan = plan_with(CHAIN, DECODE)
    setting, single = request_variant(TOKEN_GRID[0], plan)
    assert setting.per_request and setting.short == "128/256 +per-request"
    chain, dec = single.instances
    assert (chain.pipelining, chain.micro_batches, chain.max_batch_tokens) == ("per-request", 1, 256)
    assert chain.kv_pool == "server"  # the chains through a server share its KV, as Helix's and Petals'
    assert dec == DECODE  # one server: nothing to pipeline
    # a prefill chain pipelines per request over its own share: its KV is handed over in its own blocks
    prefill = CHAIN.model_copy(update={"name": "pre", "role": "prefill"})
    (pre,) = request_variant(AS_WRITTEN, plan_with(prefill))[1].instances
    assert (pre.pipelining, pre.kv_pool) == ("per-request", "own")
    assert request_variant(AS_WRITTEN, single) is None  # already per request
    assert request_variant(AS_WRITTEN, plan_with(DECODE)) is None
    # a strategy that wrote per-request chains still gets lanes tried
    _, laned = lane_variant(AS_WRITTEN, single)
    assert (laned.instances[0].pipelining, laned.instances[0].micro_batches) == ("lanes", 4)
    assert laned.instances[0].kv_pool == "own"
    # the grid: every step budget, one lane per stage with each of them (the plan's own first), then per
    # request with the best so far
    names = [s.name for s, _ in grid(plan, lambda: TOKEN_GRID[1])]
    assert names == [s.name for s in TOKEN_GRID] + [
        "one lane per stage",
        *(f"{s.name}, one lane per stage" for s in TOKEN_GRID),
        f"{TOKEN_GRID[1].name}, per-request pipelining",
    ]
    # a plan without chains: the step budgets only
    assert [s.name for s, _ in grid(plan_with(DECODE), lambda: AS_WRITTEN)] == [s.name for s in TOKEN_GRID]


def fake_run(tok_s, too_long=0, slo=True):
    reasons = [DROP_TOO_LONG] * too_long + [DROP_UNFINISHED, ""]
    summary = SimpleNamespace(throughput_tok_s=tok_s, completed=10, slo_met=slo, cost_per_hour=1.0)
    return SimpleNamespace(
        summary=summary, slo_met=slo, result=SimpleNamespace(records=SimpleNamespace(drop_reason=reasons))
    )


def test_refused_counts_only_requests_too_long_for_the_cache():
    assert refused(fake_run(1.0, too_long=3).result) == 3


def test_the_comparison_keeps_the_fastest_setting_that_refuses_no_more_requests():
    """Throughput: the setting with the most tok/s wins, except one that drops more requests as too long
    than the plan as written (it would gain by serving only the short ones)."""
    plan = plan_with(CHAIN)
    # tok/s by (max_batch_tokens, lanes, pipelining) of the instance: the lane-per-stage variant is fastest
    # but refuses
    scores = {
        (4096, 2, "lanes"): (100, 1),
        (256, 2, "lanes"): (180, 1),
        (2048, 2, "lanes"): (150, 0),
        (8192, 2, "lanes"): (90, 0),
        (256, 4, "lanes"): (400, 5),
        (4096, 4, "lanes"): (120, 1),
        (2048, 4, "lanes"): (160, 1),
        (8192, 4, "lanes"): (80, 1),
        (256, 1, "per-request"): (170, 1),
    }
    ev = Evaluator.__new__(Evaluator)
    ev.run = lambda dep, rate=None: fake_run(*scores[dep])
    inst = lambda p: (
        p.instances[0].max_batch_tokens,
        p.instances[0].micro_batches,
        p.instances[0].pipelining,
    )
    tuned = ev.tune(OBJECTIVES["throughput"], plan, inst)
    assert tuned.setting == TOKEN_GRID[0] and tuned.base.summary.throughput_tok_s == 180
    # as written, three step budgets, a lane per stage with each of the four, and per-request
    # pipelining with the best of them
    assert tuned.tried == 9
    scores[(256, 4, "lanes")] = (400, 1)
    assert ev.tune(OBJECTIVES["throughput"], plan, inst).setting.lane_per_stage
    scores[(256, 4, "lanes")] = (400, 5)
    scores[(256, 1, "per-request")] = (190, 0)
    assert ev.tune(OBJECTIVES["throughput"], plan, inst).setting.per_request
    # lanes do best with a step budget that is not the best without them
    scores[(256, 1, "per-request")] = (170, 1)
    scores[(8192, 4, "lanes")] = (250, 0)
    scores[(8192, 1, "per-request")] = (200, 0)  # per request with that budget: tried, not better
    tuned = ev.tune(OBJECTIVES["throughput"], plan, inst)
    assert tuned.setting.lane_per_stage and tuned.setting.max_batch_tokens == 8192


def test_cost_keeps_the_plan_as_written_unless_a_setting_carries_the_load_it_did_not():
    plan = plan_with(CHAIN)
    ev = Evaluator.__new__(Evaluator)
    slo_by_tokens = {4096: False, 256: False, 2048: True, 8192: True}
    ev.run = lambda dep, rate=None: fake_run(1.0, slo=slo_by_tokens[dep[0]])
    inst = lambda p: (p.instances[0].max_batch_tokens, p.instances[0].micro_batches)
    tuned = ev.tune(OBJECTIVES["cost"], plan, inst)
    assert tuned.setting == TOKEN_GRID[1]  # the first that carries it; an equal cost is no reason to move
    slo_by_tokens[4096] = True
    assert ev.tune(OBJECTIVES["cost"], plan, inst).setting is AS_WRITTEN


def test_the_planner_runs_its_plan_at_the_best_setting_and_says_so(monkeypatch):
    """The planner searches the same grid for its own plan: with simulations whose throughput favours the
    smallest step budget, the plan it returns has that budget and its notes say so."""
    from hetserve.planner import search
    from hetserve.planner.evaluate import Run
    from hetserve.specs.models import load_model
    from hetserve.specs.workloads import Workload, WorkloadFile
    from tests.contexts import WORKLOAD, cluster

    real = search.Planner._simulate

    def favour_small_steps(self, dep, rate):
        run = real(self, dep, rate)
        prefills = [i for i in dep.instances.values() if i.role != "decode"]
        if run is None or not all(i.plan.max_batch_tokens == 256 for i in prefills):
            return run
        summary = replace(run.summary, throughput_tok_s=run.summary.throughput_tok_s * 2)
        return Run(run.offered_rps, replace(run.result, summary=summary))

    monkeypatch.setattr(search.Planner, "_simulate", favour_small_steps)
    planner = search.Planner(
        cluster([{"name": "l4", "gpu": "l4", "count": 1, "replicas": 2}]),
        load_model("llama-3.1-8b"),
        Workload(WorkloadFile.model_validate(WORKLOAD)),
        "throughput",
        cluster_ref="c.yaml",
        model_ref="llama-3.1-8b",
        time_limit=60,
    )
    plan = planner.run().plan
    prefills = [i for i in plan.instances if i.role != "decode"]
    assert prefills and all(i.max_batch_tokens == 256 and i.chunk_size == 128 for i in prefills)
    assert "chunks of 128, 256 tokens per step" in plan.notes
