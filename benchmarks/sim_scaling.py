"""Simulator cost against arrival rate and instance count.

    python benchmarks/sim_scaling.py [--replicas 20] [--rate 0.4] [--duration 600] [--scale 10] [--repeat 1]

Simulates Llama-3.1-8B replicas (one A100-80GB each, least-work routing) serving Poisson arrivals with
lognormal prompts (median 1,000 tokens) and replies (median 200), three ways: the base case (N replicas,
``--rate`` requests/s per replica), ``--scale`` x the arrival rate on the same N replicas, and ``--scale``
x the replicas with ``--scale`` x the rate (the same load per replica). Each runs ``--duration``
simulated seconds, in this process (one core); with ``--repeat k`` each case runs k times and the
shortest wall time counts (a shared machine only ever makes a run slower). Reports wall time,
simulated iterations, the instances the router examined per arrival (member reads plus heap
entries pushed and popped; a scan reads every instance) and each case's time ratio to the base. Target: <= 12x the
time for 10x the rate and for 10x the instances.
"""

from __future__ import annotations

import argparse
import math
import time

import numpy as np

from hetserve.plan import deployment_from_dict
from hetserve.sim.simulator import Simulator
from hetserve.specs.clusters import Cluster, ClusterFile
from hetserve.specs.models import load_model
from hetserve.specs.workloads import SLO, Requests

MODEL = "llama-3.1-8b"
SLO_ = SLO(ttft_ms=2000, tpot_ms=100, percentile=90)


def replicas(n: int):
    nodes = [{"name": f"n{k}", "gpu": "a100-80gb", "count": 8} for k in range(math.ceil(n / 8))]
    cluster = Cluster(ClusterFile.model_validate({"nodes": nodes}), source="sim-scaling")
    servers = [{"name": f"s{k}", "node": f"n{k // 8}", "gpus": [k % 8], "layers": [0, 32]} for k in range(n)]
    instances = [
        {"name": f"r{k}", "role": "mixed", "chain": [f"s{k}"], "max_batch_size": 64, "chunk_size": 512}
        for k in range(n)
    ]
    plan = {
        "name": f"replicas-{n}",
        "model": MODEL,
        "cluster": "-",
        "servers": servers,
        "instances": instances,
        "routing": {"policy": "least-work"},
    }
    return deployment_from_dict(plan, cluster, load_model(MODEL))


def workload(rate: float, duration: float, seed: int = 0) -> Requests:
    rng = np.random.default_rng(seed)
    arrivals = np.cumsum(rng.exponential(1 / rate, int(rate * duration * 1.2) + 10))
    arrivals = arrivals[arrivals < duration]
    n = len(arrivals)
    prompt = np.clip(rng.lognormal(math.log(1000), 0.6, n), 16, 8000).astype(np.int64)
    output = np.clip(rng.lognormal(math.log(200), 0.6, n), 4, 1500).astype(np.int64)
    return Requests(arrivals, prompt, output)


def run(n: int, rate: float, duration: float, repeat: int = 1) -> dict:
    dep = replicas(n)
    reqs = workload(rate, duration)
    wall = math.inf
    for _ in range(repeat):
        t0 = time.perf_counter()
        sim = Simulator(dep, reqs, SLO_)
        result = sim.run()
        wall = min(wall, time.perf_counter() - t0)
    s = result.summary
    return {
        "replicas": n,
        "rate": rate,
        "requests": len(reqs),
        "wall_s": wall,
        "iterations": s.iterations,
        "examined_per_arrival": (
            sim.entry_pool.examined / max(1, len(reqs)) if hasattr(sim, "entry_pool") else float("nan")
        ),
        "completed": s.completed,
        "ttft_p90_ms": s.ttft_p90_ms,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--replicas", type=int, default=20)
    ap.add_argument("--rate", type=float, default=0.4, help="requests/s per replica in the base case")
    ap.add_argument("--duration", type=float, default=600.0, help="simulated seconds of arrivals")
    ap.add_argument("--scale", type=int, default=10)
    ap.add_argument("--repeat", type=int, default=1, help="runs per case; the shortest counts")
    args = ap.parse_args()
    n, k, rate = args.replicas, args.scale, args.rate * args.replicas
    cases = [
        ("base", run(n, rate, args.duration, args.repeat)),
        (f"{k}x rate", run(n, k * rate, args.duration, args.repeat)),
        (f"{k}x instances", run(k * n, k * rate, args.duration, args.repeat)),
    ]
    base = cases[0][1]["wall_s"]
    print(
        "| case | replicas | rate (req/s) | requests | wall | iterations | examined/arrival | TTFT p90 | ratio |"
    )
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for label, r in cases:
        print(
            f"| {label} | {r['replicas']} | {r['rate']:g} | {r['requests']:,} | {r['wall_s']:.2f} s | "
            f"{r['iterations']:,} | {r['examined_per_arrival']:.1f} | {r['ttft_p90_ms']:.0f} ms | "
            f"{r['wall_s'] / base:.2f} |"
        )
        assert r["completed"] == r["requests"], f"{label}: {r['requests'] - r['completed']} not completed"


if __name__ == "__main__":
    main()
