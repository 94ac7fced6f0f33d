"""Turn an allocation into a concrete plan: place TP groups on nodes, name servers and instances,
and route requests and KV hand-offs by the flows (a transport LP for prefill -> decode)."""

from __future__ import annotations

import numpy as np
from scipy.optimize import linprog

from ..plan import InstancePlan, PlanFile, RoutingPlan, ServerPlan
from ..specs.clusters import Cluster
from ..specs.models import ModelSpec
from .allocate import Allocation
from .pools import Pool
from .templates import Template


class PlacementError(Exception):
    """The allocation's TP groups do not pack into the pools' nodes."""


def place(
    cluster: Cluster, templates: list[Template], alloc: Allocation
) -> list[tuple[Template, list[tuple[str, list[int]]]]]:
    """For every instance of the allocation, (template, [(node, gpu indices) per stage]).

    Largest TP groups first, each into the node of its pool with the fewest free GPUs that still fit
    it (best fit), so big groups are not blocked by fragments.
    """
    free: dict[str, list[int]] = {n: list(range(node.count)) for n, node in cluster.nodes.items()}
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
            node = _best_fit(s.pool, s.tp, free, used_nodes if len(t.stages) > 1 else set())
            if node is None:
                node = _best_fit(s.pool, s.tp, free, set())
            if node is None:
                raise PlacementError(f"no node of {s.pool.key} has {s.tp} free GPUs")
            gpus = free[node][: s.tp]
            del free[node][: s.tp]
            used_nodes.add(node)
            spots.append((node, gpus))
        out.append((t, spots))
    return out


def _best_fit(pool: Pool, tp: int, free: dict[str, list[int]], avoid: set[str]) -> str | None:
    fits = [n for n in pool.nodes if len(free[n]) >= tp and n not in avoid]
    return min(fits, key=lambda n: (len(free[n]), n)) if fits else None


def handoff_weights(
    cluster: Cluster,
    model: ModelSpec,
    prompt: float,
    prefill: list[tuple[str, str, float]],
    decode: list[tuple[str, str, float]],
) -> dict[str, dict[str, float]]:
    """Split each prefill instance's flow over decode instances: a transport LP minimising KV transfer
    time, within decode capacities and link bandwidth. Items are (instance, node, requests/s)."""
    if not prefill or not decode:
        return {}
    kv = prompt * model.kv_bytes_per_token(2)
    P, D = len(prefill), len(decode)
    cost = np.zeros(P * D)
    link_rows, link_caps = [], []
    for i, (_, pn, _) in enumerate(prefill):
        for k, (_, dn, _) in enumerate(decode):
            link = cluster.link(pn, dn)
            cost[i * D + k] = link.transfer_time(kv)
            row = np.zeros(P * D)
            row[i * D + k] = kv
            link_rows.append(row)
            link_caps.append(link.bandwidth * 0.9)
    a_eq = np.zeros((P, P * D))
    b_eq = np.array([f for _, _, f in prefill])
    for i in range(P):
        a_eq[i, i * D : (i + 1) * D] = 1
    a_ub = np.zeros((D, P * D))
    total_p = b_eq.sum()
    dcap = np.array([f for _, _, f in decode])
    scale = total_p / dcap.sum() if dcap.sum() > 0 else 1.0
    for k in range(D):
        a_ub[k, k::D] = 1
    b_ub = dcap * max(scale, 1.0) * 1.0001
    res = linprog(
        cost,
        A_ub=np.vstack([a_ub, np.array(link_rows)]),
        b_ub=np.concatenate([b_ub, link_caps]),
        A_eq=a_eq,
        b_eq=b_eq,
        bounds=(0, None),
        method="highs",
    )
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
) -> PlanFile:
    """The plan of ``alloc`` (``model_ref``: what its ``model:`` says; default the model's name). KV caches
    go from prefill to decode instances by the flows' weights where the allocation has both
    (``weighted_handoff`` False: to the least-loaded decode instance), streamed layer by layer behind the
    prefill unless ``layerwise_kv`` is False (staged after it)."""
    placed = place(cluster, templates, alloc)
    servers, instances = [], []
    per_template: dict[int, int] = {}
    flows_by_instance: dict[str, float] = {}
    count_by_template = {id(templates[j]): n for j, n in alloc.counts.items()}
    flow_by_template = {id(templates[j]): alloc.flows.get(j, 0.0) for j in alloc.counts}
    pre_nodes, dec_nodes = [], []
    for t, spots in placed:
        k = per_template.get(id(t), 0)
        per_template[id(t)] = k + 1
        base = (
            f"{t.role}-{t.stages[0].pool.gpu.name}-{'pp' + str(len(t.stages)) + '-' if len(t.stages) > 1 else ''}"
            f"tp{t.stages[0].tp}-{t.name}-{k}"
        )
        chain = []
        for si, (s, (node, gpus)) in enumerate(zip(t.stages, spots)):
            sname = f"{base}-s{si}" if len(t.stages) > 1 else base
            bits = list(s.bits) if len(set(s.bits)) > 1 else s.bits[0]
            servers.append(
                ServerPlan(name=sname, node=node, gpus=list(gpus), layers=(s.start, s.end), bits=bits)
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
    entry = {i.name: round(flows_by_instance[i.name], 6) for i in instances if i.role != "decode"}
    hw = handoff_weights(cluster, model, prompt, pre_nodes, dec_nodes) if weighted_handoff else {}
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
