"""What each engine can express and the gaps between a plan and it: ``instance_gaps``/``plan_gaps`` list
what an engine cannot run (``EngineCaps``), ``refuse`` turns them into one error, and ``nearest``
rewrites the asks into the closest expressible form, saying per instance what changed."""

from __future__ import annotations

from dataclasses import dataclass, replace

from ..errors import HetserveError
from ..plan import Deployment
from ..specs.gpus import GPUSpec
from .common import GPU_RESOURCE, Gap, InstanceAsk, Stage, memory_fractions


@dataclass(frozen=True)
class EngineCaps:
    """What one engine can express of a plan instance."""

    name: str
    #: every node of a multi-node instance holds the same number of stages (SGLang: pp_size/nnodes)
    even_stages_per_node: bool
    #: the engine's spelling of an FP8 KV cache
    fp8_kv: str


# ---- gaps -----------------------------------------------------------------------------------------------
def fp8_weights_ok(gpu: GPUSpec) -> bool:
    """FP8 weights load on Hopper/Ada (native) and Ampere (weight-only kernels), MI300-class on AMD."""
    return "fp8" in gpu.weight_dtypes or (gpu.vendor == "nvidia" and "bf16" in gpu.weight_dtypes)


def _node_runs(ask: InstanceAsk) -> list[str]:
    runs: list[str] = []
    for s in ask.stages:
        if not runs or runs[-1] != s.node:
            runs.append(s.node)
    return runs


def instance_gaps(ask: InstanceAsk, caps: EngineCaps, checkpoint: bool = False) -> list[Gap]:
    """What ``caps`` cannot express of one instance on its own."""
    gaps = []
    g = ask.name
    vendors = sorted({s.gpu.vendor for s in ask.stages} - set(GPU_RESOURCE))
    if vendors:
        gaps.append(
            Gap(g, "unsupported GPU vendor", f"{', '.join(vendors)}: the exports address NVIDIA and AMD GPUs")
        )
    if ask.tp is None:
        tps = "/".join(str(s.tp) for s in ask.stages)
        gaps.append(
            Gap(g, "asymmetric TP between stages", f"TP {tps}; {caps.name} runs one TP degree for all stages")
        )
    every_bits = sorted({b for s in ask.stages for b in s.bits}, reverse=True)
    if len(every_bits) > 1:
        gaps.append(
            Gap(
                g,
                "per-layer mixed bits",
                f"{'/'.join(map(str, every_bits))}-bit layers; {caps.name} loads one weight format",
            )
        )
    elif every_bits[0] < 8 and not checkpoint:
        gaps.append(
            Gap(
                g,
                f"{every_bits[0]}-bit weights without a pre-quantised checkpoint",
                "pass --checkpoint with an AWQ/GPTQ checkpoint of the model",
            )
        )
    elif every_bits[0] == 8:
        old = sorted({s.gpu.name for s in ask.stages if not fp8_weights_ok(s.gpu)})
        if old:
            gaps.append(Gap(g, "8-bit weights on GPUs without FP8 kernels", ", ".join(old)))
    if ask.expert_parallel is None:
        on = ", ".join(s.server for s in ask.stages if s.expert_parallel)
        gaps.append(
            Gap(
                g,
                "expert parallelism on some stages only",
                f"{on}; {caps.name} sets it for the whole instance",
            )
        )
    if ask.kv_dtype is None:
        kinds = "/".join(s.kv_dtype for s in ask.stages)
        gaps.append(
            Gap(g, "KV dtype differs between stages", f"{kinds}; {caps.name} keeps one KV cache dtype")
        )
    elif ask.kv_dtype == "int8":
        gaps.append(Gap(g, "int8 KV cache", f"{caps.name} stores KV in 16-bit, fp32 or fp8"))
    runs = _node_runs(ask)
    if len(runs) != len(set(runs)):
        gaps.append(
            Gap(
                g,
                "pipeline returns to a node it left",
                " -> ".join(runs) + "; the engine places a node's stages together",
            )
        )
    elif caps.even_stages_per_node and ask.multi_node:
        counts = [len(ask.stages_on(n)) for n in ask.nodes]
        if len(set(counts)) > 1:
            per = ", ".join(f"{n}: {c}" for n, c in zip(ask.nodes, counts))
            gaps.append(
                Gap(
                    g, "uneven stages per node", f"{per}; {caps.name} puts pp_size/nnodes stages on each node"
                )
            )
    return gaps


def plan_gaps(asks: list[InstanceAsk], caps: EngineCaps, checkpoint: bool = False) -> list[Gap]:
    """Every gap of the plan: per instance, then between instances (shared servers, P/D hand-offs)."""
    gaps: list[Gap] = []
    users: dict[str, list[str]] = {}
    for a in asks:
        for s in a.stages:
            users.setdefault(s.server, []).append(a.name)
    for a in asks:
        shared = [s.server for s in a.stages if len(users[s.server]) > 1]
        if shared:
            others = sorted({u for s in shared for u in users[s] if u != a.name})
            gaps.append(
                Gap(
                    a.name,
                    "servers shared by several instances",
                    f"{', '.join(shared)} also serve {', '.join(others)}",
                )
            )
        gaps.extend(instance_gaps(a, caps, checkpoint))
    prefills = [a for a in asks if a.role == "prefill"]
    for d in (a for a in asks if a.role == "decode"):
        first = d.stages[0]
        for p in prefills:
            last = p.stages[-1]
            if last.gpu.vendor != first.gpu.vendor:
                gaps.append(
                    Gap(
                        d.name,
                        "cross-vendor P/D",
                        f"KV from {last.gpu.vendor} prefill '{p.name}' to {first.gpu.vendor}",
                    )
                )
                continue
            if last.kv_layout != first.kv_layout:
                gaps.append(
                    Gap(
                        d.name,
                        "KV layout conversion between head-major and token-major",
                        f"prefill '{p.name}' is {last.kv_layout}, this decode instance {first.kv_layout}",
                    )
                )
            if p.kv_dtype and d.kv_dtype and p.kv_dtype != d.kv_dtype:
                gaps.append(
                    Gap(
                        d.name,
                        "KV dtype conversion in the P/D hand-off",
                        f"{p.kv_dtype} from '{p.name}' to {d.kv_dtype}",
                    )
                )
            if p.block_size != d.block_size:
                gaps.append(
                    Gap(
                        d.name,
                        "KV block size conversion in the P/D hand-off",
                        f"blocks of {p.block_size} from '{p.name}', {d.block_size} here",
                    )
                )
    return gaps


def refuse(gaps: list[Gap], target: str) -> HetserveError:
    first = gaps[0]
    more = f" (and {len(gaps) - 1} more; see --nearest)" if len(gaps) > 1 else ""
    return HetserveError(
        f"{target} cannot express {first.line()}{more}; pass --nearest to export the closest expressible plan"
    )


# ---- the nearest expressible plan ---------------------------------------------------------------------
def _nearest_bits(stages: list[Stage], checkpoint: bool) -> int:
    every = {b for s in stages for b in s.bits}
    if every == {16}:
        return 16
    if len(every) == 1 and (every != {8} or all(fp8_weights_ok(s.gpu) for s in stages)):
        b = every.pop()
        if b >= 8 or checkpoint:
            return b
    return 8 if all(fp8_weights_ok(s.gpu) for s in stages) else 16


def nearest(
    dep: Deployment, asks: list[InstanceAsk], caps: EngineCaps, checkpoint: bool = False
) -> list[InstanceAsk]:
    """The closest expressible asks; each changed instance lists its changes in ``changes``.

    Raises HetserveError when a gap has no nearest form (an unsupported vendor).
    """
    out: list[InstanceAsk] = []
    taken: dict[str, str] = {}
    dropped: list[str] = []
    for a in asks:
        clash = [s.server for s in a.stages if s.server in taken]
        if clash:
            dropped.append(a.name)
            owner = taken[clash[0]]
            note = f"dropped: its server {clash[0]} is given to instance '{owner}' alone"
            for kept in out:
                if kept.name == owner:
                    kept.changes.append(f"instance '{a.name}' {note}")
            continue
        for s in a.stages:
            taken[s.server] = a.name
        b = replace(a, stages=list(a.stages), changes=list(a.changes), warnings=[])
        for gap in instance_gaps(b, caps, checkpoint):
            if gap.feature == "unsupported GPU vendor":
                raise HetserveError(f"--nearest: no expressible form of {gap.line()}")
        _fix_instance(b, caps, checkpoint)
        out.append(b)
    if dropped and not out:
        raise HetserveError("--nearest: every instance shares a server")
    _fix_pd(out)
    for b in out:
        b.memory_utilisation, b.memory_static = memory_fractions(dep, b)
    return out


def _fix_instance(b: InstanceAsk, caps: EngineCaps, checkpoint: bool) -> None:
    if b.tp is None:
        tp = min(s.tp for s in b.stages)
        before = "/".join(str(s.tp) for s in b.stages)
        b.stages = [replace(s, gpus=s.gpus[:tp]) for s in b.stages]
        b.changes.append(f"TP {before} -> {tp} for every stage (each stage keeps its first {tp} GPU(s))")
    bits = _nearest_bits(b.stages, checkpoint)
    if any(set(s.bits) != {bits} for s in b.stages):
        before = sorted({x for s in b.stages for x in s.bits}, reverse=True)
        b.stages = [replace(s, bits=(bits,) * s.num_layers) for s in b.stages]
        b.changes.append(f"weights {'/'.join(map(str, before))}-bit -> uniform {bits}-bit")
    if b.expert_parallel is None:
        b.stages = [replace(s, expert_parallel=False) for s in b.stages]
        b.changes.append("expert parallelism off on every stage (the plan had it on some)")
    kv = b.kv_dtype
    if kv is None or kv == "int8":
        new = b.stages[0].kv_dtype if kv is None else "fp16"
        if new == "int8":
            new = "fp16"
        b.stages = [replace(s, kv_dtype=new) for s in b.stages]
        b.changes.append(f"KV cache {kv or 'mixed dtypes'} -> {new}")
    runs = _node_runs(b)
    if len(runs) != len(set(runs)):
        order = [s for n in b.nodes for s in b.stages if s.node == n]
        regrouped = []
        for slot, s in zip(b.stages, order):
            regrouped.append(replace(s, layers=slot.layers, bits=(s.bits[0],) * slot.num_layers))
        moved = [
            f"{slot.layers[0]}..{slot.layers[1] - 1} on {s.server} ({s.node})"
            for slot, s in zip(b.stages, order)
        ]
        b.stages = regrouped
        b.changes.append("stages regrouped by node (layers " + ", ".join(moved) + ")")
    if caps.even_stages_per_node and b.multi_node and len({len(b.stages_on(n)) for n in b.nodes}) > 1:
        merged = []
        for n in b.nodes:
            group = b.stages_on(n)
            first, last = group[0], group[-1]
            merged.append(
                replace(
                    first,
                    server="+".join(s.server for s in group),
                    layers=(first.layers[0], last.layers[1]),
                    bits=(first.bits[0],) * (last.layers[1] - first.layers[0]),
                )
            )
            if len(group) > 1:
                b.changes.append(
                    f"stages {', '.join(s.server for s in group)} on {n} merged into one stage of "
                    f"{last.layers[1] - first.layers[0]} layers on GPU(s) {list(first.gpus)}"
                )
        b.stages = merged


def _fix_pd(out: list[InstanceAsk]) -> None:
    prefills = [a for a in out if a.role == "prefill"]
    decodes = [a for a in out if a.role == "decode"]
    if not prefills or not decodes:
        for a in prefills + decodes:
            a.changes.append(
                f"role {a.role} -> mixed (no {'decode' if a.role == 'prefill' else 'prefill'} instance left)"
            )
            a.role = "mixed"
        return
    vendors = {a.stages[-1].gpu.vendor for a in prefills} | {a.stages[0].gpu.vendor for a in decodes}
    if len(vendors) > 1:
        for a in prefills + decodes:
            a.changes.append(f"role {a.role} -> mixed (KV cannot cross vendors)")
            a.role = "mixed"
        return
    p = prefills[0]
    last = p.stages[-1]
    for d in decodes:
        if any(s.kv_layout != last.kv_layout for s in d.stages):
            d.stages = [replace(s, kv_layout=last.kv_layout) for s in d.stages]
            d.changes.append(f"KV layout -> {last.kv_layout}, as prefill '{p.name}' keeps it")
        if d.kv_dtype != p.kv_dtype:
            d.changes.append(f"KV cache {d.kv_dtype} -> {p.kv_dtype}, as prefill '{p.name}' keeps it")
            d.stages = [replace(s, kv_dtype=p.kv_dtype) for s in d.stages]
        if d.block_size != p.block_size:
            d.changes.append(f"block size {d.block_size} -> {p.block_size}, as prefill '{p.name}' uses")
            d.block_size = p.block_size
    for other in prefills[1:]:
        if other.kv_dtype != p.kv_dtype or other.block_size != p.block_size:
            other.changes.append(
                f"KV cache {other.kv_dtype}, blocks of {other.block_size} -> as prefill '{p.name}'"
            )
            other.stages = [replace(s, kv_dtype=p.kv_dtype, kv_layout=last.kv_layout) for s in other.stages]
            other.block_size = p.block_size
