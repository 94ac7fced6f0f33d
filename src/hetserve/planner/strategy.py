"""The strategy interface and what every strategy shares.

A *strategy* is one way of choosing a deployment: hetserve's planner, or one of the published systems
it is compared with (docs/baselines.md). Each gets the same ``StrategyContext`` (cluster, model,
workload, objective, budget, quality budget, seed, time limit) and returns a ``PlanFile`` that
``hetserve.plan.Deployment`` accepts: the contract the planner writes.

Shared here: the context (with the cost model, the workload's mean lengths and rate), the estimate of
one instance on explicitly placed servers (the planner's ``ChainTiming`` and capacity functions over
the real links between the chosen nodes), ``PlanWriter`` that names servers and instances, and
``trial`` (a short simulation some strategies search with, as their papers do).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cached_property

from .. import clock
from ..costmodel.roofline import RooflineCostModel, ServerShape
from ..errors import HetserveError, OutOfTime
from ..plan import Deployment, InstancePlan, PlanFile, RoutingPlan, ServerPlan
from ..specs.clusters import Cluster
from ..specs.models import ModelSpec
from ..specs.workloads import SLO, Workload
from .allocate import Allocation
from .build import build_plan
from .capacity import (
    Capacity,
    ChainTiming,
    decode_capacity,
    mixed_capacity,
    prefill_capacity,
)
from .engine_settings import per_request_allowed
from .evaluate import OBJECTIVES, Run, simulate_at_rate
from .pools import SETTINGS, batch_limit
from .quality import removed_share, sensitivity
from .templates import Template, TemplateFactory

#: Requests a strategy's own trial simulation replays (strategies that search by simulation).
TRIAL_REQUESTS = 300
#: Requests sampled to estimate the workload's long requests.
LENGTH_SAMPLE = 2000


@dataclass
class StrategyContext:
    """Everything a strategy may use to choose a plan."""

    cluster: Cluster
    model: ModelSpec
    workload: Workload
    objective: str = "goodput"
    model_ref: str | None = None  # what the plan's `model:` says (default: the model's name)
    cluster_ref: str = "cluster.yaml"  # what the plan's `cluster:` says
    budget: float | None = None  # USD per hour
    quality: float = 0.3  # share of sensitivity-weighted weight bits that may be removed
    seed: int = 0
    time_limit: float = 60.0  # seconds, for strategies that search
    max_seqs: int | None = None  # most sequences the engine runs in one batch (per micro-batch lane)
    started: float = field(default_factory=clock.now)
    #: A ``clock.now()`` value past which the strategy's trials raise ``OutOfTime`` (the planner
    #: sets it for the designs it confirms; None: a strategy keeps to ``time_limit`` by its own checks).
    deadline: float | None = None

    def __post_init__(self) -> None:
        if self.objective not in OBJECTIVES:
            raise HetserveError(f"objective {self.objective!r}: use one of {', '.join(OBJECTIVES)}")
        if self.budget is not None and self.budget <= 0:
            raise HetserveError(f"budget={self.budget} must be > 0 (USD per hour)")
        if not 0 <= self.quality <= 0.75:
            raise HetserveError(f"quality={self.quality} is outside [0, 0.75]")
        if self.time_limit <= 0:
            raise HetserveError(f"time_limit={self.time_limit} must be > 0 seconds")
        if self.max_seqs is not None and self.max_seqs < 1:
            raise HetserveError(f"max_batch_size={self.max_seqs} must be at least 1 (sequences per batch)")
        self.model_ref = self.model_ref or self.model.name
        self.slo: SLO = self.workload.slo
        self.prompt, self.output, self.output_q = self.workload.length_stats(self.slo.percentile, self.seed)
        self.rate = self.workload.mean_rate
        self.cost_model = RooflineCostModel(self.model)
        self.sens = sensitivity(self.model)

    # ---- conveniences -------------------------------------------------------------------------------
    @property
    def capacity_slo(self) -> SLO | None:
        """The SLO capacities are computed under: none for the throughput objective."""
        return None if self.objective == "throughput" else self.slo

    def factory(self, quality: float | None = None) -> TemplateFactory:
        q = self.quality if quality is None else quality
        return TemplateFactory(
            self.cluster,
            self.model,
            self.prompt,
            self.output,
            self.capacity_slo,
            q,
            cost_model=self.cost_model,
            output_q=self.output_q,
            max_seqs=self.max_seqs,
            long_tokens=self.long_request if self.max_seqs is not None else None,
        )

    def build_plan(
        self,
        templates: list[Template],
        alloc: Allocation,
        name: str,
        *,
        weighted_handoff: bool = True,
        layerwise_kv: bool = True,
        notes: str = "",
    ) -> PlanFile:
        """The plan of ``alloc`` on this context's cluster and model, least-work routing
        (``planner.build.build_plan``). Raises ``PlacementError`` when it does not pack into the nodes."""
        return build_plan(
            self.cluster,
            self.cluster_ref,
            self.model,
            templates,
            alloc,
            self.prompt,
            name,
            "least-work",
            self.model_ref,
            weighted_handoff=weighted_handoff,
            layerwise_kv=layerwise_kv,
            notes=notes,
        )

    def settings(self, role: str, lanes: int = 1, given: tuple | None = None) -> tuple[int, int, int | None]:
        """(max_batch_size, max_batch_tokens, chunk_size) of an instance with ``lanes`` micro-batch lanes: the
        ``given`` settings (default: the role's), with the batch held to the engine's ``max_seqs`` per lane."""
        max_batch, max_tokens, chunk = given or SETTINGS[role]
        return batch_limit(max_batch, lanes, self.max_seqs), max_tokens, chunk

    @cached_property
    def long_request(self) -> float:
        """The 99th percentile of prompt + output tokens (what a KV share must hold so that long requests
        are not dropped)."""
        return self.workload.long_request(self.seed, 99, LENGTH_SAMPLE)

    def elapsed(self) -> float:
        """Seconds since the context was made: of wall time, or of work when work is counted."""
        return clock.now() - self.started

    def time_left(self) -> float:
        return self.time_limit - self.elapsed()

    def check_time(self) -> None:
        """Raise ``OutOfTime`` once ``deadline`` (when one is set) has passed: the long loops of a
        placement call it, so that the planner's time limit holds for them too."""
        if self.deadline is not None and clock.now() > self.deadline:
            raise OutOfTime("the strategy ran out of time")

    def bits_allowed(self, bits) -> bool:
        """Whether per-layer ``bits`` stay within the quality budget."""
        return removed_share(list(bits), self.sens) <= self.quality + 1e-9

    def uniform_bit_choices(self) -> list[int]:
        """One-precision widths (16, 8, 4, 3) the quality budget allows, widest first."""
        return [b for b in (16, 8, 4, 3) if self.bits_allowed([b] * self.model.num_layers)]

    def vendor_of(self, node: str) -> str:
        return self.cluster.nodes[node].gpu.vendor


# ---- explicit placement ------------------------------------------------------------------------------
@dataclass(frozen=True)
class Spot:
    """A server to be: a TP group on one node holding layers [start, end) at per-layer bits."""

    node: str
    gpus: tuple[int, ...]
    start: int
    end: int
    bits: tuple[int, ...]

    @property
    def tp(self) -> int:
        return len(self.gpus)

    @property
    def layers(self) -> int:
        return self.end - self.start


def spot(node: str, gpus, start: int, end: int, bits=16) -> Spot:
    b = tuple(bits) if isinstance(bits, (list, tuple)) else (int(bits),) * (end - start)
    return Spot(node, tuple(gpus), start, end, b)


@dataclass
class Estimate:
    """What the cost model predicts for one instance on explicitly placed servers. Each capacity is
    computed when first asked for, so a search that ranks by one of them pays for that one only."""

    fits: bool
    kv_tokens: int  # KV capacity of the instance (tokens), after kv_share
    timing: ChainTiming | None
    capacity: Callable[[SLO | None], Capacity] | None = field(
        default=None, repr=False
    )  # under an SLO or None
    slo: SLO | None = None  # the SLO of ``cap``

    @cached_property
    def cap(self) -> Capacity | None:
        """Within the SLOs (None when it does not fit)."""
        return self.capacity(self.slo) if self.fits else None

    @cached_property
    def free(self) -> Capacity | None:
        """Ignoring the SLOs (None when it does not fit)."""
        return self.capacity(None) if self.fits else None

    def rate(self, objective: str) -> float:
        c = self.free if objective == "throughput" else self.cap
        return c.rate if c is not None else 0.0


def shape_of(ctx: StrategyContext, s: Spot) -> ServerShape:
    return ServerShape(
        ctx.cluster.nodes[s.node].gpu, s.tp, s.bits, first=s.start == 0, last=s.end == ctx.model.num_layers
    )


def memory_of(ctx: StrategyContext, s: Spot, role: str = "mixed", settings=None):
    max_batch, max_tokens, _ = settings or SETTINGS[role]
    return ctx.cost_model.memory(shape_of(ctx, s), max_tokens, max_batch)


#: Most micro-batch lanes a chain over shared block servers (Petals, Helix) runs its requests in.
MAX_CHAIN_LANES = 4


def per_request_engine(ctx: StrategyContext) -> bool:
    """Whether a strategy whose own engine moves each request through its chain on its own (Petals,
    Helix) writes its chains that way (``engine_settings.per_request_allowed``)."""
    return per_request_allowed(ctx.max_seqs)


def lanes_holding_long_requests(ctx: StrategyContext, spots: list[Spot], shares: list[float]) -> int:
    """Lanes a chain over ``spots`` (each server giving it ``shares`` of its KV room) runs its requests
    in: one per server, at most ``MAX_CHAIN_LANES``, and no more than leave each lane room for a long
    (99th-percentile) request, so no request a server's cache holds is refused for its lane's share."""
    kv = min(memory_of(ctx, s).kv_capacity_tokens * f for s, f in zip(spots, shares))
    return max(1, min(len(spots), MAX_CHAIN_LANES, int(kv // ctx.model.kv_slots(ctx.long_request))))


def chain_timing(ctx: StrategyContext, spots: list[Spot], micro_batches: int = 1) -> ChainTiming:
    """The planner's chain timing over the real links between the chosen nodes."""
    act = ctx.model.hidden_size * 2.0
    hops = [ctx.cluster.link(a.node, b.node) for a, b in zip(spots, spots[1:])]
    return ChainTiming(
        [ctx.cost_model.timer(shape_of(ctx, s)) for s in spots],
        [h.latency for h in hops],
        [act / h.bandwidth for h in hops],
        micro_batches=micro_batches,
    )


def estimate(
    ctx: StrategyContext,
    role: str,
    spots: list[Spot],
    *,
    settings=None,
    micro_batches: int = 1,
    kv_share: float = 1.0,
) -> Estimate:
    """Memory check and analytic capacity (requests/s) of one instance, as the planner computes it."""
    max_batch, max_tokens, _ = ctx.settings(role, micro_batches, settings)
    kv = math.inf
    for s in spots:
        mem = memory_of(ctx, s, role, (max_batch, max_tokens, None))
        if not mem.fits:
            return Estimate(False, 0, None)
        kv = min(kv, mem.kv_capacity_tokens * kv_share)
    kv = int(kv)
    if kv / micro_batches < ctx.model.kv_slots(
        ctx.prompt + ctx.output
    ):  # each lane gets an equal share of the KV
        return Estimate(False, kv, None)
    ch = chain_timing(ctx, spots, micro_batches)
    if role == "prefill":

        def capacity(slo: SLO | None) -> Capacity:
            return prefill_capacity(ch, ctx.prompt, slo, max_tokens, max_batch=max_batch)
    elif role == "decode":

        def capacity(slo: SLO | None) -> Capacity:
            return decode_capacity(ch, ctx.prompt, ctx.output, slo, max_batch, kv, ctx.output_q)
    else:

        def capacity(slo: SLO | None) -> Capacity:
            return mixed_capacity(
                ch, ctx.prompt, ctx.output, slo, max_batch, max_tokens, kv, output_q=ctx.output_q
            )

    return Estimate(True, kv, ch, capacity, ctx.capacity_slo)


# ---- writing plans -----------------------------------------------------------------------------------
class PlanWriter:
    """Collects servers and instances and returns the plan."""

    def __init__(self, ctx: StrategyContext, name: str):
        self.ctx, self.name = ctx, name
        self.servers: list[ServerPlan] = []
        self.instances: list[InstancePlan] = []
        self._server_of: dict[Spot, str] = {}

    def server(self, s: Spot, name: str | None = None) -> str:
        """The server's name; a spot already written is the same server (a shared server)."""
        if s in self._server_of:
            return self._server_of[s]
        name = name or f"{s.node}-g{s.gpus[0]}" + (f"-tp{s.tp}" if s.tp > 1 else "")
        taken = {x.name for x in self.servers}
        base, k = name, 1
        while name in taken:
            name, k = f"{base}-{k}", k + 1
        bits = list(s.bits) if len(set(s.bits)) > 1 else s.bits[0]
        self.servers.append(
            ServerPlan(name=name, node=s.node, gpus=list(s.gpus), layers=(s.start, s.end), bits=bits)
        )
        self._server_of[s] = name
        return name

    def instance(
        self,
        name: str,
        role: str,
        chain: list[Spot],
        *,
        settings=None,
        micro_batches: int = 1,
        kv_share: float | list[float] = 1.0,
        policy: str | None = None,
        per_request: bool = False,
        pooled_kv: bool = False,
        parts: list[tuple[int, int]] | None = None,
    ) -> str:
        """Write an instance; ``kv_share`` is one share for every server of ``chain`` or one per server.
        ``per_request``: the chain pipelines every request on its own (``micro_batches`` is not used);
        ``pooled_kv``: then its shares join each server's one KV pool (``kv_pool: server``); ``parts``:
        per server of ``chain``, the layers it computes for this instance (``spans`` where that is part
        of the layers the server holds)."""
        if per_request:
            micro_batches = 1
        max_batch, max_tokens, chunk = self.ctx.settings(role, micro_batches, settings)
        names = [self.server(s) for s in chain]
        # rounded down, so that the shares of a server still add up to <= 1
        rounded = lambda x: max(math.floor(min(x, 1.0) * 1e4) / 1e4, 1e-4)
        share: float | dict[str, float] = 1.0
        if isinstance(kv_share, (list, tuple)):
            shares = [rounded(x) for x in kv_share]
            share = dict(zip(names, shares)) if len(set(shares)) > 1 else min(shares[0], 1.0)
        elif kv_share < 1.0:
            share = rounded(kv_share)
        spans = {
            n: (a, b)
            for n, s, (a, b) in zip(names, chain, parts or [], strict=False)
            if (a, b) != (s.start, s.end)
        }
        self.instances.append(
            InstancePlan(
                name=name,
                role=role,
                chain=names,
                max_batch_size=int(max_batch),
                max_batch_tokens=int(max_tokens),
                chunk_size=chunk,
                micro_batches=int(micro_batches),
                kv_share=share,
                spans=spans,
                **({"policy": policy} if policy else {}),
                **({"pipelining": "per-request"} if per_request and len(chain) > 1 else {}),
                **({"kv_pool": "server"} if pooled_kv and per_request and len(chain) > 1 else {}),
            )
        )
        return name

    def plan(self, routing: RoutingPlan | None = None, notes: str = "") -> PlanFile:
        if not self.instances:
            raise HetserveError(f"{self.name}: no instance could be placed on the cluster")
        return PlanFile(
            name=self.name,
            model=self.ctx.model_ref,
            cluster=self.ctx.cluster_ref,
            servers=self.servers,
            instances=self.instances,
            routing=routing or RoutingPlan(),
            notes=notes,
        )


# ---- trial simulations -------------------------------------------------------------------------------
def trial(ctx: StrategyContext, plan: PlanFile, rate: float, requests: int = TRIAL_REQUESTS) -> Run | None:
    """Simulate ``plan`` on the workload at ``rate`` for about ``requests`` requests (a strategy's own
    search; the comparison itself simulates separately)."""
    dep = Deployment(plan, ctx.cluster, ctx.model, source=f"{plan.name} (trial)", deadline=ctx.deadline)
    judge_slo = OBJECTIVES[ctx.objective].judges_slo
    return simulate_at_rate(
        dep, ctx.workload, rate, seed=ctx.seed, requests=requests, judge_slo=judge_slo, deadline=ctx.deadline
    )


def best_by_trial(ctx: StrategyContext, designs, build) -> PlanFile | None:
    """The plan of the best-scoring design: each ``(design, rate)`` in order is built with ``build(design)``
    (None = skip) and simulated at its rate (saturating for throughput, the workload's for cost/power),
    stopping when the time limit is spent and one plan exists."""
    objective = OBJECTIVES[ctx.objective]
    best = None
    for design, rate in designs:
        if best is not None and ctx.time_left() < 0:
            break
        plan = build(design)
        if plan is None:
            continue
        sim_rate = (
            rate * 1.2
            if ctx.objective == "throughput"
            else (rate if ctx.objective == "goodput" else ctx.rate)
        )
        score = objective.score(trial(ctx, plan, sim_rate), sim_rate)
        if best is None or score > best[0]:
            best = (score, plan)
    return None if best is None else best[1]


class Strategy:
    """One way of choosing a deployment. Subclasses set ``name`` and ``summary`` and implement ``plan``."""

    name = "strategy"
    summary = ""

    def plan(self, ctx: StrategyContext) -> PlanFile:
        raise NotImplementedError

    def applies(self, ctx: StrategyContext) -> bool:
        """Whether the strategy plans for ``ctx``'s model and cluster at all: every strategy but a fixed,
        published layout does. ``hetserve compare`` runs by default only those that apply."""
        return True

    def __repr__(self) -> str:
        return f"<strategy {self.name}>"
