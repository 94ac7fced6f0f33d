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

Routing as in Splitwise: join the shortest queue for prompts and for the token machine a KV cache goes
to (``least-work`` for both), KV streamed layer by layer behind the prompt computation.
"""

from __future__ import annotations

from ..errors import HetserveError
from ..plan import PlanFile
from ..planner.allocate import Allocation
from ..planner.build import PlacementError
from ..planner.evaluate import OBJECTIVES
from ..planner.pools import Stage, pools_of, tp_choices
from ..planner.strategy import Strategy, StrategyContext, best_by_trial

#: Designs whose best grid point is checked by simulation.
SIMULATED_DESIGNS = 3


class Splitwise(Strategy):
    name = "splitwise"
    summary = "prompt pool + token pool of whole machines by GPU type; grid search; cost and power objectives"

    def plan(self, ctx: StrategyContext) -> PlanFile:
        factory = ctx.factory(0.0)
        L = ctx.model.num_layers
        machines = []  # (pool, tp, instances per machine, prefill template, decode template)
        for pool in pools_of(ctx.cluster):
            tp = tp_choices(pool.gpus_per_node, ctx.model)[-1]
            stage = Stage(pool, tp, 0, L, (16,) * L)
            pre, dec = factory.make("prefill", [stage]), factory.make("decode", [stage])
            if pre is not None and dec is not None:
                machines.append((pool, tp, pool.gpus_per_node // tp, pre, dec))
        if not machines:
            raise HetserveError(
                f"splitwise: no machine type of {ctx.cluster.name} holds {ctx.model.name} at 16 bits "
                "on one machine (Splitwise runs one instance per machine, tensor parallel)"
            )
        designs = []
        for P in machines:
            for D in machines:
                point = self._grid(ctx, P, D)
                if point is not None:
                    designs.append(point)
        if not designs:
            within = f" within ${ctx.budget:.2f}/h" if ctx.budget else ""
            raise HetserveError(
                f"splitwise: no prompt/token machine split of {ctx.cluster.name} serves "
                f"{ctx.model.name}{within} at {ctx.rate:g} req/s within the SLOs"
            )
        designs.sort(key=lambda d: -d[0])
        best = best_by_trial(
            ctx, [(d[1:], d[-1]) for d in designs[:SIMULATED_DESIGNS]], lambda d: self._build(ctx, *d)
        )
        if best is None:
            raise HetserveError(f"splitwise: the chosen machines do not pack into {ctx.cluster.name}'s nodes")
        return best

    def _grid(self, ctx, P, D):
        """The best (prompt machines, token machines) of one design, scored 'higher is better'."""
        p_pool, _, p_k, p_t, _ = P
        d_pool, _, d_k, _, d_t = D
        same = p_pool.key == d_pool.key
        cap_p = (p_t.cap_free if ctx.objective == "throughput" else p_t.cap).rate * p_k
        cap_d = (d_t.cap_free if ctx.objective == "throughput" else d_t.cap).rate * d_k
        if cap_p <= 0 or cap_d <= 0:
            return None
        price_p, price_d = p_t.price * p_k, d_t.price * d_k
        best = None
        n_pm, n_dm = len(p_pool.nodes), len(d_pool.nodes)
        for n_p in range(1, n_pm + 1):
            for n_d in range(1, n_dm + 1):
                if same and n_p + n_d > n_pm:
                    continue
                price = n_p * price_p + n_d * price_d
                if ctx.budget is not None and price > ctx.budget + 1e-9:
                    continue
                rate = min(n_p * cap_p, n_d * cap_d)
                busy = (
                    p_t.dynamic_w * p_t.cap.busy_per_request + d_t.dynamic_w * d_t.cap.busy_per_request
                ) * min(rate, ctx.rate)
                power = n_p * p_t.idle_w * p_k + n_d * d_t.idle_w * d_k + busy
                if OBJECTIVES[ctx.objective].sense == "max":
                    score = rate - 1e-6 * price
                elif rate < ctx.rate:
                    continue
                else:
                    score = -(price if ctx.objective == "cost" else power) - 1e-9 * price
                if best is None or score > best[0]:
                    best = (score, P, D, n_p, n_d, rate)
        return best

    def _build(self, ctx, P, D, n_p, n_d, rate) -> PlanFile | None:
        p_pool, _, p_k, p_t, _ = P
        d_pool, _, d_k, _, d_t = D
        templates = [p_t, d_t]
        counts = {0: n_p * p_k, 1: n_d * d_k}
        flows = {0: rate, 1: rate}
        alloc = Allocation(counts, flows, rate, p_t.price * counts[0] + d_t.price * counts[1], 0.0, rate)
        design = f"{p_pool.gpu.name}-prompt/{d_pool.gpu.name}-token"
        notes = (
            f"Splitwise baseline: {design}, {n_p} prompt and {n_d} token machines "
            f"(TP {p_t.stages[0].tp} / TP {d_t.stages[0].tp})."
        )
        try:  # join the shortest queue for prompts and for the token machine a KV cache goes to
            return ctx.build_plan(
                templates, alloc, f"splitwise-{design}", weighted_handoff=False, notes=notes
            )
        except PlacementError:
            return None
