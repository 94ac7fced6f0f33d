"""How the driver reaches its workers: commands out, each micro-batch's logits back.

``ProcessGroupTransport`` is the wire the cluster serves on (gloo point-to-point messages between
rank 0 and the workers, over the ``mesh``'s groups of the current generation; commands in the signed
frame format of ``channel``). The driver depends only on ``Transport``, so the same driver code can be
run against an in-process stand-in (the conformance test with the simulator does).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterable
from typing import Any, Protocol

import torch

from .channel import TAG_COMMAND, CommandCodec, Ping, Sends, recv_tensor

log = logging.getLogger("hetserve.driver")


class Transport(Protocol):
    def send(self, command: Any, ranks: Iterable[int]) -> None:
        """Send ``command`` to every rank in ``ranks`` without waiting for it to arrive."""

    def recv_logits(self, shape: tuple[int, ...], src: int, tag: int) -> torch.Tensor:
        """Block until rank ``src`` returns the next micro-batch's logits (float32, ``shape``) under
        ``tag`` (its instance's, ``channel.logits_tag``)."""

    def flush(self) -> None:
        """Forget sends that have completed."""

    def close(self) -> None:
        """Wait for the sends still in flight (a worker that is gone is not waited for) and leave."""


class ProcessGroupTransport:
    """Signed command frames and raw logits over the mesh's world group. Sends are serialised by a
    lock (a frame is two messages; two threads must not interleave theirs), and a thread pings every
    worker that has had no command for ``ping_interval`` seconds."""

    def __init__(self, mesh, ping_interval: float | None = None):
        from .mesh import PING_INTERVAL

        self.mesh = mesh
        self.codec = CommandCodec(mesh.rv.command_key)
        self._sending = Sends("hetserve-driver-sends")
        self.lock = threading.RLock()  # held by a send, and by a regroup (no frame on a retiring group)
        self._last_sent: dict[int, float] = {}
        self.ranks: set[int] = set(range(1, mesh.world_size))  # workers to ping
        self._closed = threading.Event()
        self._interval = PING_INTERVAL if ping_interval is None else ping_interval
        threading.Thread(target=self._pinger, name="hetserve-ping", daemon=True).start()

    def send(self, command: Any, ranks: Iterable[int]) -> None:
        ranks = list(ranks)
        if not ranks:
            return
        with self.lock:
            sizes, frame = encoded = self.codec.encode(command)
            now = time.monotonic()
            for r in ranks:
                for t in (sizes, frame):
                    try:
                        self._sending.add(self.mesh.send(t, r, TAG_COMMAND), encoded)
                    except RuntimeError as exc:  # a worker that is gone: its instance is taken down
                        log.debug("cannot send to worker rank %d: %s", r, exc)
                        break
                self._last_sent[r] = now

    def recv_logits(self, shape: tuple[int, ...], src: int, tag: int) -> torch.Tensor:
        return recv_tensor(self.mesh, shape, torch.float32, src, tag)

    def flush(self) -> None:
        """Nothing to do: the sends' thread lets each go once it completed."""

    def drain(self, timeout: float = 30.0) -> bool:
        """Wait (at most ``timeout``) for the sends in flight; failed ones (a worker gone) are dropped."""
        return self._sending.drain(timeout)

    def _pinger(self) -> None:
        while not self._closed.wait(min(1.0, self._interval)):
            now = time.monotonic()
            with self.lock:
                if self.mesh.world is None:
                    continue
                idle = [r for r in sorted(self.ranks) if now - self._last_sent.get(r, 0.0) >= self._interval]
                if idle:
                    self.send(Ping(), idle)

    def close(self) -> None:
        self._closed.set()
        self.drain()
        self._sending.close()
        with self.lock:
            self.mesh.close()
