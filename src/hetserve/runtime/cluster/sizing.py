"""KV-cache blocks per instance, computed the same way by the driver and by every worker."""

from __future__ import annotations

from typing import NamedTuple

from ...vocabulary import TORCH_DTYPE_BYTES
from .topology import Topology


def local_kv_head_range(num_heads: int, num_kv_heads: int, tp_size: int, tp_rank: int) -> tuple[int, int]:
    """The KV heads ``[start, end)`` TP rank ``tp_rank`` of ``tp_size`` holds."""
    from ..model.tp import tp_shards

    if tp_size == 1:
        return 0, num_kv_heads
    s = tp_shards(num_heads, num_kv_heads, tp_size, tp_size)[tp_rank]
    return s.kv_start, s.kv_end


def _block_bytes(w, config, block_size: int) -> int:
    """Bytes of one KV block of ``block_size`` tokens on worker ``w`` (its layers and KV heads)."""
    start, end = local_kv_head_range(config.num_heads, config.num_kv_heads, w.tp_size, w.tp_rank)
    return (
        2
        * (w.layers[1] - w.layers[0])
        * block_size
        * (end - start)
        * config.head_dim
        * TORCH_DTYPE_BYTES[w.dtype]
    )


class PoolSize(NamedTuple):
    """A server's shared KV pool: its blocks and their size in tokens."""

    blocks: int
    block_size: int


def pool_blocks(topo: Topology, config, kv_cache_gb: float) -> dict[str, PoolSize]:
    """Each server's shared KV pool (``kv_pool: server``): ``kv_cache_gb`` x the shares of the instances
    pooling it, as its tightest worker holds them. Servers nobody pools are left out."""
    shares: dict[str, float] = {}
    block: dict[str, int] = {}
    for inst in topo.instances.values():
        if inst.scheduling.kv_pool:
            for server, share in zip(inst.servers, inst.kv_shares):
                shares[server] = shares.get(server, 0.0) + share
                block[server] = inst.block_size  # one block size per pool (the plan checks it)
    return {
        server: PoolSize(
            min(
                int(kv_cache_gb * share * 2**30) // _block_bytes(topo.workers[r], config, block[server])
                for r in topo.servers[server]
            ),
            block[server],
        )
        for server, share in shares.items()
    }


def instance_blocks(topo: Topology, config, kv_cache_gb: float) -> dict[str, int]:
    """Blocks each instance's lanes share: every worker gives ``kv_cache_gb`` x the instance's share of
    the worker's server to it, or, pooling its servers' KV, the whole pool may be its; the instance has
    what its tightest worker holds."""
    pools = pool_blocks(topo, config, kv_cache_gb)
    out = {}
    for inst in topo.instances.values():
        if inst.scheduling.kv_pool:
            out[inst.name] = min(pools[s].blocks for s in inst.servers)
        else:
            share = dict(zip(inst.servers, inst.kv_shares))
            out[inst.name] = min(
                int(kv_cache_gb * share[w.server] * 2**30) // _block_bytes(w, config, inst.block_size)
                for w in (topo.workers[r] for r in inst.ranks)
            )
        if out[inst.name] < inst.lanes:
            raise ValueError(
                f"instance '{inst.name}': {kv_cache_gb} GB of KV cache per worker holds "
                f"{out[inst.name]} blocks, fewer than its {inst.lanes} micro-batch lanes; "
                "raise --kv-cache-gb"
            )
    return out
