"""Every seed scenario, every strategy: each baseline against its paper's reference point, next to the
paper's headline, and hetserve against each baseline (same cost model, same simulator, same requests).

    python benchmarks/compare_scenarios.py [--scenarios a,b] [--seed N] [--out DIR] [--json FILE]

Every strategy plans at the scenario's quality (16-bit weights unless the scenario sets a quality budget);
``hetserve-q``, hetserve allowed to quantise, is a row of its own, and its "vs hetserve" figure is what
quantising would add, not part of any headline. Ratios are "times better" in the scenario's objective
(higher-is-better objectives: ours / theirs; lower-is-better: theirs / ours). For chain-bloom176b the
paper's metric, mean response time at the offered rate, is reported as well (Petals' mean / chain
composition's mean). A strategy that cannot plan
the scenario, or whose plan never meets the SLOs, has no ratio ("-").
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from datetime import date
from pathlib import Path

from hetserve.compare import ratio, run_compare

ROOT = Path(__file__).resolve().parents[1]
SCENARIOS = ROOT / "examples" / "scenarios"


def fmt(x, digits=2) -> str:
    if x is None:
        return "-"
    if isinstance(x, float):
        return f"{x:.{digits}f}"
    return str(x)


def paper_point(report: dict) -> list[str]:
    """The baseline against its paper's reference, in this run, next to the paper's headline."""
    res = report["strategies"]
    base, ref = report["baseline"], report["reference"]
    lines = [
        (
            f"  paper point: {base} vs {ref}: {fmt(report['ratios']['baseline_vs_reference'])}x in "
            f"{report['objective']} ({report['objective_unit']}, {report['objective_sense']})   "
            f"paper: {report['headline']}"
        )
    ]
    if report["scenario"].startswith("chain"):
        b, r = res.get(base, {}).get("e2e_mean_ms"), res.get(ref, {}).get("e2e_mean_ms")
        if b and r:
            change = (1 - b / r) * 100
            how = f"{change:.0f}% lower" if change >= 0 else f"{-change:.0f}% higher"
            lines.append(
                f"  mean response at {report['offered_rps']:.3g} req/s: {base} {b / 1e3:.2f} s, {ref} "
                f"{r / 1e3:.2f} s -> {base} {how} (paper: lower)"
            )
    if report["scenario"].startswith("splitwise"):
        b, r = res.get(base, {}), res.get(ref, {})
        if "cost_per_hour" in b and "cost_per_hour" in r:
            lines.append(
                f"  cost: {base} ${b['cost_per_hour']:.2f}/h vs {ref} ${r['cost_per_hour']:.2f}/h; "
                f"average power {b['power_w']:.0f} W vs {r['power_w']:.0f} W"
            )
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--scenarios", help="comma-separated scenario names (default: all in examples/scenarios)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", help="directory for each scenario's compare output (plans, plots)")
    ap.add_argument("--json", help="write every report to this JSON file")
    args = ap.parse_args()
    names = args.scenarios.split(",") if args.scenarios else sorted(p.stem for p in SCENARIOS.glob("*.yaml"))
    print(
        f"# compare_scenarios.py, {date.today()}, {platform.machine()} {platform.python_version()}, "
        f"seed {args.seed}"
    )
    reports = {}
    t_all = time.perf_counter()
    for name in names:
        t0 = time.perf_counter()
        out = Path(args.out) / name if args.out else None
        report = run_compare(SCENARIOS / f"{name}.yaml", out_dir=out, seed=args.seed)
        wall = time.perf_counter() - t0
        reports[name] = report
        res = report["strategies"]
        print(
            f"\n## {name}: {report['model']} on {report['cluster']}, {report['objective']} "
            f"({report['objective_unit']}, {report['objective_sense']}), {report['requests']} requests at "
            f"{report['offered_rps']:.3g} req/s, {wall:.0f} s"
        )
        print(
            f"  {'strategy':12s} {'bits':>5s} {'objective':>10s} {'tok/s':>8s} {'TTFT p90':>9s} {'TPOT p90':>9s} "
            f"{'$/h':>7s} {'J/tok':>6s} {'plan s':>6s}  vs hetserve"
        )
        ours = res.get("hetserve", {}).get("objective_value")
        for s, m in res.items():
            if "error" in m:
                print(f"  {s:12s} {'':>5s} {'failed':>10s}  {m['error'][:90]}")
                continue
            x = ratio(ours, m["objective_value"], report["objective_sense"]) if s != "hetserve" else None
            value = m["objective_value"] if m["objective_value"] is not None else "infeasible"
            print(
                f"  {s:12s} {m['weight_bits']:>5s} {fmt(value):>10s} {fmt(m['throughput_tok_s'], 0):>8s} "
                f"{fmt(m['ttft_p90_ms'], 0):>9s} "
                f"{fmt(m['tpot_p90_ms'], 0):>9s} {fmt(m['cost_per_hour']):>7s} {fmt(m['joules_per_token']):>6s} "
                f"{fmt(m['plan_seconds'], 1):>6s}  {'' if s == 'hetserve' else ('-' if x is None else fmt(x) + 'x')}"
            )
        for line in paper_point(report):
            print(line)
    print(f"\ntotal {time.perf_counter() - t_all:.0f} s")
    if args.json:
        Path(args.json).write_text(json.dumps(reports, indent=2, default=float))


if __name__ == "__main__":
    main()
