"""Candidate instances ("templates") the allocation chooses counts of.

GPUs are grouped into *pools* (pools.py: nodes with the same GPU type, GPUs per node and zone). A
template is a chain of stages, each a tensor-parallel group inside one node of a pool, with its layer
range and per-layer bits, a role and scheduler settings, and its analytic capacity for the workload.

Generated per pool: every TP degree that divides both the heads and the node size, with the fewest
pipeline stages that fit (and one more), at 16 bits and, under the quality budget, with lower-bit
layers where they make the model fit, decode faster or leave more KV room (``_bits_for`` modes).
Across pools: asymmetric chains of one TP group per pool (HexGen / Helix), of every node of the pools
and of every GPU of the pools (LLM-PQ: one pipeline over a small cluster), with layers split in
proportion to stage speed or to stage memory under each stage's memory; these are what makes a model
fit that no single node holds, and what puts every small server of a cluster to work.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

from .. import clock
from ..costmodel.roofline import RooflineCostModel, ServerShape
from ..specs.clusters import Cluster
from ..specs.models import ModelSpec
from ..specs.workloads import SLO
from .capacity import Capacity, ChainTiming, decode_capacity, mixed_capacity, prefill_capacity
from .pools import ROLES, Pool, Stage, pools_of, role_settings, split_even, tp_choices, weight_room
from .quality import sensitivity

MAX_STAGES = 8
#: Most stages in a cross-pool chain (LLM-PQ-style chains put every GPU of a small cluster in one).
MAX_CHAIN_STAGES = 16


@dataclass
class Template:
    name: str
    role: str
    stages: list[Stage]
    micro_batches: int
    gpus: dict[str, int]
    price: float
    idle_w: float
    dynamic_w: float
    kv_tokens: int
    settings: tuple[int, int, int]
    cap: Capacity  # within the SLOs
    cap_free: Capacity  # ignoring SLOs (throughput objective)
    kv_bytes_per_token: float = 0.0
    quantised: bool = field(default=False)
    #: How its stages were laid out: "pool" (one pool), "per-pool" (one TP group per pool, across pools) or
    #: "every-server" (every node or every GPU of several pools a stage, across pools).
    layout: str = "pool"

    @property
    def num_gpus(self) -> int:
        return sum(self.gpus.values())

    @property
    def vendor(self) -> str:
        return self.stages[0].pool.gpu.vendor

    def describe(self) -> str:
        parts = []
        for s in self.stages:
            b = sorted(set(s.bits))
            bits = f"{b[0]}-bit" if len(b) == 1 else "/".join(str(x) for x in b) + "-bit"
            parts.append(f"{s.pool.gpu.name} TP{s.tp}{' EP' if s.ep else ''} L{s.start}-{s.end - 1} {bits}")
        return f"{self.role}: " + " -> ".join(parts)


class TemplateFactory:
    """Builds templates and their capacities for one cluster, model and workload."""

    def __init__(
        self,
        cluster: Cluster,
        model: ModelSpec,
        prompt: float,
        output: float,
        slo: SLO | None,
        quality: float,
        cost_model: RooflineCostModel | None = None,
        lane_tokens: float | None = None,
        precisions: tuple[str, ...] = ("fit", "spread"),
        weight_bits: int | None = None,
        output_q: float | None = None,
        max_seqs: int | None = None,
        long_tokens: float | None = None,
        deadline: float | None = None,
    ):
        self.cluster, self.model = cluster, model
        #: ``clock.now()`` after which ``all`` makes no more templates (None: every one is made).
        self.deadline = deadline
        self.cut_short = False
        #: Most sequences the engine runs in one batch (per micro-batch lane); None: the roles' settings.
        #: With a limit, stages keep KV room for that many ``long_tokens`` requests per lane (``weight_room``).
        self.max_seqs = max_seqs
        self.long_tokens = long_tokens if long_tokens is not None else prompt + output
        #: Output tokens at the SLO percentile, for the E2E target (None: the mean output).
        self.output_q = output_q
        #: Modes of ``_bits_for`` tried per template (the planner adds "deep"; the baselines that build on
        #: this factory keep the two they were written with).
        self.precisions = precisions
        #: Every layer at these bits (``plan --weight-bits``), whatever the quality budget; None: the budget.
        self.weight_bits = weight_bits
        #: Tokens (prompt + output) a micro-batch lane's share of the KV cache must hold (the simulator and
        #: the runtime split an instance's cache equally over its lanes); a chain whose cache is small for its
        #: stage count gets fewer lanes. None: only the whole cache must hold a mean request.
        self.lane_tokens = lane_tokens
        self.prompt, self.output, self.slo, self.quality = prompt, output, slo, quality
        self.cm = cost_model or RooflineCostModel(model)
        self.sens = sensitivity(model)
        self._count = 0

    # ---- precision ------------------------------------------------------------------------------
    def _bits_for(
        self, spans: list[tuple[int, int]], caps: list[float], mode: str = "fit"
    ) -> list[int] | None:
        """Per-layer bits so each span's weights fit its byte cap, removing the least sensitive bits first.

        ``fit``: only until every span fits. ``spread``: spend the whole quality budget, every layer to 8 bits
        before any to 4 (lower bits decode faster). ``deep``: spend it least sensitive layer first, each down
        to 4 bits before the next; for the same budget this frees the most memory (a step from 16 to 8 or 8 to
        4 bits saves the same bytes per unit of sensitivity, so the cheapest layers should take both), which
        is KV room: LLM-PQ's trade of precision for batch size."""
        m = self.model
        bits = [16] * m.num_layers
        allowed = self.quality * 16 * sum(self.sens)
        spent = 0.0
        order = sorted(range(m.num_layers), key=lambda i: (self.sens[i], i))
        span_of = [0] * m.num_layers
        for k, (a, b) in enumerate(spans):
            for l in range(a, b):
                span_of[l] = k
        weight = [sum(m.layer_weight_bytes(bits[l]) for l in range(a, b)) for a, b in spans]
        steps = ((16, 8), (8, 4))
        passes = (
            [[(l, hi, lo) for l in order for hi, lo in steps]]
            if mode == "deep"
            else [[(l, hi, lo) for l in order] for hi, lo in steps]
        )
        for moves in passes:
            for l, hi, lo in moves:
                k = span_of[l]
                if bits[l] != hi:
                    continue
                over = weight[k] > caps[k]
                if not over and mode == "fit":
                    continue
                cost = self.sens[l] * (hi - lo)
                if spent + cost > allowed + 1e-9:
                    continue
                weight[k] -= m.layer_weight_bytes(hi) - m.layer_weight_bytes(lo)
                bits[l] = lo
                spent += cost
        if any(w > c for w, c in zip(weight, caps)):
            return None
        return bits

    def _precisions(self, spans: list[tuple[int, int]], caps: list[float]) -> list[list[int]]:
        """The distinct per-layer bits of each mode (only ``fit`` for a lossless budget; only the fixed
        bits with ``weight_bits``, if they fit)."""
        m = self.model
        if self.weight_bits is not None:
            fixed = [self.weight_bits] * m.num_layers
            fits = all(
                (b - a) * m.layer_weight_bytes(self.weight_bits) <= c for (a, b), c in zip(spans, caps)
            )
            return [fixed] if fits else []
        out: list[list[int]] = []
        for mode in self.precisions if self.quality > 0 else ("fit",):
            bits = self._bits_for(spans, caps, mode)
            if bits is not None and bits not in out:
                out.append(bits)
        return out

    def _weight_cap(self, pool: Pool, tp: int, first: bool, last: bool, role: str, stages: int = 1) -> float:
        """Bytes of layer weights a stage of a ``stages``-stage chain may hold (``weight_room``)."""
        return weight_room(self.cm, pool.gpu, tp, first, last, role, stages, self.max_seqs, self.long_tokens)

    # ---- templates ---------------------------------------------------------------------------------
    def single_pool(self, pool: Pool) -> list[Template]:
        m = self.model
        out: list[Template] = []
        for tp in tp_choices(pool.gpus_per_node, m):
            groups = pool.total // tp
            found = 0
            for pp in range(1, min(MAX_STAGES, groups, m.num_layers) + 1):
                spans = split_even(m.num_layers, pp)
                made = self._variants(pool, tp, spans)
                out.extend(made)
                if made:
                    found += 1
                    if found == 2:
                        break
        return out

    def _variants(self, pool: Pool, tp: int, spans: list[tuple[int, int]]) -> list[Template]:
        out = []
        for role in ROLES:
            caps = [
                self._weight_cap(pool, tp, a == 0, b == self.model.num_layers, role, len(spans))
                for a, b in spans
            ]
            for bits in self._precisions(spans, caps):
                stages = [Stage(pool, tp, a, b, tuple(bits[a:b])) for a, b in spans]
                t = self.make(role, stages)
                if t is not None:
                    out.append(t)
        return out

    def hetero_chains(self, pools: list[Pool], max_len: int = 4) -> list[Template]:
        """Asymmetric chains over 2..max_len pools of one vendor (consecutive in speed order), and over all of
        a vendor's pools when there are more. Each set of pools is tried with three stage layouts:
        one whole-node TP group per pool (HexGen / Helix), every node of the pools a stage, and every GPU a
        stage (LLM-PQ); the last two group stages by zone so that a chain crosses each zone boundary once."""
        ranked = sorted(pools, key=lambda p: -p.gpu.memory_bw_gb_per_s * p.gpus_per_node)
        out = []
        by_vendor: dict[str, list[Pool]] = {}
        for p in ranked:
            by_vendor.setdefault(p.gpu.vendor, []).append(p)
        seen: set[tuple] = set()
        for vendor_pools in by_vendor.values():
            windows = [
                vendor_pools[start : start + length]
                for length in range(2, min(max_len, len(vendor_pools)) + 1)
                for start in range(0, len(vendor_pools) - length + 1)
            ]
            if len(vendor_pools) > max_len:
                windows.append(vendor_pools)
            for chosen in windows:
                if self._past_deadline():
                    return out
                for layout in self._stage_layouts(chosen, len(chosen) <= max_len):
                    key = tuple((p.key, t) for p, t in layout)
                    if key in seen:
                        continue
                    seen.add(key)
                    stage_pools = [p for p, _ in layout]
                    tps = [t for _, t in layout]
                    kind = (
                        "per-pool"
                        if [p.key for p in stage_pools] == [p.key for p in chosen]
                        else "every-server"
                    )
                    splits = []
                    for by in ("speed", "memory"):
                        spans = self._balanced_spans(stage_pools, tps, by)
                        if spans is not None and spans not in splits:
                            splits.append(spans)
                    for spans in splits:
                        for t in self._variants_multi(stage_pools, tps, spans):
                            t.layout = kind
                            out.append(t)
        return out

    def _max_tp(self, pool: Pool) -> int:
        return tp_choices(pool.gpus_per_node, self.model)[-1]

    def _stage_layouts(self, chosen: list[Pool], one_per_pool: bool) -> list[list[tuple[Pool, int]]]:
        """(pool, TP) per stage: one whole-node group per pool; every node a stage; every GPU a stage."""
        out = []
        if one_per_pool:
            out.append([(p, self._max_tp(p)) for p in chosen])
        zones: list[str] = []
        for p in chosen:
            if p.zone not in zones:
                zones.append(p.zone)
        grouped = sorted(chosen, key=lambda p: zones.index(p.zone))  # stable: speed order in a zone
        limit = min(MAX_CHAIN_STAGES, self.model.num_layers)
        if sum(len(p.nodes) for p in grouped) <= limit:  # (counted first: a big pool has many GPUs)
            every_node = [(p, self._max_tp(p)) for p in grouped for _ in p.nodes]
            if every_node not in out:
                out.append(every_node)
        if sum(p.total for p in grouped) <= limit:
            every_gpu = [(p, 1) for p in grouped for _ in range(p.total)]
            if every_gpu not in out:
                out.append(every_gpu)
        return out

    def _balanced_spans(
        self, pools: list[Pool], tps: list[int], by: str = "speed"
    ) -> list[tuple[int, int]] | None:
        """Layer counts in proportion to each stage's speed (``by="speed"``: balanced step times) or to its
        memory room (``by="memory"``: balanced KV room, so the chain's KV cache is not bounded by one
        crowded stage), capped by what its memory holds (4-bit at the most), rounded so every stage has
        at least one layer."""
        m = self.model
        L = m.num_layers
        room = [
            self._weight_cap(p, t, i == 0, i == len(pools) - 1, "mixed", len(pools))
            for i, (p, t) in enumerate(zip(pools, tps))
        ]
        speed = (
            [p.gpu.memory_bw_gb_per_s * t for p, t in zip(pools, tps)]
            if by == "speed"
            else [max(r, 0.0) for r in room]
        )
        cap_layers = [int(r // m.layer_weight_bytes(4)) for r in room]
        if sum(cap_layers) < L or min(cap_layers) < 1:
            return None
        share = [0.0] * len(pools)
        free = list(range(len(pools)))
        left = float(L)
        while free:
            total = sum(speed[i] for i in free)
            over = [i for i in free if left * speed[i] / total > cap_layers[i]]
            if not over:
                for i in free:
                    share[i] = left * speed[i] / total
                break
            for i in over:
                share[i] = cap_layers[i]
                left -= cap_layers[i]
                free.remove(i)
        counts = [max(1, int(round(s))) for s in share]
        while sum(counts) > L:
            i = max(range(len(counts)), key=lambda k: counts[k] - share[k])
            counts[i] -= 1
        while sum(counts) < L:
            i = max(range(len(counts)), key=lambda k: share[k] - counts[k])
            counts[i] += 1
        spans, start = [], 0
        for c in counts:
            spans.append((start, start + c))
            start += c
        return spans

    def _variants_multi(self, pools, tps, spans) -> list[Template]:
        out = []
        for role in ROLES:
            caps = [
                self._weight_cap(p, t, a == 0, b == self.model.num_layers, role, len(spans))
                for p, t, (a, b) in zip(pools, tps, spans)
            ]
            for bits in self._precisions(spans, caps):
                stages = [Stage(p, t, a, b, tuple(bits[a:b])) for p, t, (a, b) in zip(pools, tps, spans)]
                tpl = self.make(role, stages)
                if tpl is not None:
                    out.append(tpl)
        return out

    # ---- one template ---------------------------------------------------------------------------------
    def make(self, role: str, stages: list[Stage]) -> Template | None:
        """The template of ``stages`` in ``role`` (None when it does not fit or serves nothing). For an
        MoE model whose stages span several GPUs, expert parallelism is tried too and kept when it
        serves more within the SLOs (then ignoring them)."""
        plain = self._make(role, stages)
        if self.model.num_experts == 1 or all(s.tp == 1 for s in stages):
            return plain
        ep = self._make(role, [replace(s, ep=s.tp > 1) for s in stages])
        if ep is None or plain is None:
            return ep or plain
        better = (ep.cap.rate, ep.cap_free.rate) > (plain.cap.rate, plain.cap_free.rate)
        return ep if better else plain

    def _make(self, role: str, stages: list[Stage]) -> Template | None:
        clock.charge(clock.TEMPLATE_S)
        m, cm = self.model, self.cm
        max_batch, max_tokens, _ = role_settings(role, len(stages), self.max_seqs)
        shapes = [
            ServerShape(s.pool.gpu, s.tp, s.bits, first=s.start == 0, last=s.end == m.num_layers, ep=s.ep)
            for s in stages
        ]
        kv = math.inf
        for shape in shapes:
            mem = cm.memory(shape, max_tokens, max_batch)
            if not mem.fits:
                return None
            kv = min(kv, mem.kv_capacity_tokens)
        if kv < m.kv_slots(self.prompt + self.output):
            return None
        lanes = len(stages)  # micro-batches in flight: one per stage keeps every stage busy
        if self.lane_tokens is not None:  # ... unless a lane's share of the cache cannot hold a request
            lanes = min(lanes, int(kv // m.kv_slots(self.lane_tokens)))
            if lanes < 1:
                return None
        settings = role_settings(role, lanes, self.max_seqs)
        max_batch = settings[0]
        hops = []
        for a, b in zip(stages, stages[1:]):
            if a.pool is b.pool and a.tp + b.tp <= a.pool.gpus_per_node:
                link = self.cluster.nodes[a.pool.nodes[0]].intra_link
            else:
                na = a.pool.nodes[0]
                nb = (
                    b.pool.nodes[0]
                    if b.pool is not a.pool
                    else (b.pool.nodes[1] if len(b.pool.nodes) > 1 else b.pool.nodes[0])
                )
                link = self.cluster.link(na, nb)
            hops.append(link)
        act = m.hidden_size * 2.0
        ch = ChainTiming(
            [cm.timer(s) for s in shapes],
            [h.latency for h in hops],
            [act / h.bandwidth for h in hops],
            micro_batches=lanes,
        )
        kv_bytes = m.kv_bytes_per_token(2)
        if role == "prefill":
            net = self.cluster.spec.network.gbit_per_s * 1e9 / 8
            link_rate = net / (m.kv_slots(self.prompt) * kv_bytes)
            cap = prefill_capacity(ch, self.prompt, self.slo, max_tokens, link_rate, max_batch)
            free = prefill_capacity(ch, self.prompt, None, max_tokens, link_rate, max_batch)
        elif role == "decode":
            cap = decode_capacity(ch, self.prompt, self.output, self.slo, max_batch, kv, self.output_q)
            free = decode_capacity(ch, self.prompt, self.output, None, max_batch, kv)
        else:
            chunk = settings[2]
            cap = mixed_capacity(
                ch, self.prompt, self.output, self.slo, max_batch, max_tokens, kv, chunk, self.output_q
            )
            free = mixed_capacity(ch, self.prompt, self.output, None, max_batch, max_tokens, kv, chunk)
        if free.rate <= 0:
            return None
        gpus: dict[str, int] = {}
        for s in stages:
            gpus[s.pool.key] = gpus.get(s.pool.key, 0) + s.tp
        self._count += 1
        price = sum(s.pool.gpu.price_per_hour * s.tp for s in stages)
        idle = sum(s.pool.gpu.idle_watts * s.tp for s in stages)
        dyn = sum((s.pool.gpu.tdp_w - s.pool.gpu.idle_watts) * s.tp for s in stages) / len(stages)
        return Template(
            f"t{self._count}",
            role,
            stages,
            lanes,
            gpus,
            price,
            idle,
            dyn,
            int(kv),
            settings,
            cap,
            free,
            kv_bytes,
            any(b < 16 for s in stages for b in s.bits),
        )

    def _past_deadline(self) -> bool:
        """Whether the deadline has passed (then ``cut_short`` says that some templates were not made)."""
        if self.deadline is not None and clock.now() > self.deadline:
            self.cut_short = True
        return self.cut_short

    def all(self) -> list[Template]:
        """Every template: each pool's, then the cross-pool chains; with a deadline, those made by then."""
        pools = pools_of(self.cluster)
        out = []
        for pool in pools:
            if self._past_deadline():
                return out
            out.extend(self.single_pool(pool))
        out.extend(self.hetero_chains(pools))
        return out
