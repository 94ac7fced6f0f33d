"""Simulated servers and instances.

A ``SimServer`` is a compute resource. A server on one instance's chain has a FIFO timeline
(``free_at``). A server on several instances' chains batches: whatever waits on it when it becomes free
(the batches of every chain through it, up to the largest token budget among them) runs as one step,
so the server reads its weights once for all of them, as a block server batching the requests of
every path through it does. A ``SimInstance`` is the shared instance layer
(``hetserve.scheduling.instance``: lanes, lane choice, admission counters, the router's view) on the
simulator's clock; its steps are timed by its chain's cost model (``chain``, a ``costmodel.ChainTimer``).
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field

from ..costmodel.roofline import ServerTimer
from ..plan import Deployment, Instance
from ..scheduling.decode_group import GroupScheduler
from ..scheduling.instance import InstanceState
from ..scheduling.instance import Lane as LaneBase
from ..scheduling.scheduler import Batch, Scheduler


@dataclass
class SimServer:
    name: str
    gpus: int
    idle_w: float
    busy_w: float
    free_at: float = 0.0
    busy: float = 0.0
    bins: list[float] = field(default_factory=list)  # busy seconds per utilisation bin
    bin_width: float = 1.0
    # a server shared by several instances: its timer, its step's token budget and the (lane, stage)
    # batches waiting for the next step
    timer: ServerTimer | None = None
    token_budget: int = 0
    waiting: deque = field(default_factory=deque)
    running: bool = False
    # a server whose devices share a host's cores (``sim.hosts``): the host and the cores a step asks for
    host: str | None = None
    host_cores: float = 0.0

    @property
    def batching(self) -> bool:
        return self.timer is not None

    def take_step(self) -> tuple[list, tuple[float, float, float, float]]:
        """The waiting batches the next step runs (in arrival order, within the token budget; at least
        one) and the shape of the merged step."""
        taken, tokens, new, seqs, pairs, kv = [], 0.0, 0.0, 0.0, 0.0, 0.0
        while self.waiting:
            lane, stage = self.waiting[0]
            n, q, p, k = lane.shape
            if taken and tokens + n > self.token_budget:
                break
            self.waiting.popleft()
            taken.append((lane, stage))
            # a step through part of the server's layers (``spans``) does that part of the work per
            # token; the server still reads the weights of every layer once per merged step
            f = lane.instance.fractions[stage]
            tokens += n
            new, seqs, pairs, kv = new + n * f, seqs + q * f, pairs + p * f, kv + k * f
        return taken, (new, seqs, pairs, kv)

    def occupy(self, start: float, duration: float) -> None:
        self.busy += duration
        end = start + duration
        if end > self.free_at:
            self.free_at = end
        w = self.bin_width
        b = int(start / w)
        while duration > 0:
            if b >= len(self.bins):
                self.bins.extend([0.0] * (b + 1 - len(self.bins)))
            edge = (b + 1) * w
            part = min(duration, edge - start)
            self.bins[b] += part
            duration -= part
            start = edge
            b += 1


def run_total(a: float, b: float, kv0: float, n: float, k: int) -> float:
    """Time of ``k`` decode steps of ``n`` sequences whose step time is ``a + b * kv``, starting with
    ``kv0`` KV tokens read (each step reads ``n`` more than the one before)."""
    return k * a + b * (k * kv0 + n * k * (k - 1) / 2)


def steps_within(a: float, b: float, kv0: float, n: float, budget: float, limit: int) -> int:
    """The largest ``m`` in ``[0, limit]`` with ``run_total(m) <= budget``."""
    if budget <= 0:
        return 0
    c2 = b * n / 2
    c1 = a + b * kv0 - c2
    if c2 > 0:
        m = int((-c1 + math.sqrt(c1 * c1 + 4 * c2 * budget)) / (2 * c2))
    else:
        m = int(budget / c1) if c1 > 0 else limit
    m = min(max(m, 0), limit)
    while m > 0 and run_total(a, b, kv0, n, m) > budget:
        m -= 1
    while m < limit and run_total(a, b, kv0, n, m + 1) <= budget:
        m += 1
    return m


@dataclass(eq=False)
class Lane(LaneBase):
    """A lane on the simulator's clock: the step (or run of decode steps) it has in flight."""

    instance: SimInstance | None = None
    busy: bool = False
    batch: Batch | None = None
    version: int = 0  # bumps when a run is cut short; stale DONE events are skipped
    shape: tuple = ()  # (new tokens, sequences, attention pairs, KV read) of the batch
    # the step (or run of decode steps) in flight on an exclusive chain
    t0: float = 0.0
    duration: float = 0.0  # of one step; a run's length comes from (a, b, kv0, n)
    steps: int = 1
    a: float = 0.0
    b: float = 0.0
    kv0: float = 0.0
    n: float = 0.0
    shares: list = field(default_factory=list)

    def total(self, k: int) -> float:
        return run_total(self.a, self.b, self.kv0, self.n, k) if self.steps > 1 else self.duration

    def steps_done_by(self, t: float) -> int:
        """Steps of the current run that have ended by time ``t``."""
        if self.steps == 1:
            return 1 if t >= self.t0 + self.duration else 0
        return steps_within(self.a, self.b, self.kv0, self.n, t - self.t0, self.steps)


class SimInstance(InstanceState[Lane]):
    """One instance of the plan on the simulator's clock: its chain's timers and hops, its lanes, and
    its servers' timelines."""

    #: Decoding sequences advance as a group (the same decisions as ``Scheduler``, in O(1) per step);
    #: models with sliding-window KV use ``Scheduler``.
    scheduler_type: type[Scheduler] = GroupScheduler

    def __init__(self, inst: Instance, dep: Deployment, servers: dict[str, SimServer]):
        self.chain = dep.chain_timer(inst.name)
        config = inst.scheduling()
        super().__init__(
            config,
            self.chain.work_estimate(),
            inst.kv_capacity_tokens // inst.plan.block_size,
            Lane,
            scheduler_type=self.scheduler_type if config.kv_window is None else Scheduler,
        )
        for lane in self.lanes:
            lane.instance = self
        self.plan = inst.plan
        self.servers = [servers[s.name] for s in inst.servers]
        #: The share of each server's layers this instance's steps run through (below 1 where ``spans``
        #: gives a server's part): a shared server's merged step counts a step's work by it.
        self.fractions = [inst.stage_fraction(k) for k in range(len(inst.servers))]
        #: A server of its chain shares a host's cores (``sim.hosts``): its steps are timed there.
        self.hosted = any(srv.host is not None for srv in self.servers)
        #: Servers nobody else uses: a step's time is known when it starts, and runs of decode steps
        #: can be advanced together. With m lanes in flight a lane's step takes the pipeline's cycle,
        #: max(latency, m x slowest stage) (a lone lane: the latency); servers shared with other
        #: instances, and servers sharing a host's cores, queue stage by stage (each stage's time then
        #: depends on what the other lanes and the host's other devices do meanwhile).
        self.exclusive = (
            not self.per_request and not self.hosted and not any(len(s.instances) > 1 for s in inst.servers)
        )
        self.kv_bytes_per_token = dep.model.kv_bytes_per_token(inst.servers[-1].shape.kv_dtype_bytes)
        self.clock = [0.0]  # the simulator's current time, shared
        #: Lanes looked at by the router's reads of this instance's load (the simulator charges them).
        self.lane_reads = 0

    def busy_lanes(self) -> int:
        """Lanes with a step in flight."""
        self.lane_reads += len(self.lanes)
        return sum(1 for ln in self.lanes if ln.busy)

    # ---- the router's view ------------------------------------------------------------------------
    def output_in_flight(self) -> int:
        """Tokens that runs of decode steps part-way through have produced by now."""
        now = self.clock[0]
        self.lane_reads += len(self.lanes)
        return sum(ln.steps_done_by(now) * ln.n for ln in self.lanes if ln.busy and ln.steps > 1)

    def work_drop_bound(self) -> tuple[float, float, float]:
        """Each run of decode steps part-way through ends a step of ``n`` tokens at most every
        ``shortest`` seconds (its shortest step, the first or the last): by time ``t`` at most one step
        plus ``(t - now) / shortest`` more, each ``n`` tokens of owed output fewer, and no more than the
        steps it has left."""
        return self.work_view()[1]

    def work_view(self) -> tuple[float, tuple[float, float, float]]:
        """``own_work()`` and ``work_drop_bound()`` from one pass over the lanes."""
        now = self.clock[0]
        jump = rate = most = 0.0
        produced = 0
        per_token = self.estimate.decode_s_per_token
        for ln in self.lanes:
            if not (ln.busy and ln.steps > 1):
                continue
            done = ln.steps_done_by(now)
            produced += done * ln.n
            left = ln.steps - done
            if left <= 0:
                continue  # the run's end is the next change (an event)
            shortest = min(ln.a + ln.b * ln.kv0, ln.a + ln.b * (ln.kv0 + ln.n * (ln.steps - 1)))
            step = per_token * ln.n
            most += step * left
            if shortest > 0:
                jump += step
                rate += step / shortest
            else:
                jump += step * left
        return self.work_with(produced), (jump, rate, most)
