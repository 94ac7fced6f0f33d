"""What the driver does when workers die: which instances lost a worker, and what to undo for them.

A worker that exits (its process ends, or a receive from it fails) takes down every instance it is a
stage of. The instance stops taking requests; its requests go back to the router and are prefilled
again elsewhere (the tokens they already streamed are kept); KV that its prefill steps were sending to
live decode instances will never come, so those receives are dropped.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from typing import Protocol

from .channel import KVDrop
from .instance import InstanceRunner

log = logging.getLogger("hetserve.driver")


class Process(Protocol):
    def poll(self) -> int | None:
        """The exit code, or None while the process runs."""


def exited_ranks(processes: Mapping[int, Process]) -> set[int]:
    """Ranks whose local worker process has exited."""
    return {r for r, p in processes.items() if p.poll() is not None}


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
    for lane in inst.lanes:
        for dec, key in lane.flight.handoffs.values() if lane.flight else ():
            if instances[dec].up:
                drops.append((KVDrop(key), instances[dec].spec.ranks))
        lane.flight = None
    return drops
