"""Simulator speed: replay the whole Azure 2023 conversation trace against the 32-GPU example plan.

    python benchmarks/sim_speed.py [--trace PATH] [--plan PATH] [--repeat 10]

Runs in this process (one core). Reports wall time, requests/s and simulated iterations/s for the
trace as is, and for the trace repeated ``--repeat`` times back to back (same load, ``repeat`` x the
requests) to check that cost grows linearly. Targets: <= 10 s for the trace; <= 12x the time for 10x.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

from hetserve.plan import load_plan
from hetserve.sim import simulate
from hetserve.specs.workloads import SLO, Requests, read_trace

ROOT = Path(__file__).resolve().parents[1]
TRACE = ROOT.parent / "shared" / "traces" / "azure_2023_conv.csv"
PLAN = ROOT / "examples" / "plans" / "bench-32gpu.yaml"
SLO_ = SLO(ttft_ms=2000, tpot_ms=100, percentile=90)


def tiled(trace, times: int) -> Requests:
    span = float(trace.arrival_s[-1]) + 1.0
    arrivals = np.concatenate([trace.arrival_s + k * span for k in range(times)])
    return Requests(arrivals, np.tile(trace.prompt_tokens, times), np.tile(trace.output_tokens, times))


def run(plan_path: Path, reqs: Requests) -> dict:
    dep = load_plan(plan_path)
    t0 = time.perf_counter()
    result = simulate(dep, reqs, SLO_)
    wall = time.perf_counter() - t0
    s = result.summary
    return {
        "requests": len(reqs),
        "wall_s": wall,
        "requests_per_s": len(reqs) / wall,
        "iterations": s.iterations,
        "iterations_per_s": s.iterations / wall,
        "completed": s.completed,
        "dropped": s.dropped,
        "ttft_p90_ms": s.ttft_p90_ms,
        "throughput_tok_s": s.throughput_tok_s,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--trace", default=str(TRACE))
    ap.add_argument("--plan", default=str(PLAN))
    ap.add_argument("--repeat", type=int, default=10)
    args = ap.parse_args()
    trace = read_trace(args.trace)
    base = run(Path(args.plan), tiled(trace, 1))
    big = run(Path(args.plan), tiled(trace, args.repeat))
    for label, r in (("1x", base), (f"{args.repeat}x", big)):
        print(
            f"{label:>4}: {r['requests']:>7} requests  {r['wall_s']:7.2f} s  {r['requests_per_s']:9.0f} req/s  "
            f"{r['iterations']:>9} iterations  {r['iterations_per_s']:9.0f} it/s  completed {r['completed']}  "
            f"dropped {r['dropped']}  TTFT p90 {r['ttft_p90_ms']:.0f} ms  {r['throughput_tok_s']:.0f} tok/s"
        )
    print(f"time ratio {args.repeat}x / 1x: {big['wall_s'] / base['wall_s']:.2f}")


if __name__ == "__main__":
    main()
