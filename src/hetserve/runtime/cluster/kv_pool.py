"""A worker's one KV cache shared by the instances that pool its server (``kv_pool: server``).

The driver schedules each instance over block ids of its own (``scheduling.instance``: the instance may
hold up to the whole pool, and admits a request only when every pool on its chain has room for its
whole length). On the worker those ids name blocks of the instance's *view* of the pool: a block gets a
physical block of the shared cache the first time a step writes to it, and gives it back when the
driver says the request holding it left (``KVFree``). Admission never promises more than the pool
holds, so a step always finds its blocks. Prefix caching is off for such instances: a block's KV
leaves with its request.
"""

from __future__ import annotations

from dataclasses import replace

import torch
from torch import Tensor

from ..model.attention import AttentionMetadata


class PooledBlocks:
    """Physical blocks of one shared cache, and each pooling instance's map onto them."""

    def __init__(self, num_blocks: int, block_size: int):
        self.num_blocks, self.block_size = num_blocks, block_size
        self._free = list(range(num_blocks - 1, -1, -1))  # pop() hands out block 0 first
        self._maps: dict[str, Tensor] = {}

    def add(self, instance: str, num_blocks: int) -> None:
        """An instance scheduling over ``num_blocks`` block ids of its own."""
        self._maps[instance] = torch.full((num_blocks,), -1, dtype=torch.long)

    @property
    def free_blocks(self) -> int:
        return len(self._free)

    def translate(self, instance: str, meta: AttentionMetadata) -> AttentionMetadata:
        """``meta`` with the instance's block ids replaced by physical ones; blocks written for the first
        time get one. Padding entries of block tables that map nowhere read block 0 (masked)."""
        m, bs = self._maps[instance], self.block_size
        local = meta.slot_mapping // bs
        new = torch.unique(local[m[local] < 0])
        if len(new) > len(self._free):
            raise RuntimeError(
                f"instance {instance}: {len(new)} new KV blocks, {len(self._free)} left in the server's "
                "pool (the driver admitted more than the pool holds)"
            )
        if len(new):
            m[new] = torch.tensor([self._free.pop() for _ in range(len(new))], dtype=torch.long)
        physical = lambda t: None if t is None else m[t].clamp(min=0)
        blocks = m[local]
        return replace(
            meta,
            slot_mapping=blocks * bs + meta.slot_mapping % bs,
            decode_block_tables=physical(meta.decode_block_tables),
            prefills=tuple(replace(s, block_table=physical(s.block_table)) for s in meta.prefills),
            slot_blocks=None if meta.slot_blocks is None else blocks,
        )

    def release(self, instance: str, blocks: list[int] | None) -> None:
        """The instance's ``blocks`` (None: all of them) hold nothing any more."""
        m = self._maps[instance]
        ids = torch.arange(len(m)) if blocks is None else torch.tensor(blocks, dtype=torch.long)
        if not len(ids):
            return
        held = m[ids]
        self._free.extend(held[held >= 0].tolist())
        m[ids] = -1
