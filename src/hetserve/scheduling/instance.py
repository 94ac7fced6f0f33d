"""One instance as both clocks run it: its micro-batch lanes and the figures the router reads.

An instance is a chain of servers that serves requests. It runs the shared scheduler in one or more
*lanes*: a lane is one batch in flight through the chain. Two ways to pipeline (``InstanceConfig.
per_request``):

* micro-batch lanes (the default): ``lanes`` micro-batches keep a pipeline's stages busy, each with its
  own scheduler over an equal, disjoint share of the instance's KV blocks and an equal share of its
  ``max_batch_size``; a lane's sequences move through the stages together.
* per-request: every request is a lane of its own and moves through the stages independently (the
  schedule of Petals and Helix); the servers batch whatever steps wait on them. The lanes share one KV
  pool. A request is admitted, first come first served, when a lane is free and the pool has room for
  its whole length (prompt plus every output token) beyond what the requests already admitted may
  still grow to, so an admitted request never has to be preempted. Instances through one server may
  share its KV room (``KVPool``, a plan's ``kv_pool: server``): a request is then admitted when every
  pool on its chain has room for it too, and a request that leaves frees room for the others.

The simulator (``hetserve.sim``) and the cluster driver
(``hetserve.runtime.cluster``) both subclass ``InstanceState``: they keep their own clock and transport
and add their lane's in-flight state, while lane choice, admission counters and the router's view
(``Routable``) are these.

Outstanding work is in seconds: queued prompt tokens and owed output tokens times per-token costs
(``WorkEstimate``) that the owner supplies (the cost model's chain timer in both clocks, or measured
step times). Pure Python: no torch, no numpy.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Generic, TypeVar

from .block_manager import BlockManager
from .kv_window import KVWindow
from .routing import Pool, ScanPool
from .scheduler import Batch, Policy, Scheduler, SchedulerConfig
from .sequence import Sequence, SequenceStatus

#: Reference request used to rank instance speed and to estimate outstanding work: a 1,000-token
#: prompt, a 200-token reply, decoded in batches of 16.
REF_PROMPT, REF_OUTPUT, REF_BATCH = 1000, 200, 16


@dataclass(frozen=True)
class WorkEstimate:
    """What a unit of work costs on one instance, in seconds."""

    prefill_s_per_token: float
    decode_s_per_token: float
    #: Reference requests per second the instance serves one at a time (JFFC's chain speed).
    speed: float


@dataclass(frozen=True)
class InstanceConfig:
    """An instance's scheduling settings, as the plan gives them (``max_batch_size`` counts the whole
    instance; every lane runs its share)."""

    name: str
    role: str  # mixed | prefill | decode
    lanes: int
    max_batch_size: int
    max_batch_tokens: int
    chunk_size: int | None
    policy: Policy
    block_size: int
    kv_window: KVWindow | None = None  # the model's sliding-window layers: KV held per token
    #: Each request its own lane through the chain, over one shared KV pool (``max_batch_size`` lanes;
    #: ``lanes`` is not used).
    per_request: bool = False
    #: Per-request pipelining over its servers' shared KV pools (``join``); no prefix caching then: a
    #: block's KV leaves the server's pool when its request does.
    kv_pool: bool = False


class KVPool:
    """One server's KV room shared by the instances through it that pipeline per request: token slots,
    and the slots their admitted requests may grow to."""

    def __init__(self, server: str, tokens: int):
        self.server = server
        self.tokens = tokens
        self.promised = 0
        self.members: list[InstanceState] = []

    def room(self) -> int:
        return self.tokens - self.promised


def share_kv_pools(
    instances: dict[str, InstanceState], pooled: dict[str, tuple[tuple[str, int], ...]]
) -> None:
    """Give every instance in ``pooled`` (name -> its servers' (name, pool tokens)) the pools of its
    servers, one ``KVPool`` per server for all of them."""
    pools: dict[str, KVPool] = {}
    for name, servers in pooled.items():
        instances[name].join([pools.setdefault(s, KVPool(s, t)) for s, t in servers])


@dataclass(eq=False)
class Lane:
    """One micro-batch lane: a scheduler over the blocks ``[offset, offset + num_blocks)``."""

    index: int
    scheduler: Scheduler
    offset: int

    @property
    def load(self) -> int:
        return len(self.scheduler.waiting) + len(self.scheduler.running)


L = TypeVar("L", bound=Lane)


class InstanceState(Generic[L]):
    """Lanes, admission and the router's view of one instance. ``make_lane`` builds each lane (the
    owner's lane type, holding its in-flight state)."""

    def __init__(
        self,
        config: InstanceConfig,
        estimate: WorkEstimate,
        num_blocks: int,
        make_lane: type[L],
        *,
        prefix_caching: bool = True,
        scheduler_type: type[Scheduler] = Scheduler,
    ):
        self.config = config
        self.name = config.name
        self.role = config.role
        self.estimate = estimate
        self.per_request = config.per_request
        if self.per_request:  # one sequence per lane, one pool shared by all (block ids as they are)
            prefix_caching = prefix_caching and not config.kv_pool
            lanes, per_lane = max(1, config.max_batch_size), max(1, num_blocks)
            pool = BlockManager(per_lane, config.block_size, prefix_caching, config.kv_window)
            scheduler_type = Scheduler  # a lane of one sequence has no decode group to advance
        else:
            lanes = max(1, config.lanes)
            per_lane = max(1, num_blocks // lanes)
        #: KV slots one lane holds (a request must fit in one lane), and the longest sequence they hold.
        self.capacity_tokens = per_lane * config.block_size
        window = config.kv_window
        self.longest_sequence = (
            self.capacity_tokens if window is None else window.tokens_within(self.capacity_tokens)
        )
        self.lane_seqs = 1 if self.per_request else max(1, config.max_batch_size // lanes)
        self.lanes: list[L] = [
            make_lane(
                i,
                scheduler_type(
                    SchedulerConfig(
                        max_batch_size=self.lane_seqs,
                        max_batch_tokens=config.max_batch_tokens,
                        chunk_size=config.chunk_size,
                        policy=config.policy,
                    ),
                    pool
                    if self.per_request
                    else BlockManager(per_lane, config.block_size, prefix_caching, config.kv_window),
                ),
                0 if self.per_request else i * per_lane,
            )
            for i in range(lanes)
        ]
        self.num_blocks = per_lane if self.per_request else per_lane * lanes
        #: Per-request pipelining: requests waiting for a lane and for KV room (first come, first
        #: served), the lanes without a request, and the blocks the admitted requests may grow to.
        self.queue: deque[Sequence] = deque()
        self.idle: list[L] = self.lanes[::-1] if self.per_request else []
        self.promised = 0
        #: Servers' KV pools this instance shares with others (``join``), and those others.
        self.kv_pools: list[KVPool] = []
        self.pool_neighbours: list[InstanceState] = []
        #: The lane each admitted, unfinished sequence is on.
        self.lane_of: dict[int, L] = {}
        #: Prompt tokens still to be computed, output tokens still owed, requests admitted and unfinished.
        self.pending_prompt = 0
        self.pending_output = 0
        self.requests = 0
        #: For a prefill instance: the pool of decode instances it hands off to, whose least outstanding
        #: work counts in its own so entry routing sees decode-pool congestion.
        self.downstream: Pool | ScanPool | None = None
        #: Routing pools this instance is in (told of every change of its load) and the tie-break stamp.
        self.pools: list[Pool | ScanPool] = []
        self.last_chosen = -1

    def join(self, pools: list[KVPool]) -> None:
        """Draw on ``pools`` (per-request pipelining) beside this instance's own blocks."""
        if not self.per_request:
            raise ValueError(
                f"instance '{self.name}': only an instance pipelining per request shares KV pools"
            )
        self.kv_pools = pools
        for pool in pools:
            for other in pool.members:
                if other not in self.pool_neighbours:
                    self.pool_neighbours.append(other)
                    other.pool_neighbours.append(self)
            pool.members.append(self)

    def leave_pools(self) -> None:
        """Give back what this instance's admitted requests were promised in the shared pools, and
        leave them (an instance taken down; its requests are served elsewhere)."""
        tokens = self.promised * self.config.block_size
        for pool in self.kv_pools:
            pool.promised -= tokens
            pool.members.remove(self)
        for other in self.pool_neighbours:
            other.pool_neighbours.remove(self)
        self.kv_pools, self.pool_neighbours, self.promised = [], [], 0

    def pools_hold(self, tokens: int) -> bool:
        """Whether every shared pool on this instance's chain has room for ``tokens`` more."""
        return all(pool.room() >= tokens for pool in self.kv_pools)

    # ---- the router's view (Routable) -------------------------------------------------------------
    @property
    def speed(self) -> float:
        return self.estimate.speed

    def output_in_flight(self) -> int:
        """Output tokens already produced by steps in flight but not yet accounted (a clock that
        advances several decode steps at once reports the part already behind it)."""
        return 0

    def own_work(self) -> float:
        """Seconds of work queued and running here."""
        return self.work_with(self.output_in_flight())

    def work_with(self, in_flight: int) -> float:
        """``own_work`` when steps in flight have produced ``in_flight`` output tokens."""
        output = self.pending_output - in_flight
        return (
            self.pending_prompt * self.estimate.prefill_s_per_token
            + output * self.estimate.decode_s_per_token
        )

    def outstanding_work(self) -> float:
        """Seconds of work ahead of a new request on its whole path."""
        own = self.own_work()
        return own if self.downstream is None else own + self.downstream.least_work()

    def work_view(self) -> tuple[float, tuple[float, float, float]]:
        """``own_work()`` and ``work_drop_bound()`` together (``routing.Indexable``); a clock that
        computes both from the same state does it in one pass."""
        return self.own_work(), self.work_drop_bound()

    def work_drop_bound(self) -> tuple[float, float, float]:
        """How much ``own_work`` can fall with time alone (``routing.Indexable``): not at all here; a
        clock that advances several decode steps at once says how fast its runs end steps."""
        return 0.0, 0.0, 0.0

    def load_changed(self) -> None:
        """Tell this instance's routing pools that its load changed."""
        for pool in self.pools:
            pool.mark(self)

    def has_free_slot(self) -> bool:
        """A batch slot, and a lane with KV room for a reference prompt (or an empty lane)."""
        if self.requests >= self.config.max_batch_size:
            return False
        need = min(REF_PROMPT + 1, self.capacity_tokens)
        if self.per_request:
            return (self.num_blocks - self.promised) * self.config.block_size >= need and self.pools_hold(
                need
            )
        return any(
            ln.scheduler.blocks.num_free_blocks * ln.scheduler.blocks.block_size >= need for ln in self.lanes
        )

    @property
    def fit_limit(self) -> int:
        """The most prompt + output tokens a request can have and still run here: KV room and, for an
        instance that prefills without chunking, the token budget (a decode instance receives the
        prompt's KV and computes one token per step, so it needs KV room only)."""
        if self.role == "decode" or self.config.chunk_size is not None:
            return self.longest_sequence
        return min(self.longest_sequence, self.config.max_batch_tokens)

    def fits(self, prompt: int, output: int) -> bool:
        """Whether a request could ever run here (``fit_limit``)."""
        return prompt + output <= self.fit_limit

    # ---- a request's life -------------------------------------------------------------------------
    def add(self, seq: Sequence) -> list[L]:
        """Queue ``seq``: on the least loaded lane (the first of equals), or, pipelining per request,
        in the instance's queue. The lanes given a sequence (that may have a step to start)."""
        if self.per_request:
            if self.promise(seq) > self.num_blocks:
                self.lanes[0].scheduler.add(seq)  # raises: longer than the whole pool holds
            self.queue.append(seq)
        else:
            lane = min(self.lanes, key=lambda ln: (ln.load, ln.index))
            lane.scheduler.add(seq)
            self.lane_of[seq.seq_id] = lane
        self.pending_prompt += seq.prompt_len - seq.num_transferred_tokens
        self.pending_output += seq.max_tokens - seq.num_output_tokens
        self.requests += 1
        started = self.admit_queued() if self.per_request else [lane]
        self.load_changed()
        return started

    def promise(self, seq: Sequence) -> int:
        """Blocks ``seq`` holds at its longest."""
        return self.lanes[0].scheduler.blocks.blocks_for(seq.max_total_tokens)

    def admit_queued(self) -> list[L]:
        """Pipelining per request: give queued sequences, in order, a free lane while the pool (and
        every shared pool on the chain) has room for each one's whole length; the lanes given one."""
        started: list[L] = []
        while self.queue and self.idle:
            need = self.promise(self.queue[0])
            tokens = need * self.config.block_size
            if self.promised + need > self.num_blocks or not self.pools_hold(tokens):
                break
            seq = self.queue.popleft()
            lane = self.idle.pop()
            self.promised += need
            for pool in self.kv_pools:
                pool.promised += tokens
            lane.scheduler.add(seq)
            self.lane_of[seq.seq_id] = lane
            started.append(lane)
        return started

    def next_step_tokens(self, lane: L) -> int:
        """Pipelining per request: the most tokens ``lane``'s next step computes (its request's next
        prompt chunk, or one token), before a prefix-cache hit shortens a prompt."""
        sched = lane.scheduler
        seq = sched.running[0] if sched.running else sched.waiting[0] if sched.waiting else None
        return 0 if seq is None else sched.step_tokens(seq)

    def _release(self, seq: Sequence) -> None:
        """``seq`` left its lane (finished or aborted)."""
        lane = self.lane_of.pop(seq.seq_id, None)
        if self.per_request and lane is not None:
            need = self.promise(seq)
            self.promised -= need
            for pool in self.kv_pools:
                pool.promised -= need * self.config.block_size
            self.idle.append(lane)

    def schedule(self, lane: L) -> Batch:
        """The lane's next batch; a preempted sequence's tokens count as prompt to compute again."""
        batch = lane.scheduler.schedule()
        for seq in batch.preempted:
            self.pending_prompt += seq.prompt_len + seq.num_output_tokens - 1 - seq.num_transferred_tokens
        self.load_changed()  # preemptions, and free blocks for has_free_slot
        return batch

    def complete(
        self,
        lane: L,
        batch: Batch,
        token_ids: dict[int, int] | None = None,
        stopped: set[int] | frozenset[int] = frozenset(),
        steps: int = 1,
    ) -> list[Sequence]:
        """Advance ``lane``'s sequences after ``batch`` ran (``steps`` identical decode steps when more
        than one); the finished sequences."""
        produced = batch.group.seqs if batch.group else 0  # output tokens each step produces
        for it in batch.items:
            if it.seq.status is not SequenceStatus.RUNNING:
                continue  # aborted while its batch ran
            if it.is_prefill:
                self.pending_prompt -= it.num_tokens
            if it.samples:
                produced += 1
        if steps > 1:
            finished = lane.scheduler.postprocess_decode_steps(batch, steps)
        else:
            finished = lane.scheduler.postprocess(batch, token_ids, stopped)
        self.pending_output -= produced * steps
        for seq in finished:
            self.pending_output -= seq.max_tokens - seq.num_output_tokens  # stopped early
            self.requests -= 1
            self._release(seq)
        self.load_changed()
        return finished

    def abort(self, seq_id: int) -> None:
        """Remove a sequence that has not finished; its remaining work no longer counts."""
        lane = self.lane_of.get(seq_id)
        if lane is not None:
            seq = lane.scheduler.abort(seq_id)
        else:
            seq = next((s for s in self.queue if s.seq_id == seq_id), None)
            if seq is not None:
                self.queue.remove(seq)
        if seq is None:
            return
        self._release(seq)
        computed = max(seq.num_computed_tokens, seq.num_transferred_tokens)
        self.pending_prompt -= max(0, seq.prompt_len - computed)
        self.pending_output -= seq.max_tokens - seq.num_output_tokens
        self.requests -= 1
        self.load_changed()
