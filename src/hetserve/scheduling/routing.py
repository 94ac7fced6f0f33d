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
from heapq import heapify as _heapify
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
    """What a ``Pool`` member adds: its work split into its own and what lies downstream of it, how
    fast its own work can fall with time alone, and the pools it tells about changes."""

    #: A pool whose least work is added to this instance's own (a prefill instance's decode pool).
    downstream: Pool | None
    pools: list[Pool]

    def own_work(self) -> float:
        """Outstanding work without ``downstream``'s."""

    def work_view(self) -> tuple[float, tuple[float, float, float]]:
        """``(own_work(), work_drop_bound())``."""

    def work_drop_bound(self) -> tuple[float, float, float]:
        """``(jump, rate, most)``: until the member next tells its pools of a change, its own work at
        clock time ``t`` is at least its current own work minus ``min(most, jump + rate * (t - now))``;
        (0, 0, 0) when it changes only with such calls."""


def chosen(inst: Routable) -> Routable:
    """Record that ``inst`` was just chosen (the tie-break reads it) and return it."""
    inst.last_chosen = next(_STAMPS)
    for pool in getattr(inst, "pools", ()):
        pool.mark(inst)
    return inst


def _rank(c: Routable) -> tuple[float, float, int]:
    return (c.outstanding_work(), -c.speed, getattr(c, "last_chosen", -1))


class _Heap:
    """A min-heap of pool positions keyed by tuples that end with the position (so no two are equal):
    ``heapq`` entries with lazy removal. ``keys`` holds each position's current key; an entry is
    current while it is that very object, and stale entries are dropped when they reach the top (or
    all at once when they outnumber the current ones). ``steps`` counts entries pushed and popped
    (each O(log n), in C)."""

    def __init__(self) -> None:
        self.entries: list[tuple] = []
        self.keys: dict[int, tuple] = {}
        self.steps = 0

    def __len__(self) -> int:
        return len(self.keys)

    def top(self) -> int | None:
        entries, keys = self.entries, self.keys
        while entries:
            key = entries[0]
            if keys.get(key[-1]) is key:
                return key[-1]
            _heappop(entries)
            self.steps += 1
        return None

    def set(self, pos: int, key: tuple) -> None:
        if self.keys.get(pos) == key:
            return
        self.keys[pos] = key
        _heappush(self.entries, key)
        self.steps += 1
        if len(self.entries) > 2 * len(self.keys) + 16:
            self.entries = list(self.keys.values())
            _heapify(self.entries)

    def remove(self, pos: int) -> None:
        self.keys.pop(pos, None)


#: A falling member's fall rate is rounded up to a power of this (its rate class), so each class's heap
#: orders its members' lower bounds with one rate that overstates none by more than this factor.
RATE_STEP = 1.5


class _Group:
    """The members of a pool with the same ``downstream``, in heaps: those whose own work is fixed
    until their next change (``still``, keyed by it exactly), and those whose work falls with time
    alone, keyed by a lower bound of it (``falling``, one heap per rate class, and ``floor``).

    A falling member read at time ``r`` with own work ``U`` and bound ``(J, rho, most)`` has own work at
    any later ``t`` of at least ``U - J - rate * (t - r)`` for any ``rate >= rho``, and at least
    ``F = U - most``. With one ``rate`` per class (``rho`` rounded up to a power of ``RATE_STEP``) the
    first is ``K - rate * t``, ``K = U - J + rate * r``: a heap ordered by ``K`` gives its class's bounds
    in order at any time. Once the bound falls below ``F`` (time ``switch``) the member moves to the
    ``floor`` heap, ordered by ``F``. Either bound is valid at any time, so the moment of the move only
    decides how tight the bound is."""

    def __init__(self, downstream: Pool | None):
        self.downstream = downstream
        self.still = _Heap()
        self.falling: dict[int, _Heap] = {}  # rate class -> heap
        self.floor = _Heap()
        self.reads: dict[int, tuple[float, float, float, float, int]] = {}  # pos -> (U, J, F, r, serial)
        self.rate_class: dict[int, int] = {}  # pos -> its class while in a falling heap
        self.switch: list[tuple[float, int, int]] = []  # (time, pos, serial)
        self._serial = 0

    def heaps(self) -> list[_Heap]:
        return [self.still, self.floor, *self.falling.values()]

    @staticmethod
    def rate(cls: int) -> float:
        return RATE_STEP**cls

    def _unfall(self, pos: int) -> None:
        cls = self.rate_class.pop(pos, None)
        if cls is not None:
            self.falling[cls].remove(pos)

    def remove(self, pos: int) -> None:
        self.still.remove(pos)
        self.floor.remove(pos)
        self._unfall(pos)
        self.reads.pop(pos, None)

    def place(self, pos: int, key: tuple, bound: tuple[float, float, float], now: float) -> None:
        """Put a member just read at ``now`` (``key``: its own work, -speed, stamp, pos) in a heap."""
        jump, rho, most = bound
        if most <= 0.0:
            self._unfall(pos)
            self.floor.remove(pos)
            self.reads.pop(pos, None)
            self.still.set(pos, key)
            return
        self.still.remove(pos)
        self._serial += 1
        u, f = key[0], key[0] - most
        self.reads[pos] = (u, jump, f, now, self._serial)
        if not math.isfinite(now) or f >= u - jump or rho <= 0.0:
            self._unfall(pos)
            self.floor.set(pos, (f, pos))
            return
        cls = math.ceil(math.log(rho, RATE_STEP) - 1e-12)
        while self.rate(cls) < rho:  # rounding of the logarithm
            cls += 1
        old = self.rate_class.get(pos)
        if old is not None and old != cls:
            self.falling[old].remove(pos)
        self.floor.remove(pos)
        rate = self.rate(cls)
        self.rate_class[pos] = cls
        heap = self.falling.get(cls)
        if heap is None:
            heap = self.falling[cls] = _Heap()
        heap.set(pos, (u - jump + rate * now, pos))
        _heappush(self.switch, (now + (u - jump - f) / rate, pos, self._serial))

    def advance(self, now: float) -> None:
        """Move the falling members whose floor is now the tighter bound."""
        while self.switch and self.switch[0][0] <= now:
            _, pos, serial = _heappop(self.switch)
            read = self.reads.get(pos)
            if read is not None and read[4] == serial and pos in self.rate_class:
                self._unfall(pos)
                self.floor.set(pos, (read[2], pos))

    def bounds(self, now: float) -> dict[_Heap, tuple[float, float, float]]:
        """Each non-empty falling or floor heap's top: (its lower bound at ``now``, the bound's
        magnitude, the heap's rate)."""
        heaps = [(h, self.rate(cls)) for cls, h in self.falling.items()] + [(self.floor, 0.0)]
        out = {}
        for heap, rate in heaps:
            entry = self.top_bound(heap, rate, now)
            if entry is not None:
                out[heap] = entry
        return out

    @staticmethod
    def top_bound(heap: _Heap, rate: float, now: float) -> tuple[float, float, float] | None:
        """``bounds``' entry for one heap (None when it is empty); the floor heap's bounds (rate 0)
        do not fall."""
        top = heap.top()
        if top is None:
            return None
        k = heap.keys[top][0]
        if rate == 0.0:  # also where ``now`` is infinite (a pool without a clock)
            return (k, abs(k), 0.0)
        return (k - rate * now, abs(k) + rate * abs(now), rate)


class Pool(Seq):
    """A fixed set of instances to route among (in a fixed order), indexed by outstanding work.

    Members tell the pool when their load may have changed (``mark``: admissions, steps, completions,
    preemptions, aborts, being chosen); the pool re-reads those when next asked. A member whose work
    also falls with time alone (a simulated run of decode steps, which ends its steps between events)
    is re-read only when the lower bound of its work reaches the least work found: a heap gives those
    bounds in order (``_Group``). ``remove`` takes a failed instance out. Members are grouped by their
    ``downstream`` pool: a group's order does not depend on that pool's work, which is added when the
    groups' best are compared. ``examined`` counts member reads plus heap entries pushed and popped.
    """

    def __init__(self, members: Iterable[Indexable], clock: list[float] | None = None):
        self.members: list[Indexable] = list(members)
        #: The caller's current time (``clock[0]``), for members whose work falls with time.
        self.clock = clock
        self._live: list[Indexable] = list(self.members)
        self._pos = {id(m): i for i, m in enumerate(self.members)}
        self._groups: dict[int, _Group] = {}
        self._group_of: dict[int, _Group] = {}
        self._dirty: set[int] = set(range(len(self.members)))
        self._gone: set[int] = set()
        self._reads = 0
        for m in self.members:
            m.pools.append(self)

    # ---- a sequence of the live members, in order ---------------------------------------------------
    def __len__(self) -> int:
        return len(self._live)

    def __getitem__(self, i):
        return self._live[i]

    def __iter__(self):
        return iter(self._live)

    @property
    def reads(self) -> int:
        """Members whose work was read (a scan reads every member per decision)."""
        return self._reads

    @property
    def heap_operations(self) -> int:
        """Heap entries pushed and popped while keeping the index in order."""
        return sum(h.steps for g in self._groups.values() for h in g.heaps())

    @property
    def examined(self) -> int:
        return self.reads + self.heap_operations

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
        group = self._group_of.pop(pos, None)
        if group is not None:
            group.remove(pos)
        if self in member.pools:
            member.pools.remove(self)

    # ---- reading -----------------------------------------------------------------------------------
    def _read(self, pos: int, now: float) -> tuple:
        """Read member ``pos`` at ``now`` into its group's heaps; its key."""
        m = self.members[pos]
        self._reads += 1
        own, bound = m.work_view()
        key = (own, -m.speed, m.last_chosen, pos)
        group = self._groups.get(id(m.downstream))
        if group is None:
            group = self._groups[id(m.downstream)] = _Group(m.downstream)
        old = self._group_of.get(pos)
        if old is not None and old is not group:
            old.remove(pos)
        self._group_of[pos] = group
        group.place(pos, key, bound, now)
        return key

    def _least_own(self, group: _Group, now: float) -> tuple | None:
        """The least (own work, -speed, stamp, pos) in ``group`` at ``now``: the still heap's top, or a
        falling member read because its lower bound reached it."""
        group.advance(now)
        pos = group.still.top()
        best = None if pos is None else group.still.keys[pos]
        read = []
        tops = group.bounds(now)  # only the heap a member leaves changes its entry
        while tops:
            heap = min(tops, key=lambda h: tops[h][0])
            lo, scale, rate = tops[heap]
            if best is not None and lo > best[0] + 1e-9 * (1.0 + scale):  # rounding never hides one
                break
            pos = heap.top()
            group.remove(pos)
            entry = group.top_bound(heap, rate, now)
            if entry is None:
                del tops[heap]
            else:
                tops[heap] = entry
            m = self.members[pos]
            self._reads += 1
            own, bound = m.work_view()
            key = (own, -m.speed, m.last_chosen, pos)
            read.append((pos, key, bound))
            if best is None or key < best:
                best = key
        for pos, key, bound in read:
            group.place(pos, key, bound, now)
        return best

    def least(self) -> Indexable | None:
        """The live member with the least outstanding work (then the fastest, then the least recently
        chosen, then the first): what ``min`` over ``_rank`` returns for the members in order."""
        now = math.inf if self.clock is None else self.clock[0]
        if self._dirty:
            for pos in self._dirty:
                self._read(pos, now)
            self._dirty.clear()
        best = best_key = None
        for group in self._groups.values():
            own = self._least_own(group, now)
            if own is None:
                continue
            self._reads += 1
            offset = group.downstream.least_work() if group.downstream is not None else 0.0
            key = (own[0] + offset, *own[1:])
            if best_key is None or key < best_key:
                best, best_key = self.members[own[3]], key
        return best

    def least_work(self) -> float:
        """The least outstanding work among the live members (0 when there are none)."""
        m = self.least()
        return 0.0 if m is None else m.outstanding_work()


class ScanPool(Seq):
    """A small set of instances to route among, read whole at each decision: below ``INDEX_MIN``
    members that costs less than keeping ``Pool``'s index up to date at every change of load. The same
    choices as ``Pool`` (``least``: ``min`` over ``_rank`` of the members in order)."""

    def __init__(self, members: Iterable[Routable], clock: list[float] | None = None):
        self.members: list[Routable] = list(members)
        self.clock = clock
        self._live: list[Routable] = list(self.members)
        self._reads = 0
        for m in self.members:
            m.pools.append(self)

    def __len__(self) -> int:
        return len(self._live)

    def __getitem__(self, i):
        return self._live[i]

    def __iter__(self):
        return iter(self._live)

    @property
    def reads(self) -> int:
        return self._reads

    @property
    def examined(self) -> int:
        return self._reads

    def mark(self, member: Routable) -> None:
        """Nothing to keep up to date: every member is read at each decision."""

    def remove(self, member: Routable) -> None:
        """Take ``member`` out (it failed); it is never chosen again."""
        self._live = [m for m in self._live if m is not member]
        if self in member.pools:
            member.pools.remove(self)

    def least(self) -> Routable | None:
        self._reads += len(self._live)
        return min(self._live, key=_rank, default=None)

    def least_work(self) -> float:
        m = self.least()
        return 0.0 if m is None else m.outstanding_work()


#: Fewest members for which ``make_pool`` indexes a pool by load: the 8-instance plan of
#: benchmarks/sim_speed.py runs faster scanned, 200 replicas (benchmarks/sim_scaling.py) faster indexed
#: (BENCHMARKS.md, "Simulator speed").
INDEX_MIN = 32


def make_pool(members: Iterable[Indexable], clock: list[float] | None = None) -> Pool | ScanPool:
    """The pool to route ``members`` over: indexed by load when there are many, scanned otherwise."""
    members = list(members)
    return Pool(members, clock) if len(members) >= INDEX_MIN else ScanPool(members, clock)


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
        if isinstance(candidates, (Pool, ScanPool)):
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
