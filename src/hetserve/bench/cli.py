"""``hetserve bench``: replay a workload against an OpenAI-compatible server and summarise it."""

from __future__ import annotations

import argparse
import json
import os
import statistics
from pathlib import Path

from ..errors import HetserveError, seed_value
from ..vocabulary import API_KEY_ENV

SUMMARY_ROWS = (
    "requests",
    "completed",
    "dropped",
    "ttft_p50_ms",
    "ttft_p90_ms",
    "ttft_p99_ms",
    "tpot_p50_ms",
    "tpot_p90_ms",
    "itl_p50_ms",
    "itl_p90_ms",
    "e2e_p50_ms",
    "e2e_p90_ms",
    "throughput_rps",
    "throughput_tok_s",
    "input_tok_s",
    "goodput_rps",
    "slo_attainment",
    "slo_met",
    "makespan_s",
    "wall_s",
)


def add_bench_parser(sub) -> argparse.ArgumentParser:
    b = sub.add_parser("bench", help="replay a workload against an OpenAI-compatible server (load generator)")
    b.add_argument("--url", required=True, help="server base URL, e.g. http://127.0.0.1:8000")
    b.add_argument(
        "--workload", required=True, help="workload YAML (arrivals, lengths, SLOs; see docs/files.md)"
    )
    b.add_argument(
        "--duration", type=float, help="seconds of arrivals (default: the workload's; traces: all)"
    )
    b.add_argument("--rate", type=float, help="override the mean arrival rate (requests/s)")
    b.add_argument("--model", help="model id to request (default: the first one the server lists)")
    b.add_argument("--endpoint", choices=["completions", "chat"], default="completions")
    b.add_argument(
        "--max-requests", type=int, default=1000, help="send at most this many requests (default 1000)"
    )
    b.add_argument(
        "--timeout", type=float, help="stop after this many seconds in all (default: arrivals + 600)"
    )
    b.add_argument(
        "--no-ignore-eos",
        action="store_true",
        help="do not send ignore_eos (for servers that reject unknown fields)",
    )
    b.add_argument(
        "--api-key",
        default=os.environ.get(API_KEY_ENV) or None,
        help=f"sent as 'Authorization: Bearer KEY' (default: ${API_KEY_ENV}; none)",
    )
    b.add_argument("--seed", type=seed_value, default=0)
    b.add_argument("--json", action="store_true")
    b.add_argument("--out", help="directory for requests.csv and summary.json")
    b.set_defaults(func=cmd_bench)
    return b


def cmd_bench(args) -> int:
    from ..specs.workloads import Workload
    from .loadgen import BenchConfig, to_records

    for flag, value, ok in (
        ("--duration", args.duration, args.duration is None or args.duration > 0),
        ("--rate", args.rate, args.rate is None or args.rate > 0),
        ("--max-requests", args.max_requests, args.max_requests >= 1),
        ("--timeout", args.timeout, args.timeout is None or args.timeout > 0),
    ):
        if not ok:
            raise HetserveError(f"{flag}={value} must be > 0")
    if not args.url.startswith(("http://", "https://")):
        raise HetserveError(f"--url {args.url}: give an http:// or https:// URL, e.g. http://127.0.0.1:8000")
    try:
        import httpx  # noqa: F401
    except ImportError:
        raise HetserveError("the load generator needs httpx: pip install 'hetserve[serve]'") from None
    workload = Workload.load(args.workload)
    cfg = BenchConfig(
        url=args.url,
        workload=workload,
        model=args.model,
        duration_s=args.duration,
        rate=args.rate,
        seed=args.seed,
        max_requests=args.max_requests,
        timeout_s=args.timeout,
        endpoint=args.endpoint,
        ignore_eos=not args.no_ignore_eos,
        api_key=args.api_key,
    )
    results, summary = _run_with_progress(cfg, enabled=not args.json)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        to_records(results, summary["url"]).write(out / "requests.csv")
        (out / "summary.json").write_text(json.dumps(summary, indent=2, default=float))
        summary["files"] = [str(out / "requests.csv"), str(out / "summary.json")]
    if args.json:
        from ..report.tables import print_json

        print_json(summary)
        return 0
    from ..report.tables import key_values, table

    key_values(
        f"{summary['model']} at {summary['url']} x {workload.name}: {summary['requests']} requests "
        f"(of {summary['sampled_requests']} sampled), seed {args.seed}",
        [(k, summary.get(k)) for k in SUMMARY_ROWS],
    )
    if summary["errors"]:
        table("Errors", ["error", "requests"], sorted(summary["errors"].items(), key=lambda kv: -kv[1]))
    if summary.get("files"):
        print("wrote: " + ", ".join(summary["files"]))
    return 0


class _LiveBench:
    """A progress bar while the replay runs: requests ended of all, ETA, the TTFT p50 so far."""

    def __init__(self, enabled: bool):
        self.enabled = enabled
        self.bar = None
        self.advance = None
        self.ttfts: list[float] = []
        self.failed = 0

    def start(self, n: int) -> None:
        from ..report.progress import progress

        self.bar = progress("requests", n, self.enabled)
        self.advance = self.bar.__enter__()

    def done(self, r) -> None:
        if self.advance is None:
            return
        if r.error is None and r.first_token == r.first_token:  # not NaN
            self.ttfts.append((r.first_token - r.arrival) * 1000)
        else:
            self.failed += 1
        ttft = f"TTFT p50 {statistics.median(self.ttfts):,.0f} ms" if self.ttfts else "no token yet"
        self.advance(1, ttft + (f", {self.failed} failed" if self.failed else ""))

    def stop(self) -> None:
        if self.bar is not None:
            self.bar.__exit__(None, None, None)


def _run_with_progress(cfg, enabled: bool):
    from .loadgen import run_bench

    live = _LiveBench(enabled)
    try:
        return run_bench(cfg, on_start=live.start, on_done=live.done)
    finally:
        live.stop()
