"""Runs one scheduled batch through the model: owns the paged KV cache, builds the step's inputs.

The flat batch puts single-token items (decodes) first, then one contiguous span per multi-token item
(prompts, prompt chunks, recomputation), matching ``AttentionMetadata``'s layout.
"""
from __future__ import annotations

import torch
from torch import Tensor

from ..scheduling import ScheduledSeq
from .model.attention import AttentionMetadata, PrefillSpan, causal_mask
from .model.llama import LlamaModel


class ModelRunner:
    def __init__(self, model: LlamaModel, num_blocks: int, block_size: int):
        if not (model.is_first and model.is_last):
            raise ValueError("ModelRunner drives a whole model; this one holds only some layers")
        c = model.config
        self.model, self.num_blocks, self.block_size = model, num_blocks, block_size
        shape = (num_blocks, block_size, c.num_kv_heads, c.head_dim)
        self.kv_caches = [(torch.zeros(shape, dtype=model.dtype, device=model.device),
                           torch.zeros(shape, dtype=model.dtype, device=model.device))
                          for _ in model.layers]

    @staticmethod
    def kv_bytes_per_block(model: LlamaModel, block_size: int) -> int:
        c = model.config
        return 2 * len(model.layers) * block_size * c.kv_size * model.dtype.itemsize

    def prepare(self, items: list[ScheduledSeq]) -> tuple[Tensor, Tensor, AttentionMetadata, list[int]]:
        """Token ids, positions, attention metadata, and the row of each sampling item (item order)."""
        bs, device = self.block_size, self.model.device
        decodes = [it for it in items if it.num_tokens == 1]
        spans = [it for it in items if it.num_tokens > 1]
        ids = [it.seq.token_ids[it.start] for it in decodes]
        positions = [it.start for it in decodes]
        slots = [torch.tensor([it.seq.block_table[it.start // bs] * bs + it.start % bs for it in decodes],
                              dtype=torch.long)]
        row_of = {id(it): row for row, it in enumerate(decodes)}
        decode_tables = decode_mask = None
        if decodes:
            width = max(-(-it.end // bs) for it in decodes)
            decode_tables = torch.zeros(len(decodes), width, dtype=torch.long)
            for row, it in enumerate(decodes):
                used = -(-it.end // bs)
                decode_tables[row, :used] = torch.tensor(it.seq.block_table[:used])
            lengths = torch.tensor([it.end for it in decodes])
            decode_mask = (torch.arange(width * bs)[None, :] < lengths[:, None])[:, None, None, :]
            decode_tables, decode_mask = decode_tables.to(device), decode_mask.to(device)
        prefills = []
        row = len(decodes)
        for it in spans:
            table = torch.tensor(it.seq.block_table[:-(-it.end // bs)], dtype=torch.long)
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
        meta = AttentionMetadata(torch.cat(slots).to(device), len(decodes), decode_tables, decode_mask,
                                 tuple(prefills))
        sample_rows = [row_of[id(it)] for it in items if it.samples]
        return (torch.tensor(ids, dtype=torch.long, device=device),
                torch.tensor(positions, dtype=torch.long, device=device), meta, sample_rows)

    @torch.inference_mode()
    def run(self, items: list[ScheduledSeq]) -> Tensor:
        """fp32 logits [number of sampling items, vocab], in the order of ``items``."""
        ids, positions, meta, sample_rows = self.prepare(items)
        hidden = self.model(ids, positions, meta, self.kv_caches)
        return self.model.compute_logits(hidden[sample_rows])
