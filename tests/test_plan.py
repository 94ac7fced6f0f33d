"""The plan file: the examples load, each validation rule rejects a broken plan with a message that
names the field and the problem, and the loaded deployment answers capacity, cost and hand-off
questions correctly."""

from __future__ import annotations

import copy
import re

import pytest
import yaml

from hetserve.errors import HetserveError
from hetserve.plan import PlanFile, load_plan, save_plan
from hetserve.specs.gpus import builtin_gpus

from .conftest import EXAMPLES

PLANS = EXAMPLES / "plans"
EXPECTED_EXAMPLES = {
    "deepseek-expert-parallel.yaml",
    "homogeneous-replicas.yaml",
    "hexgen-asymmetric.yaml",
    "llmpq-mixed-precision.yaml",
    "splitwise-pd.yaml",
    "cross-vendor-pd.yaml",
    "petals-chains.yaml",
    "bench-32gpu.yaml",
}

# ---- a small plan to break -------------------------------------------------------------------------
CLUSTER = """\
name: tiny
nodes:
  - {name: nv, gpu: l4, count: 4}
  - {name: amd, gpu: mi300x, count: 2}
  - {name: t4, gpu: t4, count: 1}
"""

# Llama-3.1-8B (32 layers, 32 heads): a 2-stage TP-2 pipeline on L4s and a single MI300X replica.
BASE = {
    "model": "llama-3.1-8b",
    "cluster": "cluster.yaml",
    "servers": [
        {"name": "a", "node": "nv", "gpus": [0, 1], "layers": [0, 16]},
        {"name": "b", "node": "nv", "gpus": [2, 3], "layers": [16, 32]},
        {"name": "c", "node": "amd", "gpus": [0], "layers": [0, 32]},
    ],
    "instances": [
        {"name": "pipe", "role": "mixed", "chain": ["a", "b"]},
        {"name": "solo", "role": "mixed", "chain": ["c"]},
    ],
}


@pytest.fixture
def plan(write):
    """plan(edit=None, cluster=CLUSTER) -> path of BASE (after ``edit(dict)``) beside its cluster file."""

    def _plan(edit=None, cluster: str = CLUSTER, name: str = "plan.yaml"):
        data = copy.deepcopy(BASE)
        if edit is not None:
            edit(data)
        write("cluster.yaml", cluster)
        return write(name, yaml.safe_dump(data, sort_keys=False))

    return _plan


def load_error(path) -> str:
    with pytest.raises(HetserveError) as info:
        load_plan(path)
    return str(info.value)


# ---- the examples -------------------------------------------------------------------------------------
def test_all_example_plans_are_present():
    assert EXPECTED_EXAMPLES <= {p.name for p in PLANS.glob("*.yaml")}


@pytest.mark.parametrize("path", sorted(PLANS.glob("*.yaml")), ids=lambda p: p.name)
def test_example_plan_loads(path):
    text = path.read_text()
    assert text.startswith("#"), "each example starts with a comment saying what it shows"
    dep = load_plan(path)
    assert dep.gpus_used() > 0 and dep.instances


def test_bench_plan_shape():
    dep = load_plan(PLANS / "bench-32gpu.yaml")
    assert dep.gpus_used() == 32
    assert len(dep.gpu_counts()) >= 3
    assert len(dep.instances) == 8
    roles = [i.role for i in dep.instances.values()]
    assert {"mixed", "prefill", "decode"} <= set(roles)
    assert any(len(i.servers) == 2 for i in dep.instances.values())
    assert any(i.plan.chunk_size for i in dep.instances.values())


def test_petals_plan_shares_a_server():
    dep = load_plan(PLANS / "petals-chains.yaml")
    assert dep.spec.routing.policy == "jffc"
    shared = [s for s in dep.servers.values() if len(s.instances) > 1]
    assert shared
    for s in shared:
        assert sum(dep.instances[n].plan.kv_share for n in s.instances) <= 1.0


def test_llmpq_plan_mixes_bits_per_layer():
    dep = load_plan(PLANS / "llmpq-mixed-precision.yaml")
    (inst,) = dep.instances.values()
    bits = [b for s in inst.servers for b in s.plan.layer_bits()]
    assert len(bits) == dep.model.num_layers
    assert {16, 8, 4} <= set(bits)
    assert any(isinstance(s.plan.bits, list) for s in inst.servers)


def test_hexgen_plan_is_asymmetric():
    dep = load_plan(PLANS / "hexgen-asymmetric.yaml")
    for inst in dep.instances.values():
        assert len(inst.servers) >= 2
    stages = [(s.num_gpus, s.plan.layers[1] - s.plan.layers[0]) for s in dep.servers.values()]
    assert len({tp for tp, _ in stages}) > 1 and len({n for _, n in stages}) > 1
    assert all(s.plan.bits == 16 for s in dep.servers.values())


def test_pd_examples_hand_off():
    sw = load_plan(PLANS / "splitwise-pd.yaml")
    assert {s.node.gpu.name for i in sw.instances.values() if i.role == "prefill" for s in i.servers} == {
        "h100-sxm"
    }
    assert {s.node.gpu.name for i in sw.instances.values() if i.role == "decode" for s in i.servers} == {
        "a100-80gb"
    }
    assert sw.spec.routing.handoff_weights
    xv = load_plan(PLANS / "cross-vendor-pd.yaml")
    assert xv.kv_conversion_needed("prefill-a", "decode-a")


# ---- validation: each rule, with a message naming the field and the problem ------------------------
def _set(*path_and_value):
    *path, value = path_and_value

    def edit(d):
        obj = d
        for key in path[:-1]:
            obj = obj[key]
        obj[path[-1]] = value

    return edit


def _add_t4_replica(d):
    d["servers"].append({"name": "t", "node": "t4", "gpus": [0], "layers": [0, 32]})
    d["instances"].append({"name": "t", "role": "mixed", "chain": ["t"]})


def _tp3(d):
    d["servers"][0]["gpus"] = [0, 1, 2]
    d["servers"][1]["gpus"] = [3]


def _smollm2(d):
    """SmolLM2-135M (30 layers, 9 heads, 3 KV heads) in BASE's layout."""
    d["model"] = "smollm2-135m"
    d["servers"][0]["layers"], d["servers"][1]["layers"], d["servers"][2]["layers"] = (
        [0, 15],
        [15, 30],
        [0, 30],
    )


def _smollm2_tp4(d):
    _smollm2(d)
    d["servers"][0]["gpus"] = [0, 1, 2, 3]
    d["servers"][1].update(node="amd", gpus=[1])


def _decode_without_prefill(d):
    d["instances"][1]["role"] = "decode"


def _prefill_without_decode(d):
    d["instances"][1]["role"] = "prefill"


def _over_shared(d):
    d["servers"] = [
        {"name": "x", "node": "nv", "gpus": [0], "layers": [0, 16]},
        {"name": "y", "node": "nv", "gpus": [1], "layers": [0, 16]},
        {"name": "z", "node": "nv", "gpus": [2, 3], "layers": [16, 32]},
    ]
    d["instances"] = [
        {"name": "i1", "role": "mixed", "chain": ["x", "z"], "kv_share": 0.7},
        {"name": "i2", "role": "mixed", "chain": ["y", "z"], "kv_share": 0.5},
    ]


def _cross_vendor_chain(d):
    d["servers"][1] = {"name": "b", "node": "amd", "gpus": [1], "layers": [16, 32]}


def _pd(routing):
    def edit(d):
        d["instances"][0]["role"] = "prefill"
        d["instances"][1]["role"] = "decode"
        d["routing"] = routing

    return edit


def _misspelt_layers(d):
    d["servers"][0]["layer"] = d["servers"][0].pop("layers")


CASES = [
    # (id, edit, must appear in the message)
    (
        "unknown-node",
        _set("servers", 2, "node", "amdd"),
        ["servers[2]", ".node", "unknown node 'amdd'", "did you mean 'amd'"],
    ),
    (
        "gpu-index-out-of-node",
        _set("servers", 2, "gpus", [5]),
        ["servers[2]", ".gpus", "GPU index 5", "node amd", "2 GPUs"],
    ),
    (
        "gpu-on-two-servers",
        _set("servers", 1, "gpus", [1, 2]),
        ["servers[1]", ".gpus", "GPU 1 of node nv", "already used by server 'a'"],
    ),
    (
        "tp-cannot-split-heads",
        _smollm2_tp4,
        [
            "servers[0]",
            ".gpus",
            "tp (len(gpus))=4",
            "cannot split the 9 attention heads (3 KV heads)",
            "use one of [1, 2, 3, 9]",
        ],
    ),
    (
        "layer-covered-twice",
        _set("servers", 1, "layers", [12, 32]),
        ["instances[0] (pipe).chain", "layers 12..15 are covered twice"],
    ),
    (
        "layer-gap",
        _set("servers", 1, "layers", [20, 32]),
        ["instances[0] (pipe).chain", "layers 16..19 are not covered"],
    ),
    (
        "layers-missing-at-end",
        _set("servers", 1, "layers", [16, 30]),
        ["instances[0] (pipe).chain", "layers 30..31 are not covered", "all 32 layers"],
    ),
    (
        "layer-range-beyond-model",
        _set("servers", 1, "layers", [16, 40]),
        ["servers[1]", ".layers", "[16, 40)", "not a layer range"],
    ),
    ("server-does-not-fit", _add_t4_replica, ["server 't' does not fit", "GB of weights", "GB usable", "t4"]),
    (
        "decode-without-prefill",
        _decode_without_prefill,
        ["instances", "decode instances need a prefill instance"],
    ),
    (
        "prefill-without-decode",
        _prefill_without_decode,
        ["instances", "prefill instances need a decode instance"],
    ),
    ("kv-share-over-one", _over_shared, ["server 'z'", "kv_share", "1.20", "at most 1"]),
    (
        "chain-spans-vendors",
        _cross_vendor_chain,
        ["instances[0] (pipe).chain", "never spans vendors", "nvidia", "amd"],
    ),
    (
        "weights-name-decode-instance",
        _pd({"policy": "weighted", "weights": {"solo": 1.0}}),
        ["routing.weights", "'solo' is not a prefill or mixed instance"],
    ),
    (
        "weighted-without-weights",
        _set("routing", {"policy": "weighted"}),
        ["routing.weights", "needs a positive weight"],
    ),
    (
        "negative-weight",
        _set("routing", {"weights": {"pipe": -1}}),
        ["routing.weights", "'pipe' must be from 0 to"],
    ),
    (
        "handoff-weights-name-decode-as-source",
        _pd({"handoff": "weighted", "handoff_weights": {"solo": {"pipe": 1}}}),
        ["routing.handoff_weights", "'solo' is not a prefill instance"],
    ),
    (
        "handoff-weights-name-prefill-as-target",
        _pd({"handoff": "weighted", "handoff_weights": {"pipe": {"pipe": 1}}}),
        ["routing.handoff_weights.pipe", "'pipe' is not a decode instance"],
    ),
    ("misspelt-key", _misspelt_layers, ["servers[0]", "unknown key 'layer'", "did you mean 'layers'"]),
    (
        "bits-list-wrong-length",
        _set("servers", 0, "bits", [16, 8]),
        ["servers[0] (a).bits", "2 values for 16 layers"],
    ),
    ("unsupported-bits", _set("servers", 0, "bits", 5), ["servers[0] (a).bits", "5 is not supported"]),
    (
        "kv-dtype-not-on-gpu",
        _set("servers", 2, "kv_dtype", "int8"),
        ["servers[2] (c).kv_dtype", "mi300x", "int8"],
    ),
    (
        "unknown-server-in-chain",
        _set("instances", 0, "chain", ["a", "bb"]),
        ["instances[0] (pipe).chain[1]", "unknown server 'bb'", "did you mean 'b'"],
    ),
    (
        "unused-server",
        lambda d: d["servers"].append({"name": "u", "node": "amd", "gpus": [1], "layers": [0, 32]}),
        ["servers ['u']", "on no instance's chain"],
    ),
    (
        "duplicate-server-name",
        lambda d: d["servers"].append({"name": "a", "node": "amd", "gpus": [1], "layers": [0, 32]}),
        ["servers[3] (a).name", "used twice"],
    ),
    (
        "duplicate-instance-name",
        lambda d: d["instances"].append({"name": "solo", "role": "mixed", "chain": ["c"]}),
        ["instances[2] (solo).name", "used twice"],
    ),
    (
        "kv-share-above-one-on-instance",
        _set("instances", 1, "kv_share", 1.5),
        ["instances[1].kv_share", "less than or equal to 1"],
    ),
    (
        "kv-share-of-a-server-above-one",
        _set("instances", 0, "kv_share", {"a": 1.2, "b": 1.0}),
        ["instances[0].kv_share", "server 'a'", "less than or equal to 1"],
    ),
    (
        "micro-batches-with-per-request-pipelining",
        lambda d: d["instances"][0].update(micro_batches=2, pipelining="per-request"),
        ["instances[0]", "micro_batches is 2 but pipelining is per-request", "set pipelining: lanes"],
    ),
    (
        "kv-pool-with-lanes",
        _set("instances", 0, "kv_pool", "server"),
        [
            "instances[0]",
            "kv_pool is server but pipelining is lanes",
            "set pipelining: per-request or kv_pool: own",
        ],
    ),
    (
        "kv-pool-on-a-prefill-instance",
        lambda d: (
            _pd({})(d),
            d["instances"][0].update(pipelining="per-request", kv_pool="server"),
        ),
        ["instances[0]", "kv_pool is server but the role is prefill", "set kv_pool: own"],
    ),
    (
        "kv-pool-sharers-with-two-block-sizes",
        lambda d: (
            _over_shared(d),
            [i.update(kv_share=0.5, pipelining="per-request", kv_pool="server") for i in d["instances"]],
            d["instances"][1].update(block_size=32),
        ),
        ["server 'z'", "['i1', 'i2']", "block sizes [16, 32]", "the same block_size"],
    ),
    (
        "span-outside-the-servers-layers",
        lambda d: (d["servers"][0].update(layers=[0, 20]), d["instances"][0].update(spans={"a": [0, 22]})),
        ["instances[0] (pipe).spans.a", "[0, 22) is not a part of the layers [0, 20)", "within them"],
    ),
    (
        "span-of-a-server-not-on-the-chain",
        _set("instances", 0, "spans", {"c": [0, 16]}),
        ["instances[0] (pipe).spans", "names ['c'], not on its chain ['a', 'b']"],
    ),
    (
        "spans-on-a-prefill-instance",
        lambda d: (_pd({})(d), d["instances"][0].update(spans={"a": [0, 16]})),
        ["instances[0]", "spans are given but the role is prefill", "make the instance mixed"],
    ),
    (
        "chain-passing-a-server-twice",
        _set("instances", 0, "chain", ["a", "b", "a"]),
        ["instances[0] (pipe).chain", "server a appears twice", "passes a server once"],
    ),
    (
        "span-leaving-a-gap",
        lambda d: (d["servers"][0].update(layers=[0, 20]), d["instances"][0].update(spans={"a": [0, 14]})),
        ["instances[0] (pipe).chain", "layers 14..15 are not covered"],
    ),
    (
        "unknown-pipelining",
        _set("instances", 0, "pipelining", "lockstep"),
        ["instances[0].pipelining", "'lanes'", "'per-request'"],
    ),
    (
        "expert-parallel-without-experts",
        _set("servers", 2, "expert_parallel", True),
        ["servers[2] (c).expert_parallel", "has no experts", "remove it"],
    ),
    ("unknown-routing-policy", _set("routing", {"policy": "random"}), ["routing.policy", "jffc", "'random'"]),
    ("wrong-version", lambda d: d.update(version=2), ["version", "got 2"]),
    ("unknown-model", lambda d: d.update(model="llama-9"), ["model", "unknown model 'llama-9'"]),
    (
        "missing-cluster-file",
        lambda d: d.update(cluster="nope.yaml"),
        ["cluster", "nope.yaml not found", "relative to the plan file"],
    ),
]


@pytest.mark.parametrize("edit, expected", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_broken_plan_is_rejected(plan, edit, expected):
    message = load_error(plan(edit))
    assert "plan.yaml" in message, "the message names the file"
    for part in expected:
        assert part in message, f"{part!r} not in {message!r}"
    assert "\n" not in message


def test_base_plan_is_valid(plan):
    dep = load_plan(plan())
    assert set(dep.servers) == {"a", "b", "c"}
    assert [s.name for s in dep.instances["pipe"].servers] == ["a", "b"]


def test_tp_may_split_kv_heads_unevenly(plan):
    dep = load_plan(plan(_smollm2))  # TP=2 over 3 KV heads: 2 + 1
    assert dep.servers["a"].plan.tp == 2 and dep.model.name == "smollm2-135m"
    dep = load_plan(plan(_tp3))  # Llama-3.1-8B's 8 KV heads over 3 GPUs: 3 + 3 + 2
    assert dep.servers["a"].plan.tp == 3


def test_unknown_gpu_in_cluster(plan):
    message = load_error(plan(cluster=CLUSTER.replace("gpu: t4", "gpu: t5")))
    assert "cluster.yaml" in message and "nodes[2].gpu" in message and "unknown GPU 't5'" in message


def test_does_not_fit_gives_gb_numbers(plan):
    message = load_error(plan(_add_t4_replica))
    # 32 layers of Llama-3.1-8B at 16 bits: ~16 GB of weights, on a T4 with 90% of 16 GB usable
    numbers = [float(x) for x in re.findall(r"(\d+(?:\.\d+)?) GB", message)]
    assert len(numbers) >= 3
    assert 15.5 < numbers[0] < 16.5 and abs(numbers[-1] - 14.4) < 0.05


def test_fits_at_fewer_bits(plan):
    def t4_at_8_bits(d):
        _add_t4_replica(d)
        d["servers"][-1]["bits"] = 8

    load_plan(plan(t4_at_8_bits))


def test_a_server_may_be_shared_up_to_one(plan):
    def shared(d):
        _over_shared(d)
        d["instances"][1]["kv_share"] = 0.3

    dep = load_plan(plan(shared))
    assert sorted(dep.servers["z"].instances) == ["i1", "i2"]


# ---- the resolved deployment --------------------------------------------------------------------------
def test_kv_capacity_shrinks_with_kv_share(plan):
    full = load_plan(plan()).instances["pipe"].kv_capacity_tokens
    half = (
        load_plan(plan(_set("instances", 0, "kv_share", 0.5), name="half.yaml"))
        .instances["pipe"]
        .kv_capacity_tokens
    )
    assert full > 0 and half < full
    assert abs(2 * half - full) <= 2


def test_kv_share_per_server(plan):
    """A share per server: the instance holds what its tightest server gives it, and each server's
    shares add up on that server alone."""
    full = load_plan(plan()).instances["pipe"].kv_capacity_tokens
    back_half = load_plan(plan(_set("instances", 0, "kv_share", {"a": 1.0, "b": 0.5}), name="b.yaml"))
    assert abs(2 * back_half.instances["pipe"].kv_capacity_tokens - full) <= 2

    def roomy_tail(d):  # i1 takes most of x and little of z; i2 the rest of z
        _over_shared(d)
        d["instances"][0]["kv_share"] = {"x": 0.9, "z": 0.2}
        d["instances"][1]["kv_share"] = {"y": 1.0, "z": 0.8}

    dep = load_plan(plan(roomy_tail, name="roomy.yaml"))
    assert dep.instances["i1"].plan.share_on("z") == 0.2 and dep.instances["i2"].plan.share_on("z") == 0.8

    def over(d):
        roomy_tail(d)
        d["instances"][1]["kv_share"]["z"] = 0.85

    assert all(x in load_error(plan(over, name="over.yaml")) for x in ("server 'z'", "1.05", "at most 1"))

    def missing(d):
        d["instances"][0]["kv_share"] = {"a": 0.5}

    msg = load_error(plan(missing, name="missing.yaml"))
    assert "instances[0] (pipe).kv_share" in msg and "no share for ['b']" in msg

    def stranger(d):
        d["instances"][0]["kv_share"] = {"a": 0.5, "b": 0.5, "c": 0.5}

    assert "names ['c'], not on its chain" in load_error(plan(stranger, name="stranger.yaml"))


def test_instances_pooling_a_server_share_its_shares_room(plan):
    """kv_pool: server: the pool on z is both instances' shares of it together, and either may hold all
    of it (its other server permitting); with its own share each holds its part only."""

    def pooled(kind):
        def edit(d):
            _over_shared(d)
            d["instances"][0].update(kv_share={"x": 1.0, "z": 0.3}, pipelining="per-request", kv_pool=kind)
            d["instances"][1].update(kv_share={"y": 1.0, "z": 0.5}, pipelining="per-request", kv_pool=kind)

        return edit

    own = load_plan(plan(pooled("own"), name="own.yaml"))
    dep = load_plan(plan(pooled("server"), name="pooled.yaml"))

    def room(srv):  # a server's whole KV room in tokens
        mem = dep.cost_model.memory(srv.shape, 8192, 256)
        return mem.kv_room / mem.kv_bytes_per_token

    z = dep.servers["z"]
    assert z.kv_pool_tokens == pytest.approx(0.8 * room(z), abs=1)
    for name, head in (("i1", "x"), ("i2", "y")):
        inst = dep.instances[name]
        assert inst.kv_capacity_tokens == min(dep.servers[head].kv_pool_tokens, z.kv_pool_tokens)
        assert dep.kv_pools()[name] == ((head, dep.servers[head].kv_pool_tokens), ("z", z.kv_pool_tokens))
    assert dep.instances["i1"].kv_capacity_tokens > own.instances["i1"].kv_capacity_tokens
    assert own.kv_pools() == {} and own.servers["z"].kv_pool_tokens == 0


def test_a_chain_through_part_of_a_server_is_timed_by_that_part(plan):
    """Partial inference: server a holds layers 0-19 and b 16-31, so the chain runs a's first 16 layers
    only; its first stage is timed as 16 layers (as a server holding exactly those), not a's 20."""

    def overlapping(d):
        d["servers"][0]["layers"] = [0, 20]
        d["instances"][0]["spans"] = {"a": [0, 16]}

    dep = load_plan(plan(overlapping, name="partial.yaml"))
    exact = load_plan(plan(name="exact.yaml"))  # a holds exactly layers 0-15
    inst = dep.instances["pipe"]
    assert inst.layers == [(0, 16), (16, 32)]
    assert inst.stage_fraction(0) == pytest.approx(0.8) and inst.stage_fraction(1) == 1.0
    step = (512.0, 8.0, 8 * 300.0, 8 * 600.0)
    part = dep.chain_timer("pipe").timers[0].time(*step)
    assert part == pytest.approx(exact.chain_timer("pipe").timers[0].time(*step))
    assert part < dep.cost_model.timer(dep.servers["a"].shape).time(*step)
    # the memory check still counts all 20 layers a holds: it has less KV room than the exact server
    assert inst.kv_capacity_tokens < exact.instances["pipe"].kv_capacity_tokens


def test_kv_capacity_is_the_smallest_server(plan):
    dep = load_plan(plan(_set("servers", 1, "bits", 4)))  # the back stage has more room at 4 bits
    inst = dep.instances["pipe"]
    per_server = []
    for srv in inst.servers:
        mem = dep.cost_model.memory(srv.shape, inst.plan.max_batch_tokens, inst.plan.max_batch_size)
        per_server.append(int(mem.kv_room / mem.kv_bytes_per_token))
    assert inst.kv_capacity_tokens == min(per_server) and per_server[0] != per_server[1]


def test_gpus_used_counts_tp_gpus(plan):
    dep = load_plan(plan())
    assert dep.gpus_used() == 5  # 2 + 2 + 1, not 3 servers, not the cluster's 7 GPUs
    assert dep.gpu_counts() == {"l4": 4, "mi300x": 1}


def test_cost_per_hour_is_sum_of_used_gpus(plan):
    prices = {name: g.price_per_hour for name, g in builtin_gpus().items()}
    dep = load_plan(plan())
    assert dep.cost_per_hour() == pytest.approx(4 * prices["l4"] + 1 * prices["mi300x"])


def test_cost_per_hour_uses_cluster_price_overrides(plan):
    cluster = CLUSTER.replace("name: tiny\n", "name: tiny\ngpus:\n  l4: {price_per_hour: 1.25}\n")
    prices = {name: g.price_per_hour for name, g in builtin_gpus().items()}
    dep = load_plan(plan(cluster=cluster))
    assert dep.cost_per_hour() == pytest.approx(4 * 1.25 + prices["mi300x"])


def _pd_pair(d):
    d["servers"] = [
        {"name": "p", "node": "nv", "gpus": [0, 1], "layers": [0, 32]},
        {"name": "d-nv", "node": "nv", "gpus": [2, 3], "layers": [0, 32]},
        {"name": "d-amd", "node": "amd", "gpus": [0, 1], "layers": [0, 32]},
    ]
    d["instances"] = [
        {"name": "pre", "role": "prefill", "chain": ["p"]},
        {"name": "dec-nv", "role": "decode", "chain": ["d-nv"]},
        {"name": "dec-amd", "role": "decode", "chain": ["d-amd"]},
    ]


def test_kv_conversion_needed_across_vendors_only(plan):
    dep = load_plan(plan(_pd_pair))
    assert dep.kv_conversion_needed("pre", "dec-amd")
    assert not dep.kv_conversion_needed("pre", "dec-nv")


def test_kv_conversion_needed_for_a_different_kv_dtype(plan):
    def bf16_decode(d):
        _pd_pair(d)
        d["servers"][1]["kv_dtype"] = "bf16"

    assert load_plan(plan(bf16_decode)).kv_conversion_needed("pre", "dec-nv")


def test_kv_link_crosses_the_network_between_nodes(plan):
    dep = load_plan(plan(_pd_pair))
    same_node, other_node = dep.kv_link("pre", "dec-nv"), dep.kv_link("pre", "dec-amd")
    assert same_node.bandwidth > other_node.bandwidth


def test_save_then_load_round_trips(plan, tmp_path):
    original = load_plan(plan(_set("servers", 0, "bits", [16] * 8 + [8] * 8)))
    out = tmp_path / "saved.yaml"  # beside cluster.yaml, so the relative path still holds
    save_plan(original.spec, out)
    again = load_plan(out)
    assert again.spec == original.spec
    assert list(again.servers) == list(original.servers)
    for name, srv in original.servers.items():
        assert again.servers[name].plan == srv.plan
    for name, inst in original.instances.items():
        assert [s.name for s in again.instances[name].servers] == [s.name for s in inst.servers]
        assert again.instances[name].kv_capacity_tokens == inst.kv_capacity_tokens


def test_example_round_trips(tmp_path):
    original = load_plan(PLANS / "petals-chains.yaml")
    spec = original.spec.model_copy(update={"cluster": str((PLANS / original.spec.cluster).resolve())})
    save_plan(spec, tmp_path / "petals.yaml")
    again = load_plan(tmp_path / "petals.yaml")
    assert again.spec.servers == original.spec.servers
    assert again.spec.instances == original.spec.instances
    assert again.spec.routing == original.spec.routing
    assert isinstance(again.spec, PlanFile)


# ---- the CLI ----------------------------------------------------------------------------------------------
def test_cli_broken_plan_exits_2_with_one_line(plan, run_cli):
    from hetserve.cli import build_parser

    try:
        build_parser().parse_args(["simulate", "--plan", "x", "--workload", "y"])
    except SystemExit:
        pytest.skip("the simulate verb is not there yet")
    path = plan(_set("servers", 1, "layers", [12, 32]))
    code, out, err = run_cli("simulate", "--plan", path, "--workload", EXAMPLES / "workloads" / "chat.yaml")
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err
    assert "covered twice" in lines[0]


def test_every_server_mistake_and_every_instance_mistake_is_reported_at_once(write, run_cli):
    from pathlib import Path

    cluster = Path(__file__).resolve().parents[1] / "examples" / "clusters" / "bench-32gpu.yaml"
    plan = write(
        "bad.yaml",
        f"name: bad\nmodel: llama-3.1-8b\ncluster: {cluster}\nservers:\n"
        "  - {name: a, node: nosuch, gpus: [0], layers: [0, 32]}\n"
        "  - {name: b, node: l4-0, gpus: [0, 9], layers: [0, 32]}\n"
        "  - {name: c, node: l4-1, gpus: [0], layers: [0, 40]}\n"
        "instances:\n  - {name: x, role: mixed, chain: [b]}\n",
    )
    work = write("w.yaml", "arrivals: {kind: poisson, rate: 1}\n")
    code, out, err = run_cli("simulate", "--plan", plan, "--workload", work)
    assert code == 2 and "Traceback" not in err
    for needle in (
        "servers[0] (a).node: unknown node 'nosuch'",
        "servers[1] (b).gpus: GPU index 9",
        "servers[2] (c).layers",
    ):
        assert needle in err, err
    assert err.count(str(plan)) == 1  # the file is named once
    fixed = plan.read_text().replace("nosuch", "l4-0").replace("[0, 9]", "[2]").replace("[0, 40]", "[0, 32]")
    plan.write_text(fixed.replace("chain: [b]}", "chain: [zz]}\n  - {name: y, role: mixed, chain: [c, c]}"))
    code, out, err = run_cli("simulate", "--plan", plan, "--workload", work)
    assert "instances[0] (x).chain[0]: unknown server 'zz'" in err and "instances[1] (y).chain" in err


def test_expert_parallel_example_spreads_experts_and_keeps_the_latent_once():
    dep = load_plan(PLANS / "deepseek-expert-parallel.yaml")
    srv = dep.servers["mi300x-ep8"]
    assert srv.shape.ep and srv.plan.tp == 8
    tp = load_plan_with(PLANS / "deepseek-expert-parallel.yaml", expert_parallel=False)
    assert dep.instances["ds"].kv_capacity_tokens > 4 * tp.instances["ds"].kv_capacity_tokens


def load_plan_with(path, **server_fields):
    """``path`` with every server's fields updated."""
    from hetserve.plan import deployment_from_dict

    data = yaml.safe_load(path.read_text())
    for s in data["servers"]:
        s.update(server_fields)
    base = load_plan(path)
    return deployment_from_dict(data, base.cluster, base.model)


def test_instances_prefill_in_chunks_unless_the_plan_says_null():
    from hetserve.plan import DEFAULT_CHUNK_TOKENS, InstancePlan

    mixed = InstancePlan(name="m", role="mixed", chain=["s"])
    assert mixed.chunk_size == DEFAULT_CHUNK_TOKENS == 2048
    assert InstancePlan(name="p", role="prefill", chain=["s"], max_batch_tokens=1024).chunk_size == 1024
    assert InstancePlan(name="d", role="decode", chain=["s"]).chunk_size is None
    assert InstancePlan(name="w", role="mixed", chain=["s"], chunk_size=None).chunk_size is None
    # the default is written out, so a saved plan means the same when read back
    assert InstancePlan.model_validate(mixed.model_dump()).chunk_size == 2048
