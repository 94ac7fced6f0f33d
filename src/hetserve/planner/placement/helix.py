"""``helix``: max-flow layer placement over the network, and per-hop weighted routing (Helix, ASPLOS 2025).

Helix sees the cluster as a flow network. Every machine (a node; its GPUs are one tensor-parallel
group) holds one contiguous range of layers; a request enters at a machine holding layer 0, moves to
a machine that starts where the previous one ended, and leaves at a machine holding the last layer.
The placement maximises the flow (requests/s) from source to sink, as one MILP (SciPy HiGHS). Helix
writes it per machine (a start layer, binaries for the layers held and for every edge); here identical
machines (same GPU, node size and zone) are one class, which is exact for them and removes the
symmetry branch-and-bound cannot prune:

- integers y[class, s, e]: how many machines of the class hold layers [s, e), at most the class's size,
  with e - s at most what fits in half of a GPU's memory at 16 bits (Helix's rule, the rest is KV cache)
  and at least ``MIN_SPAN_SHARE`` of that; flows g[class, s, e] <= y x the machine's throughput with
  e - s layers (from the roofline cost model: the largest decode batch its KV room holds, plus its share
  of prefill);
- flow conserved at every layer boundary per (zone, vendor), with crossing flows h between groups of one
  vendor; the crossings between two zones are bounded by their link's bandwidth over the activation bytes
  a request sends ((prompt + output) x hidden x 2 bytes), times the smaller zone's machine count;
- objective: the flow into layer L, with tiny costs on machines and on crossings between zones.

The flow is then decomposed into source -> sink paths: each path is a chain (an instance), and
requests are spread over the chains in proportion to their flows, which gives every machine the same
share of next hops as Helix's per-hop weighted routing. A machine on several chains is shared: each
chain gets a KV share in proportion to its flow there. Plain 16-bit weights; colocated instances.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy.optimize import Bounds, LinearConstraint, milp
from scipy.sparse import coo_array

from ...costmodel.roofline import ServerShape
from ...errors import HetserveError
from ...plan import PlanFile, RoutingPlan
from ..capacity import KV_HEADROOM
from ..pools import tp_choices
from ..strategy import PlanWriter, Spot, Strategy, StrategyContext, lanes_holding_long_requests, spot

#: Helix caps a machine's weights at half of its GPU memory (the rest is KV cache).
WEIGHT_SHARE = 0.5
MILP_GAP = 0.01
#: Branch-and-bound nodes the placement MILP may explore: a budget in work, so the placement (and every
#: figure made from it) is the same on any machine and under any load. The time limit left to the
#: strategy (80% of it) only guards a machine too slow to explore them; the notes say which one stopped it.
MILP_NODES = 100
#: Most (class, start, end) choices before starts and ends move to a coarser layer grid.
MAX_ARCS = 2500
#: A machine holds at least this share of the layers it could hold (long spans keep the MILP small and
#: its solutions made of few, long chains).
MIN_SPAN_SHARE = 0.5


@dataclass
class Machine:
    node: str
    gpus: tuple[int, ...]
    caps: list[float]  # caps[k-1]: requests/s when holding k layers
    kind: tuple  # (GPU, GPUs per node, zone): identical machines share it

    @property
    def kmax(self) -> int:
        return len(self.caps)


@dataclass
class HelixPlacement:
    """What the MILP chose (kept for inspection and tests)."""

    ranges: dict[str, tuple[int, int]]  # node -> [start, end)
    flows: dict[tuple[str, str], float]  # edge -> requests/s ("source"/"sink" at the ends)
    max_flow: float
    step: int = 1  # layer granularity of starts and ends
    gap: float | None = None  # MILP optimality gap where it stopped
    stopped_by: str = "gap"  # what ended the MILP: "gap" (optimal within MILP_GAP), "nodes" or "time"


class Helix(Strategy):
    name = "helix"
    summary = "max-flow layer placement (MILP, HiGHS) and per-hop weighted routing"

    def __init__(self):
        self.last: HelixPlacement | None = None

    def machines(self, ctx: StrategyContext) -> list[Machine]:
        m, cm = ctx.model, ctx.cost_model
        P, O = ctx.prompt, ctx.output
        max_batch, max_tokens, _ = ctx.settings("mixed")  # a machine's batch, within the engine's limit
        out = []
        by_kind: dict[tuple[str, int], list[float]] = {}  # identical nodes have identical capacities
        for node in ctx.cluster.nodes.values():
            tp = tp_choices(node.count, m)[-1]
            gpu = node.gpu
            kind = (gpu.name, node.count)
            if kind in by_kind:
                if by_kind[kind]:
                    out.append(
                        Machine(node.name, tuple(range(tp)), by_kind[kind], (gpu.name, node.count, node.zone))
                    )
                continue
            kmax = int(WEIGHT_SHARE * gpu.memory_gb * 1e9 * tp // m.layer_weight_bytes(16))
            caps = []
            for k in range(1, min(kmax, m.num_layers) + 1):
                shape = ServerShape(gpu, tp, (16,) * k, first=False, last=False)
                mem = cm.memory(shape, max_tokens, max_batch)
                if not mem.fits:
                    break
                B = min(float(max_batch), KV_HEADROOM * mem.kv_capacity_tokens / (P + O / 2 + 1))
                if B < 1:
                    break
                timer = cm.timer(shape)
                n = max(1, min(int(max_tokens // max(P, 1)), max_batch))
                pre = timer.time(n * P, n, n * P * (P + 1) / 2, n * P) / n
                kv = B * (P + O / 2 + 1)
                step = timer.time(B, B, kv, kv)
                caps.append(1.0 / (pre + O * step / B))
            by_kind[kind] = caps
            if caps:
                out.append(Machine(node.name, tuple(range(tp)), caps, (gpu.name, node.count, node.zone)))
        return out

    def plan(self, ctx: StrategyContext) -> PlanFile:
        m = ctx.model
        L = m.num_layers
        machines = self.machines(ctx)
        if sum(x.kmax for x in machines) < L:
            raise HetserveError(
                f"helix: the machines of {ctx.cluster.name} hold {sum(x.kmax for x in machines)} "
                f"layers of {m.name} within half of their memory, fewer than its {L}; add GPUs"
            )
        per_request = (ctx.prompt + ctx.output) * m.hidden_size * 2.0
        placement = self._solve(ctx, machines, per_request, max(0.1, ctx.time_left() * 0.8))
        self.last = placement
        if placement is None or placement.max_flow <= 0:
            raise HetserveError(
                f"helix: the placement MILP found no source-to-sink flow for {m.name} on "
                f"{ctx.cluster.name} within {ctx.time_limit:g} s"
            )
        gpus = {x.node: x.gpus for x in machines}
        paths = [
            ([spot(n, gpus[n], *placement.ranges[n]) for n in path], f)
            for path, f in decompose(placement.flows)
        ]
        stop = {"gap": "", "nodes": f" after its {MILP_NODES} nodes", "time": " at its time guard"}
        gap = "" if placement.gap is None else f", MILP gap {placement.gap:.0%}{stop[placement.stopped_by]}"
        used = {s.node for chain, _ in paths for s in chain}
        return write_chains(
            ctx,
            f"helix-{m.name}",
            paths,
            notes=f"Helix baseline: max flow {placement.max_flow:.3f} req/s over "
            f"{len(paths)} chains on {len(used)} machines (layer grid "
            f"{placement.step}{gap}).",
        )

    # ---- the MILP --------------------------------------------------------------------------------------
    def _solve(
        self, ctx, machines: list[Machine], per_request: float, time_limit: float
    ) -> HelixPlacement | None:
        """Max-flow placement. Identical machines (same GPU, node size and zone) are one class, so the
        MILP counts machines per (class, start, end) instead of labelling them (the labels are
        symmetric); flow is conserved per (zone, vendor) at every layer boundary, may cross between
        zones of one vendor, and crossings are bounded by the zones' links."""
        L = ctx.model.num_layers
        classes: dict[tuple, list[Machine]] = {}
        for x in machines:
            classes.setdefault(x.kind, []).append(x)
        kinds = sorted(classes)
        vendor = {k: ctx.vendor_of(classes[k][0].node) for k in kinds}
        group = {k: (k[2], vendor[k]) for k in kinds}
        groups = sorted(set(group.values()))
        zone_nodes: dict[str, int] = {}
        for k in kinds:
            zone_nodes[k[2]] = zone_nodes.get(k[2], 0) + len(classes[k])
        step = self._grid(L, [classes[k][0].kmax for k in kinds])
        cuts = sorted(set(range(0, L, step)) | {L})
        col: dict[tuple, int] = {}
        for t, kind in enumerate(kinds):
            kmax = classes[kind][0].kmax
            kmin = self._shortest(kmax)
            for s in cuts[:-1]:
                for e in cuts:
                    if s + kmin <= e <= s + kmax or (e == L and s < e <= s + kmax):
                        col[("y", t, s, e)] = len(col)
                        col[("g", t, s, e)] = len(col)
        crossings = [(a, b) for a in groups for b in groups if a != b and a[1] == b[1]]
        for r in cuts[1:-1]:
            for a, b in crossings:
                col[("h", r, a, b)] = len(col)
        nv = len(col)
        entries: dict[tuple[int, int], float] = {}
        lo, hi = [], []

        def add(terms, lb, ub):
            row = len(lo)
            for key, v in terms:
                entries[(row, col[key])] = entries.get((row, col[key]), 0.0) + v
            lo.append(lb), hi.append(ub)

        ys = [key for key in col if key[0] == "y"]
        for t, kind in enumerate(kinds):  # machines per class
            add([(key, 1) for key in ys if key[1] == t], 0, len(classes[kind]))
        for key in ys:  # a server's throughput
            _, t, s, e = key
            add([(("g", t, s, e), 1), (key, -classes[kinds[t]][0].caps[e - s - 1])], -np.inf, 0)
        ending: dict[tuple, list] = {}
        starting: dict[tuple, list] = {}
        for _, t, s, e in ys:
            ending.setdefault((e, group[kinds[t]]), []).append(("g", t, s, e))
            starting.setdefault((s, group[kinds[t]]), []).append(("g", t, s, e))
        for r in cuts[1:-1]:  # conservation per (zone, vendor)
            for gr in groups:
                terms = [(key, 1) for key in ending.get((r, gr), [])]
                terms += [(key, -1) for key in starting.get((r, gr), [])]
                terms += [(("h", r, gr, b), -1) for a, b in crossings if a == gr]
                terms += [(("h", r, a, gr), 1) for a, b in crossings if b == gr]
                if terms:
                    add(terms, 0, 0)
        zone_pairs: dict[tuple[str, str], list] = {}
        for a, b in crossings:
            if a[0] != b[0]:
                zone_pairs.setdefault((a[0], b[0]), []).append((a, b))
        for (za, zb), members in zone_pairs.items():  # links between zones
            na = next(classes[k][0].node for k in kinds if k[2] == za)
            nb = next(classes[k][0].node for k in kinds if k[2] == zb)
            link = ctx.cluster.link(na, nb)
            add(
                [(("h", r, a, b), 1) for r in cuts[1:-1] for a, b in members],
                0,
                link.bandwidth / per_request * min(zone_nodes[za], zone_nodes[zb]),
            )
        c = np.zeros(nv)
        for key in ys:
            _, t, s, e = key
            if e == L:
                c[col[("g", t, s, e)]] = -1.0
            c[col[key]] = 1e-6  # among equal flows, fewer machines
        for key, k in col.items():
            if key[0] == "h":
                c[k] = 1e-3  # and fewer crossings between zones
        integrality = np.zeros(nv)
        ub = np.full(nv, np.inf)
        for key in ys:
            integrality[col[key]] = 1
            ub[col[key]] = len(classes[kinds[key[1]]])
        ij = np.array(list(entries), dtype=int).reshape(-1, 2)
        a = coo_array((np.array(list(entries.values())), (ij[:, 0], ij[:, 1])), shape=(len(lo), nv)).tocsr()
        res = milp(
            c,
            constraints=LinearConstraint(a, lo, hi),
            integrality=integrality,
            bounds=Bounds(np.zeros(nv), ub),
            options={
                "time_limit": time_limit,
                "node_limit": MILP_NODES,
                "disp": False,
                "mip_rel_gap": MILP_GAP,
            },
        )
        # 0: optimal within the gap, 1: the time guard, 4: the node budget (HiGHS status 16); each with
        # the best placement found so far
        if res.x is None or res.status not in (0, 1, 4):
            return None
        x = res.x
        # label machines: each (class, start, end) takes that many machines of its class
        ranges: dict[str, tuple[int, int]] = {}
        server_flow: dict[str, float] = {}
        for t, kind in enumerate(kinds):
            free = list(classes[kind])
            for key in sorted(k for k in ys if k[1] == t):
                n = round(x[col[key]])
                _, _, s, e = key
                g = x[col[("g", t, s, e)]]
                for _ in range(n):
                    mach = free.pop(0)
                    ranges[mach.node] = (s, e)
                    server_flow[mach.node] = g / n
        flows = self._edges(ctx, ranges, server_flow, L)
        gap = getattr(res, "mip_gap", None)
        return HelixPlacement(
            ranges,
            flows,
            float(sum(f for (a, b), f in flows.items() if b == "sink")),
            step,
            None if gap is None else float(gap),
            {0: "gap", 1: "time", 4: "nodes"}[res.status],
        )

    @staticmethod
    def _shortest(kmax: int) -> int:
        """Shortest span a machine is offered: at least MIN_SPAN_SHARE of what it holds at most."""
        return max(1, math.ceil(kmax * MIN_SPAN_SHARE))

    def _grid(self, L: int, kmax: list[int]) -> int:
        """Layer granularity of starts and ends: 1 unless that makes the MILP too large."""
        step = 1
        while True:
            cuts = sorted(set(range(0, L, step)) | {L})
            arcs = sum(
                sum(
                    1
                    for s in cuts[:-1]
                    for e in cuts
                    if s + self._shortest(k) <= e <= s + k or (e == L and s < e <= s + k)
                )
                for k in kmax
            )
            if arcs <= MAX_ARCS or step >= L:
                return step
            step += 1

    @staticmethod
    def _edges(ctx, ranges, server_flow, L) -> dict[tuple[str, str], float]:
        """Machine-to-machine flows: at every layer boundary, the flow of the servers ending there goes to
        the servers starting there, same zone first (largest first), then across zones."""
        flows: dict[tuple[str, str], float] = {}
        zone = lambda n: ctx.cluster.nodes[n].zone
        for n, (s, e) in ranges.items():
            if s == 0 and server_flow[n] > 1e-9:
                flows[("source", n)] = server_flow[n]
            if e == L and server_flow[n] > 1e-9:
                flows[(n, "sink")] = server_flow[n]
        for r in range(1, L):
            ins = {n: server_flow[n] for n, (s, e) in ranges.items() if e == r and server_flow[n] > 1e-9}
            outs = {n: server_flow[n] for n, (s, e) in ranges.items() if s == r and server_flow[n] > 1e-9}
            for same in (True, False):
                for a in sorted(ins, key=lambda n: -ins[n]):
                    for b in sorted(outs, key=lambda n: -outs[n]):
                        if (zone(a) == zone(b)) != same or ins[a] <= 1e-9 or outs[b] <= 1e-9:
                            continue
                        f = min(ins[a], outs[b])
                        flows[(a, b)] = flows.get((a, b), 0.0) + f
                        ins[a] -= f
                        outs[b] -= f
        return flows


def write_chains(
    ctx: StrategyContext, name: str, paths: list[tuple[list[Spot], float]], notes: str
) -> PlanFile:
    """The plan of Helix-style chains: each (servers, flow) path an instance, requests weighted by the
    flows (every machine then sends each next hop its share of the flow, as Helix's per-hop weighted
    routing), a machine on several chains giving each a KV share in proportion to its flow there, and
    each chain as many lanes as leave room for a long request (``lanes_holding_long_requests``)."""
    through: dict[Spot, float] = {}
    for chain, f in paths:
        for s in chain:
            through[s] = through.get(s, 0.0) + f
    writer = PlanWriter(ctx, name)
    weights = {}
    for i, (chain, f) in enumerate(paths):
        shares = [f / through[s] for s in chain]
        lanes = lanes_holding_long_requests(ctx, chain, shares)
        inst = writer.instance(f"chain-{i}", "mixed", chain, micro_batches=lanes, kv_share=shares)
        weights[inst] = round(f, 6)
    return writer.plan(RoutingPlan(policy="weighted", weights=weights), notes=notes)


def decompose(flows: dict[tuple[str, str], float], tol: float = 1e-7) -> list[tuple[list[str], float]]:
    """Split a source -> sink flow into paths with their flows: follow the largest remaining flow out of
    every machine, take the path's bottleneck, subtract it, repeat (layers only increase along an edge,
    so there are no cycles)."""
    rest = {e: f for e, f in flows.items() if f > tol}
    paths = []
    while True:
        hops, node = ["source"], "source"
        while node != "sink":
            out = [(f, b) for (a, b), f in rest.items() if a == node and f > tol]
            if not out:
                break
            node = max(out)[1]
            hops.append(node)
        if node != "sink":
            return paths
        width = min(rest[(a, b)] for a, b in zip(hops, hops[1:]))
        for a, b in zip(hops, hops[1:]):
            rest[(a, b)] -= width
        paths.append((hops[1:-1], width))
