"""The allocation MILP is optimal: on clusters of <= 8 GPUs it matches brute-force enumeration of the
same candidate instances on the same cost model, over a grid of models, workloads and objectives."""

import pytest

from hetserve.planner.allocate import enumerate_best, solve
from hetserve.planner.pools import pools_of
from hetserve.planner.quality import removed_share, sensitivity
from hetserve.planner.templates import TemplateFactory
from hetserve.specs.clusters import Cluster, ClusterFile
from hetserve.specs.models import load_model
from hetserve.specs.workloads import SLO

CLUSTERS = {
    "a100x4+l4x4": [{"name": "a", "gpu": "a100-80gb", "count": 4}, {"name": "l", "gpu": "l4", "count": 4}],
    "h100x2+a10x2+t4x4": [
        {"name": "h", "gpu": "h100-sxm", "count": 2},
        {"name": "a", "gpu": "a10", "count": 2},
        {"name": "t", "gpu": "t4", "count": 4},
    ],
    "l40sx8": [{"name": "s", "gpu": "l40s", "count": 4, "replicas": 2}],
}
WORKLOADS = {  # mean prompt, mean output, SLO
    "chat": (1000, 200, SLO(ttft_ms=2000, tpot_ms=100)),
    "code": (2000, 30, SLO(ttft_ms=1500, tpot_ms=60)),
}


def factory(cluster_name, model, workload, objective="goodput", quality=0.3):
    cluster = Cluster(ClusterFile.model_validate({"nodes": CLUSTERS[cluster_name]}))
    p, o, slo = WORKLOADS[workload]
    f = TemplateFactory(cluster, load_model(model), p, o, None if objective == "throughput" else slo, quality)
    return f.all(), {pl.key: pl.total for pl in pools_of(cluster)}


GRID = [(c, m, w) for c in CLUSTERS for m in ("llama-3.1-8b", "llama-2-13b") for w in WORKLOADS]


@pytest.mark.parametrize("cluster,model,workload", GRID)
@pytest.mark.parametrize("objective", ["goodput", "throughput"])
def test_milp_matches_enumeration(cluster, model, workload, objective):
    templates, pools = factory(cluster, model, workload, objective)
    assert templates
    alloc = solve(templates, pools, objective)
    best = enumerate_best(templates, pools, objective)
    assert best is not None and alloc is not None
    assert alloc.objective >= best * 0.99
    assert alloc.objective <= best * (1 + 1e-6)  # and it is a real, feasible allocation


@pytest.mark.parametrize("cluster,model,workload", GRID[:4])
def test_min_cost_at_a_rate_matches_enumeration(cluster, model, workload):
    templates, pools = factory(cluster, model, workload)
    top = solve(templates, pools, "goodput")
    rate = top.rate * 0.4
    alloc = solve(templates, pools, "cost", rate=rate)
    best = enumerate_best(templates, pools, "cost", rate=rate)
    assert alloc.rate >= rate * (1 - 1e-6)
    assert alloc.objective <= best * 1.01


def test_budget_is_respected_and_binds():
    templates, pools = factory("a100x4+l4x4", "llama-3.1-8b", "chat")
    free = solve(templates, pools, "goodput")
    capped = solve(templates, pools, "goodput", budget=free.price / 3)
    assert capped.price <= free.price / 3 + 1e-9 and capped.rate < free.rate
    assert capped.objective == pytest.approx(
        enumerate_best(templates, pools, "goodput", budget=free.price / 3), rel=0.01
    )


def test_quality_budget_is_a_hard_constraint():
    model = load_model("llama-3.1-8b")
    sens = sensitivity(model)
    for q in (0.0, 0.1, 0.3):
        templates, _ = factory("a100x4+l4x4", "llama-3.1-8b", "chat", quality=q)
        for t in templates:
            bits = [b for s in t.stages for b in s.bits]
            assert len(bits) == model.num_layers
            assert removed_share(bits, sens) <= q + 1e-9
    lossless, _ = factory("a100x4+l4x4", "llama-3.1-8b", "chat", quality=0.0)
    assert all(b == 16 for t in lossless for s in t.stages for b in s.bits)


def test_chains_never_span_vendors_and_groups_stay_in_nodes():
    cluster = Cluster(
        ClusterFile.model_validate(
            {
                "nodes": [
                    {"name": "n", "gpu": "h100-sxm", "count": 2},
                    {"name": "m", "gpu": "mi300x", "count": 2},
                    {"name": "a", "gpu": "a100-40gb", "count": 2},
                ]
            }
        )
    )
    f = TemplateFactory(cluster, load_model("llama-2-70b"), 1000, 200, SLO(ttft_ms=3000, tpot_ms=150), 0.3)
    templates = f.all()
    assert templates
    for t in templates:
        assert len({s.pool.gpu.vendor for s in t.stages}) == 1
        for s in t.stages:
            assert s.tp <= s.pool.gpus_per_node and s.pool.gpus_per_node % s.tp == 0
    # the 70B model fits no single 2-GPU node at 16 bits: chains (or lower bits) make it fit
    assert any(len(t.stages) > 1 for t in templates)


@pytest.mark.parametrize("sensitive_half", ["first", "second"])
def test_measured_sensitivity_decides_which_layers_lose_bits(write, sensitive_half):
    """With a sensitivity file, a single-stage instance's least sensitive layers go below 16 bits first:
    no layer of the measured-insensitive half keeps more bits than any of the sensitive half."""
    from hetserve.specs.sensitivity import with_sensitivity

    model = load_model("llama-3.1-8b")
    n = model.num_layers
    sensitive = set(range(n // 2)) if sensitive_half == "first" else set(range(n // 2, n))
    changes = "\n".join(f"    - {8.0 if i in sensitive else 0.2}" for i in range(n))
    path = write(
        "sens.yaml",
        f"model: x\nnum_layers: {n}\ntokens: 400\ngroup_size: 64\nbase_perplexity: 20.0\n"
        f"change_pct:\n  4:\n{changes}\n",
    )
    cluster = Cluster(ClusterFile.model_validate({"nodes": CLUSTERS["a100x4+l4x4"]}))
    p, o, slo = WORKLOADS["chat"]
    measured = with_sensitivity(model, path)
    templates = TemplateFactory(cluster, measured, p, o, slo, 0.3).all()
    single = [[b for s in t.stages for b in s.bits] for t in templates if len(t.stages) == 1]
    quantised = [bits for bits in single if min(bits) < 16]
    assert quantised  # the budget is spent somewhere, or the test says nothing
    for bits in quantised:
        assert max(bits[i] for i in range(n) if i not in sensitive) <= min(bits[i] for i in sensitive)
        assert removed_share(bits, sensitivity(measured)) <= 0.3 + 1e-9


def test_instance_names_say_role_gpus_depth_and_tp():
    from hetserve.planner.build import instance_prefix

    templates, _ = factory("h100x2+a10x2+t4x4", "llama-3.1-8b", "chat")
    names = {instance_prefix(t) for t in templates}
    for t in templates:
        name = instance_prefix(t)
        assert name.startswith(t.role + "-") and t.stages[0].pool.gpu.name in name
        assert ("pp" + str(len(t.stages))) in name if len(t.stages) > 1 else "pp" not in name
        assert name.endswith("tp" + "/".join(dict.fromkeys(str(s.tp) for s in t.stages)))
    assert any("+" in n for n in names) or all(
        len({s.pool.gpu.name for s in t.stages}) == 1 for t in templates
    )


def test_templates_of_an_moe_model_take_expert_parallelism_where_it_serves_more():
    """DeepSeek-V3 at 8 bits on 8 H200s: with its latent KV kept once per sequence (expert parallelism,
    data-parallel attention) a decode server holds several times the sequences, and serves more within
    the SLOs; a dense model's templates never get the flag."""
    from hetserve.planner.pools import Stage

    cluster = Cluster(ClusterFile.model_validate({"nodes": [{"name": "h", "gpu": "h200", "count": 8}]}))
    (pool,) = pools_of(cluster)
    f = TemplateFactory(cluster, load_model("deepseek-v3"), 2000, 400, SLO(ttft_ms=3000, tpot_ms=100), 0.0)
    stage = Stage(pool, 8, 0, 61, (8,) * 61)
    chosen = f.make("decode", [stage])
    tp = f._make("decode", [stage])
    assert chosen.stages[0].ep and not tp.stages[0].ep
    assert chosen.kv_tokens > 4 * tp.kv_tokens and chosen.cap.rate > tp.cap.rate
    dense = TemplateFactory(
        cluster, load_model("llama-3.1-70b"), 2000, 400, SLO(ttft_ms=3000, tpot_ms=100), 0.0
    )
    assert not dense.make("decode", [Stage(pool, 8, 0, 80, (16,) * 80)]).stages[0].ep
