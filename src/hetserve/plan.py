"""The plan: the one contract between the planner, the simulator, the runtime and the exporters.

A plan names a model and a cluster file and lists *servers* (a tensor-parallel group of identical
GPUs on one node holding a contiguous layer range, each layer at a chosen precision), *instances* (a
chain of servers with a role: prefill, decode or mixed, and its scheduler settings) and *routing*.
``load_plan`` validates a plan against its cluster and model and returns a ``Deployment`` with
everything resolved (GPU specs, cost-model shapes, links, KV capacities). docs/plan.md documents it.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Annotated, Literal

import yaml
from pydantic import Field, field_validator, model_validator

from .costmodel.chain import ChainTimer
from .costmodel.roofline import RooflineCostModel, ServerShape
from .errors import HetserveError, OutOfTime, allowed, suggest
from .scheduling.instance import InstanceConfig
from .scheduling.kv_window import KVWindow
from .specs.clusters import Cluster, Link, Node
from .specs.gpus import Strict
from .specs.loading import list_mistakes, load_yaml_model, validate
from .specs.models import WEIGHT_BITS, ModelSpec, load_model
from .vocabulary import DTYPE_BYTES, KVPoolKind, Pipelining, SchedulePolicy, run_dtype_for_kv

PLAN_VERSION = 1
Role = Literal["prefill", "decode", "mixed"]

#: Bounds of an instance's scheduler settings: sequences and tokens in one batch, batches in flight
#: through a chain and tokens per KV block. Each sizes memory the simulator and the runtime allocate.
MAX_BATCH_SIZE = 1 << 16
MAX_BATCH_TOKENS = 1 << 24
MAX_MICRO_BATCHES = 256
MAX_BLOCK_SIZE = 1 << 12
#: Largest routing weight (weights are relative; a bound keeps their sums finite).
MAX_WEIGHT = 1e9


class ServerPlan(Strict):
    name: str = Field(min_length=1)
    node: str
    gpus: list[int] = Field(min_length=1, description="GPU indices within the node; len = TP degree")
    layers: tuple[int, int] = Field(description="[start, end) layer range")
    bits: int | list[int] = Field(default=16, description="weight bits: one for all layers or one per layer")
    kv_dtype: Literal["fp32", "fp16", "bf16", "fp8", "int8"] = "fp16"
    kv_layout: Literal["token-major", "head-major"] = Field(
        default="token-major",
        description="KV cache block layout: [tokens, heads, dim] or [heads, tokens, dim]",
    )
    expert_parallel: bool = Field(
        default=False,
        description="MoE models: routed experts spread whole over the GPUs, attention data-parallel "
        "(each GPU its own sequences and their KV); false: everything split by tensor parallelism",
    )

    @property
    def tp(self) -> int:
        return len(self.gpus)

    def layer_bits(self) -> tuple[int, ...]:
        n = self.layers[1] - self.layers[0]
        return tuple(self.bits) if isinstance(self.bits, list) else (self.bits,) * n


#: Prompt tokens per prefill chunk when a plan's instance gives no ``chunk_size``: vLLM V1's and SGLang's
#: default step budget for chunked prefill on GPUs short of the largest (their docs: 2,048 tokens).
DEFAULT_CHUNK_TOKENS = 2048


class InstancePlan(Strict):
    name: str = Field(min_length=1)
    role: Role
    chain: list[str] = Field(min_length=1, description="server names, first layer to last")
    max_batch_size: int = Field(default=256, ge=1, le=MAX_BATCH_SIZE)
    max_batch_tokens: int = Field(default=8192, ge=1, le=MAX_BATCH_TOKENS)
    chunk_size: int | None = Field(
        default=None,
        ge=1,
        le=MAX_BATCH_TOKENS,
        description=f"chunked prefill: prompt tokens per step; absent: {DEFAULT_CHUNK_TOKENS} (at most "
        "max_batch_tokens) on an instance that prefills; null: whole prompts",
    )
    policy: SchedulePolicy = "decode-first"
    micro_batches: int = Field(
        default=1,
        ge=1,
        le=MAX_MICRO_BATCHES,
        description="batches in flight through the chain (pipelining: lanes)",
    )
    pipelining: Pipelining = Field(
        default="lanes",
        description="lanes: micro_batches batches move through the chain's stages together; per-request: "
        "every request moves on its own and each server batches the steps waiting on it (Petals, Helix), "
        "over one KV pool that admits a request when its whole length fits",
    )
    kv_share: float | dict[str, float] = Field(
        default=1.0,
        description="share of each server's KV room: one for every server of the chain, or per server",
    )
    kv_pool: KVPoolKind = Field(
        default="own",
        description="own: the instance holds its kv_share of each server's KV room; server (pipelining: "
        "per-request): one pool per server, the kv_shares of every instance through it with kv_pool: server "
        "together, from which a request is admitted when every server of its chain has room for its whole "
        "length (Helix's and Petals' one cache per machine)",
    )
    block_size: int = Field(default=16, ge=1, le=MAX_BLOCK_SIZE)
    spans: dict[str, tuple[int, int]] = Field(
        default_factory=dict,
        description="partial inference: the [start, end) layers a server of the chain computes for this "
        "instance, where that is a part of the layers it holds (a Petals client's route through "
        "servers whose ranges overlap); a server not named computes all its layers",
    )

    @model_validator(mode="after")
    def _default_chunk(self) -> InstancePlan:
        """Chunked prefill unless the plan says ``chunk_size: null``: one long prompt then holds the
        other requests of its instance for one chunk's time, not its whole prefill."""
        if "chunk_size" not in self.model_fields_set and self.role != "decode":
            object.__setattr__(self, "chunk_size", min(DEFAULT_CHUNK_TOKENS, self.max_batch_tokens))
        return self

    @model_validator(mode="after")
    def _lanes_or_requests(self) -> InstancePlan:
        if self.pipelining == "per-request" and self.micro_batches > 1:
            raise ValueError(
                f"micro_batches is {self.micro_batches} but pipelining is per-request, where every "
                "request is its own batch; remove micro_batches or set pipelining: lanes"
            )
        if self.kv_pool == "server" and self.pipelining != "per-request":
            raise ValueError(
                "kv_pool is server but pipelining is lanes, whose lanes split the instance's own KV; "
                "set pipelining: per-request or kv_pool: own"
            )
        if self.kv_pool == "server" and self.role != "mixed":
            raise ValueError(
                f"kv_pool is server but the role is {self.role}: KV handed between prefill and decode "
                "instances goes to blocks of the instance's own cache; set kv_pool: own"
            )
        if self.spans and self.role != "mixed":
            raise ValueError(
                f"spans are given but the role is {self.role}: KV handed between prefill and decode "
                "instances covers every layer of each server; remove spans or make the instance mixed"
            )
        return self

    @field_validator("kv_share")
    @classmethod
    def _share_range(cls, v: float | dict[str, float]) -> float | dict[str, float]:
        for where, x in v.items() if isinstance(v, dict) else [("", v)]:
            if not 0 < x <= 1:
                what = f"the share of server '{where}'" if where else "a share"
                raise ValueError(f"{what} must be greater than 0 and less than or equal to 1")
        return v

    def share_on(self, server: str) -> float:
        """This instance's share of ``server``'s KV room."""
        return self.kv_share[server] if isinstance(self.kv_share, dict) else self.kv_share


class RoutingPlan(Strict):
    policy: Literal["round-robin", "weighted", "least-work", "power-of-two", "jffc"] = "least-work"
    weights: dict[str, float] = {}
    handoff: Literal["weighted", "least-work", "round-robin"] = "least-work"
    handoff_weights: dict[str, dict[str, float]] = {}
    layerwise_kv: bool = Field(default=True, description="stream KV layer by layer behind prefill")

    @field_validator("weights")
    @classmethod
    def _non_negative(cls, v: dict[str, float]) -> dict[str, float]:
        for k, w in v.items():
            if not 0 <= w <= MAX_WEIGHT:
                raise ValueError(f"weight of '{k}' must be from 0 to {MAX_WEIGHT:g}")
        return v

    @field_validator("handoff_weights")
    @classmethod
    def _non_negative_handoff(cls, v: dict[str, dict[str, float]]) -> dict[str, dict[str, float]]:
        for p, ws in v.items():
            for d, w in ws.items():
                if not 0 <= w <= MAX_WEIGHT:
                    raise ValueError(f"weight of '{p}' -> '{d}' must be from 0 to {MAX_WEIGHT:g}")
        return v


class PlanFile(Strict):
    version: int = PLAN_VERSION
    name: str = "plan"
    model: str
    cluster: str = Field(description="cluster file, relative to the plan file")
    servers: list[ServerPlan] = Field(min_length=1)
    instances: list[InstancePlan] = Field(min_length=1)
    routing: RoutingPlan = RoutingPlan()
    calibration: str | None = Field(
        default=None,
        description="calibration file the plan was made with (relative to the plan file); simulate uses it",
    )
    #: What the planner predicted (informational; a figure may be .inf or .nan, e.g. no request finished).
    predicted: dict[str, Annotated[float, Field(allow_inf_nan=True)] | int | str | None] = {}
    notes: str = ""


# ---- the resolved deployment ------------------------------------------------------------------------
@dataclass
class Server:
    plan: ServerPlan
    node: Node
    shape: ServerShape
    instances: list[str] = field(default_factory=list)
    #: KV tokens of the pool its ``kv_pool: server`` instances share (0: none of them pools)
    kv_pool_tokens: int = 0

    @property
    def name(self) -> str:
        return self.plan.name

    @property
    def num_gpus(self) -> int:
        return self.plan.tp


@dataclass
class Instance:
    plan: InstancePlan
    servers: list[Server]
    kv_capacity_tokens: int  # KV slots (scheduling.kv_window): tokens, for a model without windows
    hops: list[Link]  # link from servers[i] to servers[i+1]
    #: The [start, end) layers each server computes for this instance: its whole range, or its ``spans``
    layers: list[tuple[int, int]]
    kv_window: KVWindow | None = None  # the model's sliding-window layers, if any

    @property
    def name(self) -> str:
        return self.plan.name

    def stage_shape(self, k: int) -> ServerShape:
        """The cost-model shape of what stage ``k`` computes for this instance: its server's shape, or
        the part of it in ``spans`` (those layers' bits; the embedding and the head only where the part
        starts at the first layer or ends at the last)."""
        srv = self.servers[k]
        start, end = self.layers[k]
        held = srv.plan.layers
        if (start, end) == tuple(held):
            return srv.shape
        bits = srv.shape.layer_bits[start - held[0] : end - held[0]]
        return replace(srv.shape, layer_bits=bits, first=start == 0, last=srv.shape.last and end == held[1])

    def stage_fraction(self, k: int) -> float:
        """The share of its server's layers stage ``k`` computes for this instance."""
        start, end = self.layers[k]
        held = self.servers[k].plan.layers
        return (end - start) / (held[1] - held[0])

    @property
    def role(self) -> str:
        return self.plan.role

    @property
    def pooled(self) -> bool:
        """Whether the instance draws on its servers' shared KV pools (``kv_pool: server``)."""
        return self.plan.kv_pool == "server"

    def scheduling(self) -> InstanceConfig:
        """The settings the shared instance layer (``scheduling.instance``) runs this instance with, in
        the simulator and in the cluster driver alike."""
        p = self.plan
        return InstanceConfig(
            name=p.name,
            role=p.role,
            lanes=max(1, p.micro_batches),
            max_batch_size=p.max_batch_size,
            max_batch_tokens=p.max_batch_tokens,
            chunk_size=p.chunk_size,
            policy=p.policy,
            block_size=p.block_size,
            kv_window=self.kv_window,
            per_request=p.pipelining == "per-request",
            kv_pool=self.pooled,
        )


class Deployment:
    """A validated plan with its cluster and model resolved."""

    def __init__(
        self,
        spec: PlanFile,
        cluster: Cluster,
        model: ModelSpec,
        source: str | None = None,
        *,
        deadline: float | None = None,
    ):
        """``deadline``: a ``time.perf_counter()`` value past which building a large plan raises
        ``OutOfTime`` (the planner's time limit)."""
        self.spec, self.cluster, self.model, self.source = spec, cluster, model, source
        self.deadline = deadline
        self.cost_model = RooflineCostModel(model)
        self.servers: dict[str, Server] = {}
        self.instances: dict[str, Instance] = {}
        self._build()

    # -- construction and validation --
    def _err(self, msg: str) -> HetserveError:
        return HetserveError(msg, source=self.source)

    def _on_time(self, i: int) -> None:
        if self.deadline is not None and i % 256 == 255 and time.perf_counter() > self.deadline:
            raise OutOfTime(f"checking plan {self.spec.name}")

    def _message(self, exc: HetserveError) -> str:
        """A HetserveError's text without this plan's file name (added once when they are joined)."""
        text = str(exc)
        prefix = f"{self.source}: " if self.source else ""
        return text[len(prefix) :] if prefix and text.startswith(prefix) else text

    def _raise_all(self, mistakes: list[str]) -> None:
        if mistakes:
            raise self._err(list_mistakes(mistakes))

    def _add_server(self, i: int, s: ServerPlan, used: dict, chain_pos: dict) -> None:
        """Check server ``i`` of the plan and add it (a mistake raises HetserveError)."""
        m = self.model
        where = f"servers[{i}] ({s.name})"
        if s.name in self.servers:
            raise self._err(f"{where}.name: server name '{s.name}' is used twice")
        if len(set(s.gpus)) != len(s.gpus):
            raise self._err(f"{where}.gpus: {s.gpus} lists a GPU twice; list each GPU index once")
        node = self.cluster.nodes.get(s.node)
        if node is None:
            raise self._err(
                f"{where}.node: unknown node '{s.node}'{suggest(s.node, self.cluster.nodes)}; "
                f"nodes: {allowed(self.cluster.nodes)}"
            )
        for g in s.gpus:
            if not 0 <= g < node.count:
                raise self._err(
                    f"{where}.gpus: GPU index {g} does not exist on node {node.name} "
                    f"(it has {node.count} GPUs: 0..{node.count - 1})"
                )
            if (node.name, g) in used:
                raise self._err(
                    f"{where}.gpus: GPU {g} of node {node.name} is already used by server "
                    f"'{used[(node.name, g)]}'; a GPU belongs to one server"
                )
            used[(node.name, g)] = s.name
        try:
            m.check_tp(s.tp, "tp (len(gpus))")
        except HetserveError as exc:
            raise self._err(f"{where}.gpus: {exc}") from None
        start, end = s.layers
        if not 0 <= start < end <= m.num_layers:
            raise self._err(
                f"{where}.layers: [{start}, {end}) is not a layer range of {m.name} "
                f"(need 0 <= start < end <= {m.num_layers})"
            )
        bits = s.layer_bits()
        if len(bits) != end - start:
            raise self._err(
                f"{where}.bits: {len(bits)} values for {end - start} layers; give one value or one per layer"
            )
        bad = [b for b in bits if b not in WEIGHT_BITS]
        if bad:
            raise self._err(f"{where}.bits: {bad[0]} is not supported; use one of {list(WEIGHT_BITS)}")
        if s.kv_dtype not in node.gpu.kv_dtypes and not (s.kv_dtype == "fp32"):
            raise self._err(
                f"{where}.kv_dtype: {node.gpu.name} does not run a {s.kv_dtype} KV cache; "
                f"supported: {node.gpu.kv_dtypes}"
            )
        if s.expert_parallel and (m.num_experts == 1 or s.tp < 2):
            why = f"{m.name} has no experts" if m.num_experts == 1 else "it has one GPU"
            raise self._err(
                f"{where}.expert_parallel: {why}; expert parallelism spreads an MoE model's experts over "
                "the GPUs of one server: remove it or give the server several GPUs"
            )
        shape = ServerShape(
            node.gpu,
            s.tp,
            bits,
            first=start == 0,
            last=end == m.num_layers,
            kv_dtype_bytes=float(DTYPE_BYTES[s.kv_dtype]),
            run_dtype=run_dtype_for_kv(s.kv_dtype),
            ep=s.expert_parallel,
        )
        self.servers[s.name] = Server(s, node, shape)
        chain_pos[s.name] = []

    def _add_instance(self, i: int, inst: InstancePlan, shares: dict[str, float]) -> None:
        """Check instance ``i`` of the plan and add it (a mistake raises HetserveError)."""
        m = self.model
        where = f"instances[{i}] ({inst.name})"
        if inst.name in self.instances:
            raise self._err(f"{where}.name: instance name '{inst.name}' is used twice")
        chain: list[Server] = []
        layers: list[tuple[int, int]] = []
        stray = [n for n in inst.spans if n not in inst.chain]
        if stray:
            raise self._err(
                f"{where}.spans: names {stray}, not on its chain {inst.chain}; give spans only for "
                "servers of the chain"
            )
        if len(set(inst.chain)) != len(inst.chain):
            twice = sorted({n for n in inst.chain if inst.chain.count(n) > 1})
            raise self._err(f"{where}.chain: server {twice[0]} appears twice; a chain passes a server once")
        expect = 0
        for j, sname in enumerate(inst.chain):
            srv = self.servers.get(sname)
            if srv is None:
                raise self._err(f"{where}.chain[{j}]: unknown server '{sname}'{suggest(sname, self.servers)}")
            start, end = held = srv.plan.layers
            if sname in inst.spans:
                start, end = inst.spans[sname]
                if not held[0] <= start < end <= held[1]:
                    raise self._err(
                        f"{where}.spans.{sname}: [{start}, {end}) is not a part of the layers "
                        f"[{held[0]}, {held[1]}) the server holds; give a non-empty range within them"
                    )
            if start != expect:
                what = "covered twice" if start < expect else "not covered"
                lo, hi = sorted((start, expect))
                raise self._err(
                    f"{where}.chain: layers {lo}..{hi - 1} are {what} (server '{sname}' starts "
                    f"at layer {start}, the chain so far ends at {expect})"
                )
            expect = end
            if chain and srv.node.gpu.vendor != chain[0].node.gpu.vendor:
                raise self._err(
                    f"{where}.chain: a pipeline never spans vendors ({chain[0].node.gpu.vendor} "
                    f"server '{chain[0].name}' and {srv.node.gpu.vendor} server '{sname}'); "
                    "hand KV between vendors with prefill and decode instances instead"
                )
            chain.append(srv)
            layers.append((start, end))
        if expect != m.num_layers:
            raise self._err(
                f"{where}.chain: layers {expect}..{m.num_layers - 1} are not covered; a chain "
                f"must hold all {m.num_layers} layers of {m.name}"
            )
        if isinstance(inst.kv_share, dict) and set(inst.kv_share) != set(inst.chain):
            missing = [x for x in inst.chain if x not in inst.kv_share]
            extra = [x for x in inst.kv_share if x not in inst.chain]
            what = f"has no share for {missing}" if missing else f"names {extra}, not on its chain"
            raise self._err(
                f"{where}.kv_share: {what}; give one share per server of the chain "
                f"{inst.chain}, or a single number for all of them"
            )
        for srv in chain:
            srv.instances.append(inst.name)
            shares[srv.name] += inst.share_on(srv.name)
        hops = [self.cluster.link(a.node.name, b.node.name) for a, b in zip(chain, chain[1:])]
        self.instances[inst.name] = Instance(inst, chain, 0, hops, layers, m.kv_window)

    def _build(self) -> None:
        spec = self.spec
        if spec.version != PLAN_VERSION:
            raise self._err(f"version: this hetserve reads plan version {PLAN_VERSION}, got {spec.version}")
        used: dict[tuple[str, int], str] = {}
        chain_pos: dict[str, list[tuple[int, int]]] = {}
        mistakes: list[str] = []  # every server's mistakes, reported together
        for i, s in enumerate(spec.servers):
            self._on_time(i)
            try:
                self._add_server(i, s, used, chain_pos)
            except HetserveError as exc:
                mistakes.append(self._message(exc))
        self._raise_all(mistakes)

        shares: dict[str, float] = {name: 0.0 for name in self.servers}
        for i, inst in enumerate(spec.instances):
            self._on_time(i)
            try:
                self._add_instance(i, inst, shares)
            except HetserveError as exc:
                mistakes.append(self._message(exc))
        self._raise_all(mistakes)

        for name, total in shares.items():
            if total > 1.0 + 1e-9:
                users = self.servers[name].instances
                raise self._err(
                    f"server '{name}' is shared by {users} whose kv_share adds up to {total:.2f}; "
                    "the shares of one server must add up to at most 1"
                )
        unused = [n for n, s in self.servers.items() if not s.instances]
        if unused:
            raise self._err(
                f"servers {unused} are on no instance's chain; remove them or add them to a chain"
            )
        self._check_memory()
        self._check_roles()

    def _check_memory(self) -> None:
        gb = 1e9
        for i, inst in enumerate(self.instances.values()):
            self._on_time(i)
            caps = []
            for srv in inst.servers:
                users = [self.instances[n].plan for n in srv.instances if n in self.instances] or [inst.plan]
                mem = self.cost_model.memory(
                    srv.shape, max(u.max_batch_tokens for u in users), max(u.max_batch_size for u in users)
                )
                if not mem.fits and mem.activations > mem.usable - mem.weights > 0:
                    raise self._err(
                        f"server '{srv.name}' does not fit: activations for max_batch_tokens="
                        f"{max(u.max_batch_tokens for u in users)} need {mem.activations / gb:.1f} GB per GPU beside "
                        f"{mem.weights / gb:.1f} GB of weights ({mem.usable / gb:.1f} GB usable on a "
                        f"{srv.node.gpu.name});"
                        " lower max_batch_tokens or max_batch_size of its instances"
                    )
                if not mem.fits:
                    raise self._err(
                        f"server '{srv.name}' does not fit: {srv.plan.layers[1] - srv.plan.layers[0]} layers need "
                        f"{mem.weights / gb:.1f} GB of weights + {mem.activations / gb:.1f} GB of activations per "
                        f"GPU, but a {srv.node.gpu.name} has {mem.usable / gb:.1f} GB usable; give it fewer layers, "
                        "more GPUs (tp) or fewer weight bits"
                    )
                if inst.pooled:
                    sharers = [
                        self.instances[n].plan
                        for n in srv.instances
                        if n in self.instances and self.instances[n].pooled
                    ]
                    sizes = {u.block_size for u in sharers}
                    if len(sizes) > 1:
                        raise self._err(
                            f"server '{srv.name}': the instances sharing its KV pool "
                            f"({[u.name for u in sharers]}) have block sizes {sorted(sizes)}; one pool "
                            "has one block size: give them the same block_size"
                        )
                    pooled = sum(u.share_on(srv.name) for u in sharers)
                    srv.kv_pool_tokens = int(mem.kv_room * pooled / mem.kv_bytes_per_token)
                    caps.append(srv.kv_pool_tokens)
                else:
                    caps.append(int(mem.kv_room * inst.plan.share_on(srv.name) / mem.kv_bytes_per_token))
            # the most the instance holds: its tightest server's share, or pool
            inst.kv_capacity_tokens = min(caps)
            longest = inst.plan.block_size
            if inst.kv_capacity_tokens < longest:
                raise self._err(
                    f"instance '{inst.name}' has room for {inst.kv_capacity_tokens} KV tokens, less than "
                    "one block; give its servers fewer layers or more memory"
                )

    def _check_roles(self) -> None:
        roles = {i.role for i in self.instances.values()}
        if "decode" in roles and "prefill" not in roles:
            raise self._err(
                "instances: decode instances need a prefill instance to hand them KV caches; add one "
                "with role: prefill, or make them mixed"
            )
        if "prefill" in roles and "decode" not in roles:
            raise self._err(
                "instances: prefill instances need a decode instance to hand KV caches to; add one "
                "with role: decode, or make them mixed"
            )
        r = self.spec.routing
        entry = {n for n, i in self.instances.items() if i.role in ("prefill", "mixed")}
        for name in r.weights:
            if name not in entry:
                raise self._err(
                    f"routing.weights: '{name}' is not a prefill or mixed instance; "
                    f"those are {allowed(entry)}"
                )
        if r.policy == "weighted" and not any(r.weights.get(n, 0) > 0 for n in entry):
            raise self._err(
                "routing.weights: policy 'weighted' needs a positive weight for at least one "
                f"of {allowed(entry)}"
            )
        decode = {n for n, i in self.instances.items() if i.role == "decode"}
        if r.handoff_weights and r.handoff != "weighted":
            raise self._err(
                f"routing.handoff_weights: given, but routing.handoff is '{r.handoff}'; set "
                "handoff: weighted to use them, or remove them"
            )
        for p, ws in r.handoff_weights.items():
            if not any(w > 0 for w in ws.values()):
                raise self._err(
                    f"routing.handoff_weights.{p}: needs a positive weight for at least one decode instance"
                )
            if p not in self.instances or self.instances[p].role != "prefill":
                raise self._err(f"routing.handoff_weights: '{p}' is not a prefill instance")
            for d in ws:
                if d not in decode:
                    raise self._err(f"routing.handoff_weights.{p}: '{d}' is not a decode instance")

    # -- queries --
    @property
    def name(self) -> str:
        return self.spec.name

    def gpus_used(self) -> int:
        return sum(s.num_gpus for s in self.servers.values())

    def gpu_counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for s in self.servers.values():
            out[s.node.gpu.name] = out.get(s.node.gpu.name, 0) + s.num_gpus
        return out

    def cost_per_hour(self) -> float:
        return sum(s.node.gpu.price_per_hour * s.num_gpus for s in self.servers.values())

    @property
    def request_overhead_s(self) -> float:
        """What serving a request costs before its first step (the API, tokeniser and hand-over to the
        engine, ``CostFactors.request_overhead_ms``): one serving stack runs the whole plan, so the
        largest of its servers' figures."""
        return max(s.shape.factors.request_overhead_ms for s in self.servers.values()) * 1e-3

    def kv_pools(self) -> dict[str, tuple[tuple[str, int], ...]]:
        """Per instance with ``kv_pool: server``: the servers of its chain and the KV tokens of each
        one's shared pool (``scheduling.instance.share_kv_pools``)."""
        return {
            name: tuple((s.name, s.kv_pool_tokens) for s in inst.servers)
            for name, inst in self.instances.items()
            if inst.pooled
        }

    def chain_timer(self, instance: str) -> ChainTimer:
        """The cost model of ``instance``'s chain: its servers' timers and the hops between them (a
        token's activations cross each hop in 16 bits)."""
        inst = self.instances[instance]
        act_bytes = self.model.hidden_size * 2.0
        return ChainTimer(
            [self.cost_model.timer(inst.stage_shape(k)) for k in range(len(inst.servers))],
            [h.latency for h in inst.hops],
            [act_bytes / h.bandwidth for h in inst.hops],
            inst.plan.micro_batches,
        )

    def kv_link(self, prefill: str, decode: str) -> Link:
        """The path KV takes from a prefill instance's last server to a decode instance's first one."""
        a = self.instances[prefill].servers[-1].node.name
        b = self.instances[decode].servers[0].node.name
        return self.cluster.link(a, b)

    def kv_conversion_needed(self, prefill: str, decode: str) -> bool:
        """KV crosses vendors or formats (dtype, TP layout) and must be converted on the way."""
        p, d = self.instances[prefill].servers[-1], self.instances[decode].servers[0]
        return (
            p.node.gpu.vendor != d.node.gpu.vendor
            or p.plan.kv_dtype != d.plan.kv_dtype
            or p.plan.tp != d.plan.tp
            or p.plan.kv_layout != d.plan.kv_layout
            or self.instances[prefill].plan.block_size != self.instances[decode].plan.block_size
        )


def load_plan(path: str | Path, calibration: str | Path | None = None) -> Deployment:
    """The plan in ``path`` on its cluster, timed with ``calibration`` (default: the calibration file
    the plan records, if any)."""
    spec = load_yaml_model(PlanFile, path, "plan file")
    base = Path(path).parent
    cluster_path = Path(spec.cluster)
    if not cluster_path.is_absolute():
        cluster_path = base / cluster_path
    if not cluster_path.exists():
        raise HetserveError(
            f"cluster: file {cluster_path} not found (paths are relative to the plan file)", source=str(path)
        )
    if calibration is None and spec.calibration:
        calibration = Path(spec.calibration)
        if not calibration.is_absolute():
            calibration = base / calibration
        if not calibration.is_file():
            raise HetserveError(
                f"calibration: file {calibration} not found (paths are relative to the plan file; pass "
                "--calibration to use another)",
                source=str(path),
            )
    cluster = Cluster.load(cluster_path, calibration=calibration)
    try:
        model = load_model(spec.model)
    except HetserveError as exc:
        raise HetserveError(f"model: {exc}", source=str(path)) from None
    return Deployment(spec, cluster, model, source=str(path))


def deployment_from_dict(data: dict, cluster: Cluster, model: ModelSpec, source: str = "plan") -> Deployment:
    """Validate an in-memory plan (as the planner builds it) against a loaded cluster and model."""
    return Deployment(validate(PlanFile, data, source), cluster, model, source)


def save_plan(
    spec: PlanFile,
    path: str | Path,
    cluster_path: str | Path | None = None,
    calibration_path: str | Path | None = None,
) -> None:
    """Write ``spec`` as YAML. ``cluster_path`` and ``calibration_path`` (where those files really are)
    are rewritten relative to the new file, so the saved plan finds them from wherever it is written."""
    import os

    data = spec.model_dump(mode="json", exclude_defaults=False)
    for inst in data["instances"]:  # written only where a chain runs part of a server
        if not inst["spans"]:
            del inst["spans"]
    target = Path(path).resolve().parent
    if cluster_path is not None:
        data["cluster"] = os.path.relpath(Path(cluster_path).resolve(), target)
    if calibration_path is not None:
        data["calibration"] = os.path.relpath(Path(calibration_path).resolve(), target)
    Path(path).write_text(
        f"# hetserve plan (version {PLAN_VERSION}); see docs/plan.md\n"
        + yaml.safe_dump(data, sort_keys=False, default_flow_style=None, width=110)
    )
