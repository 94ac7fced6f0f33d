"""Turn an allocation into a concrete plan: place TP groups on nodes, name servers and instances,
and route requests and KV hand-offs by the flows (a transport LP for prefill -> decode)."""

from __future__ import annotations

import heapq

import numpy as np
from scipy import sparse
from scipy.optimize import linprog

from .. import clock
from ..errors import OutOfTime
from ..plan import InstancePlan, PlanFile, RoutingPlan, ServerPlan
from ..specs.clusters import Cluster
from ..specs.models import ModelSpec
from .allocate import Allocation
from .pools import Pool
from .templates import Template


class PlacementError(Exception):
    """The allocation's TP groups do not pack into the pools' nodes."""


#: Most (prefill, decode) instance pairs the hand-off LP weighs; a larger plan hands KV to the least-loaded
#: decode instance instead (the LP's size grows with the product).
MAX_HANDOFF_PAIRS = 40_000


def place(
    cluster: Cluster, templates: list[Template], alloc: Allocation
) -> list[tuple[Template, list[tuple[str, list[int]]]]]:
    """For every instance of the allocation, (template, [(node, gpu indices) per stage]).

    Largest TP groups first, each into the node of its pool with the fewest free GPUs that still fit
    it (best fit; ties to the first name), so big groups are not blocked by fragments.
    """
    free = _FreeGPUs(cluster)
    wanted = []
    for j, n in sorted(alloc.counts.items()):
        for _ in range(n):
            wanted.append(templates[j])
    wanted.sort(key=lambda t: (-max(s.tp for s in t.stages), -len(t.stages), t.name))
    out = []
    for t in wanted:
        used_nodes: set[str] = set()
        spots = []
        for s in t.stages:
            # The previous stage's node first (the hop stays inside the node), then a node the chain has
            # not used (a chain that leaves a node does not come back to it); only when neither has room,
            # any node of the pool.
            prev = spots[-1][0] if spots else None
            node = prev if prev is not None and free.fits(prev, s.pool, s.tp) else None
            if node is None:
                node = free.best_fit(s.pool, s.tp, used_nodes)
            if node is None:
                node = free.best_fit(s.pool, s.tp, set())
            if node is None:
                raise PlacementError(f"no node of {s.pool.key} has {s.tp} free GPUs")
            used_nodes.add(node)
            spots.append((node, free.take(node, s.tp)))
        out.append((t, spots))
    return out


class _FreeGPUs:
    """The free GPU indices of every node and, per pool, its nodes by free count (a heap of names per
    count, stale entries dropped when met), so a best fit costs a logarithm of the pool's size."""

    def __init__(self, cluster: Cluster):
        self.free: dict[str, list[int]] = {n: list(range(node.count)) for n, node in cluster.nodes.items()}
        self.pool_of: dict[str, str] = {}
        self.heaps: dict[tuple[str, int], list[str]] = {}
        self.most: dict[str, int] = {}

    def _index(self, pool: Pool) -> None:
        if pool.key in self.most:
            return
        self.most[pool.key] = max((len(self.free[n]) for n in pool.nodes), default=0)
        for n in pool.nodes:
            self.pool_of[n] = pool.key
            heapq.heappush(self.heaps.setdefault((pool.key, len(self.free[n])), []), n)

    def best_fit(self, pool: Pool, tp: int, avoid: set[str]) -> str | None:
        self._index(pool)
        for count in range(tp, self.most[pool.key] + 1):
            heap = self.heaps.get((pool.key, count))
            skipped, found = [], None
            while heap:
                name = heap[0]
                if len(self.free[name]) != count:  # moved to another count since
                    heapq.heappop(heap)
                elif name in avoid:
                    skipped.append(heapq.heappop(heap))
                else:
                    found = name
                    break
            for name in skipped:
                heapq.heappush(heap, name)
            if found is not None:
                return found
        return None

    def fits(self, node: str, pool: Pool, tp: int) -> bool:
        """Whether ``node`` belongs to ``pool`` and has ``tp`` free GPUs."""
        self._index(pool)
        return self.pool_of.get(node) == pool.key and len(self.free[node]) >= tp

    def take(self, node: str, tp: int) -> list[int]:
        gpus = self.free[node][:tp]
        del self.free[node][:tp]
        heapq.heappush(self.heaps.setdefault((self.pool_of[node], len(self.free[node])), []), node)
        return gpus


def handoff_weights(
    cluster: Cluster,
    model: ModelSpec,
    prompt: float,
    prefill: list[tuple[str, str, float]],
    decode: list[tuple[str, str, float]],
    time_limit: float | None = None,
) -> dict[str, dict[str, float]]:
    """Split each prefill instance's flow over decode instances: a transport LP minimising KV transfer
    time, within decode capacities and link bandwidth (a bound on each pair's flow). Items are (instance,
    node, requests/s). Empty (least-loaded hand-off) without both roles, beyond ``MAX_HANDOFF_PAIRS`` or
    when the LP finds no solution within ``time_limit`` seconds."""
    if not prefill or not decode or len(prefill) * len(decode) > MAX_HANDOFF_PAIRS:
        return {}
    kv = model.kv_slots(prompt) * model.kv_bytes_per_token(2)
    P, D = len(prefill), len(decode)
    cost = np.zeros(P * D)
    upper = np.zeros(P * D)
    for i, (_, pn, _) in enumerate(prefill):
        for k, (_, dn, _) in enumerate(decode):
            link = cluster.link(pn, dn)
            cost[i * D + k] = link.transfer_time(kv)
            upper[i * D + k] = link.bandwidth * 0.9 / kv
    pairs = np.arange(P * D)
    a_eq = sparse.csr_matrix((np.ones(P * D), (pairs // D, pairs)), shape=(P, P * D))
    a_ub = sparse.csr_matrix((np.ones(P * D), (pairs % D, pairs)), shape=(D, P * D))
    b_eq = np.array([f for _, _, f in prefill])
    total_p = b_eq.sum()
    dcap = np.array([f for _, _, f in decode])
    scale = total_p / dcap.sum() if dcap.sum() > 0 else 1.0
    b_ub = dcap * max(scale, 1.0) * 1.0001
    res = linprog(
        cost,
        A_ub=a_ub,
        b_ub=b_ub,
        A_eq=a_eq,
        b_eq=b_eq,
        bounds=np.column_stack([np.zeros(P * D), upper]),
        method="highs",
        options=clock.lp_limits(time_limit),
    )
    clock.charge_solve(iterations=getattr(res, "nit", 0) or 0)
    if res.status != 0:
        return {}
    x = res.x.reshape(P, D)
    out = {}
    for i, (pname, _, f) in enumerate(prefill):
        if f <= 0:
            continue
        out[pname] = {
            decode[k][0]: round(float(x[i, k] / f), 4) for k in range(D) if x[i, k] > 1e-9 * max(f, 1)
        }
    return out


def instance_prefix(t: Template) -> str:
    """What an instance of ``t`` is called before its number: role, GPU types, pipeline depth and TP, or
    EP for expert parallelism (``prefill-h100-sxm-pp3-tp2``, ``mixed-a100-80gb+l4-pp2-tp4/2`` for an
    asymmetric chain, ``mixed-h200-ep8``)."""
    gpus = list(dict.fromkeys(s.pool.gpu.name for s in t.stages))
    tps = list(dict.fromkeys(s.tp for s in t.stages))
    depth = f"pp{len(t.stages)}-" if len(t.stages) > 1 else ""
    split = "ep" if any(s.ep for s in t.stages) else "tp"
    return f"{t.role}-{'+'.join(gpus)}-{depth}{split}{'/'.join(map(str, tps))}"


def build_plan(
    cluster: Cluster,
    cluster_ref: str,
    model: ModelSpec,
    templates: list[Template],
    alloc: Allocation,
    prompt: float,
    name: str,
    routing_policy: str,
    model_ref: str | None = None,
    *,
    weighted_handoff: bool = True,
    layerwise_kv: bool = True,
    notes: str = "",
    deadline: float | None = None,
) -> PlanFile:
    """The plan of ``alloc`` (``model_ref``: what its ``model:`` says; default the model's name). KV caches
    go from prefill to decode instances by the flows' weights where the allocation has both
    (``weighted_handoff`` False: to the least-loaded decode instance), streamed layer by layer behind the
    prefill unless ``layerwise_kv`` is False (staged after it). Past ``deadline`` (a ``clock.now()``
    value), ``OutOfTime`` is raised; it also bounds the hand-off LP's time."""
    placed = place(cluster, templates, alloc)
    servers, instances = [], []
    per_prefix: dict[str, int] = {}
    flows_by_instance: dict[str, float] = {}
    count_by_template = {id(templates[j]): n for j, n in alloc.counts.items()}
    flow_by_template = {id(templates[j]): alloc.flows.get(j, 0.0) for j in alloc.counts}
    pre_nodes, dec_nodes = [], []
    for n, (t, spots) in enumerate(placed):
        clock.charge(clock.BUILD_INSTANCE_S)
        if deadline is not None and n % 256 == 255 and clock.now() > deadline:
            raise OutOfTime(f"building a plan of {len(placed)} instances")
        prefix = instance_prefix(t)
        k = per_prefix.get(prefix, 0)
        per_prefix[prefix] = k + 1
        base = f"{prefix}-{k}"
        chain = []
        for si, (s, (node, gpus)) in enumerate(zip(t.stages, spots)):
            sname = f"{base}-s{si}" if len(t.stages) > 1 else base
            bits = list(s.bits) if len(set(s.bits)) > 1 else s.bits[0]
            servers.append(
                ServerPlan(
                    name=sname,
                    node=node,
                    gpus=list(gpus),
                    layers=(s.start, s.end),
                    bits=bits,
                    expert_parallel=s.ep,
                )
            )
            chain.append(sname)
        max_batch, max_tokens, chunk = t.settings
        instances.append(
            InstancePlan(
                name=base,
                role=t.role,
                chain=chain,
                max_batch_size=max_batch,
                max_batch_tokens=max_tokens,
                chunk_size=chunk,
                micro_batches=t.micro_batches,
            )
        )
        share = flow_by_template[id(t)] / count_by_template[id(t)]
        flows_by_instance[base] = share
        if t.role == "prefill":
            pre_nodes.append((base, spots[-1][0], share))
        elif t.role == "decode":
            dec_nodes.append((base, spots[0][0], share))
    if deadline is not None and clock.now() > deadline:
        raise OutOfTime(f"building a plan of {len(placed)} instances")
    entry = {i.name: round(flows_by_instance[i.name], 6) for i in instances if i.role != "decode"}
    left = None if deadline is None else deadline - clock.now()
    hw = handoff_weights(cluster, model, prompt, pre_nodes, dec_nodes, left) if weighted_handoff else {}
    routing = RoutingPlan(
        policy=routing_policy,
        layerwise_kv=layerwise_kv,
        weights=entry if routing_policy == "weighted" else {},
        handoff="weighted" if hw else "least-work",
        handoff_weights=hw,
    )
    return PlanFile(
        name=name,
        model=model_ref or model.name,
        cluster=cluster_ref,
        servers=servers,
        instances=instances,
        routing=routing,
        notes=notes,
    )
