"""A worker's inbox: the driver's commands as they arrive, each step's input already on its way.

A thread receives the commands (in the driver's global order) and, for a step whose input comes from
the stage before, posts the receive of those hidden states at once, in command order, so the sender's
messages and the receives pair up in order. A second thread waits for those receives and marks each
step ready when its input is here. The worker can so see, when it becomes free, which steps are
waiting on it with their inputs, and run them together (``worker.Worker``), as the simulator's
servers batch the steps waiting on them.

After a ``Regroup`` the receiving thread waits until the worker has formed the new groups
(``resume``), so that nothing is received on the groups being retired.
"""

from __future__ import annotations

import queue
import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from torch import Tensor

from .channel import Ping, Regroup, Shutdown, Step


@dataclass(eq=False)
class Arrival:
    """One command. For a step fed by the stage before: its input's buffer and pending receive."""

    command: Any
    hidden: Tensor | None = None
    receive: Any = None  # the pending receive of ``hidden`` (None: the input is in the command)
    ready: threading.Event = field(default_factory=threading.Event)
    error: BaseException | None = None  # the receive failed (a peer died), or the command did


def joining(
    head: Arrival, waiting: list[Arrival], budget: int, joins: Callable[[Step, Step], bool]
) -> list[Arrival]:
    """The steps right behind ``head`` (``waiting``, in order) that run with it: each a step whose input
    has arrived and that ``joins`` allows with ``head``, until one is not, or the tokens of all would
    pass ``budget``. Nothing is taken over a command that is not such a step (the order is kept)."""
    out, tokens = [], head.command.ids.numel()
    for other in waiting:
        cmd = other.command
        if not isinstance(cmd, Step) or not other.ready.is_set() or other.error is not None:
            break
        if tokens + cmd.ids.numel() > budget or not joins(head.command, cmd):
            break
        out.append(other)
        tokens += cmd.ids.numel()
    return out


class Inbox:
    """``receive()`` blocks for the next command; ``post_input(step)`` posts the receive of a step's
    input from the stage before and returns ``(buffer, pending receive)``, or None when the step's
    input is in the command (the first stage)."""

    def __init__(
        self,
        receive: Callable[[], Any],
        post_input: Callable[[Step], tuple[Tensor, Any] | None],
    ):
        self._receive, self._post_input = receive, post_input
        self._queue: deque[Arrival] = deque()
        self._arrived = threading.Condition()
        self._inputs: queue.Queue[Arrival | None] = queue.Queue()
        self._regrouped = threading.Event()
        threading.Thread(target=self._receiving, name="hetserve-inbox", daemon=True).start()
        threading.Thread(target=self._waiting, name="hetserve-inputs", daemon=True).start()

    # ---- the worker's side ---------------------------------------------------------------------
    def next(self) -> Arrival:
        """The next command, waiting for it to arrive."""
        with self._arrived:
            while not self._queue:
                self._arrived.wait()
            return self._queue.popleft()

    def waiting(self) -> list[Arrival]:
        """The commands that have arrived after the one ``next`` gave last (none is taken)."""
        with self._arrived:
            return list(self._queue)

    def take(self, n: int) -> list[Arrival]:
        """The next ``n`` commands (waiting for them to arrive)."""
        return [self.next() for _ in range(n)]

    def resume(self) -> None:
        """The worker formed the groups a ``Regroup`` asked for: receive the next command on them."""
        self._regrouped.set()

    # ---- its threads ----------------------------------------------------------------------------
    def _put(self, arrival: Arrival) -> None:
        with self._arrived:
            self._queue.append(arrival)
            self._arrived.notify()

    def _receiving(self) -> None:
        while True:
            try:
                command = self._receive()
            except BaseException as exc:  # noqa: BLE001 - the driver is gone, or a frame is refused
                failed = Arrival(None, error=exc)
                failed.ready.set()
                self._put(failed)
                self._inputs.put(None)
                return
            if isinstance(command, Ping):
                continue
            arrival = Arrival(command)
            posted = self._post_input(command) if isinstance(command, Step) else None
            if posted is None:
                arrival.ready.set()
            else:
                arrival.hidden, arrival.receive = posted
                self._inputs.put(arrival)
            self._put(arrival)
            if isinstance(command, Shutdown):
                self._inputs.put(None)
                return
            if isinstance(command, Regroup):
                self._regrouped.wait()
                self._regrouped.clear()

    def _waiting(self) -> None:
        """Mark each step ready once its input has arrived, in command order."""
        while True:
            arrival = self._inputs.get()
            if arrival is None:
                return
            try:
                arrival.receive.wait()
            except BaseException as exc:  # noqa: BLE001 - the sending peer died
                arrival.error = exc
            arrival.ready.set()
