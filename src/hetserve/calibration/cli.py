"""``hetserve calibrate`` and ``hetserve profile``."""

from __future__ import annotations

from pathlib import Path

from ..errors import HetserveError, seed_value
from .fit import HOLDOUT_COLUMNS


def _read_all(paths: list[str], cluster: str | None):
    """Rows of every measurement file, and the GPU types they name (a profile adds its device)."""
    from ..specs.clusters import Cluster
    from ..specs.gpus import builtin_gpus
    from .measurements import engine_rows, read_csv

    gpus = dict(Cluster.load(cluster).gpus if cluster else builtin_gpus())
    rows = []
    for path in paths:
        if Path(path).suffix.lower() in (".yaml", ".yml"):
            from ..specs.calibration import load_profile

            profile = load_profile(path)
            device = profile.device
            gpus[device.name] = device
            rows.extend(engine_rows(profile.measurements.engine, device, profile.engine, path))
        else:
            rows.extend(read_csv(path, gpus))
    if not rows:
        raise HetserveError(f"{', '.join(paths)}: no measurements to fit")
    return rows, gpus


def _engine_of(rows, gpu: str, engine: str | None) -> str:
    engines = sorted({getattr(r, "engine", "") for r in rows} - {""})
    if engine is None and len(engines) > 1:
        raise HetserveError(
            f"measurements of {gpu} come from several engines ({', '.join(engines)}); factors differ per "
            "engine, so pick one with --engine"
        )
    return engine or (engines[0] if engines else "")


def cmd_calibrate(args) -> int:
    from ..report.tables import print_json, table
    from ..specs.calibration import CalibrationFile, FitError, GPUCalibration
    from .fit import errors, fit_gpu, holdout_split

    if args.holdout is not None and args.holdout_by:
        raise HetserveError("give --holdout or --holdout-by, not both")
    rows, gpus = _read_all(args.measurements, args.cluster)
    if args.engine:
        rows = [r for r in rows if getattr(r, "engine", "") in (args.engine, "")]
        if not rows:
            raise HetserveError(f"--engine={args.engine}: no measurement row names that engine")
    fit_rows, held = holdout_split(rows, fraction=args.holdout, by=args.holdout_by, seed=args.seed)
    entries: dict[str, GPUCalibration] = {}
    for name in sorted({r.gpu.name for r in rows}):
        mine = [r for r in fit_rows if r.gpu.name == name]
        if not mine:
            raise HetserveError(
                f"every measurement of {name} is held out; hold out fewer rows to calibrate {name}"
            )
        gpu = gpus[name]
        engine = _engine_of(mine, name, args.engine)
        fit = fit_gpu(mine, gpu, source=", ".join(args.measurements))
        fitted = gpu.model_copy(update={"efficiency": fit.factors})
        theirs = [r for r in held if r.gpu.name == name]
        entries[name] = GPUCalibration(
            factors=fit.factors,
            fitted=list(fit.fitted),
            engine=engine,
            rows=len(mine),
            fit=FitError.model_validate(fit.error.as_dict()),
            uncalibrated=FitError.model_validate(errors(mine, gpu).as_dict()),
            heldout=FitError.model_validate(errors(theirs, fitted).as_dict()) if theirs else None,
            heldout_uncalibrated=FitError.model_validate(errors(theirs, gpu).as_dict()) if theirs else None,
        )
    holdout = (
        f"random {args.holdout:g} (seed {args.seed})"
        if args.holdout is not None
        else (f"by {args.holdout_by}" if args.holdout_by else "")
    )
    calibration = CalibrationFile(measurements=list(args.measurements), holdout=holdout, gpus=entries)
    write_yaml(calibration.model_dump(mode="json", exclude_none=True), args.out, "hetserve calibration")
    if args.json:
        print_json(calibration.model_dump(mode="json", exclude_none=True))
        return 0
    table(
        f"cost factors fitted to {len(fit_rows)} rows"
        + (f", {len(held)} held out ({holdout})" if held else ""),
        [
            "gpu",
            "phase",
            "rows fitted",
            "default median/p90 %",
            "fitted median/p90 %",
            "held out: default",
            "held out: fitted",
        ],
        _error_rows(entries),
    )
    for name, entry in entries.items():
        changed = {n: getattr(entry.factors, n) for n in entry.fitted}
        shown = ", ".join(f"{n}={v:g}" for n, v in changed.items())
        print(
            f"{name}: {shown}" + (f", allreduce={entry.factors.allreduce}" if "collective" in changed else "")
        )
    print(f"wrote: {args.out}")
    return 0


def _error_rows(entries) -> list[tuple]:
    def pair(err, phase):
        if err is None or phase not in err.by_phase:
            return "-"
        e = err.by_phase[phase]
        return f"{e.median_ape_pct:.1f} / {e.p90_ape_pct:.1f}"

    out = []
    for name, entry in entries.items():
        for phase in sorted(entry.fit.by_phase):
            out.append(
                (
                    name,
                    phase,
                    entry.fit.by_phase[phase].n,
                    pair(entry.uncalibrated, phase),
                    pair(entry.fit, phase),
                    pair(entry.heldout_uncalibrated, phase),
                    pair(entry.heldout, phase),
                )
            )
    return out


def write_yaml(data: dict, path: str, title: str, doc: str = "docs/costmodel.md") -> None:
    import yaml

    out = Path(path)
    if out.parent and not out.parent.exists():
        raise HetserveError(f"--out: directory {out.parent} does not exist")
    out.write_text(f"# {title}; see {doc}\n" + yaml.safe_dump(data, sort_keys=False, width=110))


def cmd_profile(args) -> int:
    from ..report.tables import err_console
    from .profile import run_profile

    log = (lambda msg: None) if args.json else (lambda msg: err_console.print(msg, highlight=False))
    profile = run_profile(
        device=args.device,
        name=args.name,
        quick=args.quick,
        threads=args.threads,
        dtype=args.dtype,
        log=log,
    )
    write_yaml(profile.model_dump(mode="json", exclude_none=True), args.out, "hetserve device profile")
    if args.json:
        from ..report.tables import print_json

        print_json(profile.model_dump(mode="json", exclude_none=True))
        return 0
    d, c = profile.device, profile.calibration
    print(
        f"{d.name}: {d.tflops} TFLOPS, {d.memory_bw_gb_per_s:.1f} GB/s, fabric {d.fabric.gb_per_s:.2f} GB/s "
        f"{d.fabric.latency_us:.0f} us; engine fit median {c.fit.median_ape_pct:.1f}% "
        f"(default factors {c.uncalibrated.median_ape_pct:.1f}%)"
    )
    print(f"wrote: {args.out} (use it in a cluster file: include: [{args.out}], then gpu: {d.name})")
    return 0


def add_calibrate_parser(sub) -> None:
    c = sub.add_parser("calibrate", help="fit the cost model's factors of GPU types to measured step times")
    c.add_argument(
        "--measurements",
        nargs="+",
        required=True,
        metavar="FILE",
        help="PROFILE.yaml from `hetserve profile`, a per-layer CSV (Helix's format) or a full-model CSV "
        "(model,gpu,tp,batch,prompt,output,prefill_ms,decode_ms[,engine][,dtype])",
    )
    c.add_argument("--cluster", help="cluster file defining GPU types the measurements name")
    c.add_argument("--engine", help="fit only rows of this engine (when a file mixes several)")
    c.add_argument("--holdout", type=float, metavar="FRACTION", help="hold out a random share of rows")
    c.add_argument(
        "--holdout-by",
        metavar="COLUMN[=VALUE]",
        help=f"hold out the rows with the largest value of a column, or with VALUE ({', '.join(HOLDOUT_COLUMNS)})",
    )
    c.add_argument("--seed", type=seed_value, default=0, help="seed of the random hold-out")
    c.add_argument("--out", required=True, help="calibration file to write (YAML)")
    c.add_argument("--json", action="store_true")
    c.set_defaults(func=cmd_calibrate)


def add_profile_parser(sub) -> None:
    p = sub.add_parser(
        "profile", help="measure this machine's device with torch and write it as a calibrated GPU type"
    )
    p.add_argument("--device", default="cpu", help="torch device: cpu, cuda, cuda:N, ... (default cpu)")
    p.add_argument("--name", help="GPU type name to write (default: this-cpu, or this-<device>)")
    p.add_argument("--quick", action="store_true", help="a short sweep (about a minute on a laptop CPU)")
    p.add_argument("--threads", type=int, default=1, help="torch threads per process (default 1, as serve)")
    p.add_argument(
        "--dtype", default="float32", choices=["float32", "bfloat16", "float16"], help="the engine's dtype"
    )
    p.add_argument("--out", required=True, help="profile to write (YAML)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_profile)
