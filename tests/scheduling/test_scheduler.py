import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hetserve.scheduling import BlockManager, Scheduler, SchedulerConfig, Sequence, SequenceStatus


def make(num_blocks=64, block_size=4, **cfg) -> Scheduler:
    return Scheduler(SchedulerConfig(**cfg), BlockManager(num_blocks, block_size))


def fake_token(seq: Sequence, position: int) -> int:
    """What a deterministic model would emit: depends only on the sequence and position."""
    return (seq.seq_id * 7919 + position * 31) % 50


def run_step(s: Scheduler):
    batch = s.schedule()
    tokens = {it.seq.seq_id: fake_token(it.seq, it.end) for it in batch.items if it.samples}
    finished = s.postprocess(batch, tokens)
    return batch, finished


def drain(s: Scheduler, limit: int = 10_000):
    batches = []
    for _ in range(limit):
        if not s.has_unfinished():
            return batches
        batches.append(run_step(s)[0])
    raise AssertionError("scheduler did not finish its work")


def test_step_tokens_is_the_next_steps_size_under_the_chunking_rule():
    """What a step of one sequence computes with a whole step's budget, as ``schedule`` chunks it: the
    size pipelining per request merges steps by."""
    chunked, whole = make(max_batch_tokens=64, chunk_size=16), make(max_batch_tokens=64)
    seq = Sequence(0, 100, 3, token_ids=list(range(100)))
    assert chunked.step_tokens(seq) == 16 and whole.step_tokens(seq) == 64
    short = Sequence(1, 10, 3, token_ids=list(range(10)))
    assert chunked.step_tokens(short) == 10 and whole.step_tokens(short) == 10
    short.num_transferred_tokens = 10  # its KV was handed over: one token to decode
    assert chunked.step_tokens(short) == 1
    chunked.add(seq)
    first = chunked.schedule().items[0].num_tokens
    assert first == 16 and chunked.step_tokens(seq) == 16  # as schedule() chunked it, and the next chunk


def test_whole_prompt_then_one_token_per_step():
    s = make()
    a = Sequence(0, 10, 3, token_ids=list(range(10)))
    s.add(a)
    shapes = [[(it.start, it.num_tokens, it.samples, it.is_prefill) for it in b.items] for b in drain(s)]
    assert shapes == [[(0, 10, True, True)], [(10, 1, True, False)], [(11, 1, True, False)]]
    assert a.is_finished and a.num_output_tokens == 3
    assert a.token_ids[10:] == [fake_token(a, 10), fake_token(a, 11), fake_token(a, 12)]
    assert s.blocks.num_free_blocks == s.blocks.num_blocks


def test_chunked_prefill_splits_prompt_and_samples_only_at_the_end():
    s = make(max_batch_tokens=64, chunk_size=32)
    a = Sequence(0, 100, 2, token_ids=[1] * 100)
    s.add(a)
    items = [b.items[0] for b in drain(s)]
    assert [(it.start, it.num_tokens, it.samples) for it in items] == [
        (0, 32, False),
        (32, 32, False),
        (64, 32, False),
        (96, 4, True),
        (100, 1, True),
    ]


def test_chunks_share_the_token_budget_with_decodes():
    s = make(num_blocks=200, max_batch_tokens=16, chunk_size=12)
    s.add(Sequence(0, 4, 50, token_ids=[1] * 4))
    run_step(s)  # seq 0 is now decoding
    s.add(Sequence(1, 40, 2, token_ids=[2] * 40))
    batch, _ = run_step(s)
    assert [(it.seq.seq_id, it.num_tokens) for it in batch.items] == [(0, 1), (1, 12)]
    batch, _ = run_step(s)
    assert batch.num_tokens <= 16 and batch.num_decode_tokens == 1 and batch.num_prefill_tokens == 12


def test_a_chunk_shrinks_to_the_budget_left_after_decodes():
    s = make(num_blocks=200, max_batch_tokens=16, chunk_size=16)
    s.add(Sequence(0, 4, 50))
    run_step(s)
    s.add(Sequence(1, 40, 2))
    batch, _ = run_step(s)
    assert [(it.seq.seq_id, it.num_tokens) for it in batch.items] == [(0, 1), (1, 15)]


def test_unchunked_prompt_longer_than_the_budget_is_rejected():
    s = make(max_batch_tokens=16)
    with pytest.raises(ValueError, match="chunked prefill"):
        s.add(Sequence(0, 20, 1))


def handed_off(seq_id: int, prompt: int, max_tokens: int) -> Sequence:
    """A sequence whose prompt KV (and first token) another instance computed."""
    seq = Sequence(seq_id, prompt, max_tokens)
    seq.num_output_tokens = 1
    seq.num_transferred_tokens = prompt
    return seq


def test_a_handed_off_sequence_needs_kv_room_not_a_step_budget_for_its_prompt():
    """A decode instance without chunking and a 16-token budget takes a 40-token prompt's KV and
    decodes it one token per step."""
    s = make(max_batch_tokens=16)
    s.add(handed_off(0, 40, 6))
    batches = drain(s)
    assert [[(it.start, it.num_tokens) for it in b.items] for b in batches] == [
        [(40 + k, 1)] for k in range(5)
    ]
    assert s.stats.prefill_tokens == 0 and s.stats.finished == 1


def test_a_handed_off_sequence_preempted_recomputes_in_pieces_of_the_step_budget():
    """Preempted, it lost its transferred KV: it recomputes prompt and outputs in budget-sized
    pieces (the whole recompute never fits one 16-token step) and finishes."""
    s = make(num_blocks=14, block_size=4, max_batch_tokens=16)  # 56 KV slots
    other = handed_off(0, 8, 30)
    s.add(other)
    run_step(s)
    d = handed_off(1, 40, 12)
    s.add(d)
    batches = drain(s)
    assert d.num_preemptions >= 1 and d.is_finished and other.is_finished
    pieces = [it.num_tokens for b in batches for it in b.items if it.seq is d and it.is_prefill]
    assert max(pieces) <= 16 and sum(pieces) >= 40  # the prompt (and outputs so far) recomputed
    assert all(b.num_tokens <= 16 for b in batches)


def test_sequence_larger_than_the_cache_is_rejected():
    s = make(num_blocks=4, block_size=4)
    with pytest.raises(ValueError, match="blocks"):
        s.add(Sequence(0, 10, 8))  # 17 KV slots > 16


def test_max_num_seqs_limits_the_running_set():
    s = make(num_blocks=256, max_batch_size=3)
    for i in range(5):
        s.add(Sequence(i, 4, 5))
    batch, _ = run_step(s)
    assert [it.seq.seq_id for it in batch.items] == [0, 1, 2]
    assert [q.seq_id for q in s.waiting] == [3, 4]


def test_prefill_first_keeps_decodes_out_of_prefill_steps():
    s = make(num_blocks=256, policy="prefill-first")
    s.add(Sequence(0, 8, 4))
    run_step(s)
    s.add(Sequence(1, 8, 4))
    batch, _ = run_step(s)
    assert [(it.seq.seq_id, it.is_prefill) for it in batch.items] == [(1, True)]
    batch, _ = run_step(s)
    assert [(it.seq.seq_id, it.is_prefill) for it in batch.items] == [(0, False), (1, False)]


def test_decode_first_mixes_decodes_with_new_prefills():
    s = make(num_blocks=256, policy="decode-first")
    s.add(Sequence(0, 8, 4))
    run_step(s)
    s.add(Sequence(1, 8, 4))
    batch, _ = run_step(s)
    assert [(it.seq.seq_id, it.is_prefill) for it in batch.items] == [(0, False), (1, True)]


def test_preemption_frees_the_newest_and_it_resumes_by_recompute():
    # 6 blocks of 4: two 8-token prompts take 4 blocks; each grows by a block every 4 tokens.
    s = make(num_blocks=6, block_size=4)
    a = Sequence(0, 8, 12, token_ids=list(range(8)))
    b = Sequence(1, 8, 12, token_ids=list(range(100, 108)))
    s.add(a)
    s.add(b)
    preempted_at = None
    for step in range(200):
        if not s.has_unfinished():
            break
        batch, _ = run_step(s)
        assert s.blocks.num_used_blocks <= 6
        if batch.preempted and preempted_at is None:
            preempted_at = step
            assert batch.preempted == [b] and b.status is SequenceStatus.PREEMPTED
            assert s.waiting[0] is b and b.block_table == [] and b.num_computed_tokens == 0
            produced_before = b.num_output_tokens
        if preempted_at is not None and any(it.seq is b and it.start == 0 for it in batch.items):
            # Recompute covers the prompt and every token produced before the preemption.
            (item,) = [it for it in batch.items if it.seq is b]
            assert item.num_tokens == 8 + produced_before and item.samples
    assert preempted_at is not None and b.num_preemptions >= 1
    for q in (a, b):
        assert q.is_finished and q.num_output_tokens == 12
        assert q.output_token_ids == [fake_token(q, 8 + i) for i in range(12)]
    assert s.stats.preemptions == b.num_preemptions + a.num_preemptions


def test_preempted_sequence_goes_ahead_of_later_arrivals():
    s = make(num_blocks=6, block_size=4, max_batch_size=2)
    for i in range(3):
        s.add(Sequence(i, 8, 12))
    while not s.stats.preemptions:
        run_step(s)
    assert [q.seq_id for q in s.waiting] == [1, 2]


def test_prefix_cache_hits_reduce_prefill_tokens():
    s = make(num_blocks=64, block_size=4)
    system = list(range(20))
    s.add(Sequence(0, 23, 2, token_ids=system + [50, 51, 52]))
    drain(s)
    assert s.stats.prefill_tokens == 23
    b = Sequence(1, 22, 2, token_ids=system + [60, 61])
    s.add(b)
    batch, _ = run_step(s)
    assert b.num_cached_tokens == 20 and batch.items[0].start == 20 and batch.items[0].num_tokens == 2
    drain(s)
    assert s.stats.prefix_hit_tokens == 20 and s.stats.prefill_tokens == 23 + 2


def test_prefix_cache_with_count_only_sequences():
    s = make(num_blocks=1000, block_size=16, max_batch_tokens=4096)
    s.add(Sequence(0, 1000, 1, block_keys=[1, 2], block_key_tokens=512))
    drain(s)
    s.add(Sequence(1, 1000, 1, block_keys=[1, 3], block_key_tokens=512))
    drain(s)
    assert s.stats.prefix_hit_tokens == 512 and s.stats.prefill_tokens == 1000 + 488


def test_fcfs_head_of_line_is_not_skipped():
    s = make(num_blocks=8, block_size=4, max_batch_tokens=64)
    s.add(Sequence(0, 20, 4))  # 5 blocks
    s.add(Sequence(1, 20, 4))  # can't fit next to seq 0
    s.add(Sequence(2, 4, 1))  # would fit, but must not overtake seq 1
    batch, _ = run_step(s)
    assert [it.seq.seq_id for it in batch.items] == [0]
    assert [q.seq_id for q in s.waiting] == [1, 2]


def test_stop_and_abort_free_blocks():
    s = make()
    a, b = Sequence(0, 6, 10), Sequence(1, 6, 10)
    s.add(a)
    s.add(b)
    batch = s.schedule()
    finished = s.postprocess(batch, stopped={0})
    assert finished == [a] and a.num_output_tokens == 1 and s.running == [b]
    assert s.abort(1) is b and not s.has_unfinished()
    assert s.blocks.num_free_blocks == s.blocks.num_blocks


# ---- random load -----------------------------------------------------------------------------
requests = st.lists(
    st.tuples(st.integers(0, 2), st.integers(1, 30), st.integers(1, 12), st.integers(0, 6)),
    min_size=1,
    max_size=12,
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    reqs=requests,
    block_size=st.sampled_from([1, 2, 4, 8]),
    extra_blocks=st.integers(0, 30),
    chunk=st.sampled_from([None, 1, 3, 8]),
    budget=st.integers(8, 64),
    max_seqs=st.integers(1, 6),
    policy=st.sampled_from(["decode-first", "prefill-first"]),
    arrivals=st.randoms(use_true_random=False),
)
def test_random_load_respects_limits_and_keeps_kv_consistent(
    reqs, block_size, extra_blocks, chunk, budget, max_seqs, policy, arrivals
):
    """Under random load: limits hold, refcounts add up, a block's slots always hold the tokens of the
    sequences reading it (prefix sharing never aliases different content), every request completes."""
    seqs = []
    for i, (prefix_kind, prompt_len, max_tokens, stop_at) in enumerate(reqs):
        # Requests share leading tokens; kinds 0 and 1 differ only in their first token.
        shared = [prefix_kind // 2] + [7] * 11
        tokens = (shared + [100 + i] * prompt_len)[:prompt_len]
        seqs.append((Sequence(i, len(tokens), max_tokens, token_ids=tokens), stop_at))
    biggest = max(BlockManager(1, block_size).blocks_for(q.max_total_tokens) for q, _ in seqs)
    bm = BlockManager(biggest + extra_blocks, block_size)
    if chunk is None:
        budget = max(budget, max(q.max_total_tokens for q, _ in seqs))
    s = Scheduler(
        SchedulerConfig(max_batch_size=max_seqs, max_batch_tokens=budget, chunk_size=chunk, policy=policy),
        bm,
    )
    # block id -> slot -> the tokens whose KV sits there: a KV entry depends on its whole prefix
    kv: dict[int, dict[int, tuple[int, ...]]] = {}
    pending = list(seqs)
    stops = {q.seq_id: stop for q, stop in seqs}
    for _ in range(5000):
        while pending and arrivals.random() < 0.5:
            s.add(pending.pop(0)[0])
        if not s.has_unfinished():
            if not pending:
                break
            continue
        batch = s.schedule()
        assert len(batch.items) <= max_seqs and batch.num_tokens <= budget
        assert len({id(it.seq) for it in batch.items}) == len(batch.items)
        refs = [0] * bm.num_blocks
        for q in s.running:
            for blk in q.block_table:
                refs[blk] += 1
        assert refs == bm.ref_counts
        assert bm.num_free_blocks == sum(1 for r in refs if r == 0)
        for it in batch.items:
            q = it.seq
            assert it.num_tokens >= 1 and (chunk is None or not it.is_prefill or it.num_tokens <= chunk)
            assert len(q.block_table) * block_size >= it.end
            for pos in range(it.start, it.end):  # "write" the KV of the computed tokens
                blk, slot = q.block_table[pos // block_size], pos % block_size
                kv.setdefault(blk, {})[slot] = tuple(q.token_ids[: pos + 1])
            for pos in range(it.end):  # "read" everything attention will see
                assert kv[q.block_table[pos // block_size]][pos % block_size] == tuple(q.token_ids[: pos + 1])
        tokens = {it.seq.seq_id: fake_token(it.seq, it.end) for it in batch.items if it.samples}
        stopped = {
            it.seq.seq_id
            for it in batch.items
            if it.samples and it.seq.num_output_tokens + 1 == stops[it.seq.seq_id]
        }
        s.postprocess(batch, tokens, stopped)
    else:
        raise AssertionError("random load did not drain")
    for q, stop in seqs:
        assert q.is_finished
        expected = min(q.max_tokens, stop) if stop else q.max_tokens
        assert q.num_output_tokens == expected
        assert q.output_token_ids == [fake_token(q, q.prompt_len + k) for k in range(expected)]
    assert bm.num_free_blocks == bm.num_blocks
