"""``hetserve calibrate`` and ``hetserve profile``."""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import HetserveError, seed_value
from .fit import HOLDOUT_COLUMNS

if TYPE_CHECKING:
    from ..specs.calibration import FactorFit, GPUCalibration


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
            measured = profile.measurements
            rows.extend(
                engine_rows(measured.engine, device, profile.engine, path, measured.serving_overhead_ms)
            )
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
    from ..specs.calibration import CalibrationFile
    from .fit import holdout_split
    from .per_dtype import calibrate_gpu

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
        entries[name] = calibrate_gpu(
            mine,
            gpus[name],
            engine=_engine_of(mine, name, args.engine),
            source=", ".join(args.measurements),
            held=[r for r in held if r.gpu.name == name],
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
            "dtype",
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
        for dtype, fit in _fits(entry):
            changed = {n: getattr(fit.factors, n) for n in fit.fitted}
            shown = ", ".join(f"{n}={v:g}" for n, v in changed.items())
            collective = f", allreduce={fit.factors.allreduce}" if "collective" in changed else ""
            print(f"{name} ({dtype}): {shown}{collective}")
    print(f"wrote: {args.out}")
    return 0


def _fits(entry: GPUCalibration) -> list[tuple[str, FactorFit]]:
    """``(format, FactorFit)`` of a GPU's calibration, the main fit first."""
    return [(entry.dtype or "any", entry), *entry.per_dtype.items()]


def _error_rows(entries) -> list[tuple]:
    def pair(err, phase):
        if err is None or phase not in err.by_phase:
            return "-"
        e = err.by_phase[phase]
        return f"{e.median_ape_pct:.1f} / {e.p90_ape_pct:.1f}"

    out = []
    for name, entry in entries.items():
        for dtype, fit in _fits(entry):
            for phase in sorted(fit.fit.by_phase):
                out.append(
                    (
                        name,
                        dtype,
                        phase,
                        fit.fit.by_phase[phase].n,
                        pair(fit.uncalibrated, phase),
                        pair(fit.fit, phase),
                        pair(fit.heldout_uncalibrated, phase),
                        pair(fit.heldout, phase),
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
        dtypes=args.dtypes,
        log=log,
    )
    write_yaml(profile.model_dump(mode="json", exclude_none=True), args.out, "hetserve device profile")
    if args.json:
        from ..report.tables import print_json

        print_json(profile.model_dump(mode="json", exclude_none=True))
        return 0
    d = profile.device
    peaks = ", ".join(f"{dtype} {tflops * 1e3:.1f}" for dtype, tflops in d.tflops.items())
    fits = "; ".join(
        f"{dtype} fit median {fit.fit.median_ape_pct:.1f}% (default factors {fit.uncalibrated.median_ape_pct:.1f}%)"
        for dtype, fit in _fits(profile.calibration)
    )
    print(
        f"{d.name}: {peaks} GFLOPS, {d.memory_bw_gb_per_s:.1f} GB/s, fabric {d.fabric.gb_per_s:.2f} GB/s "
        f"{d.fabric.latency_us:.0f} us; {profile.engine} {fits}"
    )
    print(f"wrote: {args.out} (use it in a cluster file: include: [{args.out}], then gpu: {d.name})")
    if args.device.startswith("cpu"):  # CPU workers share this machine's cores: the simulator needs that
        cores = os.cpu_count() or 1
        print(
            f"workers on this machine share its {cores} cores: add hosts: [{{name: this-machine, "
            f"cores: {cores}, threads_per_device: {profile.threads}}}] and host: this-machine "
            "to its nodes (docs/files.md)"
        )
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
    from .profile import DEFAULT_DTYPES, TORCH_DTYPES

    p = sub.add_parser(
        "profile", help="measure this machine's device with torch and write it as a calibrated GPU type"
    )
    p.add_argument("--device", default="cpu", help="torch device: cpu, cuda, cuda:N, ... (default cpu)")
    p.add_argument("--name", help="GPU type name to write (default: this-cpu, or this-<device>)")
    p.add_argument("--quick", action="store_true", help="a short sweep (about a minute on a laptop CPU)")
    p.add_argument("--threads", type=int, default=1, help="torch threads per process (default 1, as serve)")
    p.add_argument(
        "--dtypes",
        "--dtype",
        nargs="+",
        default=list(DEFAULT_DTYPES),
        choices=list(TORCH_DTYPES),
        metavar="DTYPE",
        help="formats to measure the engine in, each fitted apart; the first is the main one, whose factors "
        f"also time servers in formats not measured ({', '.join(TORCH_DTYPES)}; default: "
        f"{' '.join(DEFAULT_DTYPES)})",
    )
    p.add_argument("--out", required=True, help="profile to write (YAML)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_profile)
