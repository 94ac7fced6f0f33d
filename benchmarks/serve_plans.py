"""Serving a plan over worker processes against one worker, at the same offered load.

    python benchmarks/serve_plans.py [--duration 60] [--rate 0.25] [--seed 0] [--json]

For each plan in benchmarks/plans/ (one worker; a 3-stage pipeline 7/13/10 with 3 micro-batches in
flight, and with one; prefill -> decode with KV conversion), start `hetserve serve --plan` on a free
port, send one warm-up request, replay
benchmarks/plans/serve-load.yaml with `hetserve bench` (same seed: the same requests at the same times),
stop the server. Prints the start-up time (launch until /health answers), throughput and latency
percentiles and each plan's ratio to the one-worker run (overhead = ratio - 1 for latencies; the target
is <= 20%). Every worker runs one torch thread.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

HERE = Path(__file__).resolve().parent
PLANS = [
    ("one worker", "smollm2-one-worker.yaml"),
    ("3-stage pipeline", "smollm2-pipeline-3.yaml"),
    ("3 stages, 1 lane", "smollm2-pipeline-3-one-lane.yaml"),
    ("prefill -> decode", "smollm2-pd-1-1.yaml"),
]
KEYS = [
    "startup_s",
    "throughput_tok_s",
    "ttft_p50_ms",
    "ttft_p90_ms",
    "tpot_p50_ms",
    "tpot_p90_ms",
    "e2e_p50_ms",
    "e2e_p90_ms",
    "slo_attainment",
    "completed",
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_plan(
    plan: Path, args, workload: Path = HERE / "plans" / "serve-load.yaml", kv_cache_gb: float = 0.1
) -> dict:
    """Serve ``plan``, replay ``workload`` against it with ``hetserve bench`` (args.duration, args.rate,
    args.seed) and return bench's JSON report with the start-up time."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    server = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "hetserve.cli",
            "serve",
            "--plan",
            str(plan),
            "--port",
            str(port),
            "--kv-cache-gb",
            str(kv_cache_gb),
            "--threads",
            "1",
            "--log-level",
            "warning",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        started = time.monotonic()
        deadline = started + 600
        while True:
            if server.poll() is not None:
                raise RuntimeError(f"server for {plan.name} exited:\n{server.stderr.read()[-2000:]}")
            try:
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"server for {plan.name} did not start")
            time.sleep(0.2)
        startup = time.monotonic() - started
        httpx.post(
            url + "/v1/completions",
            json={"model": "smollm2-135m", "prompt": "Hello", "max_tokens": 8},
            timeout=120,
        )
        out = subprocess.run(
            [
                sys.executable,
                "-m",
                "hetserve.cli",
                "bench",
                "--url",
                url,
                "--workload",
                str(workload),
                "--duration",
                str(args.duration),
                "--rate",
                str(args.rate),
                "--seed",
                str(args.seed),
                "--json",
            ],
            capture_output=True,
            text=True,
            check=True,
        )
        return {"startup_s": startup, **json.loads(out.stdout)}
    finally:
        server.send_signal(signal.SIGINT)
        try:
            server.wait(60)
        except subprocess.TimeoutExpired:
            server.kill()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--duration", type=float, default=60.0)
    ap.add_argument("--rate", type=float, default=0.25)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    load = os.getloadavg()
    rows = {name: run_plan(HERE / "plans" / file, args) for name, file in PLANS}
    base = rows["one worker"]
    if args.json:
        print(
            json.dumps(
                {"load_before": load, "results": {n: {k: r.get(k) for k in KEYS} for n, r in rows.items()}},
                indent=2,
            )
        )
        return
    print(
        f"SmolLM2-135M fp32, Poisson {args.rate} req/s for {args.duration:.0f} s, prompts 32-256, 32 output tokens; "
        f"1 thread per worker; load before {load[0]:.2f}"
    )
    print(f"{'plan':<20}" + "".join(f"{k:>18}" for k in KEYS))
    for name, r in rows.items():
        print(f"{name:<20}" + "".join(f"{r.get(k, float('nan')):>18.3f}" for k in KEYS))
    for name, r in rows.items():
        if name == "one worker":
            continue
        ratios = ", ".join(f"{k} {r[k] / base[k]:.2f}x" for k in KEYS[1:8] if base.get(k))
        print(f"{name} vs one worker: {ratios}")


if __name__ == "__main__":
    main()
