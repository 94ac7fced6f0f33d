"""The scheduler paths only the simulator uses: runs of decode steps advanced at once, and KV that
arrives from another instance (prefill -> decode hand-off)."""

import copy

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hetserve.scheduling import BlockManager, Scheduler, SchedulerConfig, Sequence, SequenceStatus
from hetserve.scheduling.kv_window import KVWindow


def state(s: Scheduler):
    """Everything the simulation observes; physical block ids may differ, their number may not."""
    seqs = sorted(list(s.waiting) + list(s.running), key=lambda q: q.seq_id)
    return (
        [(q.seq_id, q.status, q.num_computed_tokens, q.num_output_tokens, len(q.block_table)) for q in seqs],
        [q.seq_id for q in s.waiting],
        [q.seq_id for q in s.running],
        s.blocks.num_free_blocks,
        sorted(s.blocks.ref_counts),
        sorted(s.blocks.cached),
        s.stats,
    )


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    reqs=st.lists(st.tuples(st.integers(1, 40), st.integers(1, 30)), min_size=1, max_size=8),
    block_size=st.sampled_from([1, 4, 16]),
    extra=st.integers(0, 12),
    max_seqs=st.integers(1, 8),
    chunk=st.sampled_from([None, 8]),
    keyed=st.booleans(),
    window=st.sampled_from([None, KVWindow(8, 3, 4), KVWindow(5, 1, 2), KVWindow(6, 6, 6)]),
)
def test_a_run_of_decode_steps_equals_stepping_one_at_a_time(
    reqs, block_size, extra, max_seqs, chunk, keyed, window
):
    blocks = BlockManager(1, block_size, window=window)
    need = max(blocks.blocks_for(p + m - 1) for p, m in reqs)
    budget = 64 if chunk else max(64, max(p + m for p, m in reqs))
    s = Scheduler(
        SchedulerConfig(max_batch_size=max_seqs, max_batch_tokens=budget, chunk_size=chunk),
        BlockManager(need + extra, block_size, window=window),
    )
    for i, (p, m) in enumerate(reqs):
        # keyed: prompts share a prefix in the cache, so evictions are part of the observed state
        keys = [j if j < 2 else 100 * i + j for j in range(p)] if keyed else None
        s.add(Sequence(i, p, m, block_keys=keys, block_key_tokens=1 if keyed else None))
    for _ in range(2000):
        if not s.has_unfinished():
            break
        batch = s.schedule()
        k = s.decode_steps_available(batch)
        if k == 1:
            s.postprocess(batch)
            continue
        jumped, jump_batch = copy.deepcopy((s, batch))
        done_at_once = {q.seq_id for q in jumped.postprocess_decode_steps(jump_batch, k)}
        done = {q.seq_id for q in s.postprocess(batch)}
        ids = [it.seq.seq_id for it in batch.items]
        for _ in range(k - 1):
            step = s.schedule()
            assert not step.preempted and [it.seq.seq_id for it in step.items] == ids
            assert all(not it.is_prefill and it.num_tokens == 1 for it in step.items)
            done |= {q.seq_id for q in s.postprocess(step)}
        assert done == done_at_once
        assert state(jumped) == state(s)
    else:
        raise AssertionError("did not drain")


def test_decode_run_length_is_bounded_by_max_tokens_and_free_blocks():
    s = Scheduler(SchedulerConfig(), BlockManager(num_blocks=4, block_size=4))
    a, b = Sequence(0, 4, 10), Sequence(1, 4, 6)
    s.add(a)
    s.add(b)
    s.postprocess(s.schedule())  # both prefilled, one token each
    batch = s.schedule()  # decoding position 4 takes each one's second block: none free
    assert s.blocks.num_free_blocks == 0
    # b could take 5 more tokens, but the 5th needs a third block each: 4 steps fit.
    assert s.decode_steps_available(batch) == 4
    s.postprocess_decode_steps(batch, 4)
    assert (a.num_output_tokens, b.num_output_tokens) == (5, 5) and a.num_computed_tokens == 8
    batch = s.schedule()
    assert s.decode_steps_available(batch) == 1 or batch.preempted


def test_transferred_kv_is_not_recomputed_until_a_preemption():
    s = Scheduler(SchedulerConfig(), BlockManager(num_blocks=9, block_size=8))
    other = Sequence(0, 8, 30)
    s.add(other)
    s.postprocess(s.schedule())
    d = Sequence(1, 40, 16)  # the prefill instance computed the prompt and token 1
    d.num_output_tokens = 1
    d.num_transferred_tokens = 40
    s.add(d)
    batch = s.schedule()
    item = batch.items[-1]
    assert item.seq is d and (item.start, item.num_tokens, item.samples, item.is_prefill) == (
        40,
        1,
        True,
        False,
    )
    assert len(d.block_table) == 6 and s.stats.prefill_tokens == 8  # only other's prompt was computed
    s.postprocess(batch)
    for _ in range(20):  # both grow into the last free blocks, then d must go
        batch = s.schedule()
        s.postprocess(batch)
        if batch.preempted:
            break
    assert batch.preempted == [d] and d.num_transferred_tokens == 0 and d.block_table == []
    for _ in range(40):
        batch = s.schedule()
        if d.status is SequenceStatus.RUNNING:
            break
        s.postprocess(batch)
    (item,) = [it for it in batch.items if it.seq is d]
    assert other.is_finished and (item.start, item.is_prefill, item.samples) == (0, True, True)
    assert item.num_tokens == 40 + d.num_output_tokens  # prompt and every output token, recomputed
