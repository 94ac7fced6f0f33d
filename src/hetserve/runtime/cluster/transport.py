"""How the driver reaches its workers: commands out, each micro-batch's logits back.

``ProcessGroupTransport`` is the wire the cluster serves on (``torch.distributed`` point-to-point
messages between rank 0 and the workers). The driver depends only on ``Transport``, so the same
driver code can be run against an in-process stand-in (the conformance test with the simulator does).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, Protocol

import torch

from .channel import TAG_LOGITS, encode_command, recv_tensor, send_encoded


class Transport(Protocol):
    def send(self, command: Any, ranks: Iterable[int]) -> None:
        """Send ``command`` to every rank in ``ranks`` without waiting for it to arrive."""

    def recv_logits(self, shape: tuple[int, ...], src: int) -> torch.Tensor:
        """Block until rank ``src`` returns the next micro-batch's logits (float32, ``shape``)."""

    def flush(self) -> None:
        """Forget sends that have completed."""

    def close(self) -> None:
        """Wait for the sends still in flight (a worker that is gone is not waited for) and leave."""


class ProcessGroupTransport:
    """Point-to-point messages of the default ``torch.distributed`` process group."""

    def __init__(self) -> None:
        self._sending: list = []  # (work handle, the buffers it sends: kept alive until it completes)

    def send(self, command: Any, ranks: Iterable[int]) -> None:
        encoded = encode_command(command)
        for r in ranks:
            self._sending.extend((w, encoded) for w in send_encoded(encoded, r))

    def recv_logits(self, shape: tuple[int, ...], src: int) -> torch.Tensor:
        return recv_tensor(shape, torch.float32, src, TAG_LOGITS)

    def flush(self) -> None:
        self._sending = [(w, b) for w, b in self._sending if not w.is_completed()]

    def close(self) -> None:
        import torch.distributed as dist

        for w, _ in self._sending:
            try:
                w.wait()
            except Exception:  # noqa: BLE001 - a worker that is gone cannot receive
                pass
        self._sending = []
        if dist.is_initialized():
            dist.destroy_process_group()
