"""The driver's side of one instance: its micro-batch lanes (a scheduler each over a disjoint range of
the instance's KV blocks, or one per request over a shared pool), the batches in flight, and a thread
that collects each batch's logits."""

from __future__ import annotations

import queue
import threading
from collections import deque
from dataclasses import dataclass

from ...scheduling.instance import InstanceState, Lane
from .channel import logits_tag
from .topology import InstanceSpec
from .transport import Transport


@dataclass
class _Flight:
    """One micro-batch on its way through a chain: one lane's batch, or, pipelining per request, the
    steps of several requests' lanes sent as one."""

    parts: list[tuple[_Lane, object]]  # (lane, its batch), in row order
    sampling: list  # the batch's items that sample a token, in row order
    handoffs: dict[int, tuple[str, int]]  # seq_id -> (decode instance, KV key)
    sent: float


@dataclass(eq=False)
class _Lane(Lane):
    flight: _Flight | None = None


class InstanceRunner(InstanceState[_Lane]):
    """The driver's side of one instance: the shared lanes and counters (``scheduling.instance``), its
    liveness, and a thread collecting its logits."""

    def __init__(
        self,
        spec: InstanceSpec,
        num_blocks: int,
        vocab: int,
        results: queue.Queue,
        prefix_caching: bool,
        transport: Transport,
    ):
        super().__init__(
            spec.scheduling,
            spec.estimate,
            num_blocks,
            _Lane,
            prefix_caching=prefix_caching and spec.role != "decode",
        )
        self.spec, self.vocab = spec, vocab
        #: Pooling its servers' KV: the blocks its requests gave back, for the workers (``KVFree``).
        self._released: list[int] | None = None
        if spec.scheduling.kv_pool:
            self._released = self.lanes[0].scheduler.blocks.released = []
        self.strided = False  # set when a worker keeps head-major KV (its attention needs block ids)
        self.up = True
        self.max_in_flight = 0  # most micro-batches seen in the chain at once
        self.in_flight = 0  # micro-batches in the chain now
        #: Pipelining per request: lanes with a step to run, in the order they became ready.
        self.ready: deque[_Lane] = deque()
        self._expect: queue.Queue = queue.Queue()
        self._results = results
        self._transport = transport
        threading.Thread(target=self._collect, name=f"collect-{spec.name}", daemon=True).start()

    def has_free_slot(self) -> bool:
        return self.up and super().has_free_slot()

    def admit_queued(self) -> list[_Lane]:
        """Admit as the shared layer does; the lanes given a request join ``ready``."""
        started = super().admit_queued()
        self.ready.extend(started)
        return started

    def take_released(self) -> list[int]:
        """Blocks given back since the last call (pooling its servers' KV; else none)."""
        if not self._released:
            return []
        out = self._released[:]
        self._released.clear()
        return out

    def expect(self, flight: _Flight) -> None:
        self._expect.put(flight)

    def _collect(self) -> None:
        """Receive each flight's logits in dispatch order (the chain is FIFO)."""
        while True:
            flight = self._expect.get()
            if flight is None:
                return
            n = len(flight.sampling)
            try:
                logits = self._transport.recv_logits(
                    (n, self.vocab) if n else (1,), self.spec.last, logits_tag(self.spec.index)
                )
            except Exception as exc:  # noqa: BLE001 - a worker of this instance died
                self._results.put((self, flight, exc))
                return
            self._results.put((self, flight, logits))

    def stop(self) -> None:
        self._expect.put(None)
