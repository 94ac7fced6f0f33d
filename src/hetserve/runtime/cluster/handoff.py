"""Prefill -> decode hand-offs in the driver: which decode instance takes a prefilled request, the routes
its KV takes between the two chains' workers, and the commands that move it.

A route (``kvcache.KVRoute``) names a source rank, a destination rank and the layers and KV heads the
one sends the other; a prefill worker streams each of its layers to the decode workers holding it as
soon as the layer ran, and every decode worker posts a receive per route before the KV arrives.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

from ...scheduling.routing import make_policy
from ...vocabulary import TORCH_DTYPE_BYTES
from ..kvcache import KVRoute, KVShard, plan_kv_transfer
from .channel import KVOut, KVRecv
from .instance import InstanceRunner
from .sizing import local_kv_head_range
from .topology import InstanceSpec, Topology


@dataclass(frozen=True)
class Handoff:
    """One request's KV on its way to ``decoder``: what the prefill step sends and the decoder receives."""

    decoder: InstanceSpec
    key: int
    out: KVOut  # rides on the prefill step
    recv: KVRecv  # posted on the decode instance's workers
    nbytes: int


class KVHandoffs:
    def __init__(self, topo: Topology, config, seed: int = 0):
        self.topo, self.config = topo, config
        self.policies = {
            name: make_policy(topo.handoff_policy, topo.handoff_weights.get(name), seed)
            for name, spec in topo.instances.items()
            if spec.role == "prefill"
        }
        self._routes: dict[tuple[str, str], list[KVRoute]] = {}
        self._keys = itertools.count()
        self.bytes_moved = 0  # KV bytes handed from prefill to decode workers
        self.count = 0

    def choose(self, prefill: InstanceRunner, decoders: list[InstanceRunner]) -> InstanceRunner | None:
        """The live decode instance the plan's hand-off policy sends ``prefill``'s next request to."""
        live = [d for d in decoders if d.up]
        return self.policies[prefill.name].choose(live) if live else None

    def start(
        self, prefill: InstanceSpec, decoder: InstanceSpec, block_table: list[int], num_tokens: int
    ) -> Handoff:
        """Send the KV of ``num_tokens`` tokens held in ``block_table`` on ``prefill`` to ``decoder``."""
        key = next(self._keys)
        routes = self.routes(prefill, decoder)
        nbytes = self._bytes(routes, num_tokens)
        self.bytes_moved += nbytes
        self.count += 1
        src_dtype = self.topo.workers[prefill.last].dtype
        return Handoff(
            decoder,
            key,
            KVOut(key, block_table, num_tokens, routes),
            KVRecv(decoder.name, key, num_tokens, routes, src_dtype),
            nbytes,
        )

    def routes(self, src: InstanceSpec, dst: InstanceSpec) -> list[KVRoute]:
        """Which worker of ``src`` sends which layers and heads to which worker of ``dst`` (computed once
        per pair of instances)."""
        pair = (src.name, dst.name)
        if pair not in self._routes:
            self._routes[pair] = plan_kv_transfer(self._shards(src), self._shards(dst))
        return self._routes[pair]

    def _shards(self, inst: InstanceSpec) -> list[KVShard]:
        c = self.config
        out = []
        for r in inst.ranks:
            w = self.topo.workers[r]
            out.append(
                KVShard(r, w.layers, local_kv_head_range(c.num_heads, c.num_kv_heads, w.tp_size, w.tp_rank))
            )
        return out

    def _bytes(self, routes: list[KVRoute], num_tokens: int) -> int:
        """Bytes on the wire: K and V of every routed (layer, head) in the sender's dtype."""
        c = self.config
        return sum(
            2
            * (r.layers[1] - r.layers[0])
            * (r.kv_heads[1] - r.kv_heads[0])
            * num_tokens
            * c.head_dim
            * TORCH_DTYPE_BYTES[self.topo.workers[r.src.rank].dtype]
            for r in routes
        )
