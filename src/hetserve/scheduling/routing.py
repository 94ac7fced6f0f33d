"""Routing policies: which instance a request (or a KV hand-off) goes to.

Shared by the simulator and the runtime. A policy sees candidates through the ``Routable`` protocol
(outstanding work in seconds, whether a slot is free, a speed rank) and returns one of them, or None
when it wants the request to wait in the router's central queue (JFFC with every chain busy).

Candidates are a plain sequence (the policy looks at each one) or a ``Pool``: a fixed set of instances
that keeps a heap of their outstanding work, so least-work routing reads the least loaded one in
O(log n) instead of scanning all n, and an instance whose load changed only when it could be the one
chosen. Both give the same answer. Ties (equal work and speed) go to the
instance chosen least recently, then to the first in the pool's order: identical idle instances take
requests in turn instead of the first one taking all of them.
"""

from __future__ import annotations

import itertools
import math
import random
from bisect import bisect_left as _bisect_left
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
        """Outstanding work without ``downstream``'s; never negative."""

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


#: A falling member's fall rate is rounded up to a power of this (its rate class), so each class's heap
#: orders its members' lower bounds with one rate that overstates none by more than this factor. A
#: decision looks at the top of each class with members (24 classes span a tenfold range of rates).
RATE_STEP = 1.1
#: The rates of the classes from 1e-6 to 1e6 seconds of work per second, found by bisection.
_LOWEST_CLASS = math.floor(math.log(1e-6, RATE_STEP))
_RATES = [RATE_STEP**c for c in range(_LOWEST_CLASS, 1 - _LOWEST_CLASS)]


def _rate_class(rho: float) -> tuple[int, float]:
    """The least class whose rate (a power of ``RATE_STEP``) is at least ``rho`` > 0, and that rate."""
    i = _bisect_left(_RATES, rho)
    if 0 < i < len(_RATES):
        return i + _LOWEST_CLASS, _RATES[i]
    cls = math.ceil(math.log(rho, RATE_STEP) - 1e-12)
    while RATE_STEP**cls < rho:  # rounding of the logarithm
        cls += 1
    return cls, RATE_STEP**cls


# The entries of a group's heaps, tuples that order as the heap needs, with the member's position last
# in the part that orders them (so no two entries of different members compare equal):
#   exact    (own work, -speed, stamp, pos)        ``still``: the member's key, until its next change
#   unread   (0.0, -speed, stamp, pos, 0)          ``still``: a changed member not read since
#   floor    (F, pos)                              ``floor``
#   falling  (K, pos, F, switch, rate, class)      its rate class's heap
# Each member has one current entry (``Pool._entry[pos]``; None while it is read). An entry in a heap is
# current while it is that very object: stale ones are dropped when they reach a top, or all at once
# when a heap outgrows twice its group.
_EXACT, _UNREAD, _FALLING = 4, 5, 6


class _Group:
    """The members of a pool with the same ``downstream``, in heaps of the entries above: ``still``
    holds the members whose own work is fixed until their next change (keyed by it exactly) and the
    changed members not read yet; ``falling`` (one heap per rate class) and ``floor`` hold those whose
    work falls with time alone, keyed by a lower bound of it.

    Own work is never negative, so a changed member's key is at least ``(0, -speed, stamp, pos)``: its
    speed and tie-break stamp are known without reading its work. Under that key it waits in ``still``,
    and it is read when the key reaches the top. A member that changes several times while it cannot
    be chosen (busy with steps while idle members take the arrivals) is read once.

    A falling member read at time ``r`` with own work ``U`` and bound ``(J, rho, most)`` has own work at
    any later ``t`` of at least ``U - J - rate * (t - r)`` for any ``rate >= rho``, and at least
    ``F = U - most``. With one ``rate`` per class (``rho`` rounded up to a power of ``RATE_STEP``) the
    first is ``K - rate * t``, ``K = U - J + rate * r``: a heap ordered by ``K`` gives its class's bounds
    in order at any time. Once the bound falls below ``F`` (time ``switch``) the member moves to the
    ``floor`` heap, ordered by ``F``. Either bound is valid at any time, so the moment of the move only
    decides how tight the bound is. ``steps`` counts entries pushed and popped (each O(log n), in C)."""

    __slots__ = ("downstream", "still", "floor", "falling", "switch", "limit", "steps")

    def __init__(self, downstream: Pool | None):
        self.downstream = downstream
        self.still: list[tuple] = []
        self.floor: list[tuple] = []
        self.falling: dict[int, list[tuple]] = {}  # rate class -> heap
        self.switch: list[tuple[float, int]] = []  # (time, pos): a falling entry's floor is tighter
        self.limit = 16  # entries a heap may hold before its stale ones are dropped: twice the group, + 16
        self.steps = 0

    def prune(self, heap: list, entry: list) -> None:
        """Drop ``heap``'s stale entries (the switch times too)."""
        if heap is self.switch:
            heap[:] = [(t, p) for t, p in heap if _falls_until(entry[p], t)]
        else:
            at = 3 if heap is self.still else 1
            heap[:] = [e for e in heap if entry[e[at]] is e]
        _heapify(heap)


def _falls_until(e: tuple | None, t: float) -> bool:
    """Whether ``e`` is a falling entry that moves to the floor heap at ``t``."""
    return e is not None and len(e) == _FALLING and e[3] == t


class Pool(Seq):
    """A fixed set of instances to route among (in a fixed order), indexed by outstanding work.

    Members tell the pool when their load may have changed (``mark``: admissions, steps, completions,
    preemptions, aborts, being chosen). A changed member is read when a decision needs it: when its
    least possible key (no work, its speed, its tie-break stamp) could beat the best found. A member
    whose work also falls with time alone (a simulated run of decode steps, which ends its steps
    between events) is re-read only when the lower bound of its work reaches the least work found: a
    heap gives those bounds in order (``_Group``). ``remove`` takes a failed instance out. Members are
    grouped by their ``downstream`` pool: a group's order does not depend on that pool's work, which
    is added when the groups' best are compared. ``examined`` counts member reads plus heap entries
    pushed and popped. A member's own work is never negative.
    """

    def __init__(self, members: Iterable[Indexable], clock: list[float] | None = None):
        self.members: list[Indexable] = list(members)
        #: The caller's current time (``clock[0]``), for members whose work falls with time.
        self.clock = clock
        self._live: list[Indexable] = list(self.members)
        self._pos = {id(m): i for i, m in enumerate(self.members)}
        self._groups: dict[int, _Group] = {}
        self._group_of: list[_Group | None] = [None] * len(self.members)
        #: Each member's current entry in its group's heaps (None while it is read, and once removed).
        self._entry: list[tuple | None] = [None] * len(self.members)
        self._dirty: set[int] = set(range(len(self.members)))
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
        return sum(g.steps for g in self._groups.values())

    @property
    def examined(self) -> int:
        return self.reads + self.heap_operations

    # ---- changes -----------------------------------------------------------------------------------
    def mark(self, member: Indexable) -> None:
        """``member``'s work (or its tie-break stamp) may have changed."""
        pos = self._pos.get(id(member))
        if pos is not None:
            self._dirty.add(pos)

    def remove(self, member: Indexable) -> None:
        """Take ``member`` out (it failed); it is never chosen again."""
        pos = self._pos.pop(id(member), None)
        if pos is None:
            return
        self._live = [m for m in self._live if m is not member]
        self._dirty.discard(pos)
        self._entry[pos] = None
        self._join(pos, None)
        if self in member.pools:
            member.pools.remove(self)

    def _join(self, pos: int, group: _Group | None) -> None:
        """Make ``group`` member ``pos``'s group."""
        old = self._group_of[pos]
        if old is not group:
            if old is not None:
                old.limit -= 2
            if group is not None:
                group.limit += 2
            self._group_of[pos] = group

    # ---- reading -----------------------------------------------------------------------------------
    def _read(self, pos: int, read: list) -> tuple:
        """Read member ``pos`` (its current entry is None); add its key and bound to ``read``."""
        m = self.members[pos]
        self._reads += 1
        own, bound = m.work_view()
        key = (own, -m.speed, m.last_chosen, pos)
        read.append((key, bound))
        return key

    def _place(self, group: _Group, read: list, now: float) -> None:
        """Put the members read at ``now`` in ``group``'s heaps."""
        entry = self._entry
        limit = group.limit
        for key, (jump, rho, most) in read:
            pos = key[3]
            if most <= 0.0:
                entry[pos] = e = key
                heap = group.still
            else:
                u = key[0]
                f = u - most
                if rho <= 0.0 or f >= u - jump or not math.isfinite(now):
                    entry[pos] = e = (f, pos)
                    heap = group.floor
                else:
                    i = _bisect_left(_RATES, rho)
                    cls, rate = (i + _LOWEST_CLASS, _RATES[i]) if 0 < i < len(_RATES) else _rate_class(rho)
                    switch = now + (u - jump - f) / rate
                    entry[pos] = e = (u - jump + rate * now, pos, f, switch, rate, cls)
                    heap = group.falling.get(cls)
                    if heap is None:
                        heap = group.falling[cls] = []
                    _heappush(group.switch, (switch, pos))
                    if len(group.switch) > limit:
                        group.prune(group.switch, entry)
            _heappush(heap, e)
            group.steps += 1
            if len(heap) > limit:
                group.prune(heap, entry)

    def _defer(self, now: float) -> None:
        """Give each changed member an unread entry in its group's still heap, or read it now when
        that entry would come before the heap's top (a read it could not escape)."""
        members, entry, groups = self.members, self._entry, self._groups
        todo = []
        for pos in self._dirty:
            m = members[pos]
            group = groups.get(id(m.downstream))
            if group is None:
                group = groups[id(m.downstream)] = _Group(m.downstream)
            e = entry[pos]
            if (
                e is not None
                and len(e) == _UNREAD
                and e[2] == m.last_chosen
                and e[1] == -m.speed
                and self._group_of[pos] is group
            ):
                continue  # changed again before it was read: the same least key
            if self._group_of[pos] is not group:
                self._join(pos, group)
            entry[pos] = None
            todo.append((group, pos, m))
        self._dirty.clear()
        reads: dict[_Group, list] = {}
        for group, pos, m in todo:
            still = group.still
            while still and entry[still[0][3]] is not still[0]:
                _heappop(still)
                group.steps += 1
            e = (0.0, -m.speed, m.last_chosen, pos, 0)
            if still and still[0] < e:
                entry[pos] = e
                _heappush(still, e)
                group.steps += 1
                if len(still) > group.limit:
                    group.prune(still, entry)
            else:
                read = reads.get(group)
                if read is None:
                    read = reads[group] = []
                self._read(pos, read)
        for group, read in reads.items():
            self._place(group, read, now)

    def _still_best(self, group: _Group, best: tuple | None, read: list) -> tuple | None:
        """The least of ``best`` and the still heap's top, reading the unread members whose least key
        comes before it."""
        still, entry = group.still, self._entry
        while still:
            e = still[0]
            pos = e[3]
            if entry[pos] is not e:
                _heappop(still)
                group.steps += 1
            elif len(e) == _EXACT:
                return e if best is None or e < best else best
            elif best is not None and best < e:
                return best
            else:
                _heappop(still)
                group.steps += 1
                entry[pos] = None
                key = self._read(pos, read)
                if best is None or key < best:
                    best = key
        return best

    def _least_own(self, group: _Group, now: float) -> tuple | None:
        """The least (own work, -speed, stamp, pos) in ``group`` at ``now``: the still heap's top, or an
        unread or falling member read because its least key or the lower bound of its work reached
        it."""
        entry, steps = self._entry, 0
        switch, floor = group.switch, group.floor
        while switch and switch[0][0] <= now:  # falling members whose floor is now the tighter bound
            t, pos = _heappop(switch)
            e = entry[pos]
            if e is not None and len(e) == _FALLING and e[3] == t:
                entry[pos] = f = (e[2], pos)
                _heappush(floor, f)
                steps += 1
                if len(floor) > group.limit:
                    group.prune(floor, entry)
        read: list[tuple[tuple, tuple[float, float, float]]] = []
        best = self._still_best(group, None, read)
        tops = []  # [lower bound at now, its magnitude, rate, heap] of each falling heap and the floor
        falling = group.falling
        for cls, heap in list(falling.items()):
            while heap and entry[heap[0][1]] is not heap[0]:
                _heappop(heap)
                steps += 1
            if heap:
                k, rate = heap[0][0], heap[0][4]
                tops.append([k - rate * now, abs(k) + rate * abs(now), rate, heap])
            else:
                del falling[cls]
        while floor and entry[floor[0][1]] is not floor[0]:
            _heappop(floor)
            steps += 1
        if floor:
            k = floor[0][0]
            tops.append([k, abs(k), 0.0, floor])
        unread = False
        while tops:
            top = tops[0]
            for t in tops:
                if t[0] < top[0]:
                    top = t
            lo, scale, rate, heap = top
            if best is not None and lo > best[0] + 1e-9 * (1.0 + scale):  # rounding never hides one
                break
            pos = _heappop(heap)[1]
            steps += 1
            entry[pos] = None
            while heap and entry[heap[0][1]] is not heap[0]:
                _heappop(heap)
                steps += 1
            if not heap:
                tops.remove(top)
            elif rate == 0.0:
                k = heap[0][0]
                top[0], top[1] = k, abs(k)
            else:
                k = heap[0][0]
                top[0], top[1] = k - rate * now, abs(k) + rate * abs(now)
            if best is not None and best[0] <= 0.0:
                # no work can be less: the tie-break decides, and it is known without a read
                m = self.members[pos]
                entry[pos] = e = (0.0, -m.speed, m.last_chosen, pos, 0)
                _heappush(group.still, e)
                steps += 1
                unread = True
                continue
            key = self._read(pos, read)
            if best is None or key < best:
                best = key
        group.steps += steps
        if unread:
            if len(group.still) > group.limit:
                group.prune(group.still, entry)
            best = self._still_best(group, best, read)
        self._place(group, read, now)
        return best

    def least(self) -> Indexable | None:
        """The live member with the least outstanding work (then the fastest, then the least recently
        chosen, then the first): what ``min`` over ``_rank`` returns for the members in order."""
        now = math.inf if self.clock is None else self.clock[0]
        if self._dirty:
            self._defer(now)
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
