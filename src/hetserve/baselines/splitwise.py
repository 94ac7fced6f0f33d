"""``splitwise``: a prompt (prefill) pool and a token (decode) pool of whole machines (Splitwise, ISCA 2024).

Splitwise runs every instance on one whole machine (tensor parallel over its GPUs: TP 8 on a DGX) and
splits machines into a prompt pool and a token pool, each of one machine type: Splitwise-AA and -HH
(one type for both), -HA (H100 prompt, A100 token) and -HHcap (H100 prompt, power-capped H100 token)
are the designs; here every ordered pair of the cluster's machine types is one, so a cluster that
defines a power-capped GPU variant gets the HHcap design. For each design an exhaustive grid over
(prompt machines, token machines) is priced with the planner's capacity model: the prompt pool's
TTFT-bound rate and the token pool's TBT-bound rate, the smaller being what the design carries; cost
is the machines' $/hour and power their idle draw plus busy energy per request. The objective picks:
the highest rate within the budget (goodput, throughput), or the cheapest / lowest-power grid point that
carries the workload's rate (cost, power). The best grid point of each of the top designs is checked
by simulation (Splitwise sized its clusters with its simulator) and the best simulated one is kept.

The mixed pool. Splitwise's scheduler keeps a third pool of machines that run mixed batching (prompt and
token phases in one batch): when the least-loaded prompt machine's queue is long, a token machine joins
the mixed pool and takes the prompt; when no token machine has memory for the request, a prompt machine
joins it and takes the tokens; a mixed machine returns to its own pool once idle, and when no pool can
take a request it runs whole on the least-loaded machine. Plans here are static, so the mixed pool is a
*design option*: some machines of the prompt or the token machine type are ``mixed`` instances for the
whole run, serving whole requests beside the prompt and token pools (the router's least-work choice
sends a request to a mixed machine when that machine's work is below a prompt machine's plus the token
pool's). The grid also prices, for every (prompt, token) point, the mixed machines its budget and
inventory allow (the most, for goodput and throughput; the fewest that carry the workload's rate, for
cost and power), a mixed machine carrying the planner's mixed capacity on top of the pair's rate. The
best mixed-pool points are simulated after the prompt/token points, and one is kept only if it scores
higher than every prompt/token point.

Routing as in Splitwise: join the shortest queue for prompts and for the token machine a KV cache goes
to (``least-work`` for both), KV streamed layer by layer behind the prompt computation.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from ..errors import HetserveError
from ..plan import PlanFile
from ..planner.allocate import Allocation
from ..planner.build import PlacementError
from ..planner.evaluate import OBJECTIVES
from ..planner.pools import Pool, Stage, pools_of, tp_choices
from ..planner.strategy import Strategy, StrategyContext, best_by_trial
from ..planner.templates import Template

#: Designs whose best grid point is checked by simulation.
SIMULATED_DESIGNS = 3
#: Mixed-pool grid points (the best of as many designs) checked by simulation after them.
SIMULATED_MIXED = 3


@dataclass(frozen=True, eq=False)
class Machine:
    """A machine type as Splitwise uses it: one node of ``pool`` holding ``per_node`` instances of TP
    ``tp`` (one, on a DGX), as a prompt, a token or (``mixed`` None: never) a mixed-batching machine."""

    pool: Pool
    tp: int
    per_node: int
    prompt: Template
    token: Template
    mixed: Template | None

    @property
    def name(self) -> str:
        return self.pool.gpu.name


@dataclass(frozen=True)
class Point:
    """A grid point: ``n_prompt`` prompt and ``n_token`` token machines, and ``n_mixed`` machines of
    ``mixed``'s type running mixed batching (the mixed pool; 0 without one). ``rate`` is what the cost
    model says it carries (requests/s); ``score`` ranks points of every design, higher is better."""

    score: float
    prompt: Machine
    token: Machine
    n_prompt: int
    n_token: int
    pair_rate: float  # what the prompt and token pools carry
    mixed: Machine | None = None
    n_mixed: int = 0
    mixed_rate: float = 0.0  # what the mixed machines carry

    @property
    def rate(self) -> float:
        return self.pair_rate + self.mixed_rate

    @property
    def design(self) -> str:
        return f"{self.prompt.name}-prompt/{self.token.name}-token"


class Splitwise(Strategy):
    name = "splitwise"
    summary = (
        "prompt pool + token pool of whole machines by GPU type, optionally mixed machines; grid search; "
        "cost and power objectives"
    )

    def plan(self, ctx: StrategyContext) -> PlanFile:
        machines = self.machines(ctx)
        if not machines:
            raise HetserveError(
                f"splitwise: no machine type of {ctx.cluster.name} holds {ctx.model.name} at 16 bits "
                "on one machine (Splitwise runs one instance per machine, tensor parallel)"
            )
        split, mixed = [], []
        for P in machines:
            for D in machines:
                plain, pooled = self.grid(ctx, P, D)
                split += [plain] if plain is not None else []
                mixed += [pooled] if pooled is not None else []
        if not split and not mixed:
            within = f" within ${ctx.budget:.2f}/h" if ctx.budget else ""
            raise HetserveError(
                f"splitwise: no prompt/token machine split of {ctx.cluster.name} serves "
                f"{ctx.model.name}{within} at {ctx.rate:g} req/s within the SLOs"
            )
        split.sort(key=lambda p: -p.score)
        mixed.sort(key=lambda p: -p.score)
        # prompt/token points first: a mixed-pool point is kept only when it simulates strictly better
        tried = split[:SIMULATED_DESIGNS] + mixed[:SIMULATED_MIXED]
        best = best_by_trial(ctx, [(p, p.rate) for p in tried], lambda p: self.build(ctx, p))
        if best is None:
            raise HetserveError(f"splitwise: the chosen machines do not pack into {ctx.cluster.name}'s nodes")
        return best

    @staticmethod
    def machines(ctx: StrategyContext) -> list[Machine]:
        """Every machine type that holds the model as one tensor-parallel instance per machine."""
        factory = ctx.factory(0.0)
        L = ctx.model.num_layers
        out = []
        for pool in pools_of(ctx.cluster):
            tp = tp_choices(pool.gpus_per_node, ctx.model)[-1]
            stage = Stage(pool, tp, 0, L, (16,) * L)
            pre, dec = factory.make("prefill", [stage]), factory.make("decode", [stage])
            if pre is not None and dec is not None:
                mix = factory.make("mixed", [stage])
                out.append(Machine(pool, tp, pool.gpus_per_node // tp, pre, dec, mix))
        return out

    def grid(self, ctx: StrategyContext, P: Machine, D: Machine) -> tuple[Point | None, Point | None]:
        """The best prompt/token point of the design (prompt machines ``P``, token machines ``D``) and its
        best point with a mixed pool (mixed machines of ``P``'s or ``D``'s type); None where none is
        feasible."""
        throughput = ctx.objective == "throughput"
        maximise = OBJECTIVES[ctx.objective].sense == "max"

        def cap(t: Template) -> float:
            return (t.cap_free if throughput else t.cap).rate

        def busy(t: Template) -> float:  # watts-seconds of dynamic power per request
            b = t.dynamic_w * t.cap.busy_per_request
            return b if math.isfinite(b) else 0.0

        cap_p, cap_d = cap(P.prompt) * P.per_node, cap(D.token) * D.per_node
        if cap_p <= 0 or cap_d <= 0:
            return None, None
        price_p, price_d = P.prompt.price * P.per_node, D.token.price * D.per_node
        idle_p, idle_d = P.prompt.idle_w * P.per_node, D.token.idle_w * D.per_node
        busy_pair = busy(P.prompt) + busy(D.token)
        mixers = []  # (machine, requests/s, $/h, idle W, busy W-s per request) of each mixed machine type
        for M in [P] if P is D else [P, D]:
            if M.mixed is not None and cap(M.mixed) > 0:
                t = M.mixed
                mixers.append((M, cap(t) * M.per_node, t.price * M.per_node, t.idle_w * M.per_node, busy(t)))
        nodes = {P.pool.key: len(P.pool.nodes), D.pool.key: len(D.pool.nodes)}

        def score(rate: float, price: float, idle: float, busy_rate: float) -> float | None:
            if ctx.budget is not None and price > ctx.budget + 1e-9:
                return None
            if maximise:
                return rate - 1e-6 * price
            if rate < ctx.rate * (1 - 1e-9):
                return None
            power = idle + busy_rate * min(rate, ctx.rate) / rate
            return -(price if ctx.objective == "cost" else power) - 1e-9 * price

        plain = pooled = None
        for n_p in range(1, nodes[P.pool.key] + 1):
            for n_d in range(1, nodes[D.pool.key] + 1):
                used = {P.pool.key: n_p}
                used[D.pool.key] = used.get(D.pool.key, 0) + n_d
                if any(n > nodes[k] for k, n in used.items()):
                    continue
                rate = min(n_p * cap_p, n_d * cap_d)
                price = n_p * price_p + n_d * price_d
                idle = n_p * idle_p + n_d * idle_d
                s = score(rate, price, idle, busy_pair * rate)
                if s is not None and (plain is None or s > plain.score):
                    plain = Point(s, P, D, n_p, n_d, rate)
                for M, cap_m, price_m, idle_m, busy_m in mixers:
                    n_m = self._mixed_count(ctx, maximise, rate, price, cap_m, price_m)
                    n_m = min(n_m, nodes[M.pool.key] - used[M.pool.key])
                    if n_m < 1:
                        continue
                    extra = n_m * cap_m
                    s = score(
                        rate + extra,
                        price + n_m * price_m,
                        idle + n_m * idle_m,
                        busy_pair * rate + busy_m * extra,
                    )
                    if s is not None and (pooled is None or s > pooled.score):
                        pooled = Point(s, P, D, n_p, n_d, rate, M, n_m, extra)
        return plain, pooled

    @staticmethod
    def _mixed_count(ctx, maximise: bool, rate: float, price: float, cap_m: float, price_m: float) -> int:
        """Mixed machines beside a prompt/token point carrying ``rate`` at ``price``: for goodput and
        throughput the most the budget allows (unbounded without a budget: the inventory decides); for
        cost and power the fewest that carry the workload's rate (at least one)."""
        if maximise:
            if ctx.budget is None:
                return 1 << 30
            return int((ctx.budget + 1e-9 - price) // price_m)
        return max(1, math.ceil((ctx.rate - rate) / cap_m - 1e-9))

    def build(self, ctx: StrategyContext, point: Point) -> PlanFile | None:
        P, D, M = point.prompt, point.token, point.mixed
        mixed = M is not None and point.n_mixed > 0
        templates = [P.prompt, D.token]
        counts = {0: point.n_prompt * P.per_node, 1: point.n_token * D.per_node}
        flows = {0: point.pair_rate, 1: point.pair_rate}
        if mixed:
            templates.append(M.mixed)
            counts[2] = point.n_mixed * M.per_node
            flows[2] = point.mixed_rate
        price = sum(templates[j].price * n for j, n in counts.items())
        alloc = Allocation(counts, flows, point.rate, price, 0.0, point.rate)
        design = point.design
        machines = f"{point.n_prompt} prompt and {point.n_token} token machines"
        if mixed:
            many = "s" if point.n_mixed > 1 else ""
            machines = (
                f"{point.n_prompt} prompt machines, {point.n_token} token machines and {point.n_mixed} "
                f"{M.name} machine{many} in the mixed pool (mixed batching)"
            )
        notes = (
            f"Splitwise baseline: {design}, {machines} "
            f"(TP {P.tp} / TP {D.tp}" + (f" / TP {M.tp}" if mixed else "") + ")."
        )
        name = f"splitwise-{design}" + (f"+{M.name}-mixed" if mixed else "")
        try:  # join the shortest queue for prompts and for the token machine a KV cache goes to
            return ctx.build_plan(templates, alloc, name, weighted_handoff=False, notes=notes)
        except PlacementError:
            return None
