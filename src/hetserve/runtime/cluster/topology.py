"""A plan as processes: which rank holds which server's layers and heads, and how instances chain them.

Rank 0 is the driver (router, schedulers, API). Every GPU of every server is one worker rank, in plan
order: server ``s`` with TP degree ``t`` takes ``t`` consecutive ranks, TP rank 0 first. Instances are
chains of servers; a server named by several instances is one set of processes holding a KV cache for
each (its ``kv_share`` of the room). Pure Python: no torch.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ...errors import HetserveError
from ...plan import Deployment
from ...scheduling.instance import InstanceConfig, WorkEstimate
from ...vocabulary import ENGINE_DTYPES


@dataclass(frozen=True)
class WorkerSpec:
    rank: int
    server: str
    tp_rank: int
    tp_size: int
    layers: tuple[int, int]  # [start, end) of the model's layers
    bits: tuple[int, ...]  # weight bits per layer (16 = the run dtype)
    dtype: str  # float32 | float16 | bfloat16: weights, activations and KV
    kv_layout: str  # token-major | head-major
    node: str


@dataclass(frozen=True)
class InstanceSpec:
    name: str
    stages: tuple[tuple[int, ...], ...]  # per server in the chain: its ranks, TP rank 0 first
    servers: tuple[str, ...]
    kv_shares: tuple[float, ...]  # per server in the chain: its share of that server's KV room
    #: The settings the shared instance layer schedules it with (role, lanes, batch limits, policy).
    scheduling: InstanceConfig
    #: Per-token costs and speed from the plan's cost model (least-work routing and JFFC read them).
    estimate: WorkEstimate
    #: Per server in the chain: the [start, end) model layers it computes for this instance (its whole
    #: range, or the part the plan's ``spans`` gives)
    layers: tuple[tuple[int, int], ...]
    #: Its place among the plan's instances (the tag its logits return under, ``channel.logits_tag``).
    index: int

    @property
    def role(self) -> str:  # mixed | prefill | decode
        return self.scheduling.role

    @property
    def lanes(self) -> int:  # micro-batches in flight through the chain
        return self.scheduling.lanes

    @property
    def block_size(self) -> int:
        return self.scheduling.block_size

    @property
    def ranks(self) -> tuple[int, ...]:
        return tuple(r for stage in self.stages for r in stage)

    @property
    def last(self) -> int:
        """The rank that returns logits to the driver (TP rank 0 of the last stage)."""
        return self.stages[-1][0]


@dataclass
class Topology:
    model: str  # the plan's model name
    num_layers: int
    workers: dict[int, WorkerSpec]  # by rank (1..world-1)
    instances: dict[str, InstanceSpec]
    routing_policy: str
    routing_weights: dict[str, float]
    handoff_policy: str
    handoff_weights: dict[str, dict[str, float]]
    servers: dict[str, tuple[int, ...]] = field(default_factory=dict)  # server name -> its ranks

    @property
    def world_size(self) -> int:
        return 1 + len(self.workers)

    def instances_of(self, rank: int) -> list[InstanceSpec]:
        return [i for i in self.instances.values() if rank in i.ranks]

    def ranks_of(self, servers: list[str] | None) -> list[int]:
        """The worker ranks of the named servers (all workers when None)."""
        if servers is None:
            return sorted(self.workers)
        unknown = [s for s in servers if s not in self.servers]
        if unknown:
            raise HetserveError(
                f"--servers: unknown server(s) {unknown}; the plan has {sorted(self.servers)}"
            )
        return sorted(r for s in servers for r in self.servers[s])


def topology_from_plan(dep: Deployment, dtype: str | None = None) -> Topology:
    """Ranks for ``dep``'s servers. ``dtype`` (float32/float16/bfloat16) overrides every server's kv_dtype."""
    workers: dict[int, WorkerSpec] = {}
    servers: dict[str, tuple[int, ...]] = {}
    rank = 1
    for srv in dep.servers.values():
        p = srv.plan
        run_dtype = dtype or ENGINE_DTYPES.get(p.kv_dtype)
        if run_dtype is None:
            raise HetserveError(
                f"server '{p.name}': kv_dtype {p.kv_dtype} cannot be served by the engine "
                f"(it runs KV in fp32, fp16 or bf16); set kv_dtype or pass --dtype",
                source=dep.source,
            )
        ranks = tuple(range(rank, rank + p.tp))
        for tp_rank, r in enumerate(ranks):
            workers[r] = WorkerSpec(
                r,
                p.name,
                tp_rank,
                p.tp,
                tuple(p.layers),
                p.layer_bits(),
                run_dtype,
                p.kv_layout,
                p.node,
            )
        servers[p.name] = ranks
        rank += p.tp
    instances = {}
    for index, inst in enumerate(dep.instances.values()):
        p = inst.plan
        stages = tuple(servers[s.name] for s in inst.servers)
        instances[p.name] = InstanceSpec(
            p.name,
            stages,
            tuple(s.name for s in inst.servers),
            tuple(p.share_on(s.name) for s in inst.servers),
            inst.scheduling(),
            dep.chain_timer(p.name).work_estimate(),
            tuple(tuple(span) for span in inst.layers),
            index,
        )
    r = dep.spec.routing
    return Topology(
        dep.spec.model,
        dep.model.num_layers,
        workers,
        instances,
        r.policy,
        dict(r.weights),
        r.handoff,
        {k: dict(v) for k, v in r.handoff_weights.items()},
        servers,
    )
