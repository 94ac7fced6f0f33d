from hetserve.deploy.common import asks_from, assign_ports, host_ref, host_var, shell_join
from hetserve.deploy.gaps import instance_gaps, nearest, plan_gaps
from hetserve.deploy.sglang import CAPS as SGLANG
from hetserve.deploy.vllm import CAPS as VLLM

from ..conftest import EXAMPLES
from .util import deployment


def _asks(name, kind="serve"):
    dep = deployment(EXAMPLES / kind / f"{name}.yaml")
    return dep, asks_from(dep)


def test_asks_read_the_plan():
    dep, (ask,) = _asks("smollm2-pipeline")
    assert ask.layer_partition == [7, 13, 10]
    assert sum(ask.layer_partition) == dep.model.num_layers
    assert ask.nodes == ["l4-box", "t4-box"] and ask.multi_node
    assert ask.gpus_on("l4-box") == [0, 1, 2] and ask.gpus_on("t4-box") == [0]
    assert ask.tp is None  # TP 1/2/1


def test_gaps_name_instance_and_feature():
    _, asks = _asks("smollm2-pipeline")
    vllm_gaps = [g.feature for g in plan_gaps(asks, VLLM)]
    assert vllm_gaps == ["asymmetric TP between stages"]
    sglang_gaps = [g.feature for g in plan_gaps(asks, SGLANG)]
    assert "uneven stages per node" in sglang_gaps
    _, asks = _asks("smollm2-shared")
    gaps = plan_gaps(asks, VLLM)
    assert {g.instance for g in gaps} == {"chain-a", "chain-b"}
    assert all(g.feature == "servers shared by several instances" for g in gaps)
    _, asks = _asks("llmpq-mixed-precision", "plans")
    assert [g.feature for g in instance_gaps(asks[0], VLLM)] == ["per-layer mixed bits"]
    _, asks = _asks("petals-chains", "plans")
    features = {g.feature for g in plan_gaps(asks, VLLM)}
    assert "4-bit weights without a pre-quantised checkpoint" in features
    assert "pipeline returns to a node it left" in features
    assert "4-bit weights without a pre-quantised checkpoint" not in {
        g.feature for g in plan_gaps(asks, VLLM, checkpoint=True)
    }
    _, asks = _asks("cross-vendor-pd", "plans")
    assert "cross-vendor P/D" in {g.feature for g in plan_gaps(asks, VLLM)}


def test_nearest_is_expressible_and_says_what_changed():
    dep, asks = _asks("smollm2-pipeline")
    (near,) = nearest(dep, asks, VLLM)
    assert near.tp == 1 and near.layer_partition == [7, 13, 10]
    assert any("TP 1/2/1 -> 1" in c for c in near.changes)
    assert plan_gaps([near], VLLM) == []
    (near,) = nearest(dep, asks, SGLANG)
    assert near.layer_partition == [20, 10] and near.nodes == ["l4-box", "t4-box"]
    assert plan_gaps([near], SGLANG) == []
    dep, asks = _asks("smollm2-shared")
    near = nearest(dep, asks, VLLM)
    assert [a.name for a in near] == ["chain-a"]
    assert any("chain-b" in c for c in near[0].changes)
    dep, asks = _asks("cross-vendor-pd", "plans")
    near = nearest(dep, asks, VLLM)
    assert {a.role for a in near} == {"mixed"}
    dep, asks = _asks("llmpq-mixed-precision", "plans")
    (near,) = nearest(dep, asks, VLLM)
    assert near.bits == 16  # the V100s and T4s have no FP8 kernels
    assert near.warnings  # OPT-66B at 16 bits does not fit those GPUs


def test_memory_fractions_follow_kv_share():
    _, asks = _asks("smollm2-shared")
    a = asks[0]
    assert 0 < a.memory_static < a.memory_utilisation <= 0.9
    _, (whole,) = _asks("smollm2-tp2")
    assert whole.memory_utilisation > a.memory_utilisation  # half of head's KV room


def test_hosts_and_ports():
    assert host_var("l4-box") == "NODE_L4_BOX_HOST"
    assert host_ref("l4-box") == "${NODE_L4_BOX_HOST:-l4-box}"
    assert shell_join(["a b", host_ref("x") + ":1"]) == "'a b' \"${NODE_X_HOST:-x}:1\""
    _, asks = _asks("bench-32gpu", "plans")
    ports = assign_ports(asks)
    seen = set()
    for a in asks:
        key = (a.head, ports[a.name].http)
        assert key not in seen
        seen.add(key)
