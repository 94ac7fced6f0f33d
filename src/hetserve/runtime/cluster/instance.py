"""The driver's side of one instance: its micro-batch lanes (a scheduler each over a disjoint range of
the instance's KV blocks), the batches in flight, and a thread that collects each batch's logits."""

from __future__ import annotations

import queue
import threading
from dataclasses import dataclass

import torch

from ...scheduling import BlockManager, Scheduler, SchedulerConfig, Sequence
from .channel import TAG_LOGITS
from .topology import InstanceSpec


@dataclass
class _Flight:
    """One micro-batch on its way through a chain."""

    lane: _Lane
    batch: object
    sampling: list  # the batch's items that sample a token, in row order
    handoffs: dict[int, tuple[str, int]]  # seq_id -> (decode instance, KV key)
    sent: float


@dataclass
class _Lane:
    index: int
    scheduler: Scheduler
    offset: int  # first physical block of this lane
    flight: _Flight | None = None

    @property
    def load(self) -> int:
        return len(self.scheduler.waiting) + len(self.scheduler.running)


class InstanceRunner:
    """The driver's side of one instance: its lanes, its state, and a thread collecting its logits."""

    def __init__(
        self, spec: InstanceSpec, num_blocks: int, vocab: int, results: queue.Queue, prefix_caching: bool
    ):
        self.spec, self.name, self.vocab = spec, spec.name, vocab
        per_lane = num_blocks // spec.lanes
        #: A plan's max_batch_size counts the whole instance; each lane runs its share (as the simulator).
        self.lane_seqs = max(1, spec.max_batch_size // spec.lanes)
        self.lanes = [
            _Lane(
                i,
                Scheduler(
                    SchedulerConfig(
                        max_num_seqs=self.lane_seqs,
                        max_num_batched_tokens=spec.max_batch_tokens,
                        prefill_chunk_size=spec.chunk_size,
                        policy=spec.policy,
                    ),
                    BlockManager(per_lane, spec.block_size, prefix_caching and spec.role != "decode"),
                ),
                i * per_lane,
            )
            for i in range(spec.lanes)
        ]
        self.num_blocks = per_lane * spec.lanes
        self.strided = False  # set when a worker keeps head-major KV (its attention needs block ids)
        self.up = True
        self.max_in_flight = 0  # most micro-batches seen in the chain at once
        # JFFC ranks chains by speed: fewer layers on the slowest stage (per TP rank) is faster
        self.speed = 1.0 / max(1, len(spec.stages))
        self._expect: queue.Queue = queue.Queue()
        self._results = results
        threading.Thread(target=self._collect, name=f"collect-{spec.name}", daemon=True).start()

    # Routable
    def outstanding_work(self) -> float:
        return sum(lane.load for lane in self.lanes) / self.speed

    def has_free_slot(self) -> bool:
        return self.up and any(lane.load < self.lane_seqs for lane in self.lanes)

    def add(self, seq: Sequence) -> int:
        lane = min(self.lanes, key=lambda ln: ln.load)
        lane.scheduler.add(seq)
        return lane.index

    def expect(self, flight: _Flight) -> None:
        self._expect.put(flight)

    def _collect(self) -> None:
        """Receive each flight's logits in dispatch order (the chain is FIFO)."""
        from .channel import recv_tensor

        while True:
            flight = self._expect.get()
            if flight is None:
                return
            n = len(flight.sampling)
            try:
                logits = recv_tensor(
                    (n, self.vocab) if n else (1,), torch.float32, self.spec.last, TAG_LOGITS
                )
            except Exception as exc:  # noqa: BLE001 - a worker of this instance died
                self._results.put((self, flight, exc))
                return
            self._results.put((self, flight, logits))

    def stop(self) -> None:
        self._expect.put(None)
