"""What a plan asks of a serving engine, and what every export target shares (hosts, ports, scripts).

A plan instance becomes one engine deployment: a pipeline of ``len(chain)`` stages, each a tensor-
parallel group of ``tp`` GPUs on one node. ``asks_from`` reads a validated ``Deployment`` into
``InstanceAsk`` objects (one per instance, with the memory fractions the engines take); what an engine
cannot express is in ``gaps.py``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from ..costmodel.roofline import ServerShape
from ..plan import Deployment
from ..specs.gpus import GPUSpec
from ..vocabulary import DTYPE_BYTES

#: Vendors whose GPUs the exported scripts and manifests know how to address.
GPU_RESOURCE = {"nvidia": "nvidia.com/gpu", "amd": "amd.com/gpu"}
#: Node labels the Kubernetes manifests select on (docs/deploy.md).
NODE_LABEL = "hetserve.io/node"
GPU_LABEL = "hetserve.io/gpu"

BASE_HTTP_PORT = 8000


@dataclass(frozen=True)
class Stage:
    """One pipeline stage: a plan server (a TP group of identical GPUs on one node)."""

    server: str
    node: str
    gpus: tuple[int, ...]
    layers: tuple[int, int]
    bits: tuple[int, ...]
    kv_dtype: str
    kv_layout: str
    gpu: GPUSpec
    kv_share: float
    expert_parallel: bool = False

    @property
    def tp(self) -> int:
        return len(self.gpus)

    @property
    def num_layers(self) -> int:
        return self.layers[1] - self.layers[0]


@dataclass
class InstanceAsk:
    """What the plan asks of one instance, in the terms an engine takes."""

    name: str
    role: str
    stages: list[Stage]
    max_batch_size: int
    max_batch_tokens: int
    chunk_size: int | None
    policy: str
    micro_batches: int
    block_size: int
    #: lanes or per-request (``InstancePlan.pipelining``)
    pipelining: str = "lanes"
    #: fraction of each GPU's memory the engine may take (weights, activations and this instance's
    #: share of the KV room), the smallest over the stages: vLLM's --gpu-memory-utilization
    memory_utilisation: float = 0.9
    #: the same without activations (weights + KV pool): SGLang's --mem-fraction-static
    memory_static: float = 0.85
    #: 16 (weights as in the checkpoint), 8 (FP8 quantised when loading) or 4/3 (a pre-quantised
    #: checkpoint); None when the stages differ (a gap)
    changes: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    @property
    def tp(self) -> int | None:
        tps = {s.tp for s in self.stages}
        return tps.pop() if len(tps) == 1 else None

    @property
    def pp(self) -> int:
        return len(self.stages)

    @property
    def nodes(self) -> list[str]:
        """The chain's nodes in first-appearance order."""
        out: list[str] = []
        for s in self.stages:
            if s.node not in out:
                out.append(s.node)
        return out

    @property
    def head(self) -> str:
        return self.stages[0].node

    @property
    def multi_node(self) -> bool:
        return len(self.nodes) > 1

    @property
    def vendor(self) -> str:
        return self.stages[0].gpu.vendor

    @property
    def bits(self) -> int | None:
        every = {b for s in self.stages for b in s.bits}
        return every.pop() if len(every) == 1 else None

    @property
    def kv_dtype(self) -> str | None:
        every = {s.kv_dtype for s in self.stages}
        return every.pop() if len(every) == 1 else None

    @property
    def expert_parallel(self) -> bool | None:
        """Whether the stages run expert parallelism with data-parallel attention; None when they differ."""
        every = {s.expert_parallel for s in self.stages}
        return every.pop() if len(every) == 1 else None

    @property
    def layer_partition(self) -> list[int]:
        return [s.num_layers for s in self.stages]

    def gpus_on(self, node: str) -> list[int]:
        """GPU indices this instance uses on ``node``, stage by stage (rank order)."""
        return [g for s in self.stages if s.node == node for g in s.gpus]

    def stages_on(self, node: str) -> list[Stage]:
        return [s for s in self.stages if s.node == node]


@dataclass(frozen=True)
class Gap:
    """A plan feature the engine cannot express, on one instance."""

    instance: str
    feature: str
    detail: str

    def line(self) -> str:
        return f"instance '{self.instance}': {self.feature} ({self.detail})"


# ---- reading the plan ---------------------------------------------------------------------------------
def hf_model_id(dep: Deployment) -> str:
    """The Hugging Face repository (or local directory) of the plan's model, for the engines."""
    source = dep.model.source or ""
    m = re.match(r"https?://huggingface\.co/([^/]+/[^/]+)", source)
    if m:
        return m.group(1)
    ref = dep.spec.model
    if ref.endswith("config.json"):
        return str(__import__("pathlib").Path(ref).parent) or "."
    return ref


def memory_fractions(dep: Deployment, ask: InstanceAsk) -> tuple[float, float]:
    """(utilisation, static) memory fractions of one GPU for ``ask``, the smallest over its stages.

    The plan gives every server ``kv_room = usable - weights - activations`` (usable = 90% of the
    GPU) and each instance ``kv_share`` of it, so the instance may take ``weights + activations +
    share * kv_room`` bytes of a GPU: over the GPU's memory that is vLLM's --gpu-memory-utilization
    (which covers weights, activations and KV cache). SGLang's --mem-fraction-static covers weights
    and the KV pool only, so its fraction leaves the activations out.
    """
    cm = dep.cost_model
    util, static = 1.0, 1.0
    n = dep.model.num_layers
    for s in ask.stages:
        shape = ServerShape(
            s.gpu,
            s.tp,
            s.bits,
            first=s.layers[0] == 0,
            last=s.layers[1] == n,
            kv_dtype_bytes=float(DTYPE_BYTES[s.kv_dtype]),
            ep=s.expert_parallel,
        )
        mem = cm.memory(shape, ask.max_batch_tokens, ask.max_batch_size)
        room = max(mem.kv_room, 0.0) * s.kv_share
        top = mem.usable / mem.capacity  # never past the plan's usable share (when a stage does not fit)
        util = min(util, top, (mem.weights + mem.activations + room) / mem.capacity)
        static = min(static, top, (mem.weights + room) / mem.capacity)
        if not mem.fits:
            ask.warnings.append(
                f"stage {s.server} ({s.num_layers} layers, TP {s.tp}, {s.gpu.name}) may not fit in "
                f"memory as exported: {mem.weights / 1e9:.1f} GB of weights + "
                f"{mem.activations / 1e9:.1f} GB of activations per GPU, {mem.usable / 1e9:.1f} GB usable"
            )
    return round(max(util, 0.05), 3), round(max(static, 0.05), 3)


def asks_from(dep: Deployment) -> list[InstanceAsk]:
    asks = []
    for inst in dep.instances.values():
        stages = [
            Stage(
                server=srv.name,
                node=srv.node.name,
                gpus=tuple(srv.plan.gpus),
                layers=tuple(span),  # the layers it computes for this instance (``spans``)
                bits=inst.stage_shape(k).layer_bits,
                kv_dtype=srv.plan.kv_dtype,
                kv_layout=srv.plan.kv_layout,
                gpu=srv.node.gpu,
                kv_share=inst.plan.share_on(srv.name),
                expert_parallel=srv.plan.expert_parallel,
            )
            for k, (srv, span) in enumerate(zip(inst.servers, inst.layers, strict=True))
        ]
        p = inst.plan
        ask = InstanceAsk(
            name=p.name,
            role=p.role,
            stages=stages,
            max_batch_size=p.max_batch_size,
            max_batch_tokens=p.max_batch_tokens,
            chunk_size=p.chunk_size,
            policy=p.policy,
            micro_batches=p.micro_batches,
            block_size=p.block_size,
            pipelining=p.pipelining,
        )
        ask.memory_utilisation, ask.memory_static = memory_fractions(dep, ask)
        asks.append(ask)
    return asks


# ---- hosts, ports, scripts ------------------------------------------------------------------------------
def host_var(node: str) -> str:
    """The environment variable a script reads for ``node``'s address: NODE_<NAME>_HOST."""
    return "NODE_" + re.sub(r"[^A-Za-z0-9]", "_", node).upper() + "_HOST"


def host_ref(node: str) -> str:
    """``${NODE_X_HOST:-x}``: the node's address, its name when the variable is unset."""
    return "${" + host_var(node) + ":-" + node + "}"


@dataclass(frozen=True)
class Ports:
    http: int  # the instance's API port on its head node
    aux: int  # a per-instance offset for side ports (Ray, NCCL rendezvous, KV bootstrap)


def assign_ports(asks: list[InstanceAsk]) -> dict[str, Ports]:
    """HTTP ports distinct per head node (8000, 8001, ...) and a plan-wide index for side ports."""
    per_node: dict[str, int] = {}
    out = {}
    for i, a in enumerate(asks):
        k = per_node.get(a.head, 0)
        per_node[a.head] = k + 1
        out[a.name] = Ports(http=BASE_HTTP_PORT + k, aux=i)
    return out


def safe_name(name: str) -> str:
    """A DNS-1123 label (Kubernetes object names) from a plan name."""
    s = re.sub(r"[^a-z0-9-]", "-", name.lower()).strip("-")
    return s[:63] or "x"


def torch_dtype(kv_dtype: str | None) -> str:
    """The engine's --dtype for a plan KV dtype: the activations follow the KV cache when it is a float."""
    return {"fp16": "float16", "bf16": "bfloat16", "fp32": "float32"}.get(kv_dtype or "", "auto")


def shell_word(arg: str) -> str:
    """One shell word: single-quoted, or double-quoted when it expands a ``${...}`` variable."""
    import shlex

    if "${" in arg or arg.startswith("$("):
        return '"' + re.sub(r'(["\\`])', r"\\\1", arg) + '"'
    return shlex.quote(arg)


def shell_join(argv: list[str]) -> str:
    return " ".join(shell_word(a) for a in argv)


@dataclass
class Step:
    """One command of a node's launch script."""

    node: str
    instance: str
    argv: list[str]
    env: dict[str, str] = field(default_factory=dict)
    comment: list[str] = field(default_factory=list)
    background: bool = True  # a server: started with & and waited for at the end
    retry: bool = False  # repeat until it succeeds (joining a Ray head that may not be up yet)
    wait_gpus: tuple[str, int] | None = None  # (Ray address, GPUs) to wait for before this step
    engine: bool = False  # the engine's own command line (what the argument-parser test parses)


@dataclass
class Export:
    """What an exporter produced: the (possibly nearest) asks, commands and files to write."""

    target: str
    engine: str
    model: str
    asks: list[InstanceAsk]
    steps: list[Step] = field(default_factory=list)
    files: dict[str, str] = field(default_factory=dict)
    urls: dict[str, str] = field(default_factory=dict)  # instance -> its API base URL
    notes: dict[str, list[str]] = field(default_factory=dict)  # instance -> differences in behaviour
    gaps: list[Gap] = field(default_factory=list)  # what the plan asked that the target cannot express
    #: --nearest with --workload: the planned and the nearest plan simulated (``nearest_cost``)
    cost: list[str] = field(default_factory=list)
