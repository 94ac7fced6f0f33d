"""How a plan becomes ranks, stages and KV blocks (no processes)."""

from __future__ import annotations

from pathlib import Path

import pytest

from hetserve.errors import HetserveError
from hetserve.plan import load_plan
from hetserve.runtime.cluster.sizing import instance_blocks, local_kv_head_range
from hetserve.runtime.cluster.topology import topology_from_plan

PLANS = Path(__file__).resolve().parents[3] / "examples" / "serve"


def topo(name: str, dtype: str | None = None):
    return topology_from_plan(load_plan(PLANS / name), dtype)


class SmolConfig:
    num_heads, num_kv_heads, head_dim = 9, 3, 64


def test_ranks_follow_the_plan_order_tp_rank_0_first():
    t = topo("smollm2-pipeline.yaml")
    assert t.world_size == 5 and t.servers == {"s0": (1,), "s1": (2, 3), "s2": (4,)}
    chain = t.instances["chain"]
    assert chain.stages == ((1,), (2, 3), (4,)) and chain.last == 4 and chain.lanes == 3
    assert [(w.rank, w.tp_rank, w.layers) for w in t.workers.values()] == [
        (1, 0, (0, 7)),
        (2, 0, (7, 20)),
        (3, 1, (7, 20)),
        (4, 0, (20, 30)),
    ]
    assert t.ranks_of(["s1", "s2"]) == [2, 3, 4] and t.ranks_of(None) == [1, 2, 3, 4]
    with pytest.raises(HetserveError, match="unknown server"):
        t.ranks_of(["s9"])


def test_a_shared_server_is_one_set_of_processes_for_both_chains():
    t = topo("smollm2-shared.yaml")
    head = t.servers["head"][0]
    assert {i.name for i in t.instances_of(head)} == {"chain-a", "chain-b"}
    assert [i.name for i in t.instances_of(t.servers["tail-b"][0])] == ["chain-b"]
    assert t.instances["chain-b"].servers == ("head", "tail-b") and t.instances["chain-b"].kv_shares == (
        0.5,
        1.0,
    )


def test_dtypes_layouts_and_roles():
    t = topo("smollm2-pd.yaml")
    prompt, token = (t.workers[r] for r in (1, 3))
    assert (prompt.dtype, prompt.kv_layout, prompt.tp_size) == ("float32", "head-major", 2)
    assert (token.dtype, token.kv_layout, token.tp_size) == ("float32", "token-major", 1)
    assert (t.instances["prefill"].role, t.instances["decode"].block_size) == ("prefill", 32)
    assert topo("smollm2-pd-bf16.yaml").workers[3].dtype == "bfloat16"
    assert all(w.dtype == "float16" for w in topo("smollm2-pd.yaml", "float16").workers.values())


def test_unservable_kv_dtype_is_a_clear_error(tmp_path):
    text = (PLANS / "smollm2-tp2.yaml").read_text().replace("kv_dtype: fp32", "kv_dtype: fp8")
    plan = tmp_path / "p.yaml"
    plan.write_text(text.replace("../clusters/", str(PLANS.parent / "clusters") + "/"))
    with pytest.raises(HetserveError, match="kv_dtype fp8 cannot be served"):
        topology_from_plan(load_plan(plan))


def test_kv_heads_per_tp_rank_follow_the_kv_groups():
    assert [local_kv_head_range(9, 3, 2, r) for r in range(2)] == [(0, 2), (2, 3)]
    assert local_kv_head_range(9, 3, 1, 0) == (0, 3)


def test_blocks_are_what_the_tightest_worker_holds():
    gb = 0.01
    t = topo("smollm2-pd.yaml")
    blocks = instance_blocks(t, SmolConfig, gb)
    # prefill: the TP rank with 2 of the 3 KV heads, 30 layers, blocks of 16, fp32
    assert blocks["prefill"] == int(gb * 2**30) // (2 * 30 * 16 * 2 * 64 * 4)
    assert blocks["decode"] == int(gb * 2**30) // (2 * 30 * 32 * 3 * 64 * 4)
    shared = instance_blocks(topo("smollm2-shared.yaml"), SmolConfig, gb)
    assert shared["chain-a"] == int(gb * 0.5 * 2**30) // (2 * 15 * 16 * 3 * 64 * 4)  # half the head's room
    with pytest.raises(ValueError, match="micro-batch lanes"):
        instance_blocks(topo("smollm2-pipeline.yaml"), SmolConfig, 1e-6)


def test_an_instances_lanes_share_its_max_batch_size_as_in_the_simulator():
    """The plan's max_batch_size (16 here) counts the whole instance: three lanes run at most 5 each, as
    the simulator runs them, not 16 each."""
    import queue

    from hetserve.runtime.cluster.instance import InstanceRunner

    spec = topo("smollm2-pipeline.yaml").instances["chain"]
    runner = InstanceRunner(
        spec, num_blocks=30, vocab=10, results=queue.Queue(), prefix_caching=False, transport=None
    )
    assert [lane.scheduler.config.max_batch_size for lane in runner.lanes] == [5, 5, 5]
