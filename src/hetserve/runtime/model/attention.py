"""Attention over a paged KV cache.

Each layer's cache is a pair of tensors ``[num_blocks, block_size, num_kv_heads, head_dim]``: contiguous
(token-major storage, the fast path) or a strided view of head-major storage (``kvcache.token_major_view``),
whose new K/V are written by (block, offset) indexing instead of flat slots. A step's
tokens arrive as one flat batch: first ``num_decodes`` single decode tokens (one per sequence), then
one contiguous span per sequence that computes several tokens (a prompt or a prompt chunk). New K/V
are written to their cache slots first, then every query attends to its sequence's blocks:

* decodes: all sequences at once, one ``scaled_dot_product_attention`` call over a padded ``[D, S]``
  batch with a length mask. The keys and values come from the model runner's dense per-sequence copy
  when the layer's cache carries one (``decode_kv_index`` set: read in place, the new token appended), else
  the sequences' blocks are gathered from the paged cache;
* spans: one call each (a span is already a large matrix product). A span that starts a sequence uses
  its fresh K/V with a causal mask; one that continues earlier KV gathers its blocks.

The metadata (slots, block tables, masks) is built once per step by the model runner, not per layer.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor


@dataclass
class PrefillSpan:
    """Rows ``[start, end)`` of the flat batch: one sequence's new tokens, attending to ``context_len``."""

    start: int
    end: int
    context_len: int  # tokens visible to the last query: earlier KV + this span
    block_table: Tensor | None = None  # [num_blocks] long; only when the span continues earlier KV
    mask: Tensor | None = None  # [end - start, context_len] bool, True = may attend

    @property
    def continues(self) -> bool:
        return self.context_len > self.end - self.start


@dataclass
class AttentionMetadata:
    slot_mapping: Tensor  # [T] long: cache slot (block * block_size + offset) per row
    num_decodes: int = 0  # rows [0, num_decodes) are single decode tokens
    decode_block_tables: Tensor | None = None  # [D, max_blocks] long (padding entries are masked)
    decode_mask: Tensor | None = None  # [D, 1, 1, max_blocks * block_size] bool
    prefills: tuple[PrefillSpan, ...] = ()
    # for strided (head-major) caches, once per step; without them each layer derives them from slots
    slot_blocks: Tensor | None = None  # [T] long: slot_mapping // block_size
    slot_offsets: Tensor | None = None  # [T] long: slot_mapping % block_size
    # decodes read a dense copy ([2, rows, kv_heads, capacity, head_dim] per layer, decode d in row d): where
    # each decode's new K/V goes in its flattened [rows * kv_heads * capacity, head_dim] view
    decode_kv_index: Tensor | None = None  # [D * kv_heads] long


@dataclass
class StepSegments:
    """Several steps run as one (a server batching the steps that wait on it): rows
    ``[bounds[i], bounds[i + 1])`` are step ``i``'s, whose attention reads and writes, with ``metas[i]``,
    its own KV cache (each layer's cache argument is then one cache tuple per step). Everything but
    attention runs over all rows at once, so the server reads its weights once for all the steps."""

    bounds: tuple[int, ...]
    metas: tuple[AttentionMetadata, ...]
    #: The ``[lo, hi)`` layers of the slice each step runs, where they differ (partial inference: chains
    #: through different parts of one server); None where every step runs the same layers.
    parts: tuple[tuple[int, int], ...] | None = None

    def subset(self, steps: list[int]) -> tuple[StepSegments, Tensor]:
        """The segments of ``steps`` alone, rows renumbered from 0, and the rows they had here."""
        b = self.bounds
        rows = torch.cat([torch.arange(b[j], b[j + 1]) for j in steps])
        bounds = [0]
        for j in steps:
            bounds.append(bounds[-1] + b[j + 1] - b[j])
        return StepSegments(tuple(bounds), tuple(self.metas[j] for j in steps)), rows


def segmented_attention(
    q: Tensor, k: Tensor, v: Tensor, caches: tuple[tuple[Tensor, ...], ...], segments: StepSegments
) -> Tensor:
    """``paged_attention`` of each step of ``segments`` over its rows and its cache, rows in order."""
    b = segments.bounds
    return torch.cat(
        [
            paged_attention(q[lo:hi], k[lo:hi], v[lo:hi], c[0], c[1], m, c[2] if len(c) > 2 else None)
            for lo, hi, m, c in zip(b, b[1:], segments.metas, caches)
        ]
    )


def causal_mask(q_len: int, context_len: int, device: torch.device | str = "cpu") -> Tensor:
    """[q_len, context_len] mask for queries that are the last ``q_len`` of ``context_len`` tokens."""
    query_pos = torch.arange(context_len - q_len, context_len, device=device)
    return torch.arange(context_len, device=device)[None, :] <= query_pos[:, None]


def _gather(cache: Tensor, block_table: Tensor) -> Tensor:
    """The cache blocks of ``block_table`` ([nb] or [D, nb]) as tokens: [(D,) nb * block_size, kvh, hd]."""
    blocks = cache.index_select(0, block_table.reshape(-1))  # [D * nb, block_size, kvh, hd]
    return blocks.view(*block_table.shape[:-1], -1, *cache.shape[2:])


def _write_strided(k: Tensor, v: Tensor, k_cache: Tensor, v_cache: Tensor, meta: AttentionMetadata) -> None:
    """Store new K/V in caches that are strided views (no flat slot index exists for them)."""
    blocks, offsets = meta.slot_blocks, meta.slot_offsets
    if blocks is None or offsets is None:
        block_size = k_cache.shape[1]
        blocks, offsets = meta.slot_mapping // block_size, meta.slot_mapping % block_size
    k_cache[blocks, offsets] = k
    v_cache[blocks, offsets] = v


def paged_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    k_cache: Tensor,
    v_cache: Tensor,
    meta: AttentionMetadata,
    decode_kv: Tensor | None = None,
) -> Tensor:
    """q: [T, heads, hd]; k, v: [T, kv_heads, hd] for the new tokens. Returns [T, heads, hd].

    The caches are ``[num_blocks, block_size, kv_heads, hd]``, contiguous or a head-major storage's view.
    ``decode_kv`` is the layer's dense decode copy ``[2, rows, kv_heads, capacity, hd]``; the decodes use
    it when ``meta.decode_kv_index`` is set.
    """
    kv_heads, hd = k.shape[1], k.shape[2]
    if k_cache.is_contiguous():
        k_cache.view(-1, kv_heads, hd).index_copy_(0, meta.slot_mapping, k)
        v_cache.view(-1, kv_heads, hd).index_copy_(0, meta.slot_mapping, v)
    else:
        _write_strided(k, v, k_cache, v_cache, meta)
    d = meta.num_decodes
    if d:
        if decode_kv is not None and meta.decode_kv_index is not None:
            width = meta.decode_mask.shape[-1]
            dense_k, dense_v = decode_kv[0], decode_kv[1]  # [rows, kvh, capacity, hd]
            dense_k.view(-1, hd).index_copy_(0, meta.decode_kv_index, k[:d].reshape(-1, hd))
            dense_v.view(-1, hd).index_copy_(0, meta.decode_kv_index, v[:d].reshape(-1, hd))
            keys, values = dense_k[:d, :, :width], dense_v[:d, :, :width]  # [D, kvh, S, hd] views
        else:
            keys = _gather(k_cache, meta.decode_block_tables).transpose(1, 2)  # [D, kvh, S, hd]
            values = _gather(v_cache, meta.decode_block_tables).transpose(1, 2)
        o = F.scaled_dot_product_attention(
            q[:d].unsqueeze(2), keys, values, attn_mask=meta.decode_mask, enable_gqa=True
        )  # [D, heads, 1, hd]
        if not meta.prefills:  # a decode-only step: nothing else to place
            return o.squeeze(2)
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    if d:
        out[:d] = o.squeeze(2)
    for span in meta.prefills:
        qs = q[span.start : span.end].transpose(0, 1).unsqueeze(0)  # [1, heads, L, hd]
        if span.continues:
            ctx = span.context_len
            keys = _gather(k_cache, span.block_table)[:ctx].transpose(0, 1).unsqueeze(0)
            values = _gather(v_cache, span.block_table)[:ctx].transpose(0, 1).unsqueeze(0)
            o = F.scaled_dot_product_attention(qs, keys, values, attn_mask=span.mask, enable_gqa=True)
        else:
            keys = k[span.start : span.end].transpose(0, 1).unsqueeze(0)
            values = v[span.start : span.end].transpose(0, 1).unsqueeze(0)
            o = F.scaled_dot_product_attention(qs, keys, values, is_causal=True, enable_gqa=True)
        out[span.start : span.end] = o[0].transpose(0, 1)
    return out
