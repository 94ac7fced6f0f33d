"""Routing policies: which instance a request (or a KV hand-off) goes to.

Shared by the simulator and the runtime. A policy sees candidates through the ``Routable`` protocol
(outstanding work in seconds, whether a slot is free, a speed rank) and returns one of them, or None
when it wants the request to wait in the router's central queue (JFFC with every chain busy).
"""

from __future__ import annotations

import random
from collections.abc import Sequence as Seq
from typing import Protocol


class Routable(Protocol):
    name: str

    def outstanding_work(self) -> float:
        """Estimated seconds of work queued and running."""

    def has_free_slot(self) -> bool:
        """Whether one more request can start now (a batch slot and KV room for it)."""

    @property
    def speed(self) -> float:
        """Requests per second the instance serves alone (higher is faster)."""


class RoutingPolicy:
    name = "base"
    #: True when the policy may hold requests back (the caller must re-offer them on completions).
    queues = False

    def choose(self, candidates: Seq[Routable]) -> Routable | None:
        raise NotImplementedError


class RoundRobin(RoutingPolicy):
    name = "round-robin"

    def __init__(self) -> None:
        self._next = 0

    def choose(self, candidates):
        c = candidates[self._next % len(candidates)]
        self._next += 1
        return c


class Weighted(RoutingPolicy):
    """Smooth weighted round-robin: deterministic, and each instance's share equals its weight."""

    name = "weighted"

    def __init__(self, weights: dict[str, float]):
        self.weights = weights
        self._current: dict[str, float] = {}

    def choose(self, candidates):
        live = [c for c in candidates if self.weights.get(c.name, 0) > 0] or list(candidates)
        total = sum(self.weights.get(c.name, 1.0) for c in live)
        best = None
        for c in live:
            self._current[c.name] = self._current.get(c.name, 0.0) + self.weights.get(c.name, 1.0)
            if best is None or self._current[c.name] > self._current[best.name]:
                best = c
        self._current[best.name] -= total
        return best


class LeastWork(RoutingPolicy):
    name = "least-work"

    def choose(self, candidates):
        return min(candidates, key=lambda c: (c.outstanding_work(), -c.speed))


class PowerOfTwo(RoutingPolicy):
    """Sample two instances at random (seeded), send to the one with less outstanding work."""

    name = "power-of-two"

    def __init__(self, seed: int = 0):
        self._rng = random.Random(seed)

    def choose(self, candidates):
        if len(candidates) == 1:
            return candidates[0]
        a, b = self._rng.sample(list(candidates), 2)
        return a if (a.outstanding_work(), -a.speed) <= (b.outstanding_work(), -b.speed) else b


class JoinFastestFreeChain(RoutingPolicy):
    """JFFC: the fastest instance with a free slot; if none is free, wait in the central queue."""

    name = "jffc"
    queues = True

    def choose(self, candidates):
        free = [c for c in candidates if c.has_free_slot()]
        if not free:
            return None
        return max(free, key=lambda c: c.speed)


def make_policy(name: str, weights: dict[str, float] | None = None, seed: int = 0) -> RoutingPolicy:
    if name == "round-robin":
        return RoundRobin()
    if name == "weighted":
        return Weighted(dict(weights or {}))
    if name == "least-work":
        return LeastWork()
    if name == "power-of-two":
        return PowerOfTwo(seed)
    if name == "jffc":
        return JoinFastestFreeChain()
    raise ValueError(
        f"unknown routing policy '{name}'; use round-robin, weighted, least-work, power-of-two or jffc"
    )
