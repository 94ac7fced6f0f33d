"""Planning KV hand-offs between a plan's prefill and decode instances (no processes): typed routes, the
commands both sides get, and the bytes on the wire."""

from __future__ import annotations

import pickle
from pathlib import Path

from hetserve.plan import load_plan
from hetserve.runtime.cluster.handoff import KVHandoffs
from hetserve.runtime.cluster.topology import topology_from_plan
from hetserve.runtime.kvcache import KVRoute

PLANS = Path(__file__).resolve().parents[3] / "examples" / "serve"


class SmolConfig:
    num_heads, num_kv_heads, head_dim = 9, 3, 64


def handoffs(name: str = "smollm2-pd.yaml") -> KVHandoffs:
    return KVHandoffs(topology_from_plan(load_plan(PLANS / name)), SmolConfig())


def test_routes_are_typed_and_cover_every_layer_and_head_once():
    kv = handoffs()
    prefill, decode = kv.topo.instances["prefill"], kv.topo.instances["decode"]
    routes = kv.routes(prefill, decode)
    assert all(isinstance(r, KVRoute) for r in routes)
    assert {r.src.rank for r in routes} == {1, 2} and {r.dst.rank for r in routes} == {3}
    cells = [(layer, h) for r in routes for layer in range(*r.layers) for h in range(*r.kv_heads)]
    assert sorted(cells) == [(layer, h) for layer in range(30) for h in range(3)]
    assert kv.routes(prefill, decode) is routes  # planned once per pair


def test_start_builds_both_sides_and_counts_the_bytes():
    kv = handoffs()
    prefill, decode = kv.topo.instances["prefill"], kv.topo.instances["decode"]
    first = kv.start(prefill, decode, [4, 5], 20)
    second = kv.start(prefill, decode, [6], 3)
    assert second.key != first.key and first.decoder is decode
    assert first.out.key == first.recv.key == first.key
    assert first.out.block_table == [4, 5] and first.out.num_tokens == first.recv.num_tokens == 20
    assert first.recv.instance == "decode" and first.recv.src_dtype == "float32"
    assert first.out.routes == first.recv.routes == kv.routes(prefill, decode)
    assert pickle.loads(pickle.dumps(first.out)) == first.out  # commands cross the wire pickled
    per_token = 30 * 3 * 64 * 2 * 4  # layers x KV heads x head_dim x (K, V) x fp32
    assert kv.bytes_moved == (20 + 3) * per_token and kv.count == 2


def test_bytes_are_counted_in_the_senders_dtype():
    kv = handoffs("smollm2-pd-bf16.yaml")
    prefill, decode = kv.topo.instances["prefill"], kv.topo.instances["decode"]
    kv.start(prefill, decode, [0], 10)
    sender = kv.topo.workers[prefill.last].dtype
    assert kv.bytes_moved == 10 * 30 * 3 * 64 * 2 * {"float32": 4, "bfloat16": 2}[sender]
