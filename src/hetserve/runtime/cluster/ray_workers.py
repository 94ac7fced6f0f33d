"""A plan's workers started through Ray (``hetserve serve --plan PLAN --ray [ADDRESS]``).

Every worker rank gets a Ray actor placed on the Ray node that stands for the plan node of its server:
each Ray node is started with a custom resource per plan node it is (``hetserve-node:NAME``) and per
GPU type it has (``hetserve-gpu:TYPE``), e.g. ``ray start --resources '{"hetserve-node:a100-0": 1,
"hetserve-gpu:a100-80gb": 8}'``; ``ray_start_resources`` gives them for a plan. The actor starts the
same worker process ``hetserve worker`` would (``python -m hetserve.runtime.cluster.worker``) on its
node and reports when it exits; tensors still go over torch.distributed between the workers, and
commands over the driver's signed channel. A worker that dies is started again by its actor (and the
actor itself by Ray, ``max_restarts``, if its process dies), then rejoins the job as a locally started
worker does (``recovery``).

The plan file, its cluster file and the model must be at the same paths on every machine (or on a
shared file system), as for ``hetserve worker``. The cluster secret is handed to the actors through
Ray: the Ray cluster must be private, like the workers' network.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from ...errors import HetserveError
from .mesh import SECRET_ENV
from .topology import Topology

log = logging.getLogger("hetserve.driver")

#: Ray custom resources naming a plan node and a GPU type.
NODE_RESOURCE, GPU_RESOURCE = "hetserve-node:{}", "hetserve-gpu:{}"
#: Share of a node resource one worker actor asks for (any number of workers fit on their node).
ACTOR_SHARE = 0.001
#: Seconds to wait for Ray to start a worker's actor again after its process died.
ACTOR_RESTART_WAIT = 120.0
#: Restarts of one worker within ``RESTART_WINDOW`` seconds before it is given up.
MAX_RESTARTS, RESTART_WINDOW = 5, 600.0


def import_ray():
    try:
        import ray
    except ImportError:
        raise HetserveError("--ray needs Ray: pip install 'ray>=2.40' (or hetserve[ray])") from None
    return ray


def ray_resources(node: str, gpu: str, gpus: int = 1) -> dict[str, float]:
    """The custom resources the Ray node standing for plan node ``node`` (with ``gpus`` GPUs of type
    ``gpu``) is started with: ``ray start --resources '<this as JSON>'``."""
    return {NODE_RESOURCE.format(node): 1, GPU_RESOURCE.format(gpu): gpus}


class WorkerActor:
    """Runs on the Ray node of one worker rank: starts its worker process, waits for it, stops it."""

    def __init__(self, args: list[str], env: dict[str, str]):
        self.args, self.env = args, env
        self.proc: subprocess.Popen | None = None
        self.log = Path(tempfile.mkdtemp(prefix="hetserve-ray-worker-")) / "worker.log"

    def start(self, rejoin: bool) -> tuple[int, str]:
        """Start the worker process; (its pid, the id of the Ray node it runs on)."""
        import ray

        cmd = [sys.executable, "-m", "hetserve.runtime.cluster.worker", *self.args]
        if rejoin:
            cmd.append("--rejoin")
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen(
                cmd,
                stdout=out,
                stderr=subprocess.STDOUT,
                env={**os.environ, **self.env},
                preexec_fn=_die_with_parent if sys.platform == "linux" else None,
            )
        return self.proc.pid, ray.get_runtime_context().get_node_id()

    def actor_pid(self) -> int:
        return os.getpid()

    def wait(self) -> int:
        """The worker's exit code, when it exits."""
        while self.proc is None:
            time.sleep(0.05)
        return self.proc.wait()

    def tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def stop(self, timeout: float) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()

    def remove_log(self) -> None:
        shutil.rmtree(self.log.parent, ignore_errors=True)


def _die_with_parent() -> None:
    """In the worker process (Linux): end it when its actor's process ends, so that an actor Ray starts
    again never finds the previous worker of its rank still in the job."""
    import ctypes

    ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


class RayWorker:
    """The driver's handle of one worker started through Ray (what ``WorkerProcess`` is locally)."""

    def __init__(self, ray, rank: int, server: str, actor, rejoin: bool):
        self.ray, self.rank, self.server, self.actor = ray, rank, server, actor
        self.restarts: list[float] = []
        deadline = time.monotonic() + ACTOR_RESTART_WAIT
        while True:  # an actor whose process died is being started again by Ray: wait for it
            try:
                self.pid, self.node_id = ray.get(actor.start.remote(rejoin), timeout=ACTOR_RESTART_WAIT)
                break
            except ray.exceptions.ActorUnavailableError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.5)
        self.done = actor.wait.remote()
        self._code: int | None = None

    def poll(self) -> int | None:
        """None while the worker runs; its exit code (-1 if its actor died with it) once it has ended."""
        if self._code is not None:
            return self._code
        ready, _ = self.ray.wait([self.done], timeout=0)
        if not ready:
            return None
        try:
            self._code = int(self.ray.get(self.done))
        except Exception:  # noqa: BLE001 - the actor's process died (Ray restarts the actor)
            self._code = -1
        return self._code

    def tail(self) -> str:
        try:
            return self.ray.get(self.actor.tail.remote(), timeout=10)
        except Exception:  # noqa: BLE001 - the actor is gone with its log
            return "(the worker's Ray actor is gone; see the Ray logs)"

    def kill(self) -> None:
        try:
            self.ray.get(self.actor.kill.remote(), timeout=10)
        except Exception:  # noqa: BLE001 - the actor is gone already
            pass


class RayWorkers:
    """The launcher of every worker of a plan through Ray (the interface of ``launch.LocalWorkers``)."""

    def __init__(
        self,
        topo: Topology,
        gpus: dict[str, tuple[str, int]],
        args: list[str],
        secret: str,
        threads: int,
        address: str | None,
    ):
        """``gpus``: per plan node, its GPU type and count (for the resources asked and the hints)."""
        ray = self.ray = import_ray()
        if not ray.is_initialized():
            try:
                ray.init(address=address, logging_level="ERROR", log_to_driver=False)  # None: RAY_ADDRESS,
                # the cluster started last on this machine, or a new local one
            except Exception as exc:  # noqa: BLE001 - no cluster at that address
                raise HetserveError(
                    f"--ray: cannot connect to a Ray cluster at {address or 'auto'}: {exc}"
                ) from None
        self.topo, self.gpus = topo, gpus
        self._check_resources()
        env = {SECRET_ENV: secret, "OMP_NUM_THREADS": str(threads)}
        actor_class = ray.remote(WorkerActor)
        self.actors = {}
        per_node: dict[str, int] = {}
        for rank, w in sorted(topo.workers.items()):
            index = per_node.get(w.node, 0)
            per_node[w.node] = index + 1
            argv = [*args, "--rank", str(rank), "--local-index", str(index)]
            self.actors[rank] = actor_class.options(
                num_cpus=0,
                resources={
                    NODE_RESOURCE.format(w.node): ACTOR_SHARE,
                    GPU_RESOURCE.format(gpus[w.node][0]): ACTOR_SHARE,
                },
                max_restarts=-1,
                max_concurrency=4,  # wait() blocks; tail/kill/stop run beside it
                name=None,
            ).remote(argv, env)
        self.procs: dict[int, RayWorker] = {
            rank: RayWorker(ray, rank, topo.workers[rank].server, actor, rejoin=False)
            for rank, actor in self.actors.items()
        }

    def _check_resources(self) -> None:
        have = self.ray.cluster_resources()
        missing = sorted(
            {w.node for w in self.topo.workers.values()}
            - {k.split(":", 1)[1] for k in have if k.startswith(NODE_RESOURCE.format(""))}
        )
        if missing:
            node = missing[0]
            hint = json.dumps(ray_resources(node, *self.gpus[node]))
            raise HetserveError(
                f"--ray: no Ray node stands for plan node(s) {', '.join(missing)}; start the machine of "
                f"each with its resources, e.g. ray start --address ... --resources '{hint}' (docs/serve.md)"
            )

    def restart(self, rank: int) -> RayWorker | None:
        """Start ``rank`` again through its actor (to rejoin the running job); None if it keeps dying."""
        old = self.procs[rank]
        now = time.monotonic()
        recent = [t for t in old.restarts if now - t < RESTART_WINDOW]
        if len(recent) >= MAX_RESTARTS:
            return None
        try:
            proc = RayWorker(self.ray, rank, old.server, self.actors[rank], rejoin=True)
        except Exception as exc:  # noqa: BLE001 - the actor cannot be reached (its node is gone)
            log.error("worker rank %d cannot be started again through Ray: %s", rank, exc)
            return None
        proc.restarts = recent + [now]
        self.procs[rank] = proc
        return proc

    def stop(self, timeout: float = 30.0) -> None:
        """Wait for the workers to leave (they were told to), stop those still there, end the actors."""
        deadline = time.monotonic() + timeout
        for p in self.procs.values():
            while p.poll() is None and time.monotonic() < deadline:
                time.sleep(0.05)
        for rank, actor in self.actors.items():
            try:
                if self.procs[rank].poll() is None:
                    self.ray.get(actor.stop.remote(5.0), timeout=15)
                self.ray.get(actor.remove_log.remote(), timeout=10)
            except Exception:  # noqa: BLE001 - already gone
                pass
            self.ray.kill(actor, no_restart=True)

    def cleanup(self) -> None:
        """Nothing on this machine: each actor's log lives on its node's temporary directory."""
