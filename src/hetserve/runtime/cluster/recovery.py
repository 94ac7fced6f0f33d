"""What the driver does when workers die, and how they come back.

A worker that exits (its process ends, or a receive from it fails) takes down every instance it is a
stage of. The instance stops taking requests; its requests go back to the router and are prefilled
again elsewhere (the tokens they already streamed are kept), or wait (at most ``Recovery.wait_limit``
seconds) while no instance that takes requests is up and workers are coming back; KV that its prefill
steps were sending to live decode instances will never come, so those receives are dropped.

``Recovery`` is the driver's supervisor: a worker started here that dies is started again (at most
``launch.MAX_RESTARTS`` times in ``launch.RESTART_WINDOW``); it loads its layers and announces itself
at the rendezvous (workers on other machines are started again by their ``hetserve worker``, and
announce themselves the same way). Once every restarted worker has, the driver lets the micro-batches
in flight come back, re-prefills the hand-offs not yet installed, and every process forms the next
generation's groups (``mesh``); an instance whose workers are all alive takes requests again, with
fresh schedulers and empty caches.
"""

from __future__ import annotations

import logging
import queue
import time
from collections.abc import Iterable, Mapping
from typing import Protocol

from .channel import KVDrop, Regroup
from .instance import InstanceRunner

log = logging.getLogger("hetserve.driver")


class Process(Protocol):
    def poll(self) -> int | None:
        """The exit code, or None while the process runs."""


def struck_instances(instances: Iterable[InstanceRunner], dead: set[int]) -> list[InstanceRunner]:
    """The live instances that have a worker among ``dead`` ranks."""
    hit = []
    for inst in instances:
        if inst.up and dead & set(inst.spec.ranks):
            log.error("instance %s lost worker(s) %s", inst.name, sorted(dead & set(inst.spec.ranks)))
            hit.append(inst)
    return hit


def stop_instance(
    inst: InstanceRunner, instances: Mapping[str, InstanceRunner]
) -> list[tuple[KVDrop, tuple]]:
    """Mark ``inst`` down and forget its micro-batches in flight; the ``KVDrop`` commands (with the ranks
    to send them to) that free receives live decode instances posted for its hand-offs."""
    inst.up = False
    inst.stop()
    drops = []
    flights = {id(ln.flight): ln.flight for ln in inst.lanes if ln.flight is not None}  # lanes may share one
    for flight in flights.values():
        for dec, key in flight.handoffs.values():
            if instances[dec].up:
                drops.append((KVDrop(key), instances[dec].spec.ranks))
    for lane in inst.lanes:
        lane.flight = None
    return drops


class Recovery:
    """The driver's supervisor of its workers (see the module docstring)."""

    wait_limit = 120.0  # seconds a request waits for an instance to come back
    rejoin_limit = 300.0  # seconds a restarted worker has to load its layers and announce itself
    quiesce_limit = 60.0  # seconds the micro-batches in flight have to come back before a regroup

    def __init__(self, engine, launcher=None):
        self.engine, self.launcher = engine, launcher
        self.pending: dict[int, float] = {}  # rank -> when it died (restarting, not yet rejoined)
        self.admitted: dict[int, str] = {}  # rank -> the nonce it rejoined with
        self.given_up: set[int] = set()
        self.generation = 0
        self.stopped = False
        self.back_after: list[float] = []  # seconds from a worker's death to its instances serving
        self._retired: list = []  # earlier generations' groups (receives pending on them end by themselves)
        self._last_look = 0.0
        self._remote_seen = False  # a worker on another machine announced itself

    @property
    def _rendezvous(self):
        mesh = getattr(self.engine.transport, "mesh", None)
        return None if mesh is None else mesh.rv

    def exited(self) -> set[int]:
        """Local ranks whose process has exited; each is started again (unless it keeps dying)."""
        dead = set()
        for rank, proc in list(self.engine.processes.items()):
            if rank in self.given_up or proc.poll() is None:
                continue
            dead.add(rank)
            if self.stopped or self.launcher is None:
                continue
            log.error("worker rank %d exited with code %s; starting it again", rank, proc.poll())
            if self.launcher.restart(rank) is None:
                log.error("worker rank %d keeps dying; it is not started again", rank)
                self.given_up.add(rank)
                self.pending.pop(rank, None)
            else:
                self.pending.setdefault(rank, time.monotonic())
        return dead

    def due(self) -> bool:
        """Whether there is recovery work for ``step``: a local worker to restart or one rejoining."""
        if self.stopped:
            return False
        if self.pending:
            return True
        restartable = self.launcher is not None and any(
            r not in self.given_up and p.poll() is not None for r, p in self.engine.processes.items()
        )
        return restartable or self._remote_rejoining()

    def may_recover(self) -> bool:
        """Whether an instance that takes requests may come back: it is down, none of its workers was
        given up, and someone restarts workers (this launcher, or 'hetserve worker' elsewhere)."""
        if self.stopped:
            return False
        supervised = self.launcher is not None or any(
            r not in self.engine.processes for r in self.engine.topo.workers
        )
        return supervised and any(
            not inst.up and inst.spec.role != "decode" and not set(inst.spec.ranks) & self.given_up
            for inst in self.engine.instances.values()
        )

    def _remote_rejoining(self) -> bool:
        """A worker on another machine announced itself again (looked at once a second)."""
        rv, now = self._rendezvous, time.monotonic()
        if rv is None or now - self._last_look < 1.0:
            return False
        self._last_look = now
        remote = [r for r in self.engine.topo.workers if r not in self.engine.processes]
        self._remote_seen = self._remote_seen or any(rv.has_announced("rejoin", r) for r in remote)
        return self._remote_seen

    def run(self, outputs: list) -> None:
        """Admit workers that announced themselves; regroup once every restarted one has."""
        rv = self._rendezvous
        if self.stopped or rv is None or not (self.pending or self._remote_rejoining()):
            return
        self._remote_seen = False
        for rank in self.engine.topo.workers:
            if rank in self.admitted or not rv.has_announced("rejoin", rank):
                continue
            try:
                self.admitted[rank] = rv.wait_announced("rejoin", rank)
            except Exception as exc:  # noqa: BLE001 - a wrong secret: not admitted, reported
                log.error("worker rank %d cannot rejoin: %s", rank, exc)
                continue
            self.pending.setdefault(rank, time.monotonic())
        now = time.monotonic()
        for rank, since in list(self.pending.items()):
            proc = self.engine.processes.get(rank)
            if rank not in self.admitted and proc is not None and now - since > self.rejoin_limit:
                log.error("worker rank %d did not rejoin within %.0f s; stopping it", rank, self.rejoin_limit)
                proc.kill()
        if self.given_up:
            return  # a worker that stays dead: the groups of every rank cannot be formed again
        if self.admitted and all(r in self.admitted for r in self.pending):
            self._regroup(outputs)

    def _regroup(self, outputs: list) -> None:
        e = self.engine
        deadline = time.monotonic() + self.quiesce_limit
        while time.monotonic() < deadline and any(
            ln.flight for i in e.instances.values() if i.up for ln in i.lanes
        ):
            try:
                e._handle(e._results.get(timeout=0.5), outputs)
            except queue.Empty:
                pass
        for inst in list(e.instances.values()):
            if inst.up and any(ln.flight for ln in inst.lanes):
                log.error("instance %s did not finish its micro-batches before the regroup", inst.name)
                e._take_down(inst, outputs)
        e._reprefill_handoffs(outputs)  # workers forget KV not yet installed when they regroup
        generation = self.generation + 1
        back = dict(self.admitted)
        rv, mesh = self._rendezvous, e.transport.mesh
        with e.transport.lock:  # no other frame goes out on the group being retired
            e.transport.send(Regroup(generation), [r for r in e.topo.workers if r not in back])
            e.transport.drain()
            for rank, nonce in back.items():
                rv.admit(rank, nonce, generation)
            self._retired.append(mesh.world)
            try:
                mesh.form(generation)
            except Exception as exc:  # noqa: BLE001 - a worker that did not come: everything is down
                log.error("the workers could not form generation %d: %s", generation, exc)
                for inst in list(e.instances.values()):
                    e._take_down(inst, outputs)
                self.admitted.clear()
                return
        self.generation = generation
        now = time.monotonic()
        for rank in back:
            self.back_after.append(now - self.pending.pop(rank, now))
        self.admitted.clear()
        revived = []
        for name, inst in list(e.instances.items()):
            if not inst.up and all(self._alive(r) for r in inst.spec.ranks):
                e.instances[name] = e._runner(name)
                revived.append(name)
        e._index_instances()
        log.warning(
            "worker rank(s) %s rejoined (generation %d); instance(s) %s serve again",
            sorted(back),
            generation,
            revived,
        )

    def _alive(self, rank: int) -> bool:
        if rank in self.given_up or rank in self.pending:
            return False
        proc = self.engine.processes.get(rank)
        return proc is None or proc.poll() is None

    def close(self) -> None:
        """After the workers were told to shut down: wait for them, remove their files."""
        self.stopped = True
        if self.launcher is not None:
            self.launcher.stop()
            self.launcher.cleanup()
        rv = self._rendezvous
        if rv is not None:
            rv.close()
        self._retired.clear()
