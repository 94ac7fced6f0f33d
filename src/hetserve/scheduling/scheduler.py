"""Continuous (iteration-level) batching over a paged KV cache.

Each ``schedule()`` picks the sequences that run in the next forward step and how many tokens each
computes: a whole prompt, a prompt chunk, or one decode token. ``postprocess()`` then advances their
counts with what the step produced. Two policies:

* ``decode-first`` -- running sequences go first (their decode token or next prompt chunk), then
  waiting sequences are admitted with what is left of the token budget; steps mix prefill and decode.
* ``prefill-first`` -- while a prompt can be admitted (or a running one is still mid-prompt) the step
  is prefill only; running sequences decode in steps without prefill.

When a running sequence needs a block and none is free, the most recently admitted running sequence
is preempted: its blocks are freed, its progress forgotten, and it goes back to the head of the queue
to recompute its prompt and output later. Admission is first come, first served.

Without chunking a prompt is computed whole and must fit the step's token budget, except for a sequence
whose KV arrives from another instance (a decode instance's hand-off): it only computes one token per
step, so only its KV must fit; if a preemption makes it recompute more than a step holds, it recomputes
in budget-sized pieces.

Pure Python and O(running sequences) per step (plus block bookkeeping) so the discrete-event
simulator can drive it with token counts alone.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field

from ..vocabulary import SCHEDULE_POLICIES, SchedulePolicy
from .block_manager import BlockManager
from .sequence import Sequence, SequenceStatus

Policy = SchedulePolicy


@dataclass
class SchedulerConfig:
    max_batch_size: int = 256
    max_batch_tokens: int = 8192
    #: Split prompts into pieces of at most this many tokens per step; None = whole prompts only.
    chunk_size: int | None = None
    policy: Policy = "decode-first"
    #: Fraction of all blocks left free when admitting a new sequence (damps preemption churn).
    watermark: float = 0.0

    def __post_init__(self) -> None:
        if self.max_batch_size < 1 or self.max_batch_tokens < 1:
            raise ValueError("max_batch_size and max_batch_tokens must be at least 1")
        if self.chunk_size is not None and self.chunk_size < 1:
            raise ValueError("chunk_size must be at least 1 (or None to disable chunking)")
        if self.policy not in SCHEDULE_POLICIES:
            raise ValueError(
                f"unknown policy {self.policy!r}; use {' or '.join(map(repr, SCHEDULE_POLICIES))}"
            )
        if not 0.0 <= self.watermark < 1.0:
            raise ValueError("watermark must be in [0, 1)")


@dataclass(slots=True)
class ScheduledSeq:
    """``seq`` computes positions ``[start, start + num_tokens)`` this step."""

    seq: Sequence
    start: int
    num_tokens: int
    samples: bool  # the step reaches the end of the known tokens, so a new token is sampled
    is_prefill: bool  # prompt (or recompute) work rather than a single decode token

    @property
    def end(self) -> int:
        return self.start + self.num_tokens


@dataclass(frozen=True, slots=True)
class GroupStep:
    """The sequences of a decode group (``decode_group``) in one step: each decodes one token."""

    seqs: int
    kv: int  # KV tokens they read: the sum of their positions + 1 (one new token attends to all)


@dataclass
class Batch:
    items: list[ScheduledSeq] = field(default_factory=list)
    preempted: list[Sequence] = field(default_factory=list)
    #: Decoding sequences advanced together, in addition to ``items`` (simulator only).
    group: GroupStep | None = None

    def __len__(self) -> int:
        return len(self.items) + (self.group.seqs if self.group else 0)

    @property
    def num_tokens(self) -> int:
        return sum(it.num_tokens for it in self.items) + (self.group.seqs if self.group else 0)

    @property
    def num_prefill_tokens(self) -> int:
        return sum(it.num_tokens for it in self.items if it.is_prefill)

    @property
    def num_decode_tokens(self) -> int:
        return sum(it.num_tokens for it in self.items if not it.is_prefill) + (
            self.group.seqs if self.group else 0
        )


@dataclass
class SchedulerStats:
    steps: int = 0
    prefill_tokens: int = 0  # prompt/recompute tokens actually computed
    decode_tokens: int = 0
    prefix_hit_tokens: int = 0  # tokens skipped thanks to the prefix cache
    preemptions: int = 0
    finished: int = 0


class Scheduler:
    def __init__(self, config: SchedulerConfig, block_manager: BlockManager):
        self.config = config
        self.blocks = block_manager
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.stats = SchedulerStats()
        self._watermark_blocks = int(config.watermark * block_manager.num_blocks)

    # ---- queue --------------------------------------------------------------------------------
    def add(self, seq: Sequence) -> None:
        need = self.blocks.blocks_for(seq.max_total_tokens)
        if need > self.blocks.num_blocks:
            raise ValueError(
                f"sequence {seq.seq_id} may need {seq.max_total_tokens} KV slots "
                f"({need} blocks) but the cache has {self.blocks.num_blocks} blocks"
            )
        if (
            self.config.chunk_size is None
            and not seq.num_transferred_tokens
            and seq.max_total_tokens > self.config.max_batch_tokens
        ):
            raise ValueError(
                f"sequence {seq.seq_id} may need {seq.max_total_tokens} tokens in one "
                f"step but max_batch_tokens is {self.config.max_batch_tokens}; "
                f"raise it or enable chunked prefill"
            )
        seq.status = SequenceStatus.WAITING
        self.waiting.append(seq)

    def abort(self, seq_id: int) -> Sequence | None:
        for queue in (self.waiting, self.running):
            for seq in queue:
                if seq.seq_id == seq_id:
                    queue.remove(seq)
                    self.blocks.free(seq)
                    seq.status = SequenceStatus.FINISHED
                    return seq
        return None

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    # ---- one step -----------------------------------------------------------------------------
    def schedule(self) -> Batch:
        budget = self.config.max_batch_tokens
        batch = Batch()
        if self.config.policy == "prefill-first":
            budget = self._schedule_running(batch, budget, prefill_only=True)
            if not batch.preempted:
                self._admit_waiting(batch, budget)
            if not batch.items:
                self._schedule_running(batch, self.config.max_batch_tokens, prefill_only=False)
        else:
            budget = self._schedule_running(batch, budget, prefill_only=False)
            if not batch.preempted:
                self._admit_waiting(batch, budget)
        self.stats.steps += 1
        self.stats.prefill_tokens += batch.num_prefill_tokens
        self.stats.decode_tokens += batch.num_decode_tokens
        return batch

    def step_tokens(self, seq: Sequence) -> int:
        """The most tokens ``seq``'s next step computes given a whole step's budget: one to decode, else
        its next prompt chunk (before a prefix-cache hit shortens it); KV handed over counts as
        computed."""
        pending = seq.num_tokens - max(seq.num_computed_tokens, seq.num_transferred_tokens)
        return 1 if pending <= 1 else self._chunk(pending, self.config.max_batch_tokens)

    def _chunk(self, pending: int, budget: int) -> int:
        if self.config.chunk_size is None:
            if pending <= self.config.max_batch_tokens:
                return pending
            # Longer than any step: only a sequence whose KV was handed over (admitted without the
            # budget check) and then lost to preemption. It is recomputed in pieces, or never runs.
            return min(pending, budget)
        return min(pending, self.config.chunk_size, budget)

    def _schedule_running(self, batch: Batch, budget: int, prefill_only: bool) -> int:
        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            pending = seq.num_pending_tokens
            is_decode = pending == 1 and seq.num_output_tokens > 0
            if prefill_only and is_decode:
                i += 1
                continue
            n = 1 if is_decode else self._chunk(pending, budget)
            if n > budget:
                break
            while not self.blocks.grow(seq, seq.num_computed_tokens + n):
                victim = self.running.pop()
                self._preempt(victim, batch)
                if victim is seq:
                    break
            else:
                batch.items.append(self._item(seq, n))
                budget -= n
                i += 1
        return budget

    def _admit_waiting(self, batch: Batch, budget: int) -> None:
        while self.waiting and budget > 0 and len(self.running) < self.config.max_batch_size:
            seq = self.waiting[0]
            given = seq.num_transferred_tokens
            hits = [] if given else self.blocks.match_prefix(seq)
            pending = seq.num_tokens - max(given, len(hits) * self.blocks.block_size)
            n = self._chunk(pending, budget)
            if n > budget:
                break
            reserve = self._watermark_blocks if self.running else 0
            if not self.blocks.can_allocate(seq, hits, given + n, reserve):
                break
            self.waiting.popleft()
            self.blocks.allocate(seq, hits, given + n)
            if given:
                seq.num_computed_tokens = given
            self.stats.prefix_hit_tokens += seq.num_cached_tokens
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            batch.items.append(self._item(seq, n))
            budget -= n

    @staticmethod
    def _item(seq: Sequence, n: int) -> ScheduledSeq:
        start = seq.num_computed_tokens
        samples = start + n == seq.num_tokens
        is_prefill = not (n == 1 and samples and seq.num_output_tokens > 0)
        return ScheduledSeq(seq, start, n, samples, is_prefill)

    def _preempt(self, seq: Sequence, batch: Batch) -> None:
        self.blocks.free(seq)
        seq.num_computed_tokens = 0
        seq.num_transferred_tokens = 0
        seq.status = SequenceStatus.PREEMPTED
        seq.num_preemptions += 1
        self.waiting.appendleft(seq)
        batch.preempted.append(seq)
        self.stats.preemptions += 1

    # ---- after the step -----------------------------------------------------------------------
    def postprocess(
        self, batch: Batch, token_ids: Mapping[int, int] | None = None, stopped: Collection[int] = ()
    ) -> list[Sequence]:
        """Advance counts after ``batch`` ran and return the sequences that finished.

        ``token_ids`` maps seq_id to the token sampled for it (required for sequences that track token
        ids); ``stopped`` holds seq_ids the caller ends after this token (end-of-sequence, stop string).
        A sequence also finishes when it reaches ``max_tokens``.
        """
        finished = self._advance(batch, token_ids, stopped)
        for seq in finished:
            self.blocks.free(seq)
        if finished:
            self.running = [s for s in self.running if s.status is SequenceStatus.RUNNING]
            self.stats.finished += len(finished)
        return finished

    def _advance(
        self, batch: Batch, token_ids: Mapping[int, int] | None, stopped: Collection[int]
    ) -> list[Sequence]:
        """Advance the counts of ``batch``'s items; the sequences that finished, in batch order, marked
        finished and still holding their blocks."""
        finished: list[Sequence] = []
        for item in batch.items:
            seq = item.seq
            if seq.status is not SequenceStatus.RUNNING:
                continue  # aborted since it was scheduled
            seq.num_computed_tokens = item.end
            self.blocks.register_computed(seq)
            if not item.samples:
                continue
            seq.append_token(None if token_ids is None else token_ids.get(seq.seq_id))
            if seq.num_output_tokens >= seq.max_tokens or seq.seq_id in stopped:
                seq.status = SequenceStatus.FINISHED
                finished.append(seq)
        return finished

    # ---- runs of decode steps (simulation) -----------------------------------------------------
    def decode_steps_available(self, batch: Batch) -> int:
        """How many decode steps, starting with ``batch``, would schedule exactly the same sequences.

        True while every running sequence decodes one token, nothing was preempted, no sequence finishes
        before the last of those steps (sequences end by ``max_tokens`` only: token counts, no stop
        strings) and the free blocks cover the steps' growth. Waiting sequences that could not be admitted
        now cannot be admitted during the run either: the running set, the token budget and the prefix
        cache stay as they are and free blocks only shrink. 1 when ``batch`` is not such a batch. The simulator advances
        such runs with one call to ``postprocess_decode_steps`` instead of one step at a time.
        """
        if batch.preempted or not batch.items or len(batch.items) != len(self.running):
            return 1
        if any(it.is_prefill for it in batch.items):
            return 1
        most = min(it.seq.max_tokens - it.seq.num_output_tokens for it in batch.items)
        if most <= 1:
            return 1
        free = self.blocks.num_free_blocks
        bs, blocks_for = self.blocks.block_size, self.blocks.blocks_for
        windowed = self.blocks.window is not None

        def growth(k: int) -> int:
            if windowed:
                return sum(max(0, blocks_for(it.start + k) - len(it.seq.block_table)) for it in batch.items)
            return sum(max(0, -(-(it.start + k) // bs) - len(it.seq.block_table)) for it in batch.items)

        lo, hi = 1, most
        while lo < hi:  # the largest k in [1, most] whose block growth fits
            mid = (lo + hi + 1) // 2
            if growth(mid) <= free:
                lo = mid
            else:
                hi = mid - 1
        return lo

    def postprocess_decode_steps(self, batch: Batch, steps: int) -> list[Sequence]:
        """Advance ``batch`` (for which ``decode_steps_available`` allowed ``steps``) by ``steps`` decode
        steps at once; the state afterwards equals ``steps`` rounds of schedule() and postprocess()."""
        finished: list[Sequence] = []
        for item in batch.items:  # grow everyone before anyone frees, as step-by-step scheduling does
            assert item.seq.token_ids is None, "runs of decode steps are for count-only sequences"
            grown = self.blocks.grow(item.seq, item.start + steps)
            assert grown, "decode_steps_available allowed more steps than there are free blocks"
        for item in batch.items:
            seq = item.seq
            end = item.start + steps
            seq.num_computed_tokens = end
            seq.num_output_tokens += steps
            self.blocks.register_computed(seq)
            if seq.num_output_tokens >= seq.max_tokens:
                seq.status = SequenceStatus.FINISHED
                self.blocks.free(seq)
                finished.append(seq)
        self.stats.steps += steps - 1
        self.stats.decode_tokens += (steps - 1) * len(batch.items)
        if finished:
            self.running = [s for s in self.running if s.status is SequenceStatus.RUNNING]
            self.stats.finished += len(finished)
        return finished
