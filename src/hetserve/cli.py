"""The ``hetserve`` command line: one small function per verb; the work lives in the packages."""

from __future__ import annotations

import argparse
import sys

from . import clock
from .errors import HetserveError, seed_value
from .report.progress import progress as _progress
from .report.tables import err_console, human_bytes, key_values, print_json, table


def _gpu_catalogue(cluster_path: str | None):
    from .specs.clusters import Cluster
    from .specs.gpus import builtin_gpus

    return Cluster.load(cluster_path).gpus if cluster_path else builtin_gpus()


CALIBRATION_HELP = "calibration file from `hetserve calibrate` (cost factors fitted to measurements)"


def cmd_gpus(args) -> int:
    gpus = _gpu_catalogue(args.cluster)
    if args.json:
        print_json({name: g.model_dump() for name, g in gpus.items()})
        return 0
    rows = []
    for g in gpus.values():
        rows.append(
            (
                g.name,
                g.vendor,
                g.memory_gb,
                g.memory_bw_gb_per_s,
                g.tflops.get("fp32"),
                g.half_tflops,
                g.tflops.get("fp8"),
                g.tflops.get("int8"),
                g.tflops.get("int4"),
                f"{g.fabric.kind} {g.fabric.gb_per_s:g}",
                g.tdp_w,
                g.price_per_hour,
            )
        )
    table(
        "GPU catalogue (dense TFLOPS; sources: hetserve gpus --json)",
        [
            "gpu",
            "vendor",
            "mem GB",
            "GB/s",
            "fp32",
            "fp16/bf16",
            "fp8",
            "int8",
            "int4",
            "fabric GB/s",
            "TDP W",
            "$/h",
        ],
        rows,
    )
    return 0


def cmd_models(args) -> int:
    from .specs.models import builtin_model_names, load_model

    models = [load_model(n) for n in builtin_model_names()]
    if args.json:
        print_json({m.name: m.summary() for m in models})
        return 0
    cols = [
        "name",
        "family",
        "layers",
        "hidden",
        "heads",
        "kv_heads",
        "experts",
        "params_b",
        "weights_gb_16bit",
        "weights_gb_4bit",
        "kv_kb_per_token",
        "sliding_window",
    ]
    table(
        "Built-in models (derived from each config.json)",
        cols,
        [[m.summary()[c] for c in cols] for m in models],
    )
    return 0


def cmd_estimate(args) -> int:
    from .costmodel.estimate import estimate
    from .errors import allowed, suggest
    from .specs.models import load_model

    gpus = _gpu_catalogue(args.cluster)
    if args.gpu not in gpus:
        raise HetserveError(
            f"--gpu: unknown GPU '{args.gpu}'{suggest(args.gpu, gpus)}; known: {allowed(gpus)}"
        )
    if args.calibration:
        from .specs.calibration import apply_calibration, load_calibration

        gpus = apply_calibration(gpus, load_calibration(args.calibration), args.calibration, {args.gpu})
    est = estimate(
        load_model(args.model),
        gpus[args.gpu],
        tp=args.tp,
        pp=args.pp,
        batch=args.batch,
        prompt=args.prompt,
        output=args.output,
        weight_bits=args.weight_bits,
        expert_parallel=args.expert_parallel,
        dtype=args.dtype,
    )
    if args.json:
        print_json(est.as_dict())
    else:
        d = est.as_dict()
        key_values(
            f"{est.model} on {est.tp * est.pp} x {est.gpu} (TP {est.tp}, PP {est.pp}, "
            f"{est.weight_bits}-bit weights, {est.dtype}), batch {est.batch}, {est.prompt} in / {est.output} out",
            [
                (k, d[k])
                for k in (
                    "prefill_ms",
                    "decode_ms_per_token",
                    "e2e_ms",
                    "tokens_per_s",
                    "weights_gb_per_gpu",
                    "kv_gb_per_gpu",
                    "memory_gb_per_gpu",
                    "usable_gb_per_gpu",
                    "kv_capacity_tokens",
                    "fits",
                )
            ],
        )
        if not est.fits:
            err_console.print(f"[bold red]does not fit:[/] {est.reason}")
    return 0 if est.fits else 1


SUMMARY_ROWS = (
    "requests",
    "completed",
    "dropped",
    "ttft_p50_ms",
    "ttft_p90_ms",
    "ttft_p99_ms",
    "tpot_p50_ms",
    "tpot_p90_ms",
    "e2e_p50_ms",
    "e2e_p90_ms",
    "throughput_rps",
    "throughput_tok_s",
    "goodput_rps",
    "slo_attainment",
    "slo_met",
    "preemptions",
    "bytes_transferred",
    "gpus",
    "cost_per_hour",
    "cost_per_mtok",
    "joules_per_token",
    "makespan_s",
    "iterations",
)


def cmd_simulate(args) -> int:
    import time
    from pathlib import Path

    from .plan import load_plan
    from .sim import simulate
    from .specs.workloads import Workload

    if args.duration is not None and args.duration <= 0:
        raise HetserveError(f"--duration={args.duration} must be > 0")
    dep = load_plan(args.plan, calibration=args.calibration)
    wl = Workload.load(args.workload)
    requests = wl.sample(seed=args.seed, duration_s=args.duration, rate=args.rate)
    if len(requests) == 0:
        raise HetserveError(
            f"{args.workload}: no request arrives within the duration; raise --duration or the rate"
        )
    t0 = time.perf_counter()
    with _progress("simulating", len(requests), enabled=not args.json and len(requests) >= 2000) as advance:
        result = simulate(dep, requests, wl.slo, seed=args.seed, progress=advance)
    summary = dict(
        result.summary.as_dict(),
        plan=dep.name,
        workload=wl.name,
        wall_s=time.perf_counter() - t0,
        drop_reasons=result.records.drops(),
    )
    if args.out:
        from .sim.plots import latency_cdfs, utilisation

        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        files = [result.records.write(out / f"requests.{args.records}")]
        files.append(latency_cdfs(result.records, out / "latency_cdf.png", f"{dep.name} x {wl.name}", wl.slo))
        files.append(utilisation(result.servers, result.bin_width, out / "utilisation.png", f"{dep.name}"))
        (out / "summary.json").write_text(__import__("json").dumps(summary, indent=2, default=float))
        summary["files"] = [str(f) for f in files if f]
    if args.json:
        print_json(summary)
        return 0
    shown = dict(summary, bytes_transferred=human_bytes(summary["bytes_transferred"]))
    key_values(
        f"{dep.name} ({dep.gpus_used()} GPUs) x {wl.name}: {len(requests)} requests, seed {args.seed}",
        [(k, shown.get(k)) for k in SUMMARY_ROWS],
    )
    if summary["drop_reasons"]:
        table(
            "Dropped requests",
            ["reason", "requests", "first request ids"],
            [(r, d["count"], d["first_ids"]) for r, d in summary["drop_reasons"].items()],
        )
    table("Servers", ["server", "utilisation"], sorted(summary["utilisation"].items()))
    if summary.get("files"):
        print("wrote: " + ", ".join(summary["files"]))
    return 0


def cmd_plan(args) -> int:
    from pathlib import Path

    from .deploy.targets import engine_target
    from .plan import save_plan
    from .planner import Planner
    from .planner.quality import parse_quality
    from .report.planning import OBJECTIVE_WORDS, plan_report, print_plan
    from .specs.clusters import Cluster
    from .specs.models import load_model
    from .specs.workloads import Workload

    if args.weight_bits is not None and args.quality is not None:
        raise HetserveError(
            "--weight-bits and --quality both set the weights' bits; give one (--weight-bits: every layer "
            "alike; --quality: the planner chooses per layer)"
        )
    cluster = Cluster.load(args.cluster, calibration=args.calibration)
    model = load_model(args.model)
    if args.sensitivity:
        from .specs.sensitivity import with_sensitivity

        model = with_sensitivity(model, args.sensitivity)
    workload = Workload.load(args.workload)
    out = Path(args.out)
    with (
        clock.counting_work_if(args.deterministic),
        _progress("planning", 1.0, enabled=not args.json) as tick,
    ):
        planner = Planner(
            cluster,
            model,
            workload,
            args.objective,
            cluster_ref=str(Path(args.cluster).resolve()),
            model_ref=args.model,
            budget=args.budget,
            quality=parse_quality(args.quality),
            weight_bits=args.weight_bits,
            headroom=args.headroom,
            seed=args.seed,
            time_limit=args.time_limit,
            max_seqs=args.max_batch_size,
            target=engine_target(args.target) if args.target else None,
            progress=tick,
        )
        result = planner.run()
    out.parent.mkdir(parents=True, exist_ok=True)
    save_plan(result.plan, out, cluster_path=args.cluster, calibration_path=args.calibration)
    from .report.plan_picture import draw_plan

    pictures = draw_plan(result.deployment, out, result.plan.notes)
    report = plan_report(result, str(out), workload)
    report["pictures"] = [str(f) for f in pictures]
    carries = result.carrying is None or result.carrying.carries
    if args.json:
        print_json(report)
        return 0 if carries else 1
    title = f"plan for {model.name} on {cluster.name}: {OBJECTIVE_WORDS[args.objective]}"
    print_plan(result, report, title, cluster.total_gpus)
    if args.target:
        print(f"runs on {planner.target.label} as planned: hetserve export {out} --to {args.target}")
    return 0 if carries else 1


def cmd_show(args) -> int:
    from pathlib import Path

    from .plan import load_plan
    from .report.plan_picture import draw_plan, write_html, write_png

    dep = load_plan(args.plan)
    notes = dep.spec.notes
    if args.out is None:
        files = draw_plan(dep, Path(args.plan), notes)
    elif args.out.endswith(".png"):
        files = [write_png(dep, args.out)]
    elif args.out.endswith(".html"):
        files = [write_html(dep, args.out, notes)]
    else:
        raise HetserveError(f"--out {args.out}: name a .png or .html file (or leave it out for both)")
    print("wrote " + ", ".join(str(f) for f in files))
    return 0


def cmd_generate(args) -> int:
    from .runtime.generate import run_generate

    for flag, value, ok in (
        ("--max-tokens", args.max_tokens, args.max_tokens >= 1),
        ("--temperature", args.temperature, args.temperature >= 0),
        ("--top-p", args.top_p, 0 < args.top_p <= 1),
        ("--top-k", args.top_k, args.top_k >= 0),
    ):
        if not ok:
            raise HetserveError(
                f"{flag}={value} is out of range (max-tokens >= 1, temperature >= 0, "
                "0 < top-p <= 1, top-k >= 0)"
            )
    run_generate(
        args.model,
        args.prompt,
        max_tokens=args.max_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        seed=args.seed,
        chat=not args.no_chat,
        system=args.system,
        stop=args.stop,
        dtype=args.dtype,
        threads=args.threads,
    )
    return 0


def cmd_export(args) -> int:
    from .deploy.export import export_plan

    out, files = export_plan(
        args.plan, args.to, args.engine, args.out, args.nearest, args.checkpoint, workload=args.workload
    )
    for g in out.gaps:
        print(f"nearest: {g.line()}", file=sys.stderr)
    for line in out.cost:
        if line:
            print(line)
    where = files[0].parent if files else args.out
    print(f"wrote {len(files)} files to {where} ({', '.join(f.name for f in files)}); see {where}/README.md")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="hetserve", description="Plan, simulate and serve LLMs on heterogeneous GPUs."
    )
    from . import __version__

    p.add_argument("--version", action="version", version=f"hetserve {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    g = sub.add_parser("gpus", help="list the GPU catalogue")
    g.add_argument("--cluster", help="cluster file whose 'gpus:' additions/overrides to include")
    g.add_argument("--json", action="store_true", help="print JSON (with every figure's source)")
    g.set_defaults(func=cmd_gpus)

    m = sub.add_parser("models", help="list the built-in models and their derived sizes")
    m.add_argument("--json", action="store_true")
    m.set_defaults(func=cmd_models)

    e = sub.add_parser("estimate", help="latency, throughput and memory of one batch on a TP x PP GPU group")
    e.add_argument("--model", required=True, help="built-in name or path of a config.json")
    e.add_argument("--gpu", required=True, help="GPU name (see: hetserve gpus)")
    e.add_argument("--cluster", help="cluster file defining extra GPUs")
    e.add_argument("--tp", type=int, default=1, help="tensor-parallel degree")
    e.add_argument("--pp", type=int, default=1, help="pipeline stages (layers split evenly)")
    e.add_argument("--batch", type=int, default=1)
    e.add_argument("--prompt", type=int, default=512, help="prompt tokens per request")
    e.add_argument("--output", type=int, default=128, help="output tokens per request")
    e.add_argument("--weight-bits", type=int, default=16, choices=[16, 8, 4, 3])
    e.add_argument(
        "--dtype",
        default="fp16",
        choices=["fp16", "bf16", "fp32"],
        help="format the engine computes 16-bit layers and keeps KV in: its peak and the cost factors "
        "fitted for it (hetserve profile --dtypes), weight and KV width (default: fp16)",
    )
    e.add_argument(
        "--expert-parallel",
        action="store_true",
        help="MoE models: experts spread over the TP group's GPUs, attention data-parallel (see docs/costmodel.md)",
    )
    e.add_argument("--calibration", metavar="FILE", help=CALIBRATION_HELP)
    e.add_argument("--json", action="store_true")
    e.set_defaults(func=cmd_estimate)

    pl = sub.add_parser("plan", help="choose a deployment for a cluster, model and workload")
    pl.add_argument("--cluster", required=True, help="cluster YAML (see docs/files.md)")
    pl.add_argument("--model", required=True, help="built-in name or path of a config.json")
    pl.add_argument("--workload", required=True, help="workload YAML: rates, lengths and SLOs")
    pl.add_argument(
        "--objective",
        default="cost",
        choices=["cost", "goodput", "throughput", "power", "latency"],
        help="cost (default): the cheapest plan that carries the workload's rate within its SLOs; "
        "goodput: the highest request rate within the SLOs; throughput: the most output tokens/s; "
        "power: the least power that carries the workload; latency: the least mean response time at "
        "the workload's rate (plus --headroom) within the SLOs and --budget",
    )
    pl.add_argument(
        "--headroom",
        type=float,
        default=0.2,
        metavar="SHARE",
        help="cost, power and latency plans are judged at this share more than the workload's rate "
        "(default 0.2: 20%%)",
    )
    pl.add_argument("--budget", type=float, help="most USD per hour to spend")
    pl.add_argument(
        "--quality",
        help="'lossless' (default: the checkpoint's weights, 16-bit or an FP8 release's 8) or the share of "
        "sensitivity-weighted weight bits the planner may remove, layer by layer (0 to 0.75)",
    )
    pl.add_argument(
        "--weight-bits",
        type=int,
        choices=[16, 8, 4],
        help="every layer's weights at these bits (as an engine's quantisation flag); instead of --quality",
    )
    pl.add_argument(
        "--sensitivity",
        metavar="FILE",
        help="per-layer quantisation sensitivity measured by 'hetserve quality --sensitivity' (default: "
        "an assumed curve); decides which layers lose bits first under --quality",
    )
    pl.add_argument("--seed", type=seed_value, default=0)
    pl.add_argument("--time-limit", type=float, default=60.0, help="seconds to search (default 60)")
    pl.add_argument(
        "--deterministic",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="count the search's work instead of wall time, so that the same inputs give the same plan on "
        "any machine and under any load; --time-limit is then in seconds of work as counted on the "
        "reference machine (docs/planner.md, 'Time limit')",
    )
    pl.add_argument(
        "--max-batch-size",
        type=int,
        metavar="N",
        help="the engine runs at most N sequences in one batch (per micro-batch of a pipeline, as "
        "vLLM's --max-num-seqs); default: the planner's per-role settings",
    )
    pl.add_argument(
        "--calibration", metavar="FILE", help=CALIBRATION_HELP + "; the plan records it for simulate"
    )
    pl.add_argument(
        "--target",
        choices=["vllm", "sglang"],
        help="only plans this engine runs as they are (no asymmetric TP, mixed bits, shared servers or "
        "converting P/D hand-offs), so 'hetserve export --to' that engine needs no --nearest",
    )
    pl.add_argument("--out", default="plan.yaml", help="where to write the plan (default plan.yaml)")
    pl.add_argument("--json", action="store_true")
    pl.set_defaults(func=cmd_plan)

    sh = sub.add_parser("show", help="draw a plan: nodes, GPUs, servers, instances, hand-offs (PNG and HTML)")
    sh.add_argument("plan", help="plan YAML (see docs/plan.md)")
    sh.add_argument(
        "--out", help="a .png or .html file (default: both, beside the plan: PLAN.png and PLAN.html)"
    )
    sh.set_defaults(func=cmd_show)

    s = sub.add_parser("simulate", help="replay a workload against a plan (discrete-event simulation)")
    s.add_argument("--plan", required=True, help="plan YAML (see docs/plan.md)")
    s.add_argument("--workload", required=True, help="workload YAML (see docs/files.md)")
    s.add_argument(
        "--duration", type=float, help="seconds of arrivals (default: the workload's; traces: all)"
    )
    s.add_argument("--rate", type=float, help="override the mean arrival rate (requests/s)")
    s.add_argument("--seed", type=seed_value, default=0)
    s.add_argument("--json", action="store_true")
    s.add_argument("--out", help="directory for per-request records, summary.json and PNG plots")
    s.add_argument("--records", choices=["csv", "parquet"], default="csv")
    s.add_argument(
        "--calibration", metavar="FILE", help=CALIBRATION_HELP + " (default: the one the plan records)"
    )
    s.set_defaults(func=cmd_simulate)
    x = sub.add_parser("export", help="write a plan as vLLM/SGLang launch scripts or Kubernetes manifests")
    x.add_argument("plan", help="plan YAML (see docs/plan.md)")
    x.add_argument("--to", required=True, metavar="TARGET", help="vllm, sglang or k8s")
    x.add_argument("--engine", metavar="ENGINE", help="engine of the k8s manifests: vllm (default) or sglang")
    x.add_argument("--out", help="output directory (default: PLAN-TARGET next to the working directory)")
    x.add_argument(
        "--nearest",
        action="store_true",
        help="export the closest plan the target can express and list the changes in the README",
    )
    x.add_argument(
        "--checkpoint",
        metavar="MODEL",
        help="Hugging Face id or path of the checkpoint to serve (e.g. a pre-quantised AWQ/GPTQ one for "
        "4-bit plans); default: the plan's model",
    )
    x.add_argument(
        "--workload",
        metavar="W",
        help="with --nearest: simulate the plan and the nearest plan on this workload and report what the "
        "changes cost (goodput, throughput, latency, $/h)",
    )
    x.set_defaults(func=cmd_export)
    from .compare import add_compare_parser

    add_compare_parser(sub)

    gen = sub.add_parser("generate", help="generate text with a real model (one prompt)")
    gen.add_argument("model", help="GGUF file, Hugging Face directory, or smollm2-135m")
    gen.add_argument("prompt")
    gen.add_argument("--max-tokens", type=int, default=64)
    gen.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    gen.add_argument("--top-p", type=float, default=1.0)
    gen.add_argument("--top-k", type=int, default=0)
    gen.add_argument("--seed", type=seed_value)
    gen.add_argument("--no-chat", action="store_true", help="do not apply the model's chat template")
    gen.add_argument("--system", help="system message for the chat template")
    gen.add_argument("--stop", action="append", help="stop string (repeatable)")
    gen.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    gen.add_argument("--threads", type=int, help="torch threads (default: torch's choice)")
    gen.set_defaults(func=cmd_generate)
    from .bench.cli import add_bench_parser
    from .runtime.api.cli import add_serve_parser, add_worker_parser
    from .runtime.router.cli import add_route_parser

    add_serve_parser(sub)
    add_worker_parser(sub)
    add_route_parser(sub)
    add_bench_parser(sub)
    from .bench.quality import add_quality_parser

    add_quality_parser(sub)
    from .calibration.cli import add_calibrate_parser, add_profile_parser

    add_profile_parser(sub)
    add_calibrate_parser(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help, --version, or argparse's one-line usage error
        return exc.code if isinstance(exc.code, int) else 2
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except HetserveError as exc:
        print(f"hetserve: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 0


if __name__ == "__main__":
    raise SystemExit(main())
