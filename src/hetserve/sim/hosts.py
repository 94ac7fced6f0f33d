"""Devices that share a machine's CPU cores (a cluster file's ``hosts:``): processor sharing.

Each device on a host is a worker process that computes with ``threads_per_device`` cores while it runs
a step. While the running steps ask for more cores than the host has, every one of them runs slower by
the ratio (cores asked / cores), as an operating system shares cores between busy processes. A step's
work is counted in seconds on an idle host; whenever a step starts or ends on a host, the steps running
there are re-timed from the work they have left.

Instances with a server on a host run stage by stage (``SimInstance.exclusive`` is false), so that each
stage's step is timed with what the host's other devices do meanwhile.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from ..specs.clusters import HostSpec

if TYPE_CHECKING:
    from .instance import SimServer


@dataclass(eq=False)
class HostedStep:
    """A step of a server on a host: the (lane, stage) batches it runs and the work it has left."""

    server: SimServer
    taken: list
    left: float  # seconds on an idle host
    start: float
    version: int = 0  # bumps when the step is re-timed; an earlier end event is stale


@dataclass
class CoreSharing:
    hosts: dict[str, HostSpec]
    #: pushes the event that ends a step at a time (its version as it is now)
    schedule: Callable[[HostedStep, float], None]
    asked: dict[str, float] = field(default_factory=dict)
    running: dict[str, list[HostedStep]] = field(default_factory=dict)
    since: dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name in self.hosts:
            self.asked[name] = 0.0
            self.running[name] = []
            self.since[name] = 0.0

    def slowdown(self, host: str) -> float:
        return max(1.0, self.asked[host] / self.hosts[host].cores)

    def start(self, step: HostedStep, t: float) -> None:
        host = step.server.host
        self._advance(host, t)
        self.running[host].append(step)
        self.asked[host] += step.server.host_cores
        self._retime(host, t)

    def end(self, step: HostedStep, t: float) -> None:
        host = step.server.host
        self._advance(host, t)
        self.running[host].remove(step)
        self.asked[host] = max(self.asked[host] - step.server.host_cores, 0.0)
        self._retime(host, t)

    def _advance(self, host: str, t: float) -> None:
        """The host's running steps have worked at the current speed until ``t``."""
        dt = t - self.since[host]
        if dt > 0:
            done = dt / self.slowdown(host)
            for step in self.running[host]:
                step.left = max(step.left - done, 0.0)
        self.since[host] = t

    def _retime(self, host: str, t: float) -> None:
        slow = self.slowdown(host)
        for step in self.running[host]:
            step.version += 1
            self.schedule(step, t + step.left * slow)
