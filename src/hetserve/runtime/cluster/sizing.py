"""KV-cache blocks per instance, computed the same way by the driver and by every worker."""

from __future__ import annotations

from ...vocabulary import TORCH_DTYPE_BYTES
from .topology import Topology


def local_kv_head_range(num_heads: int, num_kv_heads: int, tp_size: int, tp_rank: int) -> tuple[int, int]:
    """The KV heads ``[start, end)`` TP rank ``tp_rank`` of ``tp_size`` holds."""
    from ..model.tp import tp_shards

    if tp_size == 1:
        return 0, num_kv_heads
    s = tp_shards(num_heads, num_kv_heads, tp_size, tp_size)[tp_rank]
    return s.kv_start, s.kv_end


def instance_blocks(topo: Topology, config, kv_cache_gb: float) -> dict[str, int]:
    """Blocks each instance's lanes share: every worker gives ``kv_cache_gb`` x the instance's share of
    the worker's server to it; the instance has what its tightest worker holds."""
    out = {}
    for inst in topo.instances.values():
        counts = []
        share = dict(zip(inst.servers, inst.kv_shares))
        for rank in inst.ranks:
            w = topo.workers[rank]
            start, end = local_kv_head_range(config.num_heads, config.num_kv_heads, w.tp_size, w.tp_rank)
            heads = end - start
            per_block = (
                2
                * (w.layers[1] - w.layers[0])
                * inst.block_size
                * heads
                * config.head_dim
                * TORCH_DTYPE_BYTES[w.dtype]
            )
            counts.append(int(kv_cache_gb * share[w.server] * 2**30) // per_block)
        out[inst.name] = min(counts)
        if out[inst.name] < inst.lanes:
            raise ValueError(
                f"instance '{inst.name}': {kv_cache_gb} GB of KV cache per worker holds "
                f"{out[inst.name]} blocks, fewer than its {inst.lanes} micro-batch lanes; "
                "raise --kv-cache-gb"
            )
    return out
