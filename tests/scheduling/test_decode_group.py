"""The decode group makes exactly the scheduler's decisions, step by step, for count-only sequences."""

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hetserve.scheduling import BlockManager, Scheduler, SchedulerConfig, Sequence
from hetserve.scheduling.decode_group import GroupScheduler
from tests.scheduling.test_simulation_paths import state


def observed(s: Scheduler):
    """What a clock observes of a scheduler (``state``), the group's members written up to date."""
    if isinstance(s, GroupScheduler):
        s.sync_all()
    return state(s)


def work(s: Scheduler, batch) -> list[tuple]:
    """(seq_id, start, tokens, samples, prefill) of every sequence the batch computes."""
    out = [(it.seq.seq_id, it.start, it.num_tokens, it.samples, it.is_prefill) for it in batch.items]
    if batch.group is not None:
        assert isinstance(s, GroupScheduler) and batch.group.seqs == len(s.members)
        kv = 0
        for q in s.members.values():
            start = q.num_computed_tokens + s.step - q.group_anchor
            out.append((q.seq_id, start, 1, True, False))
            kv += start + 1
        assert kv == batch.group.kv
    return sorted(out)


def make(kind, p: int, m: int, i: int, keyed: bool, handed_off: bool) -> Sequence:
    keys = [j if j < 2 else 100 * i + j for j in range(p)] if keyed else None
    seq = Sequence(i, p, m, block_keys=keys, block_key_tokens=1 if keyed else None)
    if handed_off:  # its KV (prompt and first token) arrives from a prefill instance
        seq.num_output_tokens = 1
        seq.num_transferred_tokens = p
        seq.cacheable = False
    return seq


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    reqs=st.lists(
        st.tuples(st.integers(1, 40), st.integers(2, 30), st.integers(0, 6), st.booleans()),
        min_size=1,
        max_size=10,
    ),
    block_size=st.sampled_from([1, 4, 16]),
    extra=st.integers(0, 16),
    max_seqs=st.integers(1, 8),
    chunk=st.sampled_from([None, 8, 32]),
    budget=st.sampled_from([6, 24, 64]),
    policy=st.sampled_from(["decode-first", "prefill-first"]),
    keyed=st.booleans(),
    runs=st.booleans(),
    abort_at=st.lists(st.tuples(st.integers(0, 60), st.integers(0, 9)), max_size=3),
)
def test_the_group_schedules_exactly_as_the_scheduler(
    reqs, block_size, extra, max_seqs, chunk, budget, policy, keyed, runs, abort_at
):
    one = BlockManager(1, block_size)
    need = max(one.blocks_for(p + m - 1) for p, m, _, _ in reqs)
    if chunk is None:
        budget = max(budget, max(p + m for p, m, _, _ in reqs))
    config = SchedulerConfig(
        max_batch_size=max_seqs, max_batch_tokens=budget, chunk_size=chunk, policy=policy
    )
    plain = Scheduler(config, BlockManager(need + extra, block_size))
    grouped = GroupScheduler(config, BlockManager(need + extra, block_size))
    arrivals = sorted((when, i) for i, (_, _, when, _) in enumerate(reqs))
    aborts = dict(abort_at)
    for it in range(3000):
        for when, i in arrivals:
            if when == it:
                p, m, _, handed = reqs[i]
                plain.add(make(None, p, m, i, keyed and not handed, handed))
                grouped.add(make(None, p, m, i, keyed and not handed, handed))
        if it in aborts:
            assert (plain.abort(aborts[it]) is None) == (grouped.abort(aborts[it]) is None)
            assert observed(plain) == observed(grouped)
        if not plain.has_unfinished() and it > max(w for w, _ in arrivals):
            assert not grouped.has_unfinished()
            break
        a, b = plain.schedule(), grouped.schedule()
        assert work(plain, a) == work(grouped, b)
        assert [q.seq_id for q in a.preempted] == [q.seq_id for q in b.preempted]
        ka, kb = plain.decode_steps_available(a), grouped.decode_steps_available(b)
        assert ka == kb
        if runs and ka > 1:
            done_a = plain.postprocess_decode_steps(a, ka)
            done_b = grouped.postprocess_decode_steps(b, kb)
        else:
            done_a, done_b = plain.postprocess(a), grouped.postprocess(b)
        assert [q.seq_id for q in done_a] == [q.seq_id for q in done_b]  # the order frees blocks in
        assert observed(plain) == observed(grouped)
    else:
        raise AssertionError("did not drain")


def test_a_long_decode_costs_the_group_nothing_per_member():
    """A step of 64 decoding sequences schedules no per-sequence item: the group is one entry."""
    s = GroupScheduler(SchedulerConfig(max_batch_size=64, chunk_size=512), BlockManager(4096, 16))
    for i in range(64):
        s.add(Sequence(i, 100, 50))
    s.postprocess(s.schedule())  # 64 prompts of 100 tokens: one step, each samples its first token
    batch = s.schedule()
    assert batch.items == [] and batch.group.seqs == 64
    assert batch.group.kv == 64 * 101  # each reads its 100 prompt tokens and its first output
    k = s.decode_steps_available(batch)
    assert k == 49  # every one has 49 tokens left
    done = s.postprocess_decode_steps(batch, k)
    assert len(done) == 64 and all(q.num_output_tokens == 50 and q.block_table == [] for q in done)
    assert s.blocks.num_free_blocks == 4096 and not s.members


def test_the_group_refuses_sliding_window_kv():
    from hetserve.scheduling.kv_window import KVWindow

    try:
        GroupScheduler(SchedulerConfig(), BlockManager(8, 4, window=KVWindow(8, 3, 4)))
    except ValueError as exc:
        assert "sliding window" in str(exc)
    else:
        raise AssertionError("a windowed cache was accepted")
