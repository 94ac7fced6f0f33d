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
    """What a ``Pool`` member adds: its work split into its own and what lies downstream of it, how
    fast its own work can fall with time alone, and the pools it tells about changes."""

    #: A pool whose least work is added to this instance's own (a prefill instance's decode pool).
    downstream: Pool | None
    pools: list[Pool]

    def own_work(self) -> float:
        """Outstanding work without ``downstream``'s."""

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


class _Group:
    """The members of a pool with the same ``downstream``, in three heaps: those whose own work is
    fixed until their next change (``still``, keyed by it exactly), and those whose work falls with
    time alone, keyed by a lower bound of it (``falling`` and ``floor``).

    A falling member read at time ``r`` with own work ``U`` and bound ``(J, rho, most)`` has own work at
    any later ``t`` of at least ``U - J - rate * (t - r)`` for any ``rate >= rho``, and at least
    ``F = U - most``. With one ``rate`` for the group the first is ``K - rate * t``, ``K = U - J + rate
    * r``: one heap ordered by ``K`` gives those bounds in order at any time. Once it falls below ``F``
    (time ``switch``) the member moves to the ``floor`` heap, ordered by ``F``. Either bound is valid
    at any time, so the moment of the move only decides how tight the bound is."""

    def __init__(self, downstream: Pool | None):
        self.downstream = downstream
        self.still = _Heap()
        self.falling = _Heap()
        self.floor = _Heap()
        self.rate = 0.0
        self.reads: dict[int, tuple[float, float, float, float, int]] = {}  # pos -> (U, J, F, r, serial)
        self.switch: list[tuple[float, int, int]] = []  # (time, pos, serial)
        self._serial = 0

    def heaps(self) -> tuple[_Heap, _Heap, _Heap]:
        return self.still, self.falling, self.floor

    def remove(self, pos: int) -> None:
        for heap in self.heaps():
            heap.remove(pos)
        self.reads.pop(pos, None)

    def place(self, pos: int, key: tuple, bound: tuple[float, float, float], now: float) -> None:
        """Put a member just read at ``now`` (``key``: its own work, -speed, stamp, pos) in a heap."""
        jump, rho, most = bound
        if most <= 0.0:
            self.falling.remove(pos)
            self.floor.remove(pos)
            self.reads.pop(pos, None)
            self.still.set(pos, key)
            return
        self.still.remove(pos)
        self._serial += 1
        self.reads[pos] = (key[0], jump, key[0] - most, now, self._serial)
        if rho > self.rate:  # re-base every bound on the new rate (rare: it grows by 1.5x or more)
            self.rate = max(rho, 1.5 * self.rate)
            falling = [p for p in self.falling.keys]
            self.switch = []
            for p in falling:
                self.falling.remove(p)
                self._put(p)
        self._put(pos)

    def _put(self, pos: int) -> None:
        u, j, f, r, serial = self.reads[pos]
        if not math.isfinite(r) or f >= u - j or self.rate <= 0.0:
            self.falling.remove(pos)
            self.floor.set(pos, (f, pos))
            return
        self.floor.remove(pos)
        self.falling.set(pos, (u - j + self.rate * r, pos))
        _heappush(self.switch, (r + (u - j - f) / self.rate, pos, serial))

    def advance(self, now: float) -> None:
        """Move the falling members whose floor is now the tighter bound."""
        while self.switch and self.switch[0][0] <= now:
            _, pos, serial = _heappop(self.switch)
            read = self.reads.get(pos)
            if read is not None and read[4] == serial and pos in self.falling.keys:
                self.falling.remove(pos)
                self.floor.set(pos, (read[2], pos))


class Pool(Seq):
    """A fixed set of instances to route among (in a fixed order), indexed by outstanding work.

    Members tell the pool when their load may have changed (``mark``: admissions, steps, completions,
    preemptions, aborts, being chosen); the pool re-reads those when next asked. A member whose work
    also falls with time alone (a simulated run of decode steps, which ends its steps between events)
    is re-read only when the lower bound of its work reaches the least work found: a heap gives those
    bounds in order (``_Group``). ``remove`` takes a failed instance out. Members are grouped by their
    ``downstream`` pool: a group's order does not depend on that pool's work, which is added when the
    groups' best are compared. ``examined`` counts member reads plus heap comparisons.
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
    def comparisons(self) -> int:
        """Heap entries compared while keeping the index in order."""
        return sum(h.steps for g in self._groups.values() for h in g.heaps())

    @property
    def examined(self) -> int:
        return self.reads + self.comparisons

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
        key = (m.own_work(), -m.speed, m.last_chosen, pos)
        bound = m.work_drop_bound()
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
        falling, floor, rate = group.falling, group.floor, group.rate
        while len(falling) or len(floor):
            heap, lo, scale = None, math.inf, 0.0
            if len(falling):  # the least lower bound of either heap
                k = falling.keys[falling.top()][0]
                heap, lo, scale = falling, k - rate * now, abs(k) + rate * abs(now)
            if len(floor):
                f = floor.keys[floor.top()][0]
                if heap is None or f < lo:
                    heap, lo, scale = floor, f, abs(f)
            if best is not None and lo > best[0] + 1e-9 * (1.0 + scale):  # rounding never hides one
                break
            pos = heap.top()
            heap.remove(pos)
            m = self.members[pos]
            self._reads += 1
            key = (m.own_work(), -m.speed, m.last_chosen, pos)
            read.append((pos, key, m.work_drop_bound()))
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
