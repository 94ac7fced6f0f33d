"""Start a plan's processes: the driver here (rank 0) and workers on this machine or others.

One machine: ``start_cluster(plan)`` spawns every worker. Several machines: each machine runs
``hetserve worker --plan P --rendezvous HOST:PORT --servers a,b`` for the servers it holds, and the
machine with the API runs ``hetserve serve --plan P --rendezvous HOST:PORT --servers c`` (HOST:PORT is
where the driver listens, on that address only; see ``mesh`` for the rendezvous and the secret they
share). Workers started here are supervised: one that dies is started again and rejoins the job.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from ...errors import HetserveError
from ...vocabulary import DEFAULT_KV_CACHE_GB
from .mesh import SECRET_ENV, Mesh, Rendezvous, new_secret, read_secret
from .topology import Topology, topology_from_plan

#: a worker that has died this many times within ``RESTART_WINDOW`` seconds is not started again
MAX_RESTARTS, RESTART_WINDOW = 5, 600.0


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class WorkerProcess:
    """A worker started by this launcher; its output goes to a log file shown if it fails."""

    def __init__(self, rank: int, server: str, popen: subprocess.Popen, log: Path):
        self.rank, self.server, self.popen, self.log = rank, server, popen, log
        self.restarts: list[float] = []  # when it was started again

    def poll(self) -> int | None:
        return self.popen.poll()

    def tail(self, lines: int = 6) -> str:
        try:
            text = self.log.read_text(errors="replace").strip().splitlines()
        except OSError:
            return ""
        return "\n".join(text[-lines:])

    def kill(self) -> None:
        if self.popen.poll() is None:
            self.popen.kill()
            self.popen.wait()


def worker_args(
    plan: str,
    model: str,
    master: str,
    kv_cache_gb: float,
    dtype: str | None,
    threads: int,
    group_size: int,
    bind: str | None = None,
) -> list[str]:
    """The arguments every worker of a launch gets (``--rank`` and ``--local-index`` are added per
    worker), for ``python -m hetserve.runtime.cluster.worker``."""
    args = ["--plan", str(plan), "--model", model, "--master", master, "--kv-cache-gb", str(kv_cache_gb)]
    args += ["--threads", str(threads), "--group-size", str(group_size)]
    if dtype:
        args += ["--dtype", dtype]
    if bind:
        args += ["--bind", bind]
    return args


class LocalWorkers:
    """The workers of ``ranks`` on this machine: started with the secret in their environment, their
    logs in one temporary directory (removed by ``cleanup``), started again when they die."""

    def __init__(
        self,
        plan: str,
        model: str,
        topo: Topology,
        ranks: list[int],
        master: str,
        secret: str,
        *,
        kv_cache_gb: float,
        dtype: str | None,
        threads: int,
        group_size: int = 64,
        bind: str | None = None,
    ):
        self.topo = topo
        self.logs = Path(tempfile.mkdtemp(prefix="hetserve-workers-"))
        self.env = dict(os.environ, OMP_NUM_THREADS=str(threads), **{SECRET_ENV: secret})
        self.args = worker_args(plan, model, master, kv_cache_gb, dtype, threads, group_size, bind)
        self.index = {rank: i for i, rank in enumerate(ranks)}
        self.procs: dict[int, WorkerProcess] = {}
        for rank in ranks:
            self.procs[rank] = self._spawn(rank, rejoin=False)

    def _spawn(self, rank: int, rejoin: bool) -> WorkerProcess:
        log = self.logs / f"rank{rank}.log"
        cmd = [sys.executable, "-m", "hetserve.runtime.cluster.worker", *self.args, "--rank", str(rank)]
        cmd += ["--local-index", str(self.index[rank])] + (["--rejoin"] if rejoin else [])
        with open(log, "ab") as out:
            popen = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=self.env)
        return WorkerProcess(rank, self.topo.workers[rank].server, popen, log)

    def restart(self, rank: int) -> WorkerProcess | None:
        """Start ``rank`` again (to rejoin the running job); None if it keeps dying."""
        old = self.procs[rank]
        now = time.monotonic()
        recent = [t for t in old.restarts if now - t < RESTART_WINDOW]
        if len(recent) >= MAX_RESTARTS:
            return None
        proc = self._spawn(rank, rejoin=True)
        proc.restarts = recent + [now]
        self.procs[rank] = proc
        return proc

    def stop(self, timeout: float = 30.0) -> None:
        """Wait for the workers to leave (they were told to), terminate those still there."""
        deadline = time.monotonic() + timeout
        for p in self.procs.values():
            while p.poll() is None and time.monotonic() < deadline:
                time.sleep(0.05)
        for p in self.procs.values():
            if p.poll() is None:
                p.popen.terminate()
        for p in self.procs.values():
            try:
                p.popen.wait(5)
            except subprocess.TimeoutExpired:
                p.kill()

    def cleanup(self) -> None:
        shutil.rmtree(self.logs, ignore_errors=True)


def wait_for(what: str, fn, procs: dict[int, WorkerProcess], timeout: float = 900.0) -> None:
    """Run ``fn`` (a blocking rendezvous) while watching the workers: a worker that exits is an error."""
    failure: list[BaseException] = []

    def run():
        try:
            fn()
        except BaseException as exc:  # noqa: BLE001 - re-raised in the caller
            failure.append(exc)

    def check_workers() -> None:
        for p in procs.values():
            if p.poll() is not None:
                for q in procs.values():
                    q.kill()
                raise HetserveError(
                    f"worker rank {p.rank} (server '{p.server}') exited while {what} "
                    f"(code {p.poll()}); its last output:\n{p.tail()}"
                )

    t = threading.Thread(target=run, daemon=True)
    t.start()
    start = time.monotonic()
    while t.is_alive():
        t.join(0.2)
        check_workers()
        if time.monotonic() - start > timeout:
            raise HetserveError(
                f"timed out after {timeout:.0f} s {what}; are all workers started "
                "(hetserve worker --rendezvous ...)?"
            )
    if failure:
        time.sleep(1.0)  # a worker that crashed is the story: report its log
        check_workers()
        raise HetserveError(f"{what} failed: {failure[0]}")


def load_config(model: str):
    """The model's config and tokenizer, without its weights (the driver holds no layers)."""
    from ..model.config import LlamaConfig
    from ..model.loading import read_gguf
    from ..model.source import resolve_model
    from ..model.tokenizer import Tokenizer

    path = resolve_model(model)
    if path.is_file():
        reader, config = read_gguf(path)
        return config, Tokenizer.from_gguf(reader.meta)
    return LlamaConfig.from_hf_file(path / "config.json"), Tokenizer.from_directory(path)


def start_cluster(
    plan: str,
    model: str | None = None,
    *,
    kv_cache_gb: float = DEFAULT_KV_CACHE_GB,
    dtype: str | None = None,
    threads: int = 1,
    servers: list[str] | None = None,
    rendezvous: str | None = None,
    prefix_caching: bool = True,
    max_model_len: int | None = None,
    seed: int = 0,
    group_size: int = 64,
    secret: str | None = None,
    ray_address: str | None = None,
):
    """Start the workers of ``plan`` held here, host the rendezvous (``rendezvous``, default a free
    loopback port) and return the ``ClusterEngine``. Workers on other machines need ``secret`` (default
    ``HETSERVE_CLUSTER_SECRET``); when every worker is started here a secret is made for this launch.
    With ``ray_address`` ("auto": the Ray cluster of this machine or ``RAY_ADDRESS``) every worker is
    started as a Ray actor on the Ray node standing for its plan node (``ray_workers``) instead."""
    from ...plan import load_plan
    from .driver import ClusterEngine
    from .transport import ProcessGroupTransport

    dep = load_plan(plan)
    topo = topology_from_plan(dep, dtype)
    model = model or topo.model
    config, tokenizer = load_config(model)
    if config.num_layers != topo.num_layers:
        raise HetserveError(
            f"{plan}: the plan's model {topo.model} has {topo.num_layers} layers but {model} has "
            f"{config.num_layers}; serve the model the plan was made for"
        )
    if ray_address is not None:
        if servers:
            raise HetserveError("--servers does not go with --ray: Ray starts every worker of the plan")
        local, remote = sorted(topo.workers), []
    else:
        local = topo.ranks_of(servers)
        remote = sorted(set(range(1, topo.world_size)) - set(local))
    if secret is None:
        secret = read_secret() if remote else new_secret()
    if ray_address is not None:
        from .ray_workers import RayWorkers, import_ray

        ray = import_ray()
        host = rendezvous or f"{ray.util.get_node_ip_address()}:0"  # reachable from every Ray node
        rv = Rendezvous.host(host, secret)
        args = worker_args(
            str(Path(plan).resolve()), model, rv.address, kv_cache_gb, dtype, threads, group_size
        )
        try:
            gpus = {n.name: (n.gpu.name, n.count) for n in dep.cluster.nodes.values()}
            workers = RayWorkers(
                topo, gpus, args, secret, threads, None if ray_address == "auto" else ray_address
            )
        except BaseException:
            rv.close()
            raise
    else:
        rv = Rendezvous.host(rendezvous or "127.0.0.1:0", secret)
        workers = LocalWorkers(
            plan,
            model,
            topo,
            local,
            rv.address,
            secret,
            kv_cache_gb=kv_cache_gb,
            dtype=dtype,
            threads=threads,
            group_size=group_size,
        )
    mesh = Mesh(rv, topo.world_size)
    try:
        wait_for(
            "loading the model",
            lambda: [rv.wait_announced("join", r) for r in range(1, topo.world_size)],
            workers.procs,
        )
        wait_for("forming the worker groups", lambda: mesh.form(0), workers.procs)
    except BaseException:
        for p in workers.procs.values():
            p.kill()
        workers.cleanup()
        rv.close()
        raise
    return ClusterEngine(
        topo,
        config,
        tokenizer,
        kv_cache_gb,
        prefix_caching=prefix_caching,
        max_model_len=max_model_len,
        seed=seed,
        processes=workers.procs,
        transport=ProcessGroupTransport(mesh),
        launcher=workers,
    )


def run_workers(
    plan: str,
    model: str | None,
    rendezvous: str,
    servers: list[str] | None,
    *,
    kv_cache_gb: float,
    dtype: str | None,
    threads: int,
    group_size: int = 64,
    secret: str,
    bind: str | None = None,
) -> int:
    """``hetserve worker``: start this machine's workers of ``plan``, start again any that dies while the
    job runs, and return when the driver shuts them down (or is gone)."""
    from ...plan import load_plan
    from .mesh import parse_address
    from .worker import EXIT_DRIVER_GONE

    parse_address(rendezvous)
    topo = topology_from_plan(load_plan(plan), dtype)
    ranks = topo.ranks_of(servers)
    workers = LocalWorkers(
        plan,
        model or topo.model,
        topo,
        ranks,
        rendezvous,
        secret,
        kv_cache_gb=kv_cache_gb,
        dtype=dtype,
        threads=threads,
        group_size=group_size,
        bind=bind,
    )
    print(
        f"started workers {ranks} of {topo.world_size - 1} for {plan}; rendezvous {rendezvous}",
        file=sys.stderr,
    )
    previous = signal.signal(signal.SIGTERM, _raise_interrupt)
    done: dict[int, int] = {}
    try:
        while len(done) < len(ranks):
            time.sleep(0.2)
            for rank, proc in list(workers.procs.items()):
                code = proc.poll()
                if rank in done or code is None:
                    continue
                if code in (0, 1, EXIT_DRIVER_GONE):  # shut down, a mistake, or the job is over
                    done[rank] = code
                    continue
                print(
                    f"worker rank {rank} died (code {code}); log {proc.log}:\n{proc.tail()}",
                    file=sys.stderr,
                )
                if workers.restart(rank) is None:
                    print(f"worker rank {rank} keeps dying; not starting it again", file=sys.stderr)
                    done[rank] = code
                else:
                    print(f"worker rank {rank} started again", file=sys.stderr)
    except KeyboardInterrupt:
        print("stopping the workers", file=sys.stderr)
        for p in workers.procs.values():
            if p.poll() is None:
                p.popen.terminate()
        workers.stop(10)
        workers.cleanup()
        return 130
    finally:
        signal.signal(signal.SIGTERM, previous)
    bad = {r: c for r, c in done.items() if c}
    for r in bad:
        proc = workers.procs[r]
        print(f"worker rank {r} exited with code {bad[r]}; log {proc.log}:\n{proc.tail()}", file=sys.stderr)
    if not bad:
        workers.cleanup()
    return 1 if bad else 0


def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt
