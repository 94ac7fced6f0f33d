"""Planner speed and plan quality at scale (goodput objective unless --objectives says otherwise).

    python benchmarks/planner_speed.py [--sizes 64,512] [--deterministic]

Builds heterogeneous clusters (>= 4 GPU types, 8-GPU nodes plus 4-GPU inference nodes, two zones),
plans Llama-3.1-70B for a chat workload at a rate that loads the cluster, and reports search seconds,
the plan's simulated goodput (highest rate within the SLOs), GPUs used and what was searched. Targets
on a 2-core machine: 64 GPUs <= 30 s, 512 GPUs <= 5 min (given as --time-limit). With --deterministic
the limit counts work (``hetserve.clock``), and the work charged is printed beside the wall time: on the
reference machine, idle, the two should be close (that is how the work rates were set).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from hetserve import clock
from hetserve.planner import Planner
from hetserve.specs.clusters import Cluster, ClusterFile
from hetserve.specs.models import load_model
from hetserve.specs.workloads import Workload

MIX = [
    ("h100-sxm", 8, 0.25),
    ("a100-80gb", 8, 0.25),
    ("l40s", 4, 0.25),
    ("l4", 4, 0.125),
    ("mi300x", 8, 0.125),
]
LIMITS = {64: 30.0, 512: 300.0}


def cluster(gpus: int) -> Cluster:
    nodes = []
    for name, per, share in MIX:
        count = max(1, round(gpus * share / per))
        nodes.append(
            {
                "name": name,
                "gpu": name,
                "count": per,
                "replicas": count,
                "zone": "east" if name in ("h100-sxm", "a100-80gb", "mi300x") else "west",
            }
        )
    spec = {
        "name": f"bench-{gpus}",
        "nodes": nodes,
        "network": {
            "gbit_per_s": 200,
            "latency_ms": 0.02,
            "zones": [{"a": "east", "b": "west", "gbit_per_s": 50, "latency_ms": 2}],
        },
    }
    return Cluster(ClusterFile.model_validate(spec), source=spec["name"])


def workload(rate: float) -> Workload:
    tmp = Path(tempfile.mkdtemp()) / "chat.yaml"
    tmp.write_text(
        f"name: chat\narrivals: {{kind: poisson, rate: {rate}}}\n"
        "prompt: {kind: lognormal, mean: 1000, cv: 1.0, max: 8000}\n"
        "output: {kind: lognormal, mean: 200, cv: 1.0, max: 2000}\n"
        "slo: {ttft_ms: 2000, tpot_ms: 100, percentile: 90}\n"
    )
    return Workload.load(tmp)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="64,512")
    ap.add_argument(
        "--objectives",
        default="goodput",
        help="comma-separated planner objectives (cost: the cheapest plan carrying the workload, the CLI's "
        "default, with its 20%% headroom)",
    )
    ap.add_argument("--deterministic", action="store_true", help="count work instead of wall time")
    args = ap.parse_args()
    model = load_model("llama-3.1-70b")
    for size in (int(s) for s in args.sizes.split(",")):
        for objective in args.objectives.split(","):
            run(model, size, objective, args.deterministic)


def run(model, size: int, objective: str, deterministic: bool = False) -> None:
    c = cluster(size)
    wl = workload(rate=size / 4)
    t0 = time.perf_counter()
    with clock.counting_work_if(deterministic) as work:
        res = Planner(
            c,
            model,
            wl,
            objective,
            cluster_ref="-",
            model_ref="llama-3.1-70b",
            headroom=0.2 if objective in ("cost", "power") else 0.0,
            time_limit=LIMITS.get(size, size * 0.5),
        ).run()
    wall = time.perf_counter() - t0
    counted = f", {work.spent:.1f} s of work" if work is not None else ""
    carrying = f"  {res.carrying.sentence()}" if res.carrying else ""
    print(
        f"{c.total_gpus:4d} GPUs ({len(c.gpu_counts())} types), {objective}: {wall:6.1f} s{counted} (limit "
        f"{LIMITS.get(size, size * 0.5):.0f} s)  {res.value:.2f} {res.unit}  (analytic "
        f"{res.predicted.requests_per_s:.2f} req/s)  GPUs used {res.deployment.gpus_used()}  "
        f"instances {len(res.deployment.instances)}  ${res.summary.cost_per_hour:.0f}/h  "
        f"searched {res.searched.templates} templates, {res.searched.allocations} allocations, "
        f"{res.searched.simulated} designs simulated{carrying}"
    )
    print("      " + " | ".join(res.reasons[:2]))


if __name__ == "__main__":
    main()
