"""Routing policies: which instance a request (or a KV hand-off) goes to.

Shared by the simulator and the runtime. A policy sees candidates through the ``Routable`` protocol
(outstanding work in seconds, whether a slot is free, a speed rank) and returns one of them, or None
when it wants the request to wait in the router's central queue (JFFC with every chain busy).

Candidates are a plain sequence (the policy looks at each one) or a ``Pool``: a fixed set of instances
that keeps a heap of their outstanding work, so least-work routing reads the least loaded one in
O(log n) instead of scanning all n. Both give the same answer. Ties (equal work and speed) go to the
instance chosen least recently, then to the first in the pool's order: identical idle instances take
requests in turn instead of the first one taking all of them.
"""

from __future__ import annotations

import itertools
import math
import random
from collections.abc import Iterable
from collections.abc import Sequence as Seq
from heapq import heappop as _heappop
from heapq import heappush as _heappush
from typing import Protocol

#: Order of routing choices (for "least recently chosen"); only the order of stamps matters.
_STAMPS = itertools.count()


class Routable(Protocol):
    name: str
    #: Stamp of the most recent time a policy chose this instance (-1: never).
    last_chosen: int

    def outstanding_work(self) -> float:
        """Estimated seconds of work queued and running."""

    def has_free_slot(self) -> bool:
        """Whether one more request can start now (a batch slot and KV room for it)."""

    @property
    def speed(self) -> float:
        """Requests per second the instance serves alone (higher is faster)."""


class Indexable(Routable, Protocol):
    """What a ``Pool`` member adds: its work split into its own and what lies downstream of it, when
    its own work next changes without an event, and the pools it tells about changes."""

    #: A pool whose least work is added to this instance's own (a prefill instance's decode pool).
    downstream: Pool | None
    pools: list[Pool]

    def own_work(self) -> float:
        """Outstanding work without ``downstream``'s."""

    def work_valid_until(self) -> float:
        """Clock time before which ``own_work`` cannot change unless the member says so (inf: never)."""


def chosen(inst: Routable) -> Routable:
    """Record that ``inst`` was just chosen (the tie-break reads it) and return it."""
    inst.last_chosen = next(_STAMPS)
    for pool in getattr(inst, "pools", ()):
        pool.mark(inst)
    return inst


def _rank(c: Routable) -> tuple[float, float, int]:
    return (c.outstanding_work(), -c.speed, getattr(c, "last_chosen", -1))


class _Heap:
    """A binary min-heap of pool positions keyed by tuples, with each position's place kept so a key
    can change or leave in O(log n). ``steps`` counts the entries compared."""

    def __init__(self) -> None:
        self.items: list[int] = []
        self.keys: dict[int, tuple] = {}
        self.where: dict[int, int] = {}
        self.steps = 0

    def __len__(self) -> int:
        return len(self.items)

    def top(self) -> int | None:
        return self.items[0] if self.items else None

    def set(self, pos: int, key: tuple) -> None:
        old = self.keys.get(pos)
        self.keys[pos] = key
        if old is None:
            self.items.append(pos)
            self.where[pos] = len(self.items) - 1
            self._up(len(self.items) - 1)
        elif key < old:
            self._up(self.where[pos])
        elif key > old:
            self._down(self.where[pos])

    def remove(self, pos: int) -> None:
        if pos not in self.keys:
            return
        i = self.where.pop(pos)
        del self.keys[pos]
        last = self.items.pop()
        if i < len(self.items):
            self.items[i] = last
            self.where[last] = i
            self._up(i)
            self._down(self.where[last])

    def _swap(self, i: int, j: int) -> None:
        a, b = self.items[i], self.items[j]
        self.items[i], self.items[j] = b, a
        self.where[a], self.where[b] = j, i

    def _up(self, i: int) -> None:
        items, keys = self.items, self.keys
        while i > 0:
            parent = (i - 1) // 2
            self.steps += 1
            if keys[items[i]] < keys[items[parent]]:
                self._swap(i, parent)
                i = parent
            else:
                return

    def _down(self, i: int) -> None:
        items, keys = self.items, self.keys
        n = len(items)
        while True:
            left = 2 * i + 1
            if left >= n:
                return
            small = left
            right = left + 1
            self.steps += 2 if right < n else 1
            if right < n and keys[items[right]] < keys[items[left]]:
                small = right
            if keys[items[small]] < keys[items[i]]:
                self._swap(i, small)
                i = small
            else:
                return


class Pool(Seq):
    """A fixed set of instances to route among (in a fixed order), indexed by outstanding work.

    Members tell the pool when their load may have changed (``mark``: admissions, steps, completions,
    preemptions, aborts, being chosen); the pool re-reads only those, and the members whose own work
    changes with time alone (``work_valid_until``: a simulated run of decode steps part-way through),
    when it is next asked. ``remove`` takes a failed instance out. Members are grouped by their
    ``downstream`` pool: a group's order does not depend on that pool's work, which is added when the
    groups' best are compared. ``examined`` counts member reads plus heap comparisons.
    """

    def __init__(self, members: Iterable[Indexable], clock: list[float] | None = None):
        self.members: list[Indexable] = list(members)
        #: The caller's current time (``clock[0]``), for members whose work changes with time.
        self.clock = clock
        self._live: list[Indexable] = list(self.members)
        self._pos = {id(m): i for i, m in enumerate(self.members)}
        self._group: dict[int, Pool | None] = {}
        self._heaps: dict[int, _Heap] = {}
        self._expiry: list[tuple[float, int]] = []
        self._due: dict[int, float] = {}
        self._dirty: set[int] = set()
        self._gone: set[int] = set()
        self._reads = 0
        self._offsets: dict[int, Pool | None] = {}
        for i, m in enumerate(self.members):
            m.pools.append(self)
            self._dirty.add(i)

    # ---- a sequence of the live members, in order ---------------------------------------------------
    def __len__(self) -> int:
        return len(self._live)

    def __getitem__(self, i):
        return self._live[i]

    def __iter__(self):
        return iter(self._live)

    @property
    def examined(self) -> int:
        return self._reads + sum(h.steps for h in self._heaps.values())

    # ---- changes -----------------------------------------------------------------------------------
    def mark(self, member: Indexable) -> None:
        """``member``'s work (or its tie-break stamp) may have changed."""
        pos = self._pos.get(id(member))
        if pos is not None and pos not in self._gone:
            self._dirty.add(pos)

    def remove(self, member: Indexable) -> None:
        """Take ``member`` out (it failed); it is never chosen again."""
        pos = self._pos.get(id(member))
        if pos is None or pos in self._gone:
            return
        self._gone.add(pos)
        self._live = [m for i, m in enumerate(self.members) if i not in self._gone]
        self._dirty.discard(pos)
        self._due.pop(pos, None)
        if pos in self._group:
            self._heaps[id(self._group.pop(pos))].remove(pos)
        if self in member.pools:
            member.pools.remove(self)

    # ---- reading -----------------------------------------------------------------------------------
    def _now(self) -> float:
        return math.inf if self.clock is None else self.clock[0]

    def _refresh(self) -> None:
        now = self._now()
        while self._expiry and self._expiry[0][0] <= now:
            due, pos = _heappop(self._expiry)
            if self._due.get(pos) == due:
                del self._due[pos]
                self._dirty.add(pos)
        if not self._dirty:
            return
        for pos in self._dirty:
            self._rekey(pos)
        self._dirty.clear()

    def _rekey(self, pos: int) -> None:
        m = self.members[pos]
        self._reads += 1
        group = m.downstream
        if pos in self._group and self._group[pos] is not group:
            self._heaps[id(self._group[pos])].remove(pos)
        self._group[pos] = group
        heap = self._heaps.get(id(group))
        if heap is None:
            heap = self._heaps[id(group)] = _Heap()
            self._offsets[id(group)] = group
        heap.set(pos, (m.own_work(), -m.speed, m.last_chosen, pos))
        due = m.work_valid_until()
        if due < math.inf:
            if self._due.get(pos) != due:
                self._due[pos] = due
                _heappush(self._expiry, (due, pos))
        else:
            self._due.pop(pos, None)

    def least(self) -> Indexable | None:
        """The live member with the least outstanding work (then the fastest, then the least recently
        chosen, then the first): what ``min`` over ``_rank`` returns for the members in order."""
        self._refresh()
        best = best_key = None
        for gid, heap in self._heaps.items():
            pos = heap.top()
            if pos is None:
                continue
            own, speed, stamp, _ = heap.keys[pos]
            group = self._offsets[gid]
            key = (own + (group.least_work() if group is not None else 0.0), speed, stamp, pos)
            self._reads += 1
            if best_key is None or key < best_key:
                best, best_key = self.members[pos], key
        return best

    def least_work(self) -> float:
        """The least outstanding work among the live members (0 when there are none)."""
        m = self.least()
        return 0.0 if m is None else m.outstanding_work()


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
    """The instance with the least outstanding work; of equals the fastest, then the one chosen least
    recently (so identical instances share the load), then the first. O(log n) on a ``Pool``."""

    name = "least-work"

    def choose(self, candidates):
        if isinstance(candidates, Pool):
            best = candidates.least()
        else:
            best = min(candidates, key=_rank)
        return None if best is None else chosen(best)


class PowerOfTwo(RoutingPolicy):
    """Sample two instances at random (seeded), send to the one with less outstanding work."""

    name = "power-of-two"

    def __init__(self, seed: int = 0):
        self._rng = random.Random(seed)

    def choose(self, candidates):
        if len(candidates) == 1:
            return candidates[0]
        pool = candidates if isinstance(candidates, Seq) else list(candidates)
        a, b = self._rng.sample(pool, 2)
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
