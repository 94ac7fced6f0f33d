"""What a search's time limit counts: wall-clock seconds (the default), or work, so that the same inputs
give the same plan on any machine and under any load (``hetserve plan --deterministic``; ``compare``).

Work is counted in *reference seconds*: each kind of work the planner does is charged what it takes on
the reference machine (dev-2c in BENCHMARKS.md: 2 cores of a cloud VM, one used), so a limit of 30 makes
the decisions a 30 s search makes there when nothing else runs, and takes about that long there. The
rates below were measured there with ``benchmarks/planner_speed.py --deterministic`` (work against wall
time per phase); a faster machine finishes the same search sooner.

Every deadline in the planner, the simulator and the strategies is a value of ``now()``: with no work
clock active that is ``time.perf_counter()``; inside ``counting_work()`` it is the work charged so far.
A MILP limited by time stops wherever the machine got to; counting work, it is limited by branch-and-bound
nodes instead (``milp_limits``), and charged for the nodes it explored.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass

#: Reference seconds charged per simulator event (an arrival, a step's end, a transfer, ...), per request
#: (its sequence, admission, records and summary), per sequence in a step (a step of a large batch updates
#: every sequence in it) and per lane the router looks at when it reads an instance's load.
SIM_EVENT_S = 1.5e-6
SIM_REQUEST_S = 7.4e-5
SIM_ITEM_S = 2.25e-6
SIM_LANE_READ_S = 1.5e-6
#: Per instance a simulator sets up (its cost-model timers and KV pool).
SIM_INSTANCE_S = 2e-3
#: Per candidate instance the planner makes (its stages, precision and queueing capacity).
TEMPLATE_S = 1.5e-3
#: Per instance placed when a plan is built from an allocation.
BUILD_INSTANCE_S = 2e-5
#: A linear program or MILP: per solve, per simplex iteration (where the solver reports them) and per
#: branch-and-bound node explored.
SOLVE_S = 0.02
SIMPLEX_ITERATION_S = 2.2e-4
MILP_NODE_S = 1e-4
#: What a branch-and-bound node costs with its LP, for solvers that do not report iterations and to size a
#: node budget before the solve: NODE_S_PER_ROW x rows ** NODE_ROWS_EXPONENT, fitted to HiGHS on LLM-PQ's
#: MILP of 26 rows (0.5 ms a node) and Helix's of 1,062 and 1,761 rows (70 and 99 ms a node).
NODE_S_PER_ROW = 7.5e-6
NODE_ROWS_EXPONENT = 1.29
#: Wall-clock seconds a MILP may take when work is counted: a guard against a solve that never ends,
#: far above what its node limit takes (reaching it would make the result depend on the machine).
MILP_GUARD_S = 600.0


@dataclass
class WorkClock:
    """Reference seconds of work charged so far."""

    spent: float = 0.0


_active: ContextVar[WorkClock | None] = ContextVar("hetserve_work_clock", default=None)


def now() -> float:
    """The value deadlines are compared with: work charged so far when counting work, else
    ``time.perf_counter()``."""
    clock = _active.get()
    return time.perf_counter() if clock is None else clock.spent


def counting() -> bool:
    """Whether work is being counted (inside ``counting_work()``)."""
    return _active.get() is not None


def charge(seconds: float) -> None:
    """Add ``seconds`` of reference work to the clock when work is counted (else nothing)."""
    clock = _active.get()
    if clock is not None:
        clock.spent += seconds


@contextmanager
def counting_work() -> Iterator[WorkClock]:
    """Count work instead of wall time until the block ends (nested blocks share the outer clock)."""
    clock = _active.get()
    if clock is not None:
        yield clock
        return
    token = _active.set(WorkClock())
    try:
        yield _active.get()
    finally:
        _active.reset(token)


@contextmanager
def counting_work_if(deterministic: bool) -> Iterator[WorkClock | None]:
    """``counting_work()`` when ``deterministic``, else the wall clock (yields None)."""
    if not deterministic:
        yield None
        return
    with counting_work() as clock:
        yield clock


def node_seconds(rows: int) -> float:
    """Reference seconds one branch-and-bound node of a MILP with ``rows`` constraints takes."""
    return MILP_NODE_S + NODE_S_PER_ROW * max(rows, 0) ** NODE_ROWS_EXPONENT


def milp_nodes(seconds: float, rows: int = 0) -> int:
    """Branch-and-bound nodes ``seconds`` of work buy for a MILP of ``rows`` constraints (at least 1)."""
    return max(1, math.floor(max(seconds - SOLVE_S, 0.0) / node_seconds(rows)))


def milp_limits(seconds: float, rows: int = 0) -> dict:
    """The options that limit one HiGHS solve (scipy's ``milp``) to ``seconds``: that time on the wall
    clock, or, counting work, the branch-and-bound nodes ``seconds`` of work buy (``milp_nodes``)."""
    if not counting():
        return {"time_limit": max(seconds, 0.01)}
    return {"time_limit": MILP_GUARD_S, "node_limit": milp_nodes(seconds, rows)}


def lp_limits(seconds: float | None) -> dict:
    """The options that limit a linear program (scipy's ``linprog``) to ``seconds`` (None: no limit). An
    LP has no nodes to count: counting work, it runs to its end (``MILP_GUARD_S`` at most)."""
    if counting():
        return {"time_limit": MILP_GUARD_S}
    return {} if seconds is None else {"time_limit": max(seconds, 0.01)}


def charge_solve(nodes: int = 0, iterations: int | None = None, rows: int = 0) -> None:
    """Charge one solve: its simplex ``iterations`` and branch-and-bound ``nodes``; where the solver does
    not report iterations (scipy's ``milp``), each node is charged as one of ``rows`` constraints."""
    nodes = max(nodes, 0)
    if iterations is None:
        charge(SOLVE_S + nodes * node_seconds(rows))
    else:
        charge(SOLVE_S + SIMPLEX_ITERATION_S * max(iterations, 0) + MILP_NODE_S * nodes)
