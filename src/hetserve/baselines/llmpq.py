"""``llm-pq``: one pipeline over the cluster with per-layer mixed precision (LLM-PQ, PPoPP 2024).

LLM-PQ serves an offline batch with one pipeline in which every GPU is a stage. It chooses, jointly,
which contiguous layers each GPU holds and the bit-width of every layer (from 16/8/4/3), with a
*phase-aware* cost model: prefill and decode are timed separately, since they stress a GPU
differently, and the batch's end-to-end time is

    (m_pre + S - 1) * T_pre  +  output_tokens * max(m_dec, S) * T_dec

for S stages, slowest-stage times T_pre / T_dec of one prefill / decode micro-batch, and m_pre / m_dec
micro-batches. A model-quality indicator per layer (here: the planner's layer sensitivity times the bits
removed) is added with a small weight, and the quality budget is a hard limit.

Here the partition and the bits are one small MILP (SciPy HiGHS). The cost model times every layer
of a model alike, so what matters is how many layers each stage holds at each width: integer n[s, b]
(layers of stage s at b bits; stage s holds the next sum_b n[s, b] layers, in device order), with
memory per stage (weights + the KV cache of the batch + activations of a prefill micro-batch), every
GPU holding at least one layer, and T_pre / T_dec above every stage's summed per-layer times (roofline
cost model, plus the hop to the next stage and the LM head on the last). Inside a stage the least
sensitive layers get the fewest bits; the quality budget weighs each stage's bits removed by the
sensitivity of the layers it quantises (1 at first, then the exact mean of the chosen layout, until the
layout keeps the budget with the per-layer sensitivities). The MILP is solved for every order of the
GPU types (until the time limit, once one order has a solution), then the prefill and decode
micro-batch sizes are chosen by enumeration on the chosen partition. If the batch's KV cache does not
fit, smaller batches are planned for (16, 8, 4). One pipeline per cluster: if the cluster has several
vendors, the vendor with the most GPU memory is used (a pipeline never spans vendors).
"""

from __future__ import annotations

import itertools
import math

import numpy as np
from scipy.optimize import Bounds, LinearConstraint, milp

from .. import clock
from ..costmodel.roofline import ServerShape
from ..errors import HetserveError
from ..plan import PlanFile, RoutingPlan
from ..planner.strategy import PlanWriter, Strategy, StrategyContext, chain_timing, memory_of, spot
from .uniform import node_gpus

BITS = (16, 8, 4, 3)
#: Sequences planned for (LLM-PQ's offline batch is 32 requests).
BATCH = 32
#: Smaller batches tried when the batch's KV cache does not fit at any precision the budget allows.
FALLBACK_BATCHES = (16, 8, 4)
PREFILL_MICRO = (1, 2, 4, 8)
MAX_ORDERS = 24
MILP_SECONDS = 2.0
#: Relative optimality gap at which HiGHS stops (the cost model is not finer than this).
MIP_GAP = 0.02
#: Weight of the quality indicator: spending the whole quality budget costs this share of the batch time.
QUALITY_WEIGHT = 0.05


class LLMPQ(Strategy):
    name = "llm-pq"
    summary = (
        "one pipeline over all GPUs; per-layer bits and phase-aware partition by MILP; micro-batch sizing"
    )

    def plan(self, ctx: StrategyContext) -> PlanFile:
        vendor = max(
            sorted({n.gpu.vendor for n in ctx.cluster.nodes.values()}),
            key=lambda v: sum(
                n.gpu.memory_gb * n.count for n in ctx.cluster.nodes.values() if n.gpu.vendor == v
            ),
        )
        devices = node_gpus(ctx, vendor)[: ctx.model.num_layers]
        best = None
        orders = self._orders(ctx, devices)
        for batch in (BATCH,) + FALLBACK_BATCHES:
            for order in orders:
                if best is not None and ctx.time_left() < 0:
                    break
                for b_pre in (2, 1):
                    per_milp = min(MILP_SECONDS, max(0.5, ctx.time_left() / (2 * len(orders))))
                    sol = self._solve(
                        ctx, order, b_pre, self._decode_micro(len(order), batch), batch, per_milp
                    )
                    if sol is not None:
                        break
                if sol is not None and (best is None or sol[0] < best[0]):
                    best = sol
            if best is not None:
                break
        if best is None:
            raise HetserveError(
                f"llm-pq: {ctx.model.name} does not fit in one pipeline over the {vendor} GPUs "
                f"of {ctx.cluster.name} with bits in {list(BITS)} within the quality budget "
                f"{ctx.quality:g}; raise the quality budget or add GPUs"
            )
        _, order, spans, bits, batch = best
        chain = [spot(n, [g], a, b, tuple(bits[a:b])) for (n, g), (a, b) in zip(order, spans)]
        settings, lanes = self._micro_batches(ctx, chain, batch)
        writer = PlanWriter(ctx, f"llm-pq-{ctx.model.name}")
        writer.instance(
            "pipeline", "mixed", chain, settings=settings, micro_batches=lanes, policy="prefill-first"
        )
        used = sorted(set(bits))
        return writer.plan(
            RoutingPlan(),
            notes=f"LLM-PQ baseline: {len(chain)} stages, bits {used}, layers "
            f"{[s.layers for s in chain]}, micro-batches {lanes}, prefill micro-batch "
            f"{settings[1] // max(int(ctx.prompt), 1)} prompts, decode micro-batch "
            f"{settings[0] // lanes} sequences.",
        )

    # ---- device orders and micro-batches --------------------------------------------------------
    @staticmethod
    def _orders(ctx, devices):
        """Device orders to try: every order of the GPU types (GPUs of one type, and of one node, stay
        together), at most MAX_ORDERS of them."""
        by_type: dict[str, list] = {}
        for d in devices:
            by_type.setdefault(ctx.cluster.nodes[d[0]].gpu.name, []).append(d)
        perms = itertools.islice(itertools.permutations(sorted(by_type)), MAX_ORDERS)
        return [list(itertools.chain.from_iterable(by_type[t] for t in p)) for p in perms]

    @staticmethod
    def _decode_micro(stages: int, batch: int) -> int:
        return max(1, math.ceil(batch / stages))

    def _batch_time(self, ctx, chain, b_pre: int, b_dec: int, batch: int) -> float:
        """End-to-end time of the batch with these micro-batch sizes (LLM-PQ's cost function)."""
        S = len(chain)
        P, O = ctx.prompt, ctx.output
        ch = chain_timing(ctx, chain, micro_batches=1)
        n = b_pre * P
        pre = [t.time(n, b_pre, b_pre * P * (P + 1) / 2, n) for t in ch.timers]
        kv = b_dec * (P + O / 2 + 1)
        dec = [t.time(b_dec, b_dec, kv, kv) for t in ch.timers]
        hop = max((lat + bt * n for lat, bt in zip(ch.hop_latency, ch.hop_byte_time)), default=0.0)
        m_pre, m_dec = math.ceil(batch / b_pre), math.ceil(batch / b_dec)
        return (m_pre + S - 1) * (max(pre) + hop) + O * max(m_dec, S) * max(dec)

    def _micro_batches(self, ctx, chain, batch: int):
        S = len(chain)
        best = None
        for b_pre in PREFILL_MICRO:
            tokens = max(int(b_pre * ctx.prompt), 1)
            d = self._decode_micro(S, batch)
            for b_dec in sorted({d, max(1, d // 2), d * 2}):
                settings = (b_dec * S, tokens, tokens)  # prompts chunked to the micro-batch
                if not all(memory_of(ctx, s, "mixed", settings).fits for s in chain):
                    continue
                t = self._batch_time(ctx, chain, b_pre, b_dec, batch)
                if best is None or t < best[0]:
                    best = (t, settings)
        if best is None:
            tokens = max(int(ctx.prompt), 1)
            return (self._decode_micro(S, batch) * S, tokens, tokens), S
        return best[1], S

    # ---- the partition + precision MILP ----------------------------------------------------------------
    def _solve(self, ctx: StrategyContext, order, b_pre: int, b_dec: int, batch: int, time_limit: float):
        m, cm = ctx.model, ctx.cost_model
        L, S = m.num_layers, len(order)
        bits = [b for b in BITS if ctx.quality > 0 or b == 16]
        B = len(bits)
        P, O = ctx.prompt, ctx.output
        sens = ctx.sens
        nodes = ctx.cluster.nodes
        act_tokens = max(int(b_pre * P), 1)
        kv_tokens = batch * (P + O)
        # per-stage constants
        t_pre = np.zeros((S, B))
        t_dec = np.zeros((S, B))
        cap = np.zeros(S)
        extra_pre = np.zeros(S)
        extra_dec = np.zeros(S)
        kv_layer = kv_tokens * m.kv_bytes_per_token_layer(2)
        n = b_pre * P
        pre_shape = (n, b_pre, b_pre * P * (P + 1) / 2, n)
        kv = b_dec * (P + O / 2 + 1)
        dec_shape = (b_dec, b_dec, kv, kv)
        for s, (node, _) in enumerate(order):
            gpu = nodes[node].gpu
            first, last = s == 0, s == S - 1
            for k, b in enumerate(bits):
                timer = cm.timer(ServerShape(gpu, 1, (b,), first=False, last=False))
                t_pre[s, k] = timer.time(*pre_shape)
                t_dec[s, k] = timer.time(*dec_shape)
            mem = cm.memory(ServerShape(gpu, 1, (), first=first, last=last), act_tokens, batch)
            cap[s] = mem.usable - mem.weights - mem.activations
            head = cm.timer(ServerShape(gpu, 1, (), first=False, last=last))
            extra_pre[s] = head.time(*pre_shape) if last else 0.0
            extra_dec[s] = head.time(*dec_shape) if last else 0.0
            if s + 1 < S:
                link = ctx.cluster.link(node, order[s + 1][0])
                extra_pre[s] += link.latency + n * m.hidden_size * 2 / link.bandwidth
                extra_dec[s] += link.latency + b_dec * m.hidden_size * 2 / link.bandwidth
        if np.any(cap <= 0):
            return None
        wbytes = np.array([m.layer_weight_bytes(b) for b in bits])
        w_pre = math.ceil(batch / b_pre) + S - 1
        w_dec = O * max(math.ceil(batch / b_dec), S)
        ref = w_pre * t_pre[:, 0].mean() * L / S + w_dec * t_dec[:, 0].mean() * L / S
        theta = QUALITY_WEIGHT * ref / (max(ctx.quality, 0.05) * 16 * L)
        budget = ctx.quality * 16 * sum(sens)
        sigma = np.ones(S)  # sensitivity of the layers each stage quantises (refined below)
        for _ in range(3):
            sol = self._milp(
                S,
                L,
                bits,
                wbytes,
                kv_layer,
                cap,
                t_pre,
                t_dec,
                extra_pre,
                extra_dec,
                w_pre,
                w_dec,
                theta,
                sigma,
                budget,
                time_limit,
            )
            if sol is None:
                return None
            value, counts = sol
            spans, layer_bits = self._layout(counts, bits, sens)
            if sum(sens[l] * (16 - b) for l, b in enumerate(layer_bits)) <= budget + 1e-9:
                return value, order, spans, layer_bits, batch
            for s, (a, b) in enumerate(spans):  # the exact sensitivity of what each stage quantised
                q = [sens[l] for l in range(a, b) if layer_bits[l] < 16]
                if q:
                    sigma[s] = max(sigma[s], sum(q) / len(q))
        return None

    @staticmethod
    def _milp(
        S,
        L,
        bits,
        wbytes,
        kv_layer,
        cap,
        t_pre,
        t_dec,
        extra_pre,
        extra_dec,
        w_pre,
        w_dec,
        theta,
        sigma,
        budget,
        time_limit,
    ):
        """Layers per (stage, bits): integer n[s, b]; T_pre, T_dec bound every stage's time."""
        B = len(bits)
        nv = S * B + 2
        T_PRE, T_DEC = S * B, S * B + 1
        rows, lo, hi = [], [], []

        def row():
            return np.zeros(nv)

        r = row()
        r[: S * B] = 1
        rows.append(r), lo.append(L), hi.append(L)  # every layer once
        for s in range(S):
            cols = slice(s * B, (s + 1) * B)
            r = row()
            r[cols] = 1
            rows.append(r), lo.append(1), hi.append(np.inf)  # every GPU is a stage
            r = row()
            r[cols] = (wbytes + kv_layer) / 1e9
            rows.append(r), lo.append(-np.inf), hi.append(cap[s] / 1e9)  # memory, GB
            for T, t, extra in ((T_PRE, t_pre, extra_pre), (T_DEC, t_dec, extra_dec)):
                r = row()
                r[cols] = t[s] * 1e3
                r[T] = -1
                rows.append(r), lo.append(-np.inf), hi.append(-extra[s] * 1e3)  # stage times, ms
        removed = np.concatenate([sigma[s] * np.array([16.0 - b for b in bits]) for s in range(S)])
        r = row()
        r[: S * B] = removed  # quality budget
        rows.append(r), lo.append(-np.inf), hi.append(max(budget, 0.0) + 1e-9)
        c = row()
        c[T_PRE], c[T_DEC] = w_pre, w_dec
        c[: S * B] = theta * 1e3 * removed
        integrality = np.ones(nv)
        integrality[T_PRE] = integrality[T_DEC] = 0
        ub = np.full(nv, float(L))
        ub[T_PRE] = ub[T_DEC] = np.inf
        res = milp(
            c,
            constraints=LinearConstraint(np.array(rows), lo, hi),
            integrality=integrality,
            bounds=Bounds(np.zeros(nv), ub),
            options={**clock.milp_limits(time_limit, len(rows)), "disp": False, "mip_rel_gap": MIP_GAP},
        )
        clock.charge_solve(nodes=getattr(res, "mip_node_count", 0) or 0, rows=len(rows))
        if res.x is None or res.status not in (0, 1):
            return None
        return float(res.fun) / 1e3, np.round(res.x[: S * B]).astype(int).reshape(S, B)

    @staticmethod
    def _layout(counts, bits, sens):
        """Stage s holds the next sum(counts[s]) layers; inside it the least sensitive get the fewest bits."""
        spans, layer_bits, start = [], [16] * len(sens), 0
        for s in range(counts.shape[0]):
            n = int(counts[s].sum())
            layers = sorted(range(start, start + n), key=lambda l: (sens[l], l))
            widths = sorted((b for k, b in enumerate(bits) for _ in range(int(counts[s, k]))))
            for l, b in zip(layers, widths):
                layer_bits[l] = b
            spans.append((start, start + n))
            start += n
        return spans, layer_bits
