import pytest

from hetserve.scheduling import BlockManager, Sequence


def seq(seq_id: int, tokens: list[int], max_tokens: int = 4, **kw) -> Sequence:
    return Sequence(seq_id, len(tokens), max_tokens, token_ids=tokens, **kw)


def compute_all(bm: BlockManager, s: Sequence) -> None:
    """Allocate and mark the whole prompt computed, as a finished prefill step would."""
    bm.allocate(s, bm.match_prefix(s), s.num_tokens - bm.block_size * len(bm.match_prefix(s)))
    s.num_computed_tokens = s.num_tokens
    bm.register_computed(s)


def test_allocate_and_free_return_every_block():
    bm = BlockManager(num_blocks=8, block_size=4)
    a = seq(0, list(range(10)))
    assert bm.can_allocate(a, [], 10)
    bm.allocate(a, [], 10)
    assert len(a.block_table) == 3 and len(set(a.block_table)) == 3
    assert bm.num_free_blocks == 5
    assert bm.grow(a, 12) and len(a.block_table) == 3  # still fits in 3 blocks
    assert bm.grow(a, 13) and len(a.block_table) == 4
    assert not bm.grow(a, 4 * 9)  # would need 9 blocks in all: refused, nothing taken
    assert len(a.block_table) == 4 and bm.num_free_blocks == 4
    bm.free(a)
    assert bm.num_free_blocks == 8 and a.block_table == []


def test_allocate_refuses_beyond_capacity():
    bm = BlockManager(num_blocks=2, block_size=4)
    a = seq(0, list(range(9)))
    assert not bm.can_allocate(a, [], 9)
    with pytest.raises(RuntimeError):
        bm.allocate(a, [], 9)
    assert bm.num_free_blocks == 2


def test_shared_prefix_reuses_computed_blocks_with_refcounts():
    bm = BlockManager(num_blocks=16, block_size=4)
    a = seq(0, list(range(10)))  # blocks [0..3] [4..7] full, [8, 9] partial
    compute_all(bm, a)
    b = seq(1, list(range(8)) + [99, 98, 97])
    hits = bm.match_prefix(b)
    assert hits == a.block_table[:2]
    bm.allocate(b, hits, b.num_tokens - 8)
    assert b.num_computed_tokens == b.num_cached_tokens == 8
    assert b.block_table[:2] == a.block_table[:2] and b.block_table[2] != a.block_table[2]
    assert [bm.ref_counts[x] for x in a.block_table[:2]] == [2, 2]
    bm.free(a)
    assert [bm.ref_counts[x] for x in b.block_table[:2]] == [1, 1]  # still owned by b


def test_partial_and_uncomputed_blocks_are_not_shared():
    bm = BlockManager(num_blocks=16, block_size=4)
    a = seq(0, list(range(10)))
    bm.allocate(a, [], 10)
    a.num_computed_tokens = 5  # only the first block is computed so far (a chunked prefill)
    bm.register_computed(a)
    b = seq(1, list(range(10)))
    assert bm.match_prefix(b) == a.block_table[:1]


def test_fully_cached_prompt_still_computes_one_token():
    bm = BlockManager(num_blocks=16, block_size=4)
    a = seq(0, list(range(8)))
    compute_all(bm, a)
    b = seq(1, list(range(8)))
    assert bm.match_prefix(b) == a.block_table[:1]  # the last block is recomputed to get logits


def test_block_hash_covers_everything_before_it():
    bm = BlockManager(num_blocks=16, block_size=4)
    a = seq(0, [1, 1, 1, 1, 2, 2, 2, 2, 0])
    c = seq(1, [3, 3, 3, 3, 4, 4, 4, 4, 0])
    compute_all(bm, a)
    compute_all(bm, c)
    # Block 0 equals a's block 0 and block 1 equals c's block 1, but c's block 1 was computed after
    # different tokens, so its KV must not be reused here.
    b = seq(2, [1, 1, 1, 1, 4, 4, 4, 4, 0])
    assert bm.match_prefix(b) == a.block_table[:1]


def test_lru_eviction_evicts_oldest_freed_and_tail_blocks_first():
    bm = BlockManager(num_blocks=6, block_size=2)
    a = seq(0, [1, 1, 2, 2, 3])  # two full blocks + a partial one
    b = seq(1, [7, 7, 8, 8, 9])
    compute_all(bm, a)
    compute_all(bm, b)
    a_full, b_full = a.block_table[:2], b.block_table[:2]
    bm.free(a)
    bm.free(b)  # a was freed first, so it is older
    filler = seq(2, [5] * 6)
    bm.allocate(filler, [], 6)  # 2 clean blocks + 1 evicted: a's tail full block
    assert a_full[1] in filler.block_table
    assert bm.match_prefix(seq(3, [1, 1, 2, 2, 3])) == a_full[:1]
    assert bm.match_prefix(seq(4, [7, 7, 8, 8, 9])) == b_full


def test_reusing_a_free_cached_block_refreshes_its_lru_position():
    bm = BlockManager(num_blocks=4, block_size=2)
    a, b = seq(0, [1, 1, 0]), seq(1, [2, 2, 0])
    compute_all(bm, a)
    compute_all(bm, b)
    a_block, b_block = a.block_table[0], b.block_table[0]
    bm.free(a)
    bm.free(b)
    again = seq(2, [1, 1, 5])  # revives a's block: it leaves the free pool
    compute_all(bm, again)
    assert again.block_table[0] == a_block and bm.ref_counts[a_block] == 1
    bm.free(again)  # a's block is now the most recently freed
    hog = seq(3, [9] * 6)  # needs 3 blocks: the 2 clean ones + evict the oldest (b's)
    bm.allocate(hog, [], 6)
    assert b_block in hog.block_table and a_block not in hog.block_table
    assert bm.match_prefix(seq(4, [1, 1, 5])) == [a_block]


def test_supplied_block_keys_share_without_token_ids():
    bm = BlockManager(num_blocks=200, block_size=16)
    # Keys name 64-token spans; two requests share the first span only.
    a = Sequence(0, 150, 4, block_keys=[11, 12, 13], block_key_tokens=64)
    b = Sequence(1, 150, 4, block_keys=[11, 99, 13], block_key_tokens=64)
    compute_all(bm, a)
    assert len(a.block_hashes) == 9  # blocks wholly inside the prompt: 150 // 16
    hits = bm.match_prefix(b)
    assert hits == a.block_table[:4]  # 64 tokens / 16 per block
    c = Sequence(2, 150, 4, block_keys=[11, 12, 13], block_key_tokens=64)
    assert bm.match_prefix(c) == a.block_table[:9]


def test_opt_out_and_disabled_cache_neither_publish_nor_reuse():
    bm = BlockManager(num_blocks=16, block_size=4)
    a = seq(0, list(range(9)), cacheable=False)
    compute_all(bm, a)
    assert bm.cached == {}
    compute_all(bm, seq(1, list(range(9))))
    assert bm.match_prefix(seq(2, list(range(9)), cacheable=False)) == []
    off = BlockManager(num_blocks=16, block_size=4, enable_prefix_caching=False)
    compute_all(off, seq(3, list(range(9))))
    assert off.match_prefix(seq(4, list(range(9)))) == [] and off.cached == {}


def test_reset_prefix_cache_drops_only_free_blocks():
    bm = BlockManager(num_blocks=8, block_size=2)
    a, b = seq(0, [1, 2, 3]), seq(1, [4, 5, 6])
    compute_all(bm, a)
    compute_all(bm, b)
    bm.free(a)
    bm.reset_prefix_cache()
    assert bm.match_prefix(seq(2, [1, 2, 3])) == []
    assert bm.match_prefix(seq(3, [4, 5, 6])) == b.block_table[:1]
    assert bm.num_free_blocks == 6
