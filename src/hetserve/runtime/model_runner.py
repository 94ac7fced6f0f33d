"""Runs one scheduled batch through the model: owns the paged KV cache, builds the step's inputs.

The flat batch puts single-token items (decodes) first, then one contiguous span per multi-token item
(prompts, prompt chunks, recomputation), matching ``AttentionMetadata``'s layout.
"""
from __future__ import annotations

import torch
from torch import Tensor

from ..scheduling import ScheduledSeq
from .kvcache import KVLayout, allocate_kv_caches, kv_bytes_per_block, token_major_view
from .model.attention import AttentionMetadata, PrefillSpan, causal_mask
from .model.llama import LlamaModel


def _local_kv_heads(model: LlamaModel) -> int:
    """KV heads this model instance holds (a tensor-parallel shard holds some of them)."""
    return getattr(model, "num_local_kv_heads", model.config.num_kv_heads)


class ModelRunner:
    """``kv_storage`` holds each layer's (K, V) caches as allocated, in ``kv_layout`` (what ``extract_kv``
    and ``install_kv`` take); ``kv_caches`` are their token-major views, which the model reads."""

    def __init__(self, model: LlamaModel, num_blocks: int, block_size: int, kv_layout: KVLayout = "token-major"):
        if not (model.is_first and model.is_last):
            raise ValueError("ModelRunner drives a whole model; this one holds only some layers")
        self.model, self.num_blocks, self.block_size, self.kv_layout = model, num_blocks, block_size, kv_layout
        self.kv_storage = allocate_kv_caches(len(model.layers), num_blocks, block_size, _local_kv_heads(model),
                                             model.config.head_dim, model.dtype, model.device, kv_layout)
        self.kv_caches = [(token_major_view(k, kv_layout), token_major_view(v, kv_layout))
                          for k, v in self.kv_storage]

    @staticmethod
    def kv_bytes_per_block(model: LlamaModel, block_size: int) -> int:
        return kv_bytes_per_block(len(model.layers), block_size, _local_kv_heads(model), model.config.head_dim,
                                  model.dtype)

    def prepare(self, items: list[ScheduledSeq]) -> tuple[Tensor, Tensor, AttentionMetadata, list[int]]:
        """Token ids, positions, attention metadata, and the row of each sampling item (item order)."""
        return prepare_batch(items, self.block_size, self.model.device,
                             strided=not self.kv_caches[0][0].is_contiguous())

    @torch.inference_mode()
    def run(self, items: list[ScheduledSeq]) -> Tensor:
        """fp32 logits [number of sampling items, vocab], in the order of ``items``."""
        ids, positions, meta, sample_rows = self.prepare(items)
        hidden = self.model(ids, positions, meta, self.kv_caches)
        return self.model.compute_logits(hidden[sample_rows])


def prepare_batch(items: list[ScheduledSeq], block_size: int, device: torch.device | str = "cpu",
                  block_offset: int = 0, strided: bool = False) -> tuple[Tensor, Tensor, AttentionMetadata, list[int]]:
    """Token ids, positions, attention metadata, and the row of each sampling item (item order).

    ``block_offset`` is added to every block id (a scheduler lane owning blocks from there on);
    ``strided`` also gives (block, offset) per slot, for caches that are strided views (head-major).
    """
    bs = block_size
    decodes = [it for it in items if it.num_tokens == 1]
    spans = [it for it in items if it.num_tokens > 1]
    ids = [it.seq.token_ids[it.start] for it in decodes]
    positions = [it.start for it in decodes]
    slots = [torch.tensor([(it.seq.block_table[it.start // bs] + block_offset) * bs + it.start % bs
                           for it in decodes], dtype=torch.long)]
    row_of = {id(it): row for row, it in enumerate(decodes)}
    decode_tables = decode_mask = None
    if decodes:
        width = max(-(-it.end // bs) for it in decodes)
        decode_tables = torch.zeros(len(decodes), width, dtype=torch.long)
        for row, it in enumerate(decodes):
            used = -(-it.end // bs)
            decode_tables[row, :used] = torch.tensor(it.seq.block_table[:used])
        if block_offset:
            decode_tables += block_offset
        lengths = torch.tensor([it.end for it in decodes])
        decode_mask = (torch.arange(width * bs)[None, :] < lengths[:, None])[:, None, None, :]
        decode_tables, decode_mask = decode_tables.to(device), decode_mask.to(device)
    prefills = []
    row = len(decodes)
    for it in spans:
        table = torch.tensor(it.seq.block_table[:-(-it.end // bs)], dtype=torch.long) + block_offset
        pos = torch.arange(it.start, it.end)
        slots.append(table[pos // bs] * bs + pos % bs)
        ids.extend(it.seq.token_ids[it.start:it.end])
        positions.extend(range(it.start, it.end))
        span = PrefillSpan(row, row + it.num_tokens, it.end)
        if span.continues:
            span.block_table = table.to(device)
            span.mask = causal_mask(it.num_tokens, it.end, device)
        prefills.append(span)
        row += it.num_tokens
        row_of[id(it)] = row - 1
    meta = AttentionMetadata(torch.cat(slots).to(device), len(decodes), decode_tables, decode_mask, tuple(prefills))
    if strided:
        meta.slot_blocks, meta.slot_offsets = meta.slot_mapping // bs, meta.slot_mapping % bs
    sample_rows = [row_of[id(it)] for it in items if it.samples]
    return (torch.tensor(ids, dtype=torch.long, device=device),
            torch.tensor(positions, dtype=torch.long, device=device), meta, sample_rows)
