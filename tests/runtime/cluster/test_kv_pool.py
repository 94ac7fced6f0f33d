"""A worker's KV cache shared by the instances pooling its server: block ids of each instance's own map
onto physical blocks of one cache, handed out on first write and given back when the driver says so."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from hetserve.runtime.cluster.kv_pool import PooledBlocks  # noqa: E402
from hetserve.runtime.model.attention import AttentionMetadata, PrefillSpan  # noqa: E402

BS = 4


def writes(*blocks: int) -> AttentionMetadata:
    """A step writing one token into each of the instance's ``blocks``, decoding from their tables."""
    slots = torch.tensor([b * BS + 1 for b in blocks], dtype=torch.long)
    tables = torch.tensor([[b, 0] for b in blocks], dtype=torch.long)
    return AttentionMetadata(slots, num_decodes=len(blocks), decode_block_tables=tables)


def test_two_instances_never_hold_one_physical_block():
    pool = PooledBlocks(6, BS)
    pool.add("a", 6)
    pool.add("b", 6)
    a = pool.translate("a", writes(0, 1, 2))
    b = pool.translate("b", writes(0, 1, 2))  # the same ids of its own: other blocks of the cache
    held_a, held_b = set((a.slot_mapping // BS).tolist()), set((b.slot_mapping // BS).tolist())
    assert len(held_a) == len(held_b) == 3 and not held_a & held_b
    assert pool.free_blocks == 0
    assert (a.slot_mapping % BS).tolist() == [1, 1, 1]  # offsets within a block are kept
    # a block written again keeps its physical block; a table's padding (id 0 here) reads a real block
    again = pool.translate("a", writes(1))
    assert again.slot_mapping.tolist() == [a.slot_mapping[1].item()]
    assert again.decode_block_tables.tolist() == [
        [a.slot_mapping[1].item() // BS, a.slot_mapping[0].item() // BS]
    ]


def test_given_back_blocks_go_to_the_next_writer_and_the_old_ids_map_nowhere():
    pool = PooledBlocks(4, BS)
    pool.add("a", 4)
    pool.add("b", 4)
    a = pool.translate("a", writes(0, 1))
    pool.translate("b", writes(0, 1))
    with pytest.raises(RuntimeError, match="pool"):
        pool.translate("b", writes(2))  # more than the pool holds: the driver admitted too much
    pool.release("a", [0, 1])
    assert pool.free_blocks == 2
    b = pool.translate("b", writes(2, 3))
    assert set((b.slot_mapping // BS).tolist()) == set((a.slot_mapping // BS).tolist())
    # a's ids are unmapped now: writing one takes a free block, not the one b was given
    pool.release("b", None)  # everything b held (an instance taken down)
    assert pool.free_blocks == 4
    fresh = pool.translate("a", writes(0))
    assert pool.free_blocks == 3 and fresh.slot_mapping.numel() == 1


def test_prefill_spans_and_strided_blocks_are_translated_too():
    pool = PooledBlocks(8, BS)
    pool.add("a", 8)
    pool.translate("a", writes(5))  # block 5 of a: physical block 0
    slots = torch.tensor([5 * BS + 2, 6 * BS], dtype=torch.long)  # continues block 5, starts block 6
    meta = AttentionMetadata(
        slots,
        prefills=(PrefillSpan(0, 2, 7, block_table=torch.tensor([5, 6])),),
        slot_blocks=slots // BS,
        slot_offsets=slots % BS,
    )
    out = pool.translate("a", meta)
    assert out.slot_mapping.tolist() == [0 * BS + 2, 1 * BS]
    assert out.prefills[0].block_table.tolist() == [0, 1]
    assert out.slot_blocks.tolist() == [0, 1] and out.slot_offsets.tolist() == [2, 0]
