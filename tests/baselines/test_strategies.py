"""Strategies: hetserve's planner and the baselines each produce a plan the loader and the simulator
accept, and each baseline keeps the properties that define it (docs/baselines.md)."""

import pytest

from hetserve.baselines import STRATEGIES, get_strategy, hexgen
from hetserve.errors import HetserveError
from hetserve.planner.pools import pools_of
from hetserve.planner.quality import removed_share, sensitivity
from hetserve.sim import simulate
from tests.contexts import WORKLOAD, context, helix_machines, layer_counts, plan_of

MIXED_NVIDIA = [
    {"name": "a100", "gpu": "a100-80gb", "count": 2},
    {"name": "l4", "gpu": "l4", "count": 2, "replicas": 2},
]
#: Strategies that plan any model on any cluster (``helix-published`` is one fixed layout: tested below).
GENERAL = [n for n in STRATEGIES if n != "helix-published"]


@pytest.mark.parametrize("name", GENERAL)
def test_every_strategy_plans_something_the_loader_and_simulator_accept(name):
    ctx = context(MIXED_NVIDIA)
    plan, dep = plan_of(name, ctx)
    assert plan.model == "llama-3.1-8b" and dep.gpus_used() >= 1
    for srv in dep.servers.values():  # TP groups stay inside their node
        assert max(srv.plan.gpus) < srv.node.count
    used: dict[str, float] = {}
    for inst in dep.instances.values():
        for srv in inst.servers:
            used[srv.name] = used.get(srv.name, 0.0) + inst.plan.share_on(srv.name)
    assert max(used.values()) <= 1 + 1e-9
    reqs = ctx.workload.sample(seed=0, duration_s=10)
    s = simulate(dep, reqs, ctx.slo).summary
    assert s.completed > 0.9 * len(reqs)


@pytest.mark.parametrize("name", GENERAL)
def test_every_strategy_keeps_to_an_engine_that_runs_one_sequence_per_batch(name):
    """With ``max_seqs`` (a scenario's ``max_batch_size``) no instance may batch more than that per
    micro-batch lane, and the simulator then never runs more sequences in an instance than it has lanes."""
    ctx = context(MIXED_NVIDIA, max_seqs=1)
    _, dep = plan_of(name, ctx)
    for inst in dep.instances.values():
        assert inst.plan.max_batch_size <= inst.plan.micro_batches, (inst.name, inst.plan)
    reqs = ctx.workload.sample(seed=0, duration_s=10)
    assert simulate(dep, reqs, ctx.slo).summary.completed > 0


def test_an_engine_that_batches_little_leaves_weights_the_room_kv_did_not_need():
    """Llama-2-70B at 16 bits on two A100-80GB: the usual KV reserve (15% of free memory) leaves too
    little room for the weights; one sequence per batch needs about 1 GB of KV, so TP2 replicas fit."""
    hx = {
        "arrivals": {"kind": "poisson", "rate": 0.5},
        "prompt": {"kind": "lognormal", "mean": 512, "cv": 1.0, "max": 4096},
        "output": {"kind": "lognormal", "mean": 128, "cv": 1.0, "max": 1024},
        "slo": {"e2e_ms": 35000, "percentile": 90},
        "duration_s": 60,
    }
    nodes = [{"name": "a100", "gpu": "a100-80gb", "count": 8}]

    def tp_of_one_stage_replicas(**kw):
        ctx = context(nodes, model="llama-2-70b", workload=hx, quality=0.0, **kw)
        pool = pools_of(ctx.cluster)[0]
        return {t.stages[0].tp for t in ctx.factory().single_pool(pool) if len(t.stages) == 1}

    assert 2 not in tp_of_one_stage_replicas()
    assert 2 in tp_of_one_stage_replicas(max_seqs=1)


def test_unknown_strategy_is_a_clear_error():
    with pytest.raises(HetserveError) as exc:
        get_strategy("hexgn")
    msg = str(exc.value)
    assert "did you mean 'hexgen'" in msg and "llm-pq" in msg and "hetserve" in msg


def test_context_rejects_bad_settings():
    with pytest.raises(HetserveError, match="objective 'speed'"):
        context(MIXED_NVIDIA, objective="speed")
    with pytest.raises(HetserveError, match="budget=-1"):
        context(MIXED_NVIDIA, budget=-1)
    with pytest.raises(HetserveError, match="max_batch_size=0 must be at least 1"):
        context(MIXED_NVIDIA, max_seqs=0)


def test_homogeneous_uses_one_gpu_type_and_identical_replicas():
    ctx = context(MIXED_NVIDIA)
    _, dep = plan_of("homogeneous", ctx)
    assert len(dep.gpu_counts()) == 1
    shapes = {
        tuple((s.node.gpu.name, s.plan.tp, s.plan.layers) for s in i.servers) for i in dep.instances.values()
    }
    assert len(shapes) == 1 and {i.role for i in dep.instances.values()} == {"mixed"}


def test_homogeneous_respects_the_budget():
    ctx = context(MIXED_NVIDIA, budget=2.0)  # one L4 pair is $1.61/h; the A100s cost more
    _, dep = plan_of("homogeneous", ctx)
    assert dep.cost_per_hour() <= 2.0


def test_uniform_splits_layers_evenly_at_one_precision_over_every_gpu():
    ctx = context(MIXED_NVIDIA)
    _, dep = plan_of("uniform", ctx)
    (inst,) = dep.instances.values()
    counts = layer_counts(inst)
    assert len(inst.servers) == 6 and all(s.plan.tp == 1 for s in inst.servers)
    assert max(counts) - min(counts) <= 1
    assert len({b for s in inst.servers for b in s.plan.layer_bits()}) == 1


def test_hexgen_is_16_bit_colocated_and_deterministic_for_a_seed():
    nodes = [
        {"name": "a6000", "gpu": "rtx-a6000", "count": 2},
        {"name": "r3090", "gpu": "rtx-3090", "count": 2},
    ]
    ctx = context(nodes, model="llama-2-13b")
    plan, dep = plan_of("hexgen", ctx)
    assert all(b == 16 for s in dep.servers.values() for b in s.plan.layer_bits())
    assert {i.role for i in dep.instances.values()} == {"mixed"}
    again, _ = plan_of("hexgen", context(nodes, model="llama-2-13b"))
    assert again.servers == plan.servers and again.instances == plan.instances


def test_hexgen_builds_asymmetric_pipelines_where_no_node_holds_the_model():
    nodes = [
        {"name": "a6000", "gpu": "rtx-a6000", "count": 2},
        {"name": "r3090", "gpu": "rtx-3090", "count": 2},
    ]
    ctx = context(
        nodes,
        model="llama-2-70b",
        workload={**WORKLOAD, "arrivals": {"kind": "poisson", "rate": 0.2}},
        quality=0.0,
    )
    with pytest.raises(HetserveError, match="does not quantise"):
        plan_of("hexgen", ctx)  # 138 GB of 16-bit weights, 144 GB of GPUs: no KV room
    bigger = nodes + [{"name": "a6000b", "gpu": "rtx-a6000", "count": 2}]
    _, dep = plan_of(
        "hexgen",
        context(
            bigger,
            model="llama-2-70b",
            quality=0.0,
            objective="throughput",
            workload={**WORKLOAD, "arrivals": {"kind": "poisson", "rate": 0.2}},
        ),
    )
    chains = [i for i in dep.instances.values() if len(i.servers) > 1]
    assert chains and all(len({s.node.name for s in i.servers}) > 1 for i in chains)


HEXGEN_NODES = [
    {"name": "a6000", "gpu": "rtx-a6000", "count": 2, "replicas": 2},
    {"name": "r3090", "gpu": "rtx-3090", "count": 2, "replicas": 2},
]


def test_hexgen_search_budget_is_generations_not_time():
    """The same plan whatever the time limit (the budget is HexGen's generations; the limit only guards)."""
    short, _ = plan_of("hexgen", context(HEXGEN_NODES, model="llama-2-13b", time_limit=4.0))
    long, _ = plan_of("hexgen", context(HEXGEN_NODES, model="llama-2-13b", time_limit=60.0))
    assert short.servers == long.servers and short.instances == long.instances
    assert f"({hexgen.GENERATIONS} generations," in short.notes


def test_hexgen_simulates_on_its_periodic_generations_only(monkeypatch):
    """HexGen's schedule: every offspring of a periodic generation is simulated (each grouping once), no
    other; without a periodic generation, the ordinary fitness (the number of groups) decides."""
    calls = []
    real = hexgen.trial

    def counted(ctx, plan, rate, *args, **kw):
        calls.append(len(plan.instances))
        return real(ctx, plan, rate, *args, **kw)

    monkeypatch.setattr(hexgen, "trial", counted)
    monkeypatch.setattr(hexgen, "GENERATIONS", 30)
    monkeypatch.setattr(hexgen, "SIMULATE_FROM", 10)
    monkeypatch.setattr(hexgen, "SIMULATE_EVERY", 10)
    plan, _ = plan_of("hexgen", context(HEXGEN_NODES, model="llama-2-13b"))
    assert 1 <= len(calls) <= 2 * hexgen.OFFSPRING  # generations 10 and 20
    assert f"{len(calls)} groupings simulated" in plan.notes
    calls.clear()
    monkeypatch.setattr(hexgen, "SIMULATE_FROM", 30)  # no periodic generation: the most groups win
    plan, dep = plan_of("hexgen", context(HEXGEN_NODES, model="llama-2-13b"))
    assert not calls and "none simulated" in plan.notes
    assert len(dep.instances) == 4  # one replica per unit: every unit holds the 13B model at 16 bits


def test_llmpq_one_pipeline_over_every_gpu_with_mixed_bits_within_the_quality_budget():
    nodes = [{"name": "t4", "gpu": "t4", "count": 4}, {"name": "v100", "gpu": "v100-32gb", "count": 2}]
    batch = {
        "arrivals": {"kind": "poisson", "rate": 1000},
        "prompt": {"kind": "fixed", "value": 512},
        "output": {"kind": "fixed", "value": 100},
        "duration_s": 0.032,
    }
    ctx = context(nodes, model="opt-66b", objective="throughput", workload=batch, quality=0.5, time_limit=10)
    _, dep = plan_of("llm-pq", ctx)
    (inst,) = dep.instances.values()
    gpus = {(s.node.name, g) for s in inst.servers for g in s.plan.gpus}
    assert len(gpus) == 6 and len(inst.servers) == 6  # every GPU is one stage
    bits = [b for s in inst.servers for b in s.plan.layer_bits()]
    assert len(set(bits)) > 1  # 132 GB of 16-bit weights on 128 GB: mixed bits
    assert removed_share(bits, sensitivity(ctx.model)) <= 0.5 + 1e-9
    assert inst.plan.micro_batches == 6 and inst.plan.policy == "prefill-first"


def test_splitwise_prompt_pool_and_token_pool_on_different_machine_types():
    nodes = [
        {"name": "h100", "gpu": "h100-sxm", "count": 2},
        {"name": "a100", "gpu": "a100-80gb", "count": 2},
    ]
    ctx = context(nodes)
    plan, dep = plan_of("splitwise", ctx)
    pre = {s.node.gpu.name for i in dep.instances.values() if i.role == "prefill" for s in i.servers}
    dec = {s.node.gpu.name for i in dep.instances.values() if i.role == "decode" for s in i.servers}
    assert len(pre) == 1 and len(dec) == 1 and pre != dec  # one machine each: HA or AH
    assert all(s.plan.tp == 2 for s in dep.servers.values())  # whole machines, tensor parallel
    assert plan.routing.handoff == "least-work" and plan.routing.layerwise_kv is True


def test_splitwise_minimises_power_or_cost_at_the_rate():
    nodes = [{"name": "h100", "gpu": "h100-sxm", "count": 2, "replicas": 3}]
    cost = plan_of("splitwise", context(nodes, objective="cost"))[1]
    top = plan_of("splitwise", context(nodes, objective="goodput"))[1]
    assert cost.cost_per_hour() <= top.cost_per_hour()


def test_pd_hetero_prefills_on_the_compute_strong_vendor_and_decodes_on_the_other():
    nodes = [
        {"name": "h100", "gpu": "h100-sxm", "count": 4, "zone": "nv"},
        {"name": "mi300x", "gpu": "mi300x", "count": 2, "zone": "amd"},
    ]
    plan, dep = plan_of("pd-hetero", context(nodes, model="llama-3.1-70b"))
    roles = {i.role: {s.node.gpu.vendor for s in i.servers} for i in dep.instances.values()}
    assert roles["prefill"] == {"nvidia"} and roles["decode"] == {"amd"}
    assert plan.routing.layerwise_kv is False and plan.routing.handoff in ("least-work", "weighted")
    p = next(n for n, i in dep.instances.items() if i.role == "prefill")
    d = next(n for n, i in dep.instances.items() if i.role == "decode")
    assert dep.kv_conversion_needed(p, d)


def test_petals_chains_share_block_servers_within_their_kv_room():
    nodes = [
        {"name": "a10", "gpu": "a10", "count": 1},
        {"name": "t4", "gpu": "t4", "count": 1, "replicas": 6},
    ]
    ctx = context(
        nodes, model="llama-2-13b", workload={**WORKLOAD, "arrivals": {"kind": "poisson", "rate": 0.5}}
    )
    plan, dep = plan_of("petals", ctx)
    users: dict[str, list[str]] = {}
    for inst in dep.instances.values():
        for srv in inst.servers:
            users.setdefault(srv.name, []).append(inst.name)
    shared = [s for s, u in users.items() if len(u) > 1]
    assert "a10-g0" in shared, "the A10 heads two chains"
    for s in shared:
        shares = [dep.instances[i].plan.share_on(s) for i in users[s]]
        assert sum(shares) <= 1 + 1e-9
        assert shares == pytest.approx([1 / len(shares)] * len(shares), abs=1e-3)  # split evenly
    assert all(len(i.servers) > 1 for i in dep.instances.values())
    assert plan.routing.policy == "least-work"


def test_petals_servers_hold_every_block_that_fits_and_chains_run_parts_of_them():
    """Petals' span choice: a server takes as many blocks as fit beside its attention cache, at any
    start (not trimmed to meet another span); spans overlap and a chain runs part of a server."""
    from hetserve.baselines.petals import attn_cache_tokens
    from hetserve.planner.placement.blocks import block_servers, blocks_that_fit

    nodes = [
        {"name": "a10", "gpu": "a10", "count": 1, "replicas": 2},
        {"name": "t4", "gpu": "t4", "count": 1, "replicas": 3},
    ]
    ctx = context(nodes, model="llama-2-13b", quality=0.0)
    plan, dep = plan_of("petals", ctx)
    L = ctx.model.num_layers
    blocks = {b.node: b for b in block_servers(ctx, 16)}
    cache = attn_cache_tokens(ctx.model)
    for srv in dep.servers.values():
        start, end = srv.plan.layers
        fits = blocks_that_fit(ctx, blocks[srv.node.name], 16, cache, first=start == 0, last=end == L)
        assert end - start == min(fits, L - start) if end == L else end - start == fits
    parts = [
        (srv.name, span)
        for inst in dep.instances.values()
        for srv, span in zip(inst.servers, inst.layers)
        if span != tuple(srv.plan.layers)
    ]
    assert parts, "some chain runs part of a server whose span overlaps another"


def test_petals_reserves_its_default_attention_cache_per_model():
    """Petals' server default: 32,768 cache tokens per block when KV heads are shared, 8,192 otherwise."""
    from hetserve.baselines.petals import attn_cache_tokens
    from hetserve.specs.models import load_model

    assert attn_cache_tokens(load_model("llama-2-70b")) == 32768  # 8 KV heads for 64 query heads
    assert attn_cache_tokens(load_model("llama-2-13b")) == 8192
    assert attn_cache_tokens(load_model("bloom-176b")) == 8192


def test_petals_serves_in_nf4_where_allowed_and_every_lane_holds_a_long_request():
    """Petals' GPU default is NF4: at a quality budget that allows 4 bits its servers load 4-bit blocks
    (at lossless, 16); each chain's lanes have room for a long request, so a swarm whose caches hold
    the workload's requests refuses none of them (at 8 bits with four lanes per chain, BLOOM-176B on
    the geo cluster held 1,138 tokens per lane and dropped every 2,000-token request)."""
    from pathlib import Path

    import yaml

    from hetserve.baselines import StrategyContext, get_strategy
    from hetserve.plan import Deployment
    from hetserve.specs.clusters import Cluster
    from hetserve.specs.models import load_model
    from hetserve.specs.workloads import Workload, WorkloadFile

    root = Path(__file__).resolve().parents[2] / "examples"
    scenario = yaml.safe_load((root / "scenarios" / "chain-bloom176b.yaml").read_text())
    cluster = Cluster.load(root / "clusters" / "chain-geo-mig.yaml")
    wl = Workload(WorkloadFile.model_validate(scenario["workload"]))
    ctx = StrategyContext(cluster, load_model("bloom-176b"), wl, "goodput", quality=0.75, time_limit=4.0)
    plan = get_strategy("petals").plan(ctx)
    dep = Deployment(plan, cluster, ctx.model, source="petals plan")
    assert {b for s in dep.servers.values() for b in s.plan.layer_bits()} == {4}
    long = ctx.long_request
    for inst in dep.instances.values():
        lanes = max(1, inst.plan.micro_batches)
        assert inst.kv_capacity_tokens // lanes >= long
    lossless = context([{"name": "a", "gpu": "a100-80gb", "count": 2}], model="llama-2-13b", quality=0.0)
    _, dep16 = plan_of("petals", lossless)
    assert {b for s in dep16.servers.values() for b in s.plan.layer_bits()} == {16}


HELIX_24 = helix_machines(4, 8, 12)


def test_helix_published_runs_the_authors_layout_as_three_chains_over_all_24_machines():
    ctx = context(HELIX_24, model="llama-2-70b", objective="throughput")
    assert get_strategy("helix-published").applies(ctx)
    plan, dep = plan_of("helix-published", ctx)
    assert dep.gpus_used() == 24 and len(dep.instances) == 3
    for inst in dep.instances.values():  # every chain covers the 80 layers, each span meeting the next
        spans = [s.plan.layers for s in inst.servers]
        assert spans[0][0] == 0 and spans[-1][1] == 80
        assert all(a[1] == b[0] for a, b in zip(spans, spans[1:]))
        assert all(s.plan.bits == 16 for s in inst.servers)
    # the trunk's first machine (a T4 with layers 0-3) carries every chain: its KV shares add up to 1
    first = {i.servers[0].name for i in dep.instances.values()}
    assert len(first) == 1
    (name,) = first
    assert dep.servers[name].node.gpu.name == "t4"
    assert sum(i.plan.share_on(name) for i in dep.instances.values()) == pytest.approx(1, abs=1e-3)
    # requests weighted by the published flows (226.15 : 531.70 : 531.70)
    w = sorted(plan.routing.weights.values())
    assert w[0] / w[1] == pytest.approx(226.15 / 531.70, rel=1e-3)


def test_helix_published_says_what_the_layout_needs_elsewhere():
    strategy = get_strategy("helix-published")
    small = context(helix_machines(4, 8, 10), model="llama-2-70b")
    assert not strategy.applies(small)
    with pytest.raises(HetserveError, match="lacks 2 t4"):
        strategy.plan(small)
    with pytest.raises(HetserveError, match="80 layers"):
        strategy.plan(context(HELIX_24))  # Llama-3.1-8B has 32
