"""``pd-hetero``: prefill/decode disaggregation across GPU vendors (Chen et al., ZTE, 2025).

The system puts prefill on compute-strong GPUs and decode on bandwidth-strong GPUs of another vendor,
hands the KV cache (and the first token's state) over through host memory, and converts its layout,
block size and dtype on the way. Its deployment method has two steps, and so does this strategy:

1. **Parallel strategy per (GPU type, phase).** For each GPU type, every TP (and, where one node does
   not hold the model, PP) shape the planner's template factory offers, as a prefill and as a decode
   instance; the one with the highest rate per GPU within the phase's SLO is that type's strategy for
   the phase (16-bit weights; the quality budget only if nothing fits at 16 bits).
2. **Instance numbers by simulation.** The vendor whose best GPU has the highest FLOPS-to-bandwidth ratio
   prefills; the other types decode (with one vendor, both phases share its types). For numbers of
   prefill instances around the analytic optimum, the matching numbers of decode instances (filled from
   the most efficient decode type first) are simulated on the workload, and the best is kept.

KV hand-off: staged through host memory after the prefill (not layer-wise); each prefill instance hands
off to decode instances by weights from a transport LP over the links (the planner's).
"""

from __future__ import annotations

from ..errors import HetserveError
from ..plan import PlanFile
from ..planner.allocate import Allocation
from ..planner.build import PlacementError
from ..planner.evaluate import OBJECTIVES
from ..planner.pools import pools_of
from ..planner.strategy import Strategy, StrategyContext, best_by_trial

SIMULATIONS = 8


class PDHetero(Strategy):
    name = "pd-hetero"
    summary = (
        "cross-vendor P/D: parallel strategy per GPU type and phase, then P:D instance numbers by simulation"
    )

    def plan(self, ctx: StrategyContext) -> PlanFile:
        strategies = self._per_type_and_phase(ctx, 0.0) or self._per_type_and_phase(ctx, ctx.quality)
        if not strategies:
            raise HetserveError(
                f"pd-hetero: no GPU type of {ctx.cluster.name} runs {ctx.model.name} as a prefill "
                "and a decode instance within the SLOs"
            )
        prefill_types, decode_types = self._roles(ctx, strategies)
        pre = max(
            (strategies[g]["prefill"] for g in prefill_types if "prefill" in strategies[g]),
            key=lambda x: x[1],
            default=None,
        )
        decs = sorted(
            (strategies[g]["decode"] for g in decode_types if "decode" in strategies[g]), key=lambda x: -x[1]
        )
        if pre is None or not decs:
            raise HetserveError(
                f"pd-hetero: {ctx.cluster.name} has no GPU type that prefills "
                f"({', '.join(prefill_types)}) or none that decodes ({', '.join(decode_types)}) "
                f"{ctx.model.name} within the SLOs"
            )
        pools = {p.key: p.total for p in pools_of(ctx.cluster)}
        candidates = self._candidates(ctx, pre, decs, pools)
        if not candidates:
            within = f" within ${ctx.budget:.2f}/h" if ctx.budget else ""
            raise HetserveError(
                f"pd-hetero: no prefill/decode instance numbers fit {ctx.cluster.name}{within}"
            )
        best = best_by_trial(
            ctx,
            [((n_p, d, rate), rate) for n_p, d, rate in candidates[:SIMULATIONS]],
            lambda c: self._build(ctx, pre, decs, *c),
        )
        if best is None:
            raise HetserveError(f"pd-hetero: the instances do not pack into {ctx.cluster.name}'s nodes")
        return best

    # ---- step 1 -----------------------------------------------------------------------------------------
    @staticmethod
    def _per_type_and_phase(ctx, quality):
        factory = ctx.factory(quality)
        out: dict[str, dict] = {}
        for pool in pools_of(ctx.cluster):
            for t in factory.single_pool(pool):
                if t.role == "mixed":
                    continue
                rate = (t.cap_free if ctx.objective == "throughput" else t.cap).rate
                if rate <= 0:
                    continue
                per_gpu = rate / t.num_gpus
                cur = out.setdefault(pool.gpu.name, {}).get(t.role)
                if cur is None or per_gpu > cur[1]:
                    out[pool.gpu.name][t.role] = (t, per_gpu, rate, pool.gpu.name)
        return out

    @staticmethod
    def _roles(ctx, strategies):
        gpus = ctx.cluster.gpus
        ratio = lambda g: gpus[g].half_tflops / gpus[g].memory_bw_gb_per_s
        vendors: dict[str, list[str]] = {}
        for g in strategies:
            vendors.setdefault(gpus[g].vendor, []).append(g)
        compute = max(vendors, key=lambda v: max(ratio(g) for g in vendors[v]))
        prefill = sorted(vendors[compute])
        decode = sorted(g for v, gs in vendors.items() if v != compute for g in gs) or prefill
        return prefill, decode

    # ---- step 2 -----------------------------------------------------------------------------------------
    def _candidates(self, ctx, pre, decs, pools):
        """(prefill instances, {decode template index: count}, rate), best analytic first."""
        p_t, _, p_rate, _ = pre
        out = []
        p_pool = p_t.stages[0].pool.key
        max_p = pools[p_pool] // p_t.num_gpus
        for n_p in range(1, max_p + 1):
            left = dict(pools)
            left[p_pool] -= n_p * p_t.num_gpus
            price = n_p * p_t.price
            if ctx.budget is not None and price > ctx.budget:
                break
            need = n_p * p_rate
            counts, d_rate = {}, 0.0
            for k, (d_t, _, rate, _) in enumerate(decs):
                pool = d_t.stages[0].pool.key
                while (
                    d_rate < need
                    and left[pool] >= d_t.num_gpus
                    and (ctx.budget is None or price + d_t.price <= ctx.budget)
                ):
                    counts[k] = counts.get(k, 0) + 1
                    left[pool] -= d_t.num_gpus
                    price += d_t.price
                    d_rate += rate
            if not counts:
                continue
            for delta in (0, -1, 1):
                c = dict(counts)
                k0 = max(c)
                c[k0] += delta
                if c[k0] <= 0 and len(c) == 1:
                    continue
                if c[k0] <= 0:
                    del c[k0]
                pool = decs[k0][0].stages[0].pool.key
                if delta > 0 and (
                    left[pool] < decs[k0][0].num_gpus
                    or (ctx.budget is not None and price + decs[k0][0].price > ctx.budget)
                ):
                    continue
                rate = min(need, sum(decs[k][2] * n for k, n in c.items()))
                total_price = n_p * p_t.price + sum(decs[k][0].price * n for k, n in c.items())
                if OBJECTIVES[ctx.objective].sense == "max":
                    score = rate - 1e-6 * total_price
                elif rate < ctx.rate:
                    continue
                else:
                    idle = p_t.idle_w * n_p + sum(decs[k][0].idle_w * n for k, n in c.items())
                    score = -(total_price if ctx.objective == "cost" else idle)
                out.append((score, n_p, c, rate))
        out.sort(key=lambda x: -x[0])
        seen, unique = set(), []
        for _score, n_p, c, rate in out:
            key = (n_p, tuple(sorted(c.items())))
            if key not in seen:
                seen.add(key)
                unique.append((n_p, c, rate))
        return unique

    def _build(self, ctx, pre, decs, n_p, dec_counts, rate) -> PlanFile | None:
        p_t = pre[0]
        templates = [p_t] + [d[0] for d in decs]
        counts = {0: n_p, **{k + 1: n for k, n in dec_counts.items() if n > 0}}
        d_total = sum(decs[k][2] * n for k, n in dec_counts.items()) or 1.0
        flows = {0: rate, **{k + 1: rate * decs[k][2] * n / d_total for k, n in dec_counts.items() if n > 0}}
        price = sum(templates[j].price * n for j, n in counts.items())
        alloc = Allocation(counts, flows, rate, price, 0.0, rate)
        dec_desc = ", ".join(
            f"{n} x {decs[k][3]} {decs[k][0].describe().split(': ')[1]}"
            for k, n in dec_counts.items()
            if n > 0
        )
        notes = (
            f"Cross-vendor P/D baseline: {n_p} x {pre[3]} prefill "
            f"({p_t.describe().split(': ')[1]}); decode {dec_desc}."
        )
        try:  # KV staged through host memory after the prefill
            return ctx.build_plan(
                templates, alloc, f"pd-hetero-{ctx.model.name}", layerwise_kv=False, notes=notes
            )
        except PlacementError:
            return None
