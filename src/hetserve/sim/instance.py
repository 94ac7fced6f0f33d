"""Simulated servers and instances.

A ``SimServer`` is a compute resource. A server on one instance's chain has a FIFO timeline
(``free_at``). A server on several instances' chains batches: whatever waits on it when it becomes free
(the batches of every chain through it, up to the largest token budget among them) runs as one step,
so the server reads its weights once for all of them, as a block server batching the requests of
every path through it does. A ``SimInstance`` runs the
shared scheduler (``hetserve.scheduling``) in one or more *lanes*: a lane is one batch in flight through
the chain (``micro_batches`` lanes keep a pipeline's stages busy), with its own scheduler and an equal
share of the instance's KV blocks.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field

from ..costmodel.roofline import ServerTimer
from ..plan import Deployment, Instance
from ..scheduling.block_manager import BlockManager
from ..scheduling.scheduler import Batch, Scheduler, SchedulerConfig
from ..scheduling.sequence import Sequence

#: Reference request used to rank instance speed and estimate outstanding work.
REF_PROMPT, REF_OUTPUT, REF_BATCH = 1000, 200, 16


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

    @property
    def batching(self) -> bool:
        return self.timer is not None

    def take_step(self) -> tuple[list, tuple[float, float, float, float]]:
        """The waiting batches the next step runs (in arrival order, within the token budget; at least
        one) and the shape of the merged step."""
        taken, new, seqs, pairs, kv = [], 0.0, 0.0, 0.0, 0.0
        while self.waiting:
            lane, stage = self.waiting[0]
            n, q, p, k = lane.shape
            if taken and new + n > self.token_budget:
                break
            self.waiting.popleft()
            taken.append((lane, stage))
            new, seqs, pairs, kv = new + n, seqs + q, pairs + p, kv + k
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
class Lane:
    instance: SimInstance
    index: int
    scheduler: Scheduler
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


class SimInstance:
    """One instance of the plan: its chain's timers, hops and lanes, plus counters the router reads."""

    def __init__(self, inst: Instance, dep: Deployment, servers: dict[str, SimServer], seed: int = 0):
        self.name = inst.name
        self.role = inst.role
        self.plan = inst.plan
        self.servers = [servers[s.name] for s in inst.servers]
        self.timers: list[ServerTimer] = [dep.cost_model.timer(s.shape) for s in inst.servers]
        act_bytes = dep.model.hidden_size * 2.0
        self.hop_latency = [h.latency for h in inst.hops]
        self.hop_byte_time = [act_bytes / h.bandwidth for h in inst.hops]
        lanes = inst.plan.micro_batches
        bs = inst.plan.block_size
        total_blocks = inst.kv_capacity_tokens // bs
        self.capacity_tokens = (total_blocks // lanes) * bs
        self.lanes: list[Lane] = []
        for i in range(lanes):
            cfg = SchedulerConfig(
                max_num_seqs=max(1, inst.plan.max_batch_size // lanes),
                max_num_batched_tokens=inst.plan.max_batch_tokens,
                prefill_chunk_size=inst.plan.chunk_size,
                policy=inst.plan.policy.replace("-", "_"),
            )
            self.lanes.append(Lane(self, i, Scheduler(cfg, BlockManager(max(1, total_blocks // lanes), bs))))
        shared = any(len(s.instances) > 1 for s in inst.servers)
        #: Servers nobody else uses: a step's time is known when it starts, and runs of decode steps
        #: can be advanced together. With m lanes a lane's step takes the pipeline's steady-state cycle,
        #: max(latency, m x slowest stage); servers shared with other instances queue stage by stage.
        self.exclusive = not shared
        self.num_lanes = lanes
        self.kv_bytes_per_token = dep.model.kv_bytes_per_token(inst.servers[-1].shape.kv_dtype_bytes)
        # speed and work estimates from the cost model
        prefill_1k = self.step_time(REF_PROMPT, 1, REF_PROMPT * (REF_PROMPT + 1) / 2, REF_PROMPT)
        ctx = REF_PROMPT + REF_OUTPUT / 2
        decode = self.step_time(REF_BATCH, REF_BATCH, REF_BATCH * (ctx + 1), REF_BATCH * (ctx + 1))
        self.prefill_cost_per_token = prefill_1k / REF_PROMPT
        self.decode_cost_per_token = decode / REF_BATCH
        single = self.step_time(1, 1, ctx + 1, ctx + 1)
        self.speed = 1.0 / (prefill_1k + REF_OUTPUT * single)
        self.pending_prompt = 0
        self.pending_output = 0
        self.requests = 0  # admitted and not finished
        #: For a prefill instance: the least outstanding work among the decode instances it hands off
        #: to, set by the simulator before each routing decision.
        self.downstream_work = 0.0
        self.clock = [0.0]  # the simulator's current time, shared
        self.max_requests = inst.plan.max_batch_size

    # ---- timing ---------------------------------------------------------------------------------
    def step_time(self, new_tokens: float, seqs: float, pairs: float, kv_read: float) -> float:
        """Time of one step of one batch through the whole chain, without queueing."""
        t = 0.0
        for timer in self.timers:
            t += timer.time(new_tokens, seqs, pairs, kv_read)
        for lat, per_byte in zip(self.hop_latency, self.hop_byte_time):
            t += lat + per_byte * new_tokens
        return t

    def cycle_time(self, new_tokens: float, seqs: float, pairs: float, kv_read: float) -> float:
        """Time between one lane's steps: its latency, or with m lanes in flight m x the slowest stage."""
        latency = self.step_time(new_tokens, seqs, pairs, kv_read)
        if self.num_lanes == 1:
            return latency
        slowest = max(timer.time(new_tokens, seqs, pairs, kv_read) for timer in self.timers)
        return max(latency, self.num_lanes * slowest)

    def decode_affine(self, batch: float, kv: float) -> tuple[float, float]:
        """``(a, b)``: a lane's decode step of ``batch`` sequences takes ``a + b * kv`` (the cycle term
        that dominates at ``kv``)."""
        a = b = 0.0
        stages = []
        for timer in self.timers:
            ta, tb = timer.decode_affine(batch)
            a += ta
            b += tb
            stages.append((ta, tb))
        for lat, per_byte in zip(self.hop_latency, self.hop_byte_time):
            a += lat + per_byte * batch
        if self.num_lanes > 1:
            sa, sb = max(stages, key=lambda ab: ab[0] + ab[1] * kv)
            sa, sb = sa * self.num_lanes, sb * self.num_lanes
            if sa + sb * kv > a + b * kv:
                return sa, sb
        return a, b

    def stage_shares(self, new_tokens: float, seqs: float, pairs: float, kv_read: float) -> list[float]:
        """Each server's busy share of a lane's cycle (a single server alone: [1.0])."""
        if len(self.timers) == 1 and self.num_lanes == 1:
            return [1.0]
        times = [timer.time(new_tokens, seqs, pairs, kv_read) for timer in self.timers]
        cycle = self.cycle_time(new_tokens, seqs, pairs, kv_read)
        return [x / cycle for x in times]

    def hop_time(self, i: int, new_tokens: float) -> float:
        return self.hop_latency[i] + self.hop_byte_time[i] * new_tokens

    # ---- router's view --------------------------------------------------------------------------
    def outstanding_work(self) -> float:
        """Seconds of work ahead of a new request on its whole path: a prefill instance adds the least
        loaded decode instance it can hand off to, so entry routing sees decode-pool congestion."""
        output = self.pending_output
        now = self.clock[0]
        for lane in self.lanes:
            if lane.busy and lane.steps > 1:  # a run of decode steps part-way through
                output -= lane.steps_done_by(now) * lane.n
        own = self.pending_prompt * self.prefill_cost_per_token + output * self.decode_cost_per_token
        return own + self.downstream_work

    def has_free_slot(self) -> bool:
        if self.requests >= self.max_requests:
            return False
        return any(
            l.scheduler.blocks.num_free_blocks * l.scheduler.blocks.block_size > REF_PROMPT
            for l in self.lanes
        )

    def fits(self, prompt: int, output: int) -> bool:
        """Whether a request could ever run here (KV room and, without chunking, the token budget)."""
        need = prompt + output
        if need > self.capacity_tokens:
            return False
        return self.plan.chunk_size is not None or need <= self.plan.max_batch_tokens

    def add(self, seq: Sequence) -> Lane:
        lane = min(self.lanes, key=lambda l: (len(l.scheduler.waiting) + len(l.scheduler.running), l.index))
        lane.scheduler.add(seq)
        self.pending_prompt += seq.prompt_len - seq.num_transferred_tokens
        self.pending_output += seq.max_tokens - seq.num_output_tokens
        self.requests += 1
        return lane
