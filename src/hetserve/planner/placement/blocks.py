"""Block servers: what Petals and server chain composition place blocks (layers) on.

Each node runs one *block server*: its GPUs as one tensor-parallel group holding a contiguous range of
blocks at one bit-width, beside a KV-cache reservation. Placed servers form an interval graph: a server
ending at block e may hand a request to any server starting at e (or, with partial inference, to any
server holding block e, which runs the rest of its range); a *chain* is a path from block 0 to the last
block. This module sizes servers (blocks that fit beside a cache reservation, time per block)
and finds chains (the fastest path by Dijkstra, optionally with per-server extra costs).
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass

from ...costmodel.roofline import ServerShape, ServerTimer
from ..pools import SETTINGS, tp_choices
from ..strategy import Spot, StrategyContext, spot

#: Batch at which a server's per-block speed is measured (Petals measures single-sequence inference).
REF_BATCH = 1


@dataclass
class BlockServer:
    node: str
    gpus: tuple[int, ...]
    block_time: float  # seconds per decode token per block (batch REF_BATCH)
    prefill_block_time: float  # seconds per prompt per block
    usable: float  # bytes per GPU for weights + cache (after activations)
    timer: ServerTimer  # one block at the chosen bits

    @property
    def tp(self) -> int:
        return len(self.gpus)

    def decode_block_time(self, batch: float, context: float) -> float:
        """Seconds of one decode step of ``batch`` sequences through one block."""
        kv = batch * (context + 1)
        return self.timer.time(batch, batch, kv, kv)


def block_servers(ctx: StrategyContext, bits: int) -> list[BlockServer]:
    """One server per node (its GPUs as one TP group), in the cluster file's order."""
    m, cm = ctx.model, ctx.cost_model
    max_batch, max_tokens, _ = SETTINGS["mixed"]
    P, O = ctx.prompt, ctx.output
    out = []
    for node in ctx.cluster.nodes.values():
        tp = tp_choices(node.count, m)[-1]
        shape = ServerShape(node.gpu, tp, (bits,), first=False, last=False)
        timer = cm.timer(shape)
        kv = REF_BATCH * (P + O / 2 + 1)
        mem = cm.memory(ServerShape(node.gpu, tp, (), first=False, last=False), max_tokens, max_batch)
        out.append(
            BlockServer(
                node.name,
                tuple(range(tp)),
                timer.time(REF_BATCH, REF_BATCH, kv, kv) / REF_BATCH,
                timer.time(P, 1, P * (P + 1) / 2, P),
                mem.usable - mem.activations,
                timer,
            )
        )
    return out


def blocks_that_fit(
    ctx: StrategyContext,
    srv: BlockServer,
    bits: int,
    cache_tokens: float,
    first: bool = False,
    last: bool = False,
) -> int:
    """Blocks a server holds beside a cache reservation of ``cache_tokens`` tokens in every block."""
    m = ctx.model
    per_block = m.layer_weight_bytes(bits) / srv.tp + cache_tokens * m.kv_bytes_per_token_layer(
        2
    ) * m.kv_share_per_gpu(srv.tp)
    room = srv.usable
    emb = m.vocab_size * m.hidden_size * 2.0 / srv.tp
    room -= emb * (int(first) + int(last))
    return max(0, min(m.num_layers, int(room // per_block)))


def fastest_chain(
    ctx: StrategyContext,
    placed: dict[str, tuple[int, int]],
    servers: dict[str, BlockServer],
    extra: dict[str, float] | None = None,
    usable: set[str] | None = None,
    partial: bool = False,
) -> list[str] | None:
    """Dijkstra from block 0 to the last block over servers whose ranges meet end to start; a server
    costs the decode time per token of the blocks it runs plus ``extra``; a hop costs the link's latency.
    ``partial``: a server may also take over part-way through its range (partial inference), from the
    block where the server before it ends: it runs the rest of its range (``chain_parts``)."""
    L = ctx.model.num_layers
    extra = extra or {}
    live = {n: r for n, r in placed.items() if usable is None or n in usable}
    starts: dict[int, list[str]] = {}
    for n, (s, _end) in live.items():
        starts.setdefault(s, []).append(n)

    def entering(e: int) -> list[str]:
        """Servers that can take a request at block ``e``."""
        if not partial:
            return starts.get(e, [])
        return [n for n, (s, end) in live.items() if s <= e < end]

    def cost(n: str, e: int) -> float:
        return servers[n].block_time * (live[n][1] - e) + extra.get(n, 0.0)

    heap = [(cost(n, 0), n, None) for n in entering(0)]
    heapq.heapify(heap)
    dist: dict[str, float] = {}
    prev: dict[str, str | None] = {}
    while heap:
        ctx.check_time()
        d, n, p = heapq.heappop(heap)
        if n in dist:
            continue
        dist[n], prev[n] = d, p
        e = live[n][1]
        if e == L:
            chain = [n]
            while prev[chain[-1]] is not None:
                chain.append(prev[chain[-1]])
            return chain[::-1]
        for nxt in entering(e):
            if nxt not in dist:
                hop = ctx.cluster.link(n, nxt).latency
                heapq.heappush(heap, (d + hop + cost(nxt, e), nxt, n))
    return None


def chain_parts(placed: dict[str, tuple[int, int]], chain: list[str]) -> list[tuple[int, int]]:
    """The blocks each server of ``chain`` runs: from where the server before it ends (block 0 for the
    first) to the end of its own range."""
    out, pos = [], 0
    for n in chain:
        out.append((pos, placed[n][1]))
        pos = placed[n][1]
    return out


def chain_spots(
    placed: dict[str, tuple[int, int]], servers: dict[str, BlockServer], chain: list[str], bits: int
) -> list[Spot]:
    """The servers of ``chain`` as placed (the whole range each holds)."""
    return [spot(n, servers[n].gpus, *placed[n], bits) for n in chain]


def holds_model(ctx: StrategyContext, bits: int, cache_tokens: float) -> bool:
    """Whether the servers hold the model at least once at ``bits`` beside their cache reservation."""
    total = sum(blocks_that_fit(ctx, s, bits, cache_tokens) for s in block_servers(ctx, bits))
    return total >= ctx.model.num_layers


def uniform_bits_for(ctx: StrategyContext, cache_tokens: float) -> int | None:
    """The widest one-precision width (within the quality budget) at which the servers hold the model
    at least once beside their cache reservation."""
    for bits in ctx.uniform_bit_choices():
        if holds_model(ctx, bits, cache_tokens):
            return bits
    return None
