"""The simulator against real serving on this machine: every example serve plan, the same requests.

    python benchmarks/sim_vs_serve.py [--plans NAME ...] [--duration 120] [--rate 0.25] [--seed 0]
                                      [--profile PROFILE.yaml] [--quick] [--measured REPORT.json] [--json]

Profiles the CPU once (`hetserve profile`, one torch thread as every serve worker uses; or reuses
--profile), then for each plan in examples/serve/ (replicas, pipeline, TP 2, P/D, P/D bf16, shared
servers, mixed): runs `hetserve serve --plan` and replays benchmarks/plans/serve-load.yaml with
`hetserve bench`, and runs `hetserve simulate` of the same plan on the profiled device (a copy of the
plan whose cluster has the same nodes with `gpu: this-cpu`, all on one host whose cores every worker
shares, and the measured process-to-process link)
with the same workload, seed, duration and rate: the same requests at the same arrival times. Prints
per plan and metric the simulated and measured figures and their ratio (simulated / measured).
``--measured REPORT.json`` takes the measured figures of an earlier report (same workload, duration,
rate and seed) instead of serving again: the simulated side alone is run, e.g. with another profile.

JSON: {"profile": {...}, "plans": [{"plan": NAME, "metrics": {METRIC: {"simulated": x, "measured": y,
"ratio": x / y}}}]}
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
from serve_plans import run_plan  # noqa: E402

PLANS = ["replicas", "pipeline", "tp2", "pd", "pd-bf16", "shared", "mixed"]
METRICS = [
    "ttft_p50_ms",
    "ttft_p90_ms",
    "tpot_p50_ms",
    "tpot_p90_ms",
    "e2e_p50_ms",
    "e2e_p90_ms",
    "throughput_tok_s",
]
WORKLOAD = HERE / "plans" / "serve-load.yaml"
KV_CACHE_GB = 0.5


def hetserve(*argv: str) -> str:
    out = subprocess.run(
        [sys.executable, "-m", "hetserve.cli", *argv], capture_output=True, text=True, check=False
    )
    if out.returncode:
        raise RuntimeError(f"hetserve {' '.join(argv)} failed:\n{out.stderr[-3000:]}")
    return out.stdout


def sim_plan(plan: Path, profile: Path, work: Path) -> Path:
    """A copy of ``plan`` whose cluster is its own with every node's GPU the profiled device, every node
    on one host (this machine: its cores shared by every worker, each with the profile's threads), and
    the network between nodes the measured process-to-process link."""
    spec = yaml.safe_load(plan.read_text())
    cluster = yaml.safe_load((plan.parent / spec["cluster"]).read_text())
    prof = yaml.safe_load(profile.read_text())
    device = prof["device"]
    cluster["hosts"] = [
        {"name": "this-machine", "cores": os.cpu_count() or 1, "threads_per_device": prof.get("threads", 1)}
    ]
    for node in cluster["nodes"]:
        node["gpu"] = device["name"]
        node["host"] = "this-machine"
    cluster["include"] = [str(profile.resolve())]
    fabric = device["fabric"]
    cluster["network"] = {"gbit_per_s": fabric["gb_per_s"] * 8, "latency_ms": fabric["latency_us"] / 1e3}
    cluster["name"] = f"{cluster.get('name', 'cluster')}-on-{device['name']}"
    cluster_path = work / f"{plan.stem}-cluster.yaml"
    cluster_path.write_text(yaml.safe_dump(cluster, sort_keys=False))
    spec["cluster"] = str(cluster_path)
    out = work / plan.name
    out.write_text(yaml.safe_dump(spec, sort_keys=False))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--plans", nargs="+", default=PLANS, choices=PLANS, metavar="NAME")
    ap.add_argument("--duration", type=float, default=120.0)
    ap.add_argument("--rate", type=float, default=0.25)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--profile", type=Path, help="reuse this profile instead of measuring")
    ap.add_argument("--quick", action="store_true", help="profile with --quick")
    ap.add_argument(
        "--measured", type=Path, help="the measured figures of this earlier --json report (no serving)"
    )
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    earlier = {}
    if args.measured is not None:
        prior = json.loads(args.measured.read_text())
        earlier = {
            p["plan"]: {
                "completed": p.get("completed"),
                **{m: v["measured"] for m, v in p["metrics"].items()},
            }
            for p in prior["plans"]
        }
        missing = [name for name in args.plans if name not in earlier]
        if missing:
            sys.exit(f"--measured {args.measured}: no measured figures for {', '.join(missing)}")
    work = Path(tempfile.mkdtemp(prefix="sim-vs-serve-"))
    profile = args.profile
    if profile is None:
        profile = work / "this-cpu.yaml"
        hetserve("profile", "--out", str(profile), "--threads", "1", *(["--quick"] if args.quick else []))
    prof = yaml.safe_load(profile.read_text())
    results = []
    for name in args.plans:
        plan = ROOT / "examples" / "serve" / f"smollm2-{name}.yaml"
        measured = earlier[name] if earlier else run_plan(plan, args, WORKLOAD, KV_CACHE_GB)
        simulated = json.loads(
            hetserve(
                "simulate",
                "--plan",
                str(sim_plan(plan, profile, work)),
                "--workload",
                str(WORKLOAD),
                "--duration",
                str(args.duration),
                "--rate",
                str(args.rate),
                "--seed",
                str(args.seed),
                "--json",
            )
        )
        metrics = {}
        for m in METRICS:
            s, r = simulated.get(m), measured.get(m)
            metrics[m] = {"simulated": s, "measured": r, "ratio": s / r if s is not None and r else None}
        workers = sum(len(s["gpus"]) for s in yaml.safe_load(plan.read_text())["servers"])
        results.append(
            {"plan": name, "workers": workers, "completed": measured.get("completed"), "metrics": metrics}
        )
        line = f"{name} ({workers} workers): " + ", ".join(
            f"{m} {v['ratio']:.2f}" for m, v in metrics.items() if v["ratio"]
        )
        print(line, file=sys.stderr if args.json else sys.stdout, flush=True)
    report = {
        "profile": {
            "file": str(profile),
            "device": prof["device"]["name"],
            "fit_median_ape_pct": prof["calibration"]["fit"]["median_ape_pct"],
            # the main format's fit above; every format's (a profile fits each format it measured apart)
            "fit_median_ape_pct_per_dtype": {
                prof["calibration"].get("dtype", "main"): prof["calibration"]["fit"]["median_ape_pct"],
                **{
                    d: f["fit"]["median_ape_pct"] for d, f in prof["calibration"].get("per_dtype", {}).items()
                },
            },
        },
        "measured_from": str(args.measured) if args.measured else None,
        "cores": os.cpu_count(),
        "load_after": os.getloadavg()[0],
        "plans": results,
    }
    if args.json:
        print(json.dumps(report, indent=2))
        return
    print()
    print(f"{'plan':<10} {'metric':<17} {'simulated':>10} {'measured':>10} {'ratio':>6}")
    for r in results:
        for m, v in r["metrics"].items():
            ratio = f"{v['ratio']:.2f}" if v["ratio"] else "-"
            print(f"{r['plan']:<10} {m:<17} {v['simulated']:>10.1f} {v['measured']:>10.1f} {ratio:>6}")


if __name__ == "__main__":
    main()
