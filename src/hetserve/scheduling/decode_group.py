"""Decoding sequences advanced together: the scheduler the simulator runs.

``Scheduler`` touches every running sequence in every step, so a step costs Python work in proportion
to the batch, and a simulation's cost grows with the square of the load (more requests, each with more
company). ``GroupScheduler`` makes exactly ``Scheduler``'s decisions (tests compare the two step by step)
but keeps the count-only sequences that decode one token per step in a *decode group*, advanced by one
step counter:

* a member's counters are its values at its *anchor* (the group's step count when they were last
  written) plus the steps since, and are written back (``sync``) only when it leaves the group;
* a member takes a new KV block at every ``block_size``-th step, at a phase fixed when it joins, so
  the blocks a run of steps needs are a sum over a count per phase; those blocks are taken from the
  cache when the steps run (as ``Scheduler`` takes them) and kept in a pool until their owners sync;
* the next member to finish is the top of a heap of the steps they finish at.

A step then costs O(1) for the group plus the usual work for each sequence that prefills. When the
token budget or the free blocks do not cover every running sequence's next step, the order of the
running list decides who runs and who is preempted: the group dissolves (every member syncs) and the
step is ``Scheduler``'s, until a step again covers everyone. Sequences with token ids (the real engine)
and sliding-window KV never join a group.
"""

from __future__ import annotations

import heapq
import itertools

from .block_manager import BlockManager
from .scheduler import Batch, GroupStep, Scheduler, SchedulerConfig
from .sequence import Sequence, SequenceStatus


class GroupScheduler(Scheduler):
    def __init__(self, config: SchedulerConfig, block_manager: BlockManager):
        if block_manager.window is not None:
            raise ValueError("a decode group needs KV that grows one slot per token (no sliding window)")
        super().__init__(config, block_manager)
        #: Decode steps the group has run.
        self.step = 0
        self.members: dict[int, Sequence] = {}
        #: Running sequences outside the group, in running order.
        self.active: list[Sequence] = []
        self._offset = 0  # sum over members of (computed tokens at the anchor - anchor)
        self._phase = [0] * block_manager.block_size  # members taking a block at steps = r (mod size)
        self._ends: list[tuple[int, int, Sequence]] = []  # (step it finishes at, join number, member)
        self._joins = itertools.count()
        self._pool: list[int] = []  # blocks taken for members' growth, not yet in their tables
        self._in_flight = False  # the group's step is scheduled and not yet post-processed

    # ---- membership --------------------------------------------------------------------------------
    @staticmethod
    def _decodes(seq: Sequence) -> bool:
        """Its next step computes one token after its first (``Scheduler``'s decode)."""
        return (
            seq.num_output_tokens > 0
            and seq.num_computed_tokens == seq.prompt_len + seq.num_output_tokens - 1
        )

    def _join(self, seq: Sequence) -> None:
        step = self.step
        seq.group_anchor = step
        self.members[seq.seq_id] = seq
        self._offset += seq.num_computed_tokens - step
        self._phase[(step - seq.num_computed_tokens) % len(self._phase)] += 1
        heapq.heappush(self._ends, (step + seq.max_tokens - seq.num_output_tokens, next(self._joins), seq))

    def sync(self, seq: Sequence) -> None:
        """Write a member's counters and block table up to date (it stays in the group)."""
        k = self.step - seq.group_anchor
        if k:
            seq.num_computed_tokens += k
            seq.num_output_tokens += k
            seq.group_anchor = self.step
        need = self.blocks.blocks_for(seq.num_computed_tokens + self._in_flight) - len(seq.block_table)
        if need > 0:
            pool = self._pool
            seq.block_table.extend(pool[-need:])
            del pool[-need:]

    def sync_all(self) -> None:
        for seq in self.members.values():
            self.sync(seq)

    def _leave(self, seq: Sequence) -> None:
        """Take a synced member out of the group."""
        self._phase[(seq.group_anchor - seq.num_computed_tokens) % len(self._phase)] -= 1
        self._offset -= seq.num_computed_tokens - seq.group_anchor
        del self.members[seq.seq_id]
        seq.group_anchor = -1

    def _dissolve(self) -> None:
        for seq in self.members.values():
            self.sync(seq)
            seq.group_anchor = -1
        assert not self._pool, "the pool holds exactly the members' unsynced blocks"
        self.members.clear()
        self._offset = 0
        self._phase = [0] * len(self._phase)
        self._ends.clear()
        self.active = list(self.running)

    def _next_end(self) -> int | None:
        """The step the next member finishes at (stale heap entries dropped)."""
        ends = self._ends
        while ends:
            end, _, seq = ends[0]
            if seq.group_anchor >= 0 and end == seq.group_anchor + seq.max_tokens - seq.num_output_tokens:
                return end
            heapq.heappop(ends)
        return None

    def _blocks_within(self, steps: int, phase: list[int], count: int) -> int:
        """Blocks the members of ``phase`` (``count`` of them) take in steps ``self.step + 1`` to
        ``self.step + steps``."""
        size = len(phase)
        cycles, rest = divmod(steps, size)
        return cycles * count + sum(phase[(self.step + 1 + j) % size] for j in range(rest))

    def _longest_run(self, most: int, phase: list[int], count: int, free: int) -> int:
        """The largest ``k`` in ``[1, most]`` whose steps 2..k take at most ``free`` blocks."""
        size, first = len(phase), self.step + 1
        within = [0] * (size + 1)  # within[j]: blocks of steps first .. first + j - 1
        for j in range(size):
            within[j + 1] = within[j] + phase[(first + j) % size]
        if count == 0:
            return most
        cycles = free // count  # whole cycles of ``size`` steps that fit
        rest = free - cycles * count
        j = size
        while within[j] > rest:
            j -= 1
        return max(1, min(most, 1 + cycles * size + j))

    # ---- one step ----------------------------------------------------------------------------------
    def _plan(self, seqs: list[Sequence], decoders: bool) -> tuple[list, list, list[int]] | None:
        """Split ``seqs`` into those decoding (they join the group) and the rest with the tokens each
        computes next, when the budget and the free blocks cover all of them and the group (with
        ``decoders``: the group runs this step). None when they do not: then the order of the running
        list decides who runs (or a prompt longer than any step is cut to the budget left at its turn)."""
        cfg, bs = self.config, self.blocks.block_size
        budget, chunk = cfg.max_batch_tokens, cfg.chunk_size
        joining: list[Sequence] = []
        rest: list[Sequence] = []
        wants: list[int] = []
        tokens = need = 0
        if decoders and self.members:
            tokens, need = len(self.members), self._phase[self.step % bs]
        for seq in seqs:
            computed = seq.num_computed_tokens
            pending = seq.prompt_len + seq.num_output_tokens - computed
            if decoders and pending == 1 and seq.num_output_tokens and seq.token_ids is None:
                joining.append(seq)
                tokens += 1
                need += computed % bs == 0
                continue
            if chunk is None:
                if pending > budget:
                    return None
                n = pending
            else:
                n = min(pending, chunk, budget)
            rest.append(seq)
            wants.append(n)
            tokens += n
            need += max(0, -(-(computed + n) // bs) - len(seq.block_table))
        if tokens > budget or need > self.blocks.num_free_blocks:
            return None
        return joining, rest, wants

    def schedule(self) -> Batch:
        if self.config.policy == "prefill-first":
            return self._schedule_prefill_first()
        plan = self._plan(self.active, decoders=True)
        if plan is None:
            return self._schedule_by_order()
        joining, rest, wants = plan
        for seq in joining:
            self._join(seq)
        self.active = rest
        return self._counted(self._step(rest, wants, group=True))

    def _schedule_prefill_first(self) -> Batch:
        plan = self._plan([s for s in self.active if not self._decodes(s)], decoders=False)
        if plan is None:
            return self._schedule_by_order()
        batch = self._step(*plan[1:], group=False)
        if batch.items:
            return self._counted(batch)
        # nothing prefills or was admitted: every running sequence decodes, in the same step
        plan = self._plan(self.active, decoders=True)
        if plan is None:
            return self._schedule_by_order()
        for seq in plan[0]:
            self._join(seq)
        self.active = []
        return self._counted(self._step([], [], group=True, admit=False))

    def _step(self, seqs: list[Sequence], wants: list[int], group: bool, admit: bool = True) -> Batch:
        """The step ``_plan`` covered: the group (when it runs), ``seqs`` computing ``wants``, and then
        (with ``admit``) whoever the budget left admits."""
        batch = Batch()
        budget = self.config.max_batch_tokens
        if group and self.members:
            taken = self._phase[self.step % len(self._phase)]
            if taken:
                self._pool.extend(self.blocks.take(taken))
            self._in_flight = True
            budget -= len(self.members)
        items, grow = batch.items, self.blocks.grow
        for seq, n in zip(seqs, wants):
            grown = grow(seq, seq.num_computed_tokens + n)
            assert grown
            items.append(self._item(seq, n))
            budget -= n
        before = len(items)
        if admit:
            self._admit_waiting(batch, budget)
        if len(items) > before:
            self.active.extend(it.seq for it in items[before:])
        if self._in_flight:
            n = len(self.members)
            batch.group = GroupStep(n, self._offset + n * self.step + n)
        return batch

    def _counted(self, batch: Batch) -> Batch:
        """``batch``, counted in the stats as the step scheduled."""
        self.stats.steps += 1
        self.stats.prefill_tokens += batch.num_prefill_tokens
        self.stats.decode_tokens += batch.num_decode_tokens
        return batch

    def _schedule_by_order(self) -> Batch:
        """A step the budget or the free blocks do not cover for everyone: ``Scheduler``'s, in order."""
        if self.members:
            self._dissolve()
        batch = super().schedule()
        self.active = list(self.running)
        return batch

    # ---- after the step ----------------------------------------------------------------------------
    def postprocess(self, batch, token_ids=None, stopped=()):
        finished = self._advance(batch, token_ids, stopped)
        if batch.group is not None:
            self._in_flight = False
            self.step += 1
            finished += self._pop_finished()
        return self._release(finished)

    def _pop_finished(self) -> list[Sequence]:
        done = []
        while (end := self._next_end()) is not None and end <= self.step:
            _, _, seq = heapq.heappop(self._ends)
            self.sync(seq)
            self._leave(seq)
            seq.status = SequenceStatus.FINISHED
            done.append(seq)
        return done

    def _release(self, finished: list[Sequence]) -> list[Sequence]:
        """Free the finished sequences' blocks in running order (the order ``Scheduler`` frees them in,
        which orders the prefix cache's evictions)."""
        if not finished:
            return finished
        if len(finished) > 1:
            rank = {id(s): i for i, s in enumerate(self.running)}
            finished.sort(key=lambda s: rank[id(s)])
        for seq in finished:
            self.blocks.free(seq)
        self.running = [s for s in self.running if s.status is SequenceStatus.RUNNING]
        self.active = [s for s in self.active if s.status is SequenceStatus.RUNNING]
        self.stats.finished += len(finished)
        return finished

    # ---- runs of decode steps ------------------------------------------------------------------------
    def decode_steps_available(self, batch: Batch) -> int:
        group = batch.group.seqs if batch.group else 0
        if batch.preempted or len(batch.items) + group != len(self.running) or not len(self.running):
            return 1
        if any(it.is_prefill for it in batch.items):
            return 1
        most = (
            min(it.seq.max_tokens - it.seq.num_output_tokens for it in batch.items) if batch.items else None
        )
        end = self._next_end()
        if end is not None:
            left = end - self.step
            most = left if most is None else min(most, left)
        if most is None or most <= 1:
            return 1
        phase, count = self._phase, len(self.members)
        if batch.items:  # they join the group after this step, at the phase they would have had
            phase = list(phase)
            size = len(phase)
            for it in batch.items:
                phase[(self.step - it.start) % size] += 1
            count += len(batch.items)
        return self._longest_run(most, phase, count, self.blocks.num_free_blocks)

    def postprocess_decode_steps(self, batch: Batch, steps: int) -> list[Sequence]:
        for item in batch.items:  # their first step, then they run with the group
            seq = item.seq
            assert seq.token_ids is None, "runs of decode steps are for count-only sequences"
            seq.num_computed_tokens = item.end
            seq.num_output_tokens += 1
        self._in_flight = False
        self.step += 1
        for item in batch.items:
            self._join(item.seq)
        self.active = [s for s in self.active if s.group_anchor < 0]
        rest = steps - 1
        taken = (
            self._blocks_within(rest - 1, self._phase, len(self.members))
            + self._phase[self.step % len(self._phase)]
            if rest
            else 0
        )
        if taken:
            self._pool.extend(self.blocks.take(taken))
        self.step += rest
        self.stats.steps += rest
        self.stats.decode_tokens += rest * len(self.members)
        return self._release(self._pop_finished())

    # ---- requests leaving early ----------------------------------------------------------------------
    def abort(self, seq_id: int) -> Sequence | None:
        seq = self.members.get(seq_id)
        if seq is not None:
            self.sync(seq)
            if self._in_flight:  # the slot of the step in flight is not used
                extra = len(seq.block_table) - self.blocks.blocks_for(seq.num_computed_tokens)
                if extra > 0:
                    self._pool.extend(seq.block_table[-extra:])
                    del seq.block_table[-extra:]
            self._leave(seq)
        found = super().abort(seq_id)
        self.active = [s for s in self.active if s.seq_id != seq_id]
        return found
