"""Paged KV cache storage in two layouts, and the canonical format KV crosses between processes in.

A layer's cache is a (K, V) pair of ``[num_blocks, ...]`` tensors; a block holds ``block_size`` tokens:

* ``token-major``: a block is ``[block_size, kv_heads, head_dim]`` (one token's heads side by side);
* ``head-major``: a block is ``[kv_heads, block_size, head_dim]`` (one head's tokens side by side).

Attention reads either through ``token_major_view`` (a permute for head-major, never a copy).

Prefill and decode instances may differ in dtype, layout, block size and tensor-parallel degree, so
KV is handed over in one canonical form: per layer, head-major contiguous ``[heads, tokens, head_dim]``
for K and for V, in the sender's dtype. The sender converts its layout to it (``extract_kv``), the
receiver converts it to its own dtype, layout, block size and heads (``install_kv``).
``plan_kv_transfer`` decides which rank sends which layers and heads to which; ``send_kv_layer`` and
``recv_kv_layer`` move one layer per point-to-point message. For each of its ``(layer, route)`` in
``layer_messages(routes)`` a sender runs

    k_cache, v_cache = caches[layer - route.src.layers[0]]
    k, v = extract_kv(select_heads(k_cache, layout, route.src_heads), select_heads(v_cache, ...), ...)
    works += send_kv_layer(k, v, route.dst.rank)

and the receiver, in the same order, ``recv_kv_layer(route.num_heads, ...)`` then ``install_kv`` into
``select_heads(cache, layout, route.dst_heads)`` of its layer's caches.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal, get_args

import torch
import torch.distributed as dist
from torch import Tensor

KVLayout = Literal["token-major", "head-major"]
KV_LAYOUTS: tuple[str, ...] = get_args(KVLayout)


def _check_layout(layout: str) -> None:
    if layout not in KV_LAYOUTS:
        raise ValueError(f"unknown KV cache layout {layout!r} (known: {', '.join(KV_LAYOUTS)})")


# ---- storage ------------------------------------------------------------------------------------


def allocate_kv_caches(
    num_layers: int,
    num_blocks: int,
    block_size: int,
    num_kv_heads: int,
    head_dim: int,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    layout: KVLayout = "token-major",
) -> list[tuple[Tensor, Tensor]]:
    """Zeroed (K, V) caches, one pair per layer, each ``[num_blocks, *block shape of layout]``."""
    _check_layout(layout)
    block = (
        (block_size, num_kv_heads, head_dim)
        if layout == "token-major"
        else (num_kv_heads, block_size, head_dim)
    )
    shape = (num_blocks, *block)
    return [
        (torch.zeros(shape, dtype=dtype, device=device), torch.zeros(shape, dtype=dtype, device=device))
        for _ in range(num_layers)
    ]


def kv_bytes_per_block(
    num_layers: int, block_size: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype
) -> int:
    """Bytes one block takes over all layers, K and V (the same in both layouts)."""
    return 2 * num_layers * block_size * num_kv_heads * head_dim * dtype.itemsize


def token_major_view(cache: Tensor, layout: KVLayout) -> Tensor:
    """The cache as ``[num_blocks, block_size, kv_heads, head_dim]``: itself, or a permuted view (no copy)."""
    _check_layout(layout)
    return cache if layout == "token-major" else cache.permute(0, 2, 1, 3)


def select_heads(cache: Tensor, layout: KVLayout, heads: slice) -> Tensor:
    """A view of some of the cache's KV heads (local indices), in the same layout: lets ``extract_kv``
    send, and ``install_kv`` fill, only those heads."""
    _check_layout(layout)
    return cache[:, :, heads] if layout == "token-major" else cache[:, heads]


def _blocks(block_table: Sequence[int], num_tokens: int, block_size: int, device: torch.device) -> Tensor:
    """The ids of the blocks holding a sequence's first ``num_tokens`` tokens."""
    needed = -(-num_tokens // block_size)
    if len(block_table) < needed:
        raise ValueError(
            f"{num_tokens} tokens need {needed} blocks of {block_size}; the block table has "
            f"{len(block_table)}"
        )
    return torch.tensor(list(block_table[:needed]), dtype=torch.long, device=device)


def _to_canonical(cache: Tensor, layout: KVLayout, blocks: Tensor, num_tokens: int) -> Tensor:
    """Gather whole blocks (a fast row copy), then lay their tokens out head-major in one more copy."""
    gathered = token_major_view(cache.index_select(0, blocks), layout)  # [n, block_size, heads, head_dim]
    _, block_size, heads, head_dim = gathered.shape
    out = torch.empty((heads, num_tokens, head_dim), dtype=cache.dtype, device=cache.device)
    full, rest = divmod(num_tokens, block_size)
    out[:, : full * block_size].view(heads, full, block_size, head_dim).copy_(
        gathered[:full].permute(2, 0, 1, 3)
    )
    if rest:
        out[:, full * block_size :].copy_(gathered[full, :rest].transpose(0, 1))
    return out


def _from_canonical(cache: Tensor, layout: KVLayout, blocks: Tensor, src: Tensor) -> None:
    """Full blocks: one contiguous tensor in the cache's layout and dtype, copied in by block id; the
    last, partial block slot by slot, leaving its later slots alone."""
    heads, num_tokens, head_dim = src.shape
    block_size = cache.shape[1] if layout == "token-major" else cache.shape[2]
    full, rest = divmod(num_tokens, block_size)
    if full:
        split = src[:, : full * block_size].reshape(heads, full, block_size, head_dim)
        split = split.permute(1, 2, 0, 3) if layout == "token-major" else split.transpose(0, 1)
        cache.index_copy_(0, blocks[:full], split.to(cache.dtype, memory_format=torch.contiguous_format))
    if rest:
        last = token_major_view(cache, layout)[int(blocks[full])]  # [block_size, heads, head_dim]
        last[:rest].copy_(src[:, full * block_size :].transpose(0, 1))


def extract_kv(
    k_cache: Tensor, v_cache: Tensor, layout: KVLayout, block_table: Sequence[int], num_tokens: int
) -> tuple[Tensor, Tensor]:
    """A sequence's first ``num_tokens`` tokens as canonical contiguous ``[kv_heads, num_tokens, head_dim]``
    K and V, in the cache's dtype. The caches may be head slices (``select_heads``) to extract only those heads."""
    if k_cache.shape != v_cache.shape:
        raise ValueError(f"K cache {tuple(k_cache.shape)} and V cache {tuple(v_cache.shape)} differ")
    block_size = token_major_view(k_cache, layout).shape[1]
    blocks = _blocks(block_table, num_tokens, block_size, k_cache.device)
    return _to_canonical(k_cache, layout, blocks, num_tokens), _to_canonical(
        v_cache, layout, blocks, num_tokens
    )


def install_kv(
    k_cache: Tensor,
    v_cache: Tensor,
    layout: KVLayout,
    block_table: Sequence[int],
    k: Tensor,
    v: Tensor,
    head_start: int = 0,
) -> None:
    """Write canonical ``[heads, T, head_dim]`` K and V (any dtype: converted to the cache's) as tokens
    ``[0, T)`` of the sequence whose blocks are ``block_table``.

    The cache's head 0 is the canonical tensors' head ``head_start``: a receiver holding a subset of the
    heads sent takes heads ``[head_start, head_start + cache heads)``. To fill only some of the cache's
    heads, pass a head slice of the caches (``select_heads``).
    """
    if k.shape != v.shape or k.dim() != 3:
        raise ValueError(f"K {tuple(k.shape)} and V {tuple(v.shape)} must both be [heads, tokens, head_dim]")
    if k_cache.shape != v_cache.shape:
        raise ValueError(f"K cache {tuple(k_cache.shape)} and V cache {tuple(v_cache.shape)} differ")
    _, block_size, heads, head_dim = token_major_view(k_cache, layout).shape
    if k.shape[2] != head_dim:
        raise ValueError(f"head_dim {k.shape[2]} does not match the cache's {head_dim}")
    if not 0 <= head_start <= k.shape[0] - heads:
        raise ValueError(f"heads [{head_start}, {head_start + heads}) are not within the {k.shape[0]} sent")
    blocks = _blocks(block_table, k.shape[1], block_size, k_cache.device)
    for src, cache in ((k, k_cache), (v, v_cache)):
        _from_canonical(cache, layout, blocks, src[head_start : head_start + heads].to(cache.device))


# ---- planning ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class KVShard:
    """The KV one rank holds: layers and KV heads, half-open ``(start, end)`` in global indices."""

    rank: int
    layers: tuple[int, int]
    kv_heads: tuple[int, int]

    def __post_init__(self) -> None:
        for name, (lo, hi) in (("layers", self.layers), ("kv_heads", self.kv_heads)):
            if not 0 <= lo < hi:
                raise ValueError(f"rank {self.rank}: {name} range [{lo}, {hi}) is empty or negative")


@dataclass(frozen=True)
class KVRoute:
    """Layers and heads (global, half-open) that ``src`` sends to ``dst``: one message per layer of
    ``[2, heads, tokens, head_dim]``."""

    src: KVShard
    dst: KVShard
    layers: tuple[int, int]
    kv_heads: tuple[int, int]

    @property
    def num_heads(self) -> int:
        return self.kv_heads[1] - self.kv_heads[0]

    @property
    def src_heads(self) -> slice:
        """The route's heads among the sender's local heads."""
        return slice(self.kv_heads[0] - self.src.kv_heads[0], self.kv_heads[1] - self.src.kv_heads[0])

    @property
    def dst_heads(self) -> slice:
        """The route's heads among the receiver's local heads."""
        return slice(self.kv_heads[0] - self.dst.kv_heads[0], self.kv_heads[1] - self.dst.kv_heads[0])


def _runs(values: list[int]) -> list[tuple[int, int]]:
    """Sorted distinct ints as maximal half-open runs of consecutive values."""
    runs: list[tuple[int, int]] = []
    for x in values:
        if runs and runs[-1][1] == x:
            runs[-1] = (runs[-1][0], x + 1)
        else:
            runs.append((x, x + 1))
    return runs


def plan_kv_transfer(sources: Sequence[KVShard], destinations: Sequence[KVShard]) -> list[KVRoute]:
    """Routes that give every destination each (layer, head) it holds from exactly one source.

    A (layer, head) several sources hold (KV heads replicated over tensor-parallel ranks) comes from the
    lowest-ranked of them. Routes are ordered by first layer, then destination, then source rank, so
    both ends can walk the same list. Raises ValueError when a destination's KV is not covered.
    """
    routes: list[KVRoute] = []
    for dst in destinations:
        # owner of each (layer, head) of dst, then each source's cells as rectangles
        cells: dict[int, dict[int, list[int]]] = {}  # src index -> layer -> heads
        for layer in range(*dst.layers):
            for head in range(*dst.kv_heads):
                holders = [
                    i
                    for i, s in enumerate(sources)
                    if s.layers[0] <= layer < s.layers[1] and s.kv_heads[0] <= head < s.kv_heads[1]
                ]
                if not holders:
                    raise ValueError(f"rank {dst.rank} needs layer {layer} head {head}; no source holds it")
                owner = min(holders, key=lambda i: (sources[i].rank, i))
                cells.setdefault(owner, {}).setdefault(layer, []).append(head)
        for i, by_layer in cells.items():
            # consecutive layers with the same head runs merge into one route
            spans: list[tuple[tuple[int, int], tuple[tuple[int, int], ...]]] = []
            for layer in sorted(by_layer):
                runs = tuple(_runs(by_layer[layer]))
                if spans and spans[-1][0][1] == layer and spans[-1][1] == runs:
                    spans[-1] = ((spans[-1][0][0], layer + 1), runs)
                else:
                    spans.append(((layer, layer + 1), runs))
            routes += [KVRoute(sources[i], dst, layers, heads) for layers, runs in spans for heads in runs]
    routes.sort(key=lambda r: (r.layers[0], r.dst.rank, r.src.rank, r.kv_heads[0]))
    return routes


def layer_messages(routes: Sequence[KVRoute]) -> list[tuple[int, KVRoute]]:
    """Every (layer, route) message in the order both ends must post them: by layer, then route order.
    Each rank walks the entries it sends (``route.src.rank``) or receives (``route.dst.rank``)."""
    return sorted(((layer, r) for r in routes for layer in range(*r.layers)), key=lambda m: m[0])


# ---- point-to-point --------------------------------------------------------------------------------


def send_kv_layer(
    k: Tensor, v: Tensor, dst: int, group: dist.ProcessGroup | None = None, tag: int = 0
) -> list[dist.Work]:
    """Start sending one layer's canonical K and V to global rank ``dst`` as one ``[2, heads, tokens,
    head_dim]`` message. Keep the returned handles (they hold the tensor) until waited."""
    if k.shape != v.shape or k.dtype != v.dtype:
        raise ValueError(f"K {tuple(k.shape)} {k.dtype} and V {tuple(v.shape)} {v.dtype} must match")
    work = dist.isend(torch.stack((k, v)), dst, group=group, tag=tag)
    return [work] if work is not None else []


def recv_kv_layer(
    num_heads: int,
    num_tokens: int,
    head_dim: int,
    dtype: torch.dtype,
    src: int,
    group: dist.ProcessGroup | None = None,
    tag: int = 0,
) -> tuple[Tensor, Tensor]:
    """Receive one layer's canonical K and V (``dtype`` = the sender's) from global rank ``src``; both
    ends know the shape from the route, so nothing but the data is sent."""
    buf = torch.empty((2, num_heads, num_tokens, head_dim), dtype=dtype)
    dist.recv(buf, src, group=group, tag=tag)
    return buf[0], buf[1]
