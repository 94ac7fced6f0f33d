"""Runs one scheduled batch through the model: owns the paged KV cache, builds the step's inputs.

The flat batch puts single-token items (decodes) first, then one contiguous span per multi-token item
(prompts, prompt chunks, recomputation), matching ``AttentionMetadata``'s layout.

The runner also keeps a dense copy of the decoding sequences' K/V (``DecodeKV``) so that decode attention
reads each sequence's keys and values in place rather than gathering its blocks in every layer of every
step; the paged cache stays the source of truth.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from ..scheduling import ScheduledSeq
from ..scheduling import Sequence as Seq
from .kvcache import KVLayout, allocate_kv_caches, kv_bytes_per_block, token_major_view
from .model.attention import AttentionMetadata, PrefillSpan, causal_mask
from .model.llama import LlamaModel


def _local_kv_heads(model: LlamaModel) -> int:
    """KV heads this model instance holds (a tensor-parallel shard holds some of them)."""
    return getattr(model, "num_local_kv_heads", model.config.num_kv_heads)


class DecodeKV:
    """A dense copy of the decoding sequences' K/V: ``buf[layer]`` is ``[2, rows, kv_heads, capacity,
    head_dim]`` with one sequence per row, its tokens in position order.

    A sequence keeps its row while it decodes step after step (each step appends its new token here and
    to the paged cache); one that starts or resumes decoding is copied in from the paged cache once. Rows
    of sequences that did not decode in the previous step are dropped, and so are all rows when that step
    was not ``commit``-ted (its forward pass did not write here), so the copy never differs from what the
    paged cache holds (recomputation after preemption, prefix-cache hits). At most ``max_bytes``: a step
    that needs more runs without it (decodes gather from the paged cache).
    """

    def __init__(
        self,
        num_layers: int,
        kv_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device,
        max_bytes: int,
    ):
        self.num_layers, self.kv_heads, self.head_dim = num_layers, kv_heads, head_dim
        self.dtype, self.device, self.max_bytes = dtype, device, max_bytes
        self.buf: Tensor | None = None  # [layers, 2, rows, kv_heads, capacity, head_dim]
        self.seqs: list[Seq | None] = []  # the sequence in each row
        self.lengths: list[int] = []  # tokens each row holds
        self.pending = False  # rows assigned for a step whose writes are not confirmed
        self._bytes_per_slot = num_layers * 2 * kv_heads * head_dim * dtype.itemsize

    @property
    def rows(self) -> int:
        return 0 if self.buf is None else self.buf.shape[2]

    @property
    def capacity(self) -> int:
        return 0 if self.buf is None else self.buf.shape[4]

    def reset(self) -> None:
        """Forget every row (the memory is released)."""
        self.buf, self.seqs, self.lengths, self.pending = None, [], [], False

    def commit(self) -> None:
        """The step of the last ``assign`` wrote its new K/V here: its rows stay valid."""
        self.pending = False

    def _fits(self, rows: int, capacity: int) -> bool:
        return rows * capacity * self._bytes_per_slot <= self.max_bytes

    def _reserve(self, rows: int, width: int) -> bool:
        """Room for ``rows`` rows of ``width`` tokens; existing rows keep their contents. Capacity grows
        ahead (doubling, in steps of 64 tokens) as far as ``max_bytes`` allows."""
        if rows <= self.rows and width <= self.capacity:
            return True
        rows, capacity = max(rows, self.rows), self.capacity
        if width > capacity:
            capacity = -(-max(width, 2 * capacity) // 64) * 64
            while capacity > width and not self._fits(rows, capacity):
                capacity = max(width, capacity - 64)
        if not self._fits(rows, capacity):
            return False
        buf = torch.zeros(
            (self.num_layers, 2, rows, self.kv_heads, capacity, self.head_dim),
            dtype=self.dtype,
            device=self.device,
        )
        if self.buf is not None:
            buf[:, :, : self.rows, :, : self.capacity] = self.buf
        self.buf = buf
        self.seqs += [None] * (rows - len(self.seqs))
        self.lengths += [0] * (rows - len(self.lengths))
        return True

    def assign(
        self,
        decodes: list[ScheduledSeq],
        width: int,
        kv_caches: Sequence[tuple[Tensor, Tensor]],
        block_size: int,
    ) -> bool:
        """Put decode ``i`` in row ``i``, holding its tokens ``[0, start)``: a row kept from the previous
        step stays or moves, any other is loaded from the paged cache. False (after dropping every row)
        when the decodes do not fit in ``max_bytes``.

        ``width`` is the padded context length the step's attention reads. Records that each row holds
        ``[0, end)`` after the step (the step writes the new token).
        """
        n = len(decodes)
        if self.pending:
            self.reset()
        if not self._reserve(n, width):
            self.reset()
            return False
        row_of = {id(s): r for r, s in enumerate(self.seqs) if s is not None}
        moves: list[tuple[int, int]] = []  # (from, to)
        load: list[int] = []  # decodes filled from the paged cache
        for i, it in enumerate(decodes):
            r = row_of.get(id(it.seq))
            if r is None or self.lengths[r] != it.start:
                load.append(i)
            elif r != i:
                moves.append((r, i))
        if moves:  # one gather then one scatter: a row may move to where another moves from
            src = torch.tensor([a for a, _ in moves], device=self.device)
            dst = torch.tensor([b for _, b in moves], device=self.device)
            used = self.buf[:, :, :, :, :width]
            used.index_copy_(2, dst, used.index_select(2, src))
        if load:
            self._load([decodes[i] for i in load], load, kv_caches, block_size)
        self.seqs = [it.seq for it in decodes] + [None] * (self.rows - n)
        self.lengths = [it.end for it in decodes] + [0] * (self.rows - n)
        self.pending = True
        return True

    def _load(
        self,
        items: list[ScheduledSeq],
        rows: list[int],
        kv_caches: Sequence[tuple[Tensor, Tensor]],
        block_size: int,
    ) -> None:
        """Copy the cached tokens ``[0, start)`` of ``items`` from the paged cache into ``rows``."""
        blocks = max(-(-it.start // block_size) for it in items)
        if blocks == 0:
            return
        table = torch.tensor(
            [_padded_table(it.seq.block_table, -(-it.start // block_size), blocks) for it in items],
            dtype=torch.long,
            device=self.device,
        ).view(-1)
        index = torch.tensor(rows, device=self.device)
        span = blocks * block_size
        for i, (k_cache, v_cache, *_) in enumerate(kv_caches):
            for j, cache in enumerate((k_cache, v_cache)):
                tokens = cache.index_select(0, table).reshape(len(items), span, *cache.shape[2:])
                self.buf[i, j, :, :, :span].index_copy_(0, index, tokens.transpose(1, 2))

    def write_index(self, decodes: list[ScheduledSeq]) -> Tensor:
        """Where each decode's new K/V (row d, every head, position ``start``) goes in a layer's flattened
        ``[rows * kv_heads * capacity, head_dim]`` K or V."""
        kv_heads, capacity = self.kv_heads, self.capacity
        starts = torch.tensor([it.start for it in decodes], dtype=torch.long)
        rows = torch.arange(len(decodes), dtype=torch.long)[:, None] * kv_heads + torch.arange(kv_heads)
        return (rows * capacity + starts[:, None]).view(-1).to(self.device)


class ModelRunner:
    """``kv_storage`` holds each layer's (K, V) caches as allocated, in ``kv_layout`` (what ``extract_kv``
    and ``install_kv`` take); ``kv_caches`` are their token-major views, which the model reads.

    ``decode_kv`` is a dense copy of the decoding sequences' K/V (at most half the paged cache's size)
    that ``run`` passes to the model with ``kv_caches``. A forward pass through ``kv_caches`` alone is
    still correct (the decodes then gather from the paged cache) and the copy is reloaded at the next step.
    """

    def __init__(
        self, model: LlamaModel, num_blocks: int, block_size: int, kv_layout: KVLayout = "token-major"
    ):
        if not (model.is_first and model.is_last):
            raise ValueError("ModelRunner drives a whole model; this one holds only some layers")
        self.model, self.num_blocks, self.block_size, self.kv_layout = (
            model,
            num_blocks,
            block_size,
            kv_layout,
        )
        self.kv_storage = allocate_kv_caches(
            len(model.layers),
            num_blocks,
            block_size,
            _local_kv_heads(model),
            model.config.head_dim,
            model.dtype,
            model.device,
            kv_layout,
        )
        self.kv_caches = [
            (token_major_view(k, kv_layout), token_major_view(v, kv_layout)) for k, v in self.kv_storage
        ]
        self.decode_kv = DecodeKV(
            len(model.layers),
            _local_kv_heads(model),
            model.config.head_dim,
            model.dtype,
            model.device,
            num_blocks * self.kv_bytes_per_block(model, block_size) // 2,
        )
        self._layer_kv: list[tuple[Tensor, Tensor, Tensor]] = []  # kv_caches with the copy, per layer

    @staticmethod
    def kv_bytes_per_block(model: LlamaModel, block_size: int) -> int:
        return kv_bytes_per_block(
            len(model.layers), block_size, _local_kv_heads(model), model.config.head_dim, model.dtype
        )

    def prepare(self, items: list[ScheduledSeq]) -> tuple[Tensor, Tensor, AttentionMetadata, list[int]]:
        """Token ids, positions, attention metadata, and the row of each sampling item (item order).

        ``decode_kv_index`` is set when the decodes use the dense copy (their block tables are there too,
        for a pass over ``kv_caches`` alone).
        """
        ids, positions, meta, sample_rows = prepare_batch(
            items, self.block_size, self.model.device, strided=not self.kv_caches[0][0].is_contiguous()
        )
        decodes = [it for it in items if it.num_tokens == 1]
        if not decodes:
            self.decode_kv.reset()
        elif self.decode_kv.assign(decodes, meta.decode_mask.shape[-1], self.kv_caches, self.block_size):
            meta.decode_kv_index = self.decode_kv.write_index(decodes)
        return ids, positions, meta, sample_rows

    @torch.inference_mode()
    def run(self, items: list[ScheduledSeq]) -> Tensor:
        """fp32 logits [number of sampling items, vocab], in the order of ``items``."""
        ids, positions, meta, sample_rows = self.prepare(items)
        if meta.decode_kv_index is None:
            hidden = self.model(ids, positions, meta, self.kv_caches)
        else:
            hidden = self.model(ids, positions, meta, self._with_decode_kv())
            self.decode_kv.commit()
        return self.model.compute_logits(hidden[sample_rows])

    def _with_decode_kv(self) -> list[tuple[Tensor, Tensor, Tensor]]:
        """Each layer's (K cache, V cache, dense copy), rebuilt when the copy is reallocated."""
        buf = self.decode_kv.buf
        if not self._layer_kv or self._layer_kv[0][2]._base is not buf:
            self._layer_kv = [(k, v, buf[i]) for i, (k, v) in enumerate(self.kv_caches)]
        return self._layer_kv


def prepare_batch(
    items: list[ScheduledSeq],
    block_size: int,
    device: torch.device | str = "cpu",
    block_offset: int = 0,
    strided: bool = False,
) -> tuple[Tensor, Tensor, AttentionMetadata, list[int]]:
    """Token ids, positions, attention metadata, and the row of each sampling item (item order).

    ``block_offset`` is added to every block id (a scheduler lane owning blocks from there on);
    ``strided`` also gives (block, offset) per slot, for caches that are strided views (head-major).
    """
    bs = block_size
    decodes = [it for it in items if it.num_tokens == 1]
    spans = [it for it in items if it.num_tokens > 1]
    ids = [it.seq.token_ids[it.start] for it in decodes]
    positions = [it.start for it in decodes]
    slots = [
        torch.tensor(
            [(it.seq.block_table[it.start // bs] + block_offset) * bs + it.start % bs for it in decodes],
            dtype=torch.long,
        )
    ]
    row_of = {id(it): row for row, it in enumerate(decodes)}
    decode_tables = decode_mask = None
    if decodes:
        width = max(-(-it.end // bs) for it in decodes)
        decode_tables = torch.tensor(
            [_padded_table(it.seq.block_table, -(-it.end // bs), width) for it in decodes], dtype=torch.long
        )
        if block_offset:
            decode_tables += block_offset
        lengths = torch.tensor([it.end for it in decodes])
        decode_mask = (torch.arange(width * bs)[None, :] < lengths[:, None])[:, None, None, :]
        decode_tables, decode_mask = decode_tables.to(device), decode_mask.to(device)
    prefills = []
    row = len(decodes)
    for it in spans:
        table = torch.tensor(it.seq.block_table[: -(-it.end // bs)], dtype=torch.long) + block_offset
        pos = torch.arange(it.start, it.end)
        slots.append(table[pos // bs] * bs + pos % bs)
        ids.extend(it.seq.token_ids[it.start : it.end])
        positions.extend(range(it.start, it.end))
        span = PrefillSpan(row, row + it.num_tokens, it.end)
        if span.continues:
            span.block_table = table.to(device)
            span.mask = causal_mask(it.num_tokens, it.end, device)
        prefills.append(span)
        row += it.num_tokens
        row_of[id(it)] = row - 1
    meta = AttentionMetadata(
        torch.cat(slots).to(device), len(decodes), decode_tables, decode_mask, tuple(prefills)
    )
    if strided:
        meta.slot_blocks, meta.slot_offsets = meta.slot_mapping // bs, meta.slot_mapping % bs
    sample_rows = [row_of[id(it)] for it in items if it.samples]
    return (
        torch.tensor(ids, dtype=torch.long, device=device),
        torch.tensor(positions, dtype=torch.long, device=device),
        meta,
        sample_rows,
    )


def _padded_table(table: list[int], used: int, width: int) -> list[int]:
    """The first ``used`` block ids of ``table``, then block 0 up to ``width`` (padding the mask hides)."""
    return table[:used] + [0] * (width - used)
