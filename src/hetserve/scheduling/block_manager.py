"""Paged KV-cache accounting with automatic prefix caching.

The cache is ``num_blocks`` blocks of ``block_size`` token slots. A sequence owns a block table (block
ids in position order). A *full, computed* block is published under a chained hash of its content
(the hash of everything before it and its own tokens, or a caller-supplied key), so a later sequence
with the same prefix maps the same physical block (reference counted) instead of recomputing it.

Free blocks live in two pools: blocks holding nothing reusable, handed out first, and blocks that are
free but still cached, kept in least-recently-freed order and evicted oldest first when the clean
pool is empty. Pure Python and O(blocks touched) per call, so the simulator can call it per step.
"""

from __future__ import annotations

from collections import OrderedDict

from .kv_window import KVWindow
from .sequence import Sequence

_ROOT_HASH = -1


class BlockManager:
    def __init__(
        self,
        num_blocks: int,
        block_size: int,
        enable_prefix_caching: bool = True,
        window: KVWindow | None = None,
    ):
        if num_blocks < 1 or block_size < 1:
            raise ValueError("num_blocks and block_size must be at least 1")
        self.num_blocks = num_blocks
        self.block_size = block_size
        #: With sliding-window layers a sequence holds ``window.held(n)`` slots for ``n`` tokens, so its
        #: block table counts slots, not positions, and no prefix is shared (a block no longer names
        #: one span of positions).
        self.window = window
        self.enable_prefix_caching = enable_prefix_caching and window is None
        self.ref_counts = [0] * num_blocks
        self.block_hash: list[int | None] = [None] * num_blocks
        self.cached: dict[int, int] = {}  # content hash -> block id
        self._free_clean: list[int] = list(range(num_blocks - 1, -1, -1))  # pop() yields block 0 first
        self._free_cached: OrderedDict[int, None] = OrderedDict()  # oldest-freed first
        #: When a list: every block freed outside the prefix cache is appended (for an owner that tells
        #: the cache's holders, e.g. workers whose blocks come from a shared pool).
        self.released: list[int] | None = None

    # ---- capacity -----------------------------------------------------------------------------
    @property
    def num_free_blocks(self) -> int:
        return len(self._free_clean) + len(self._free_cached)

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - self.num_free_blocks

    def blocks_for(self, num_tokens: int) -> int:
        """Blocks a sequence of ``num_tokens`` tokens holds."""
        if self.window is not None:
            num_tokens = self.window.held(num_tokens)
        return -(-num_tokens // self.block_size)

    # ---- prefix cache -------------------------------------------------------------------------
    def _extend_hashes(self, seq: Sequence, num_blocks: int) -> None:
        """Fill ``seq.block_hashes`` up to ``num_blocks`` entries, or as far as its content is known."""
        hashes, bs = seq.block_hashes, self.block_size
        if seq.token_ids is not None:
            limit = min(num_blocks, len(seq.token_ids) // bs)
            for i in range(len(hashes), limit):
                parent = hashes[i - 1] if i else _ROOT_HASH
                hashes.append(hash((parent, tuple(seq.token_ids[i * bs : (i + 1) * bs]))))
        elif seq.block_keys is not None:
            span = seq.block_key_tokens or bs
            keyed_tokens = min(seq.prompt_len, len(seq.block_keys) * span)
            limit = min(num_blocks, keyed_tokens // bs)
            if limit <= len(hashes):
                return
            chain, h = [], _ROOT_HASH  # chain[j]: hash of keys[0..j], i.e. of the prefix they name
            for key in seq.block_keys[: (limit * bs - 1) // span + 1]:
                h = hash((h, key))
                chain.append(h)
            for i in range(len(hashes), limit):
                # The key covering this block's last token names the whole prefix up to it.
                hashes.append(hash((chain[((i + 1) * bs - 1) // span], i)))

    def match_prefix(self, seq: Sequence) -> list[int]:
        """Cached blocks equal to ``seq``'s leading blocks; at least one token is always left to compute."""
        if not (self.enable_prefix_caching and seq.cacheable):
            return []
        max_blocks = (seq.num_tokens - 1) // self.block_size
        self._extend_hashes(seq, max_blocks)
        hits: list[int] = []
        for h in seq.block_hashes[:max_blocks]:
            block = self.cached.get(h)
            if block is None:
                break
            hits.append(block)
        return hits

    def register_computed(self, seq: Sequence) -> None:
        """Publish ``seq``'s full blocks whose KV is computed so later sequences can reuse them."""
        if not (self.enable_prefix_caching and seq.cacheable):
            return
        full = seq.num_computed_tokens // self.block_size
        if full <= seq.num_registered_blocks:
            return
        self._extend_hashes(seq, full)
        stop = min(full, len(seq.block_hashes))
        for i in range(seq.num_registered_blocks, stop):
            h, block = seq.block_hashes[i], seq.block_table[i]
            if h not in self.cached:  # an identical block computed elsewhere keeps its entry
                self.cached[h] = block
                self.block_hash[block] = h
        seq.num_registered_blocks = max(seq.num_registered_blocks, stop)

    # ---- allocation ---------------------------------------------------------------------------
    def can_allocate(self, seq: Sequence, hits: list[int], num_new_tokens: int, reserve: int = 0) -> bool:
        """Whether ``seq`` can take ``hits`` and get slots for ``num_new_tokens`` beyond them."""
        needed = self.blocks_for(len(hits) * self.block_size + num_new_tokens) - len(hits)
        revived = sum(1 for b in hits if self.ref_counts[b] == 0)  # cached-but-free hits leave the pool
        return needed + revived + reserve <= self.num_free_blocks

    def allocate(self, seq: Sequence, hits: list[int], num_new_tokens: int) -> None:
        """Give a waiting ``seq`` its prefix hits plus fresh blocks for ``num_new_tokens`` more tokens."""
        assert not seq.block_table, f"sequence {seq.seq_id} already holds blocks"
        if not self.can_allocate(seq, hits, num_new_tokens):
            raise RuntimeError(f"sequence {seq.seq_id}: not enough free KV blocks")
        for block in hits:
            if self.ref_counts[block] == 0:
                del self._free_cached[block]
            self.ref_counts[block] += 1
        seq.block_table.extend(hits)
        seq.num_registered_blocks = len(hits)
        seq.num_computed_tokens = seq.num_cached_tokens = len(hits) * self.block_size
        grown = self.grow(seq, seq.num_computed_tokens + num_new_tokens)
        assert grown

    def grow(self, seq: Sequence, num_tokens: int) -> bool:
        """Extend ``seq``'s block table to hold ``num_tokens`` tokens; False (and no change) if it can't."""
        need = self.blocks_for(num_tokens) - len(seq.block_table)
        if need <= 0:
            return True
        if need > len(self._free_clean) and need > self.num_free_blocks:
            return False
        seq.block_table.extend(self.take(need))
        return True

    def take(self, count: int) -> list[int]:
        """``count`` free blocks for the caller to hand out later (the growth of sequences advanced in
        aggregate), taken exactly as ``grow`` would take them: clean blocks first, then the least recently
        freed cached ones. The caller has checked that ``count`` blocks are free."""
        clean = self._free_clean
        if count <= len(clean):  # the common case: the clean blocks in one slice
            taken = clean[-count:]
            del clean[-count:]
            taken.reverse()
            refs = self.ref_counts
            for block in taken:
                refs[block] = 1
            return taken
        assert count <= self.num_free_blocks, "take() needs that many free blocks"
        return [self._take_free_block() for _ in range(count)]

    def _take_free_block(self) -> int:
        if self._free_clean:
            block = self._free_clean.pop()
        else:
            block, _ = self._free_cached.popitem(last=False)  # evict the least recently freed
            del self.cached[self.block_hash[block]]
            self.block_hash[block] = None
        self.ref_counts[block] = 1
        return block

    def free(self, seq: Sequence) -> None:
        """Release ``seq``'s blocks. Its tail blocks go first, so they are also evicted first."""
        refs, hashes, clean, cached = self.ref_counts, self.block_hash, self._free_clean, self._free_cached
        if not (self.enable_prefix_caching and seq.cacheable):
            # blocks of a sequence outside the prefix cache are its own and hold nothing reusable
            table = seq.block_table
            for block in table:
                refs[block] = 0
            if self.released is not None:
                self.released.extend(table)
            table.reverse()
            clean.extend(table)
            table.clear()
            seq.num_registered_blocks = 0
            return
        for block in reversed(seq.block_table):
            refs[block] -= 1
            if refs[block] == 0:
                if hashes[block] is None:
                    clean.append(block)
                else:
                    cached[block] = None
        seq.block_table.clear()
        seq.num_registered_blocks = 0

    def reset_prefix_cache(self) -> None:
        """Forget every cached-but-free block (in-use blocks stay published until they are freed)."""
        for block in self._free_cached:
            del self.cached[self.block_hash[block]]
            self.block_hash[block] = None
            self._free_clean.append(block)
        self._free_cached.clear()
