"""``chain``: server chain composition (Sun, He et al., 2026): GBP-CR placement, GCA cache allocation,
JFFC dispatch.

- **GBP-CR** (greedy block placement with cache reservation). Every server reserves cache for ``c``
  concurrent jobs in each block it holds, so it holds m_j(c) = memory / (block bytes + c x cache per
  job per block) blocks. Servers are taken in order of amortised time per block (compute per block plus
  a job's communication with the server over m_j(c)) and laid end to end: each takes
  the next m_j(c) blocks of the chain being built; the one that reaches the last block is shifted back
  to end there with all its m_j(c) blocks, overlapping the server before it. A complete chain starts the
  next one. Servers stop being added once the complete chains can carry the load (their job slots over
  their service times exceed the arrival rate at 70% utilisation); the servers of an unfinished chain
  stay placed. A chain's service time for its ``c`` jobs comes from the cost model
  with the jobs batched together (their prompts, then their tokens in steps of ``c``), so concurrent
  jobs slow each other down as they do on a real server.
- **GCA** (greedy cache allocation). Over all chains the placed servers compose (any server ending at
  block e may hand to any server holding block e, which runs the rest of its range: partial inference,
  the plan's ``spans``), repeatedly take the fastest chain (Dijkstra on
  per-token service time plus link latencies) whose servers all have cache left, give it as many job
  slots as its scarcest server has left, and subtract them
  from every server on it. A job slot is the cache of a request of the workload's mean length; a chain
  needs enough slots for its 99th-percentile request. A chain with k slots takes, on each of its
  servers, the share k / (that server's slots): the plan's per-server ``kv_share``.
- **JFFC**: requests go to the fastest chain with a free slot, otherwise wait in a central queue
  (routing policy ``jffc``); a chain's slots are its ``max_batch_size``.

A chain's jobs are independent sessions, so they pipeline: a chain with k slots runs min(its servers,
k / the slots of a long request) micro-batch lanes, and a job's service time is the lanes' cycle (one
lane's trip through the chain, or the busiest server's work for all lanes if longer).

``c`` is chosen by trying 1..16 (and GBP-CR's stopping rule: servers for the load at 70% utilisation, or
every server), estimating each placement's mean response time (the service time of the fastest slots
that carry the load, plus an Erlang-C queueing delay over all slots) and simulating the candidates in
order of that estimate on the workload while the time limit lasts (at most 48; mean response time
decides), for each one-precision width the quality budget allows at which the servers hold the model
(the paper's setting uses 4-bit NF4 blocks). One server per node.
"""

from __future__ import annotations

import math

from ...errors import HetserveError
from ...plan import PlanFile, RoutingPlan
from ..pools import SETTINGS
from ..strategy import PlanWriter, Strategy, StrategyContext, memory_of, spot, trial
from .blocks import (
    BlockServer,
    block_servers,
    blocks_that_fit,
    chain_parts,
    chain_spots,
    fastest_chain,
    uniform_bits_for,
)

MAX_RESERVATION = 16
#: Reservations (best estimates first) checked by a short simulation of mean response time.
SIMULATED = 48
#: Utilisation GBP-CR plans its chains for: it stops adding servers once the chains carry the load with
#: 30% to spare (and JFFC's estimate fills the fastest slots up to it).
TARGET_UTILISATION = 0.7
#: GBP-CR's stopping rules tried: that target, or 0 (place every server: less queueing, a lower mean
#: response time).
UTILISATION_TARGETS = (TARGET_UTILISATION, 0.0)
#: Where the server that completes a chain sits: shifted back to end at the last block with every block
#: it holds (GBP-CR in the paper), or trimmed to the blocks left (more cache for its job slots, fewer
#: chains for GCA to compose); both are tried.
SHIFT_BACK = (True, False)


def erlang_c_wait(lam: float, mu: float, n: int) -> float:
    """Mean wait in an M/M/n queue with arrival rate lam and per-server rate mu (inf if unstable)."""
    if n <= 0 or mu <= 0:
        return math.inf
    a = lam / mu
    rho = a / n
    if rho >= 1:
        return math.inf
    term, total = 1.0, 1.0
    for k in range(1, n):
        term *= a / k
        total += term
    last = term * a / n / (1 - rho)
    p_wait = last / (total + last)
    return p_wait / (n * mu - lam)


class ChainComposition(Strategy):
    name = "chain"
    summary = "server chain composition: GBP-CR block placement, GCA cache allocation, JFFC dispatch"

    def plan(self, ctx: StrategyContext) -> PlanFile:
        m = ctx.model
        job_tokens = ctx.prompt + ctx.output
        widest = uniform_bits_for(ctx, job_tokens)
        if widest is None:
            raise HetserveError(
                f"chain: the servers of {ctx.cluster.name} do not hold {m.name} with one job's "
                "cache at any precision the quality budget allows; add GPUs or raise the "
                "quality budget"
            )
        found = []
        for bits in [b for b in ctx.uniform_bit_choices() if b <= widest]:
            servers = {s.node: s for s in block_servers(ctx, bits)}
            for c in range(1, MAX_RESERVATION + 1):
                seen: list[dict] = []  # the stopping and end rules may place the same servers
                for target, shift in ((t, b) for t in UTILISATION_TARGETS for b in SHIFT_BACK):
                    placed = self.gbp_cr(ctx, servers, bits, c, target, shift)
                    if not placed or placed in seen:
                        continue
                    seen.append(placed)
                    alloc = self.gca(ctx, servers, placed, bits, c)
                    if alloc:
                        found.append(
                            (self.response_time(ctx, servers, placed, alloc), bits, c, servers, placed, alloc)
                        )
        if not found:
            raise HetserveError(
                f"chain: no complete chain of {m.name}'s {m.num_layers} blocks with room for its "
                f"longer requests fits on {ctx.cluster.name}"
            )
        found.sort(key=lambda x: x[0])
        best = None
        for t, bits, c, servers, placed, alloc in found[:SIMULATED]:  # the best estimates, by simulation
            plan = self._plan(ctx, t, bits, c, servers, placed, alloc)
            run = trial(ctx, plan, ctx.rate)
            mean = run.e2e_mean_s if run is not None else math.inf
            if best is None or mean < best[0]:
                best = (mean, plan)
            if ctx.time_left() < 0:
                break
        return best[1]

    def _plan(self, ctx, t, bits, c, servers, placed, alloc) -> PlanFile:
        writer = PlanWriter(ctx, f"chain-{ctx.model.name}")
        _, max_tokens, chunk = SETTINGS["mixed"]
        for i, (ch, slots, share) in enumerate(alloc):
            writer.instance(
                f"chain-{i}",
                "mixed",
                chain_spots(placed, servers, ch, bits),
                parts=chain_parts(placed, ch),
                settings=(slots, max_tokens, chunk),
                micro_batches=self._lanes(ctx, ch, slots),
                kv_share=share,
            )
        used = {n for ch, _, _ in alloc for n in ch}
        return writer.plan(
            RoutingPlan(policy="jffc"),
            notes=f"Chain-composition baseline: cache reservation c={c}, {len(used)} servers at "
            f"{bits}-bit, {len(alloc)} chains with {sum(s for _, s, _ in alloc)} job slots, "
            f"estimated mean response {t:.2f} s.",
        )

    # ---- GBP-CR ---------------------------------------------------------------------------------------
    @classmethod
    def _lanes(cls, ctx, ch, jobs: int) -> int:
        """Jobs are independent sessions: as many move through the chain at once as it has servers, each
        lane with room for a long request."""
        return max(1, min(len(ch), jobs // cls._long_job_slots(ctx)))

    @classmethod
    def _service(cls, ctx, servers, placed, ch, jobs: int = 1) -> float:
        """Seconds a job takes on a chain that serves ``jobs`` jobs at once: they run in lanes that
        pipeline through the servers; a lane's jobs run together (their prompts, then their output tokens
        in steps, at the cost model's batch times). The time is the lanes' cycle: one lane's trip through
        every server and hop, or the busiest server's work for all lanes if that is longer."""
        lanes = cls._lanes(ctx, ch, jobs)
        per_lane = jobs / lanes
        context = ctx.prompt + ctx.output / 2
        stages, trip = [], 0.0
        for a, (n, (lo, hi)) in enumerate(zip(ch, chain_parts(placed, ch))):
            span = hi - lo
            srv = servers[n]
            stages.append(
                span
                * (per_lane * srv.prefill_block_time + ctx.output * srv.decode_block_time(per_lane, context))
            )
            if a:
                trip += (ctx.output + 1) * ctx.cluster.link(ch[a - 1], n).latency
        return max(trip + sum(stages), lanes * max(stages))

    @staticmethod
    def _amortised(ctx, servers, srv: BlockServer, bits: int, tokens: float) -> float:
        """GBP-CR's ranking of a server: its time per block for a job amortised over the blocks it holds,
        compute per block plus the job's communication with it (its tokens crossing the mean link to the
        other servers: latency and activation bytes) over its block count."""
        k = blocks_that_fit(ctx, srv, bits, tokens)
        if k < 1:
            return math.inf
        others = [n for n in servers if n != srv.node]
        if not others:
            return srv.block_time
        act = ctx.model.hidden_size * 2.0
        hop = sum(
            ctx.cluster.link(srv.node, n).latency + act / ctx.cluster.link(srv.node, n).bandwidth
            for n in others
        ) / len(others)
        return srv.block_time + (ctx.output + 1) * hop / k

    def gbp_cr(
        self, ctx, servers: dict[str, BlockServer], bits: int, c: int, target: float, shift: bool = True
    ) -> dict[str, tuple[int, int]]:
        L = ctx.model.num_layers
        tokens = c * (ctx.prompt + ctx.output)
        order = sorted(
            servers.values(), key=lambda s: (self._amortised(ctx, servers, s, bits, tokens), s.node)
        )
        placed: dict[str, tuple[int, int]] = {}
        chain: list[str] = []
        complete: list[list[str]] = []
        pos = 0
        for srv in order:
            ctx.check_time()
            k = blocks_that_fit(ctx, srv, bits, tokens, first=pos == 0, last=True)
            k_mid = blocks_that_fit(ctx, srv, bits, tokens, first=pos == 0)
            k = k if pos + k_mid >= L else k_mid  # the last server of a chain also holds the head
            if k < 1:
                continue
            end = min(pos + k, L)
            # the server that ends a chain is shifted back to end at the last block with all k blocks,
            # overlapping the server before it (chains then run part of it), or trimmed to the rest
            placed[srv.node] = (max(0, L - k), L) if end == L and shift else (pos, end)
            chain.append(srv.node)
            pos = end
            if pos == L:
                complete.append(chain)
                chain, pos = [], 0
                if (
                    target > 0
                    and target * sum(c / self._service(ctx, servers, placed, ch, c) for ch in complete)
                    >= ctx.rate
                ):
                    break
        # the servers of an unfinished chain stay placed: GCA may compose them with the others' blocks
        return placed

    # ---- GCA ----------------------------------------------------------------------------------------
    @staticmethod
    def _slots(ctx, servers, placed, bits) -> dict[str, int]:
        """Jobs (of the workload's mean length) each placed server's KV room holds, by the cost model's
        memory accounting (what the plan loader will check)."""
        job = ctx.prompt + ctx.output
        out = {}
        for n, span in placed.items():
            mem = memory_of(ctx, spot(n, servers[n].gpus, *span, bits))
            out[n] = int(mem.kv_capacity_tokens // job) if mem.fits else 0
        return out

    @staticmethod
    def _long_job_slots(ctx) -> int:
        """Job slots (of the mean request) a long (99th-percentile) request needs."""
        return math.ceil(ctx.long_request / (ctx.prompt + ctx.output))

    def gca(self, ctx, servers, placed, bits, c: int) -> list[tuple[list[str], int, list[float]]]:
        """(chain, job slots, KV share of each of its servers) in allocation order. A chain gets as many
        job slots as its scarcest server has left (GCA; ``c`` sized the servers' spans, it does not cap a
        chain); each server gives it the cache of those slots and keeps the rest for other chains."""
        slots_of = self._slots(ctx, servers, placed, bits)
        left = dict(slots_of)
        least = self._long_job_slots(ctx)
        out = []
        banned: set[str] = set()
        while True:
            ctx.check_time()
            usable = {n for n in placed if n not in banned and left[n] >= least}
            ch = fastest_chain(ctx, placed, servers, usable=usable, partial=True)
            if ch is None:
                return out
            if any(ch == other for other, _, _ in out):  # a chain is allocated once
                banned.add(min(ch, key=lambda n: left[n]))
                continue
            slots = min(left[n] for n in ch)
            if slots < least:  # the reservation holds no long request: this c cannot serve
                return out
            for n in ch:
                left[n] -= slots
            out.append((ch, slots, [slots / slots_of[n] for n in ch]))

    # ---- choosing c -----------------------------------------------------------------------------------
    def response_time(self, ctx, servers, placed, alloc) -> float:
        lam = ctx.rate
        chains = sorted((self._service(ctx, servers, placed, ch, slots), slots) for ch, slots, _ in alloc)
        used, cap = [], 0.0
        for t, slots in chains:  # JFFC fills the fastest slots first
            used.append((t, slots))
            cap += slots / t
            if cap * TARGET_UTILISATION >= lam:
                break
        n = sum(s for _, s in used)
        mean_service = sum(s for _, s in used) / cap if cap > 0 else math.inf
        total_n = sum(s for _, s in chains)
        total_rate = sum(s / t for t, s in chains)
        wait = erlang_c_wait(lam, total_rate / max(total_n, 1), total_n)
        return mean_service + wait if n else math.inf
