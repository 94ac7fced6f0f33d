"""The shared instance layer: lanes, admission counters and the router's view, as both clocks use them."""

from __future__ import annotations

import pytest

from hetserve.scheduling import Sequence
from hetserve.scheduling.instance import InstanceConfig, InstanceState, Lane, WorkEstimate, share_kv_pools
from hetserve.scheduling.routing import Pool

EST = WorkEstimate(prefill_s_per_token=0.001, decode_s_per_token=0.01, speed=2.0)


def config(**kw) -> InstanceConfig:
    base = dict(
        name="a",
        role="mixed",
        lanes=1,
        max_batch_size=8,
        max_batch_tokens=4096,
        chunk_size=None,
        policy="decode-first",
        block_size=16,
    )
    base.update(kw)
    return InstanceConfig(**base)


def test_lanes_split_the_batch_size_and_the_blocks_into_disjoint_ranges():
    inst = InstanceState(config(lanes=3, max_batch_size=16), EST, 30, Lane)
    assert [ln.scheduler.config.max_batch_size for ln in inst.lanes] == [5, 5, 5]
    assert [ln.offset for ln in inst.lanes] == [0, 10, 20]
    assert [ln.scheduler.blocks.num_blocks for ln in inst.lanes] == [10, 10, 10]
    assert inst.capacity_tokens == 160


def test_a_request_joins_the_least_loaded_lane_first_of_equals():
    inst = InstanceState(config(lanes=2), EST, 100, Lane)
    lanes = [inst.add(Sequence(i, 10, 5))[0].index for i in range(3)]
    assert lanes == [0, 1, 0]


def test_outstanding_work_is_seconds_of_queued_prompt_and_owed_output():
    inst = InstanceState(config(), EST, 100, Lane)
    inst.add(Sequence(0, 100, 20))
    inst.add(Sequence(1, 50, 10, num_transferred_tokens=40))  # a hand-off: 10 prompt tokens to compute
    assert inst.outstanding_work() == pytest.approx(110 * 0.001 + 30 * 0.01)
    decoder = InstanceState(config(name="d", role="decode"), EST, 100, Lane)
    decoder.add(Sequence(2, 100, 150, num_transferred_tokens=100))
    inst.downstream = Pool([decoder])  # a prefill instance counts its decode pool's least work
    assert inst.outstanding_work() == pytest.approx(110 * 0.001 + 30 * 0.01 + 150 * 0.01)
    assert inst.speed == 2.0


def test_completing_steps_retires_work_and_requests():
    inst = InstanceState(config(), EST, 100, Lane)
    inst.add(Sequence(0, 30, 3))
    inst.add(Sequence(1, 20, 4))
    lane = inst.lanes[0]
    batch = inst.schedule(lane)
    assert sorted(it.num_tokens for it in batch.items) == [20, 30]
    assert inst.complete(lane, batch) == []
    assert (inst.pending_prompt, inst.pending_output, inst.requests) == (0, 5, 2)
    batch = inst.schedule(lane)
    # sequence 0 is stopped by its caller (a stop string) after its second token
    finished = inst.complete(lane, batch, stopped={0})
    assert [s.seq_id for s in finished] == [0]
    assert (inst.pending_output, inst.requests) == (2, 1)  # the stopped request owes nothing more
    batch = inst.schedule(lane)
    finished = inst.complete(lane, batch, steps=2)  # a clock advancing two decode steps at once
    assert [s.seq_id for s in finished] == [1]
    assert (inst.pending_prompt, inst.pending_output, inst.requests) == (0, 0, 0)


def test_an_aborted_request_no_longer_counts():
    inst = InstanceState(config(lanes=2), EST, 100, Lane)
    (lane,) = inst.add(Sequence(0, 30, 3))
    inst.add(Sequence(1, 20, 4))
    inst.abort(0)
    assert (inst.pending_prompt, inst.pending_output, inst.requests) == (20, 4, 1)
    inst.abort(0)  # twice, or an unknown id: nothing changes
    assert inst.requests == 1


def test_a_preempted_sequence_counts_its_tokens_as_prompt_again():
    inst = InstanceState(config(max_batch_tokens=80), EST, 5, Lane)  # 80 KV tokens
    (lane,) = inst.add(Sequence(0, 30, 40))
    inst.add(Sequence(1, 30, 40))
    preempted = 0
    for _ in range(10):
        batch = inst.schedule(lane)
        preempted += len(batch.preempted)
        inst.complete(lane, batch)
    assert preempted >= 1
    waiting = {s.seq_id: s for s in lane.scheduler.waiting}
    running = {s.seq_id: s for s in lane.scheduler.running}
    owed_prompt = sum(s.num_tokens - 1 if s.num_output_tokens else s.prompt_len for s in waiting.values())
    assert inst.pending_prompt == owed_prompt
    assert inst.pending_output == sum(
        s.max_tokens - s.num_output_tokens for s in {**waiting, **running}.values()
    )


def test_a_free_slot_needs_a_batch_slot_and_room_for_a_reference_prompt():
    inst = InstanceState(config(max_batch_size=2), EST, 200, Lane)  # 3,200 KV tokens
    assert inst.has_free_slot()
    inst.add(Sequence(0, 10, 5))
    inst.add(Sequence(1, 10, 5))
    assert not inst.has_free_slot()  # both batch slots taken
    big = InstanceState(config(), EST, 200, Lane)
    big.add(Sequence(0, 2500, 5))
    big.schedule(big.lanes[0])  # holds 2,512 of 3,200 tokens: less than a 1,000-token prompt left
    assert not big.has_free_slot()


def test_an_empty_lane_smaller_than_a_reference_prompt_is_free():
    inst = InstanceState(config(), EST, 8, Lane)  # 128 KV tokens
    assert inst.has_free_slot()


def test_fits_needs_kv_room_and_without_chunking_the_token_budget():
    inst = InstanceState(config(max_batch_tokens=100), EST, 100, Lane)
    assert inst.fits(60, 40)
    assert not inst.fits(60, 41)  # over the token budget
    chunked = InstanceState(config(max_batch_tokens=100, chunk_size=64), EST, 100, Lane)
    assert chunked.fits(1000, 600)
    assert not chunked.fits(1000, 601)  # over the 1,600 KV tokens


def test_a_decode_instance_fits_whatever_its_kv_holds_whatever_its_token_budget():
    """It never prefills: a handed-off request needs KV room only (not prompt + output in one step)."""
    dec = InstanceState(config(role="decode", max_batch_tokens=100), EST, 100, Lane)  # 1,600 KV tokens
    assert dec.fits(1000, 600) and not dec.fits(1000, 601)
    seq = Sequence(0, 1000, 50, num_transferred_tokens=1000)
    seq.num_output_tokens = 1
    (lane,) = dec.add(seq)
    batch = dec.schedule(lane)
    assert [(it.start, it.num_tokens, it.is_prefill) for it in batch.items] == [(1000, 1, False)]


# ---- per-request pipelining ------------------------------------------------------------------------


def run_to_end(inst: InstanceState, limit: int = 10_000) -> tuple[list[int], int]:
    """Step every lane with work until nothing is left; (finish order, preemptions)."""
    order, preempted = [], 0
    for _ in range(limit):
        busy = [ln for ln in inst.lanes if ln.scheduler.has_unfinished()]
        if not busy and not inst.queue:
            return order, preempted
        for lane in busy:
            batch = inst.schedule(lane)
            preempted += len(batch.preempted)
            order += [s.seq_id for s in inst.complete(lane, batch)]
        inst.admit_queued()
    raise AssertionError("did not finish")


def test_per_request_lanes_hold_one_sequence_each_over_one_shared_pool():
    inst = InstanceState(config(per_request=True, lanes=2, max_batch_size=3), EST, 30, Lane)
    assert len(inst.lanes) == 3  # one per request slot; `lanes` does not apply
    pool = inst.lanes[0].scheduler.blocks
    assert all(ln.scheduler.blocks is pool and ln.offset == 0 for ln in inst.lanes)
    assert inst.capacity_tokens == 480 and inst.num_blocks == 30  # a request may use the whole pool
    started = inst.add(Sequence(0, 400, 60))  # longer than any micro-batch lane's share would be
    assert len(started) == 1 and started[0].scheduler.waiting[0].seq_id == 0
    assert inst.fits(400, 80) and not inst.fits(400, 81)


def test_per_request_admission_waits_for_room_for_the_whole_request_first_come_first_served():
    inst = InstanceState(config(per_request=True, max_batch_size=4), EST, 20, Lane)  # 320 KV tokens
    assert len(inst.add(Sequence(0, 100, 100))) == 1  # promises 13 blocks (199 tokens)
    assert inst.add(Sequence(1, 100, 100)) == []  # 13 more would be 26 > 20: queued
    assert inst.add(Sequence(2, 10, 5)) == []  # fits, but waits behind request 1
    assert [s.seq_id for s in inst.queue] == [1, 2]
    assert not inst.has_free_slot()  # 7 blocks unpromised: less than a 1,000-token prompt
    order, preempted = run_to_end(inst)
    assert order == [0, 2, 1]  # 1 and 2 start together once 0 has left; 2 is shorter
    assert preempted == 0  # a promised request always finds its blocks
    assert inst.promised == 0 and len(inst.idle) == 4
    assert (inst.pending_prompt, inst.pending_output, inst.requests) == (0, 0, 0)


def test_per_request_never_preempts_where_lanes_would():
    """Six requests that together outgrow the pool: micro-batch lanes admit them on prompt room and then
    preempt; per-request admission holds back whoever would not fit at full length."""
    seqs = lambda: [Sequence(i, 60, 60) for i in range(6)]
    laned = InstanceState(config(max_batch_size=6), EST, 24, Lane)  # 384 KV tokens, 119 per request
    for s in seqs():
        laned.add(s)
    assert run_to_end(laned)[1] > 0
    single = InstanceState(config(per_request=True, max_batch_size=6), EST, 24, Lane)
    for s in seqs():
        single.add(s)
    order, preempted = run_to_end(single)
    assert preempted == 0 and sorted(order) == list(range(6))


def test_per_request_abort_of_a_queued_or_running_request():
    inst = InstanceState(config(per_request=True, max_batch_size=1), EST, 100, Lane)
    inst.add(Sequence(0, 30, 3))
    inst.add(Sequence(1, 20, 4))  # no free lane: queued
    inst.abort(1)
    assert not inst.queue and inst.requests == 1
    inst.abort(0)
    assert inst.requests == 0 and inst.promised == 0 and len(inst.idle) == 1
    assert (inst.pending_prompt, inst.pending_output) == (0, 0)
    inst.add(Sequence(2, 20, 4))
    assert inst.lane_of[2] is inst.lanes[0]


def test_per_request_refuses_a_request_longer_than_the_pool_without_counting_it():
    inst = InstanceState(config(per_request=True), EST, 4, Lane)  # 64 KV tokens
    with pytest.raises(ValueError, match="KV slots"):
        inst.add(Sequence(0, 60, 10))
    assert inst.requests == 0 and not inst.queue


def _pooled(pool_tokens: int, own_blocks: int = 100) -> tuple[InstanceState, InstanceState]:
    """Two instances pipelining per request whose chains share one server's KV pool."""
    a = InstanceState(config(name="a", per_request=True, max_batch_size=4), EST, own_blocks, Lane)
    b = InstanceState(config(name="b", per_request=True, max_batch_size=4), EST, own_blocks, Lane)
    share_kv_pools({"a": a, "b": b}, {"a": (("s", pool_tokens),), "b": (("s", pool_tokens),)})
    return a, b


def test_instances_sharing_a_server_admit_from_its_one_pool():
    a, b = _pooled(320)  # 20 blocks on the shared server; each instance has 100 of its own
    pool = a.kv_pools[0]
    assert b.kv_pools == [pool] and a.pool_neighbours == [b] and b.pool_neighbours == [a]
    assert len(a.add(Sequence(0, 100, 100))) == 1  # 13 blocks: 208 of the pool's 320 tokens
    assert pool.promised == 208 and a.has_free_slot() is False  # 112 left: short of a reference prompt
    assert b.add(Sequence(1, 100, 100)) == []  # room in b's own blocks, not in the pool: queued
    assert len(b.add(Sequence(2, 5, 2))) == 0  # fits the pool, but waits behind request 1 (FCFS)
    order, _ = run_to_end(a)  # a's request leaves and frees the pool ...
    assert order == [0] and pool.promised == 0
    started = b.admit_queued()  # ... so the neighbour admits what waited
    assert [ln.scheduler.waiting[0].seq_id for ln in started] == [1, 2]
    assert pool.promised == 208 + 16


def test_a_pooled_instance_uses_the_room_an_idle_neighbour_leaves():
    """Where each instance would hold half the server, a busy one may take the whole pool."""
    a, _ = _pooled(640)
    started = [len(a.add(Sequence(i, 100, 100))) for i in range(4)]
    assert started == [1, 1, 1, 0]  # three of 208 tokens fit in 640; half (320) would hold one
    a.abort(0)
    assert a.kv_pools[0].promised == 2 * 208 and len(a.admit_queued()) == 1


def test_only_an_instance_pipelining_per_request_joins_a_pool():
    inst = InstanceState(config(lanes=2), EST, 30, Lane)
    with pytest.raises(ValueError, match="per request"):
        share_kv_pools({"a": inst}, {"a": (("s", 320),)})
