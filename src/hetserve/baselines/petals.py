"""``petals``: greedy block placement by throughput, shortest-path routing (Petals, ACL 2023 demo).

Petals is a swarm of block servers. A server that joins takes the contiguous span of blocks it can
hold (beside its attention-cache reservation) where the swarm is weakest: among its candidate spans it
picks the one whose blocks' current throughputs, sorted, are lexicographically smallest. A block's
throughput is the sum over the servers holding it of their tokens/s through it (a server's speed over
its span length). After everyone has joined, servers move when moving raises the swarm's bottleneck
throughput by more than 10%, in at most two passes (Petals' periodic rebalancing). Clients route each request along the
fastest chain by Dijkstra (compute per token plus link latency).

A server's span is every block it holds, at any start; spans overlap, and a chain runs the part of a
server from where the server before it ends (partial inference: the plan's ``spans``). Servers join
fastest first; NF4 (4-bit) blocks, Petals'
GPU default, where the quality budget allows 4 bits, else the widest width it allows at which the swarm
holds the model (16 bits in a lossless scenario); one server per node (its GPUs as a TP group). Chains:
repeated Dijkstra, each time adding the found chain's load to its servers' costs (a loaded server is
slower for the next client), until no new chain appears; a server on several chains keeps one
attention cache for all of them (``kv_pool: server``), as a Petals server keeps one for every session.
Requests go to the chain with the least outstanding work (a client picks the currently fastest route).
"""

from __future__ import annotations

from ..errors import HetserveError
from ..plan import PlanFile, RoutingPlan
from ..planner.placement.blocks import (
    BlockServer,
    block_servers,
    blocks_that_fit,
    chain_parts,
    chain_spots,
    fastest_chain,
    holds_model,
    uniform_bits_for,
)
from ..planner.strategy import (
    PlanWriter,
    Strategy,
    StrategyContext,
    lanes_holding_long_requests,
    per_request_engine,
)

#: Tokens of attention cache a Petals server reserves per block: its ``--attn_cache_tokens`` default,
#: 32,768 for models whose attention shares KV heads (GQA/MQA) and 8,192 for the others (Petals 2.x,
#: petals/server/server.py; 2,048 for the others before).
GQA_CACHE_TOKENS, MHA_CACHE_TOKENS = 32768, 8192


def attn_cache_tokens(model) -> int:
    """The attention cache tokens a Petals server reserves per block of ``model``."""
    return GQA_CACHE_TOKENS if model.num_kv_heads < model.num_heads else MHA_CACHE_TOKENS


REBALANCE_GAIN = 1.10
MAX_CHAINS = 16
#: Petals' weight format on GPUs when the server is not told one: NF4 (petals/server/server.py).
PETALS_BITS = 4


class Petals(Strategy):
    name = "petals"
    summary = "greedy block placement by throughput; Dijkstra routing over block servers"

    def plan(self, ctx: StrategyContext) -> PlanFile:
        L = ctx.model.num_layers
        cache = attn_cache_tokens(ctx.model)
        bits = PETALS_BITS if PETALS_BITS in ctx.uniform_bit_choices() else uniform_bits_for(ctx, cache)
        if bits is None or not holds_model(ctx, bits, cache):
            raise HetserveError(
                f"petals: the servers of {ctx.cluster.name} do not hold {ctx.model.name} beside "
                f"their {cache}-token cache at any precision the quality budget "
                "allows; add GPUs or raise the quality budget"
            )
        servers = {s.node: s for s in block_servers(ctx, bits)}
        order = sorted(servers.values(), key=lambda s: (s.block_time, s.node))
        placed: dict[str, tuple[int, int]] = {}
        for srv in order:
            span = self._choose(ctx, srv, bits, placed, servers)
            if span is not None:
                placed[srv.node] = span
        for _ in range(2):  # rebalancing
            moved = False
            for srv in order:
                if srv.node not in placed:
                    continue
                before = self._bottleneck(placed, servers, L)
                rest = {n: r for n, r in placed.items() if n != srv.node}
                span = self._choose(ctx, srv, bits, rest, servers)
                if span is None or span == placed[srv.node]:
                    continue
                trial = {**rest, srv.node: span}
                if self._bottleneck(trial, servers, L) > before * REBALANCE_GAIN:
                    placed, moved = trial, True
            if not moved:
                break
        chains = self._chains(ctx, placed, servers)
        if not chains:
            raise HetserveError(
                f"petals: the swarm's spans on {ctx.cluster.name} form no complete chain of "
                f"{ctx.model.name}'s {L} blocks"
            )
        users: dict[str, int] = {}
        for ch in chains:
            for n in ch:
                users[n] = users.get(n, 0) + 1
        writer = PlanWriter(ctx, f"petals-{ctx.model.name}")
        for i, ch in enumerate(chains):
            spots = chain_spots(placed, servers, ch, bits)
            shares = [1.0 / users[n] for n in ch]
            lanes = lanes_holding_long_requests(ctx, spots, shares)
            writer.instance(
                f"chain-{i}",
                "mixed",
                spots,
                micro_batches=lanes,
                kv_share=shares,
                parts=chain_parts(placed, ch),
                per_request=per_request_engine(ctx),
                pooled_kv=True,
            )
        return writer.plan(
            RoutingPlan(),
            notes=f"Petals baseline: {len(placed)} block servers at {bits}-bit, {len(chains)} chains.",
        )

    # ---- placement ------------------------------------------------------------------------------------
    @staticmethod
    def _speed(srv: BlockServer, span) -> float:
        """Tokens/s a server adds to each block of its span."""
        return 1.0 / (srv.block_time * (span[1] - span[0]))

    def _throughputs(self, placed, servers, L) -> list[float]:
        t = [0.0] * L
        for n, span in placed.items():
            v = self._speed(servers[n], span)
            for b in range(*span):
                t[b] += v
        return t

    def _bottleneck(self, placed, servers, L) -> float:
        return min(self._throughputs(placed, servers, L))

    def _choose(self, ctx, srv: BlockServer, bits: int, placed, servers):
        """The span covering the weakest blocks: every block the server holds beside its cache, at the
        start whose blocks' throughputs, sorted, are lexicographically smallest (Petals'
        ``_choose_best_start``; ties to the earliest start). Spans may overlap: a chain runs part of a
        server (partial inference)."""
        L = ctx.model.num_layers
        tput = self._throughputs(placed, servers, L)
        cache = attn_cache_tokens(ctx.model)
        fit = lambda first, last: blocks_that_fit(ctx, srv, bits, cache, first=first, last=last)
        candidates = []
        for start in range(L):
            k = fit(start == 0, False)
            if k < 1:
                continue
            if start + k < L:
                candidates.append((start, start + k))
            elif fit(start == 0, True) >= L - start:  # the span to the end holds the head too
                candidates.append((start, L))
                break  # later starts hold fewer blocks
        best = None
        for span in candidates:
            key = (sorted(tput[span[0] : span[1]]), span)
            if best is None or key < best[0]:
                best = (key, span)
        return best[1] if best else None

    # ---- routing --------------------------------------------------------------------------------------
    def _chains(self, ctx, placed, servers) -> list[list[str]]:
        load: dict[str, float] = {}
        chains: list[list[str]] = []
        seen = set()
        for _ in range(MAX_CHAINS):
            ch = fastest_chain(ctx, placed, servers, extra=load, partial=True)
            if ch is None or tuple(ch) in seen:
                break
            seen.add(tuple(ch))
            chains.append(ch)
            for n, (lo, hi) in zip(ch, chain_parts(placed, ch)):
                load[n] = load.get(n, 0.0) + servers[n].block_time * (hi - lo)
        return chains
