"""How tensor parallelism splits a Llama layer's heads and MLP columns across ranks (no PyTorch needed).

Each rank holds whole attention heads and a contiguous block of MLP intermediate columns:

* ``tp <= num_kv_heads``: the KV heads are split into contiguous ranges as evenly as possible (earlier
  ranks take the extra head); a rank's query heads are those of its KV heads' GQA groups. Uneven splits
  are fine (SmolLM2's 3 KV heads at TP=2: 2 + 1).
* ``tp > num_kv_heads``: ``tp`` must be a multiple of ``num_kv_heads`` that divides ``num_heads``; each
  rank takes ``num_heads / tp`` consecutive query heads, all in one group, and that group's KV head
  (replicated on the ``tp / num_kv_heads`` ranks sharing it).

The attention output and MLP down projections then produce partial sums that one all-reduce per
projection completes; see ``LlamaModel``.
"""

from __future__ import annotations

from dataclasses import dataclass

from ...specs.models import tp_degrees, tp_supported

__all__ = ["TPShard", "tp_shards", "tp_supported"]


@dataclass(frozen=True)
class TPShard:
    """What rank ``rank`` of ``size`` holds: q heads [q_start, q_end), KV heads [kv_start, kv_end),
    MLP intermediate columns [mlp_start, mlp_end)."""

    rank: int
    size: int
    q_start: int
    q_end: int
    kv_start: int
    kv_end: int
    mlp_start: int
    mlp_end: int

    @property
    def num_heads(self) -> int:
        return self.q_end - self.q_start

    @property
    def num_kv_heads(self) -> int:
        return self.kv_end - self.kv_start

    @property
    def intermediate_size(self) -> int:
        return self.mlp_end - self.mlp_start


def _even_ranges(n: int, parts: int) -> list[tuple[int, int]]:
    """[0, n) cut into ``parts`` contiguous ranges as even as possible (earlier ranges take the extra)."""
    base, extra = divmod(n, parts)
    bounds = [0]
    for i in range(parts):
        bounds.append(bounds[-1] + base + (1 if i < extra else 0))
    return list(zip(bounds[:-1], bounds[1:]))


def tp_shards(num_heads: int, num_kv_heads: int, intermediate_size: int, tp_size: int) -> list[TPShard]:
    """The shard of every rank for tensor parallelism of degree ``tp_size``; ValueError if impossible."""
    if num_kv_heads < 1 or num_heads % num_kv_heads:
        raise ValueError(f"num_kv_heads ({num_kv_heads}) must divide num_heads ({num_heads})")
    if not tp_supported(num_heads, num_kv_heads, tp_size):
        raise ValueError(
            f"tensor parallelism of degree {tp_size} cannot split {num_heads} attention heads "
            f"with {num_kv_heads} KV heads: it must be at most the KV heads, or a multiple of "
            f"them that divides the attention heads; supported degrees: "
            f"{tp_degrees(num_heads, num_kv_heads)}"
        )
    if intermediate_size < tp_size:
        raise ValueError(
            f"tensor parallelism of degree {tp_size} cannot split {intermediate_size} MLP "
            f"intermediate columns"
        )
    group = num_heads // num_kv_heads
    mlp = _even_ranges(intermediate_size, tp_size)
    shards = []
    if tp_size <= num_kv_heads:
        for rank, (kv_start, kv_end) in enumerate(_even_ranges(num_kv_heads, tp_size)):
            shards.append(
                TPShard(rank, tp_size, kv_start * group, kv_end * group, kv_start, kv_end, *mlp[rank])
            )
    else:
        per_rank, ranks_per_kv = num_heads // tp_size, tp_size // num_kv_heads
        for rank in range(tp_size):
            kv = rank // ranks_per_kv
            shards.append(
                TPShard(rank, tp_size, rank * per_rank, (rank + 1) * per_rank, kv, kv + 1, *mlp[rank])
            )
    return shards
