"""Start a plan's processes: the driver here (rank 0) and workers on this machine or others.

One machine: ``start_cluster(plan)`` spawns every worker. Several machines: each machine runs
``hetserve worker --plan P --rendezvous HOST:PORT --servers a,b`` for the servers it holds, and the
machine with the API runs ``hetserve serve --plan P --rendezvous HOST:PORT --servers c`` (HOST:PORT is
where the driver listens; torch.distributed's TCP store does the rendezvous).
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from ...errors import HetserveError
from ...vocabulary import DEFAULT_KV_CACHE_GB
from .topology import Topology, topology_from_plan


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class WorkerProcess:
    """A worker started by this launcher; its output goes to a log file shown if it fails."""

    def __init__(self, rank: int, server: str, popen: subprocess.Popen, log: Path):
        self.rank, self.server, self.popen, self.log = rank, server, popen, log

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


def spawn_workers(
    plan: str,
    model: str,
    topo: Topology,
    ranks: list[int],
    master: str,
    *,
    kv_cache_gb: float,
    dtype: str | None,
    threads: int,
    group_size: int = 64,
) -> dict[int, WorkerProcess]:
    logs = Path(tempfile.mkdtemp(prefix="hetserve-workers-"))
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    procs = {}
    for index, rank in enumerate(ranks):
        log = logs / f"rank{rank}.log"
        cmd = [
            sys.executable,
            "-m",
            "hetserve.runtime.cluster.worker",
            "--plan",
            str(plan),
            "--model",
            model,
            "--rank",
            str(rank),
            "--master",
            master,
            "--kv-cache-gb",
            str(kv_cache_gb),
            "--threads",
            str(threads),
            "--local-index",
            str(index),
            "--group-size",
            str(group_size),
        ]
        if dtype:
            cmd += ["--dtype", dtype]
        with open(log, "wb") as out:
            popen = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env)
        procs[rank] = WorkerProcess(rank, topo.workers[rank].server, popen, log)
    return procs


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
                    f"(code {p.poll()}); its log {p.log}:\n{p.tail()}"
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
    import json

    return LlamaConfig.from_hf(json.loads((path / "config.json").read_text())), Tokenizer.from_directory(path)


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
):
    """Start the workers of ``plan`` held here, join the job as rank 0 and return the ``ClusterEngine``."""
    import torch.distributed as dist

    from ...plan import load_plan
    from .driver import ClusterEngine
    from .worker import init_distributed, tp_groups

    dep = load_plan(plan)
    topo = topology_from_plan(dep, dtype)
    model = model or topo.model
    config, tokenizer = load_config(model)
    if config.num_layers != topo.num_layers:
        raise HetserveError(
            f"{plan}: the plan's model {topo.model} has {topo.num_layers} layers but {model} has "
            f"{config.num_layers}; serve the model the plan was made for"
        )
    master = rendezvous or f"127.0.0.1:{free_port()}"
    local = topo.ranks_of(servers)
    procs = spawn_workers(
        plan,
        model,
        topo,
        local,
        master,
        kv_cache_gb=kv_cache_gb,
        dtype=dtype,
        threads=threads,
        group_size=group_size,
    )
    try:
        wait_for("joining the job", lambda: init_distributed(0, topo.world_size, master), procs)
        tp_groups(topo)
        wait_for("loading the model", dist.barrier, procs)
    except BaseException:
        for p in procs.values():
            p.kill()
        raise
    return ClusterEngine(
        topo,
        config,
        tokenizer,
        kv_cache_gb,
        prefix_caching=prefix_caching,
        max_model_len=max_model_len,
        seed=seed,
        processes=procs,
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
) -> int:
    """``hetserve worker``: start this machine's workers of ``plan`` and wait for them to finish."""
    from ...plan import load_plan

    topo = topology_from_plan(load_plan(plan), dtype)
    procs = spawn_workers(
        plan,
        model or topo.model,
        topo,
        topo.ranks_of(servers),
        rendezvous,
        kv_cache_gb=kv_cache_gb,
        dtype=dtype,
        threads=threads,
        group_size=group_size,
    )
    print(
        f"started workers {sorted(procs)} of {topo.world_size - 1} for {plan}; rendezvous {rendezvous}",
        file=sys.stderr,
    )
    codes = {r: p.popen.wait() for r, p in procs.items()}
    bad = {r: c for r, c in codes.items() if c}
    for r in bad:
        print(
            f"worker rank {r} exited with code {bad[r]}; log {procs[r].log}:\n{procs[r].tail()}",
            file=sys.stderr,
        )
    return 1 if bad else 0
