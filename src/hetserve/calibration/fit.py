"""Fitting a GPU type's cost factors to measured step times.

The prediction of a row is the cost model's own (``ServerTimer`` of the row's model, GPU and TP), so
a fitted factor set means exactly what the simulator and the planner will do with it. The fit
minimises squared log ratios (relative error, so a 2 ms and a 2 s measurement weigh alike) with
SciPy's bounded trust-region least squares, from two starting points, with a weak pull towards the
default factors that only decides factors the data cannot tell apart (for example the per-layer and
per-step overheads of a single model). Factors the rows cannot inform at all are left at their
defaults: all-reduce terms without TP > 1 rows, the per-step time without whole-model rows. One fit
covers rows of one format (``run_dtype``): an engine's speed per format is its own (a CPU runs bf16
matrix products faster than fp32 and bf16 matrix-vector products slower), so ``calibrate_gpu``
(per_dtype.py) fits each format apart.
"""

from __future__ import annotations

import math
import random
import statistics
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
from scipy.optimize import least_squares

from ..costmodel.fidelity import layer_batch
from ..costmodel.roofline import BatchShape, ServerShape, ServerTimer
from ..errors import HetserveError
from ..specs.gpus import CostFactors, GPUSpec
from ..vocabulary import DTYPE_BYTES, RunDType
from .measurements import LayerRow, ModelRow, Row

#: Fitted factors: name -> (lower bound, upper bound, starting value, scale of the pull to defaults).
BOUNDS: dict[str, tuple[float, float]] = {
    "compute": (0.01, 1.0),
    "memory": (0.01, 1.0),
    "attention_compute": (0.002, 1.0),
    "attention_memory": (0.01, 1.0),
    "gemm_half_rows": (0.0, 8192.0),
    "gemm_rows_exponent": (0.2, 2.0),
    "overlap": (0.0, 1.0),
    "layer_overhead_us": (0.0, 20000.0),
    "step_overhead_ms": (0.0, 2000.0),
    "allreduce_latency_us": (0.0, 20000.0),
    "collective": (0.002, 1.0),
}
#: Typical size of each factor, for scaling the pull towards the defaults.
SCALE = {
    "compute": 0.5,
    "memory": 0.5,
    "attention_compute": 0.5,
    "attention_memory": 0.5,
    "gemm_half_rows": 256.0,
    "gemm_rows_exponent": 0.5,
    "overlap": 0.5,
    "layer_overhead_us": 50.0,
    "step_overhead_ms": 5.0,
    "allreduce_latency_us": 20.0,
    "collective": 0.5,
}
#: Weight of the pull towards the defaults (relative to one measurement's log error).
PRIOR_WEIGHT = 1e-3
#: Measurements needed per fitted factor.
ROWS_PER_FACTOR = 2


def predict_ms(row: Row, gpu: GPUSpec, cache: dict | None = None) -> tuple[float, ...]:
    """The cost model's figures for ``row`` on ``gpu`` (its factors), in the row's units (ms)."""
    key = (id(row.model), row.tp, type(row).__name__, row.run_dtype)
    timer = cache.get(key) if cache is not None else None
    if timer is None:
        if isinstance(row, LayerRow):
            shape = ServerShape(gpu, row.tp, (16,), first=False, last=False, run_dtype=row.run_dtype)
        else:
            shape = ServerShape(
                gpu,
                row.tp,
                (16,) * row.model.num_layers,
                kv_dtype_bytes=float(DTYPE_BYTES[row.run_dtype]),
                run_dtype=row.run_dtype,
            )
        timer = ServerTimer(shape, row.model)
        if cache is not None:
            cache[key] = timer
    if isinstance(row, LayerRow):
        # a per-layer figure holds no per-step time
        t = (
            timer.batch_time(layer_batch(row.phase, row.batch_tokens))
            - gpu.factors_for(row.run_dtype).step_overhead_ms * 1e-3
        )
        return (t * 1e3,)
    prefill = timer.batch_time(BatchShape.prefill([row.prompt] * row.batch))
    context = row.batch * (row.prompt + row.output / 2)
    decode = timer.batch_time(BatchShape.decode(row.batch, context))
    return (prefill * 1e3, decode * 1e3)


@dataclass(frozen=True)
class ErrorStats:
    """Absolute percentage errors of predictions against measurements, per phase."""

    n: int
    median_ape: float
    p90_ape: float
    by_phase: dict[str, tuple[int, float, float]]  # phase -> (n, median, p90)

    def as_dict(self) -> dict:
        return {
            "n": self.n,
            "median_ape_pct": round(self.median_ape, 2),
            "p90_ape_pct": round(self.p90_ape, 2),
            "by_phase": {
                p: {"n": n, "median_ape_pct": round(m, 2), "p90_ape_pct": round(q, 2)}
                for p, (n, m, q) in self.by_phase.items()
            },
        }


def _p90(values: Sequence[float]) -> float:
    return float(np.percentile(values, 90)) if values else math.nan


def errors(rows: Sequence[Row], gpu: GPUSpec) -> ErrorStats:
    """How far the cost model with ``gpu``'s factors is from ``rows``."""
    cache: dict = {}
    apes: list[float] = []
    phases: dict[str, list[float]] = defaultdict(list)
    for row in rows:
        for (phase, measured), predicted in zip(row.values, predict_ms(row, gpu, cache)):
            ape = abs(predicted - measured) / measured * 100
            apes.append(ape)
            phases[phase].append(ape)
    if not apes:
        return ErrorStats(0, math.nan, math.nan, {})
    return ErrorStats(
        len(apes),
        statistics.median(apes),
        _p90(apes),
        {p: (len(v), statistics.median(v), _p90(v)) for p, v in sorted(phases.items())},
    )


def fitted_names(rows: Sequence[Row]) -> list[str]:
    """The factors ``rows`` can inform."""
    names = ["compute", "memory", "gemm_half_rows", "gemm_rows_exponent", "overlap", "layer_overhead_us"]
    whole = [r for r in rows if isinstance(r, ModelRow)]
    if whole:
        names.append("step_overhead_ms")
    # attention's own factors only where the rows vary what attention alone depends on: prompt
    # lengths (the quadratic term) and context (KV reads); per-layer rows fix both
    if len({r.prompt for r in whole}) > 1:
        names.append("attention_compute")
    if len({r.prompt + r.output / 2 for r in whole}) > 1:
        names.append("attention_memory")
    if any(r.tp > 1 for r in rows):
        names += ["allreduce_latency_us", "collective"]
    return names


def fit_bounds(rows: Sequence[Row], names: list[str]) -> dict[str, tuple[float, float]]:
    """``BOUNDS`` of the factors ``names``, the per-step time held at least at the serving runtime's time
    per step that the rows lack (``ModelRow.serving_overhead_ms``): measured apart, so the fit may add to
    it but not trade it for other factors (for one model a fixed time per step is hard to tell from the
    GEMM efficiency of small batches)."""
    out = {n: BOUNDS[n] for n in names}
    floor = max((r.serving_overhead_ms for r in rows if isinstance(r, ModelRow)), default=0.0)
    if floor and "step_overhead_ms" in out:
        lo, hi = out["step_overhead_ms"]
        if floor >= hi:
            raise HetserveError(
                f"a serving overhead of {floor:g} ms per step is beyond the {hi:g} ms a step may cost; "
                "the serving measurement is broken: profile again"
            )
        out["step_overhead_ms"] = (max(lo, floor), hi)
    return out


def _start(
    defaults: CostFactors, gpu: GPUSpec, bounds: dict[str, tuple[float, float]], alt: bool
) -> dict[str, float]:
    """A starting point strictly inside the bounds: the defaults, or a second one with small-shape
    GEMM inefficiency and partial overlap."""
    from ..costmodel.roofline import COLLECTIVE_EFFICIENCY

    values = {
        "compute": defaults.compute,
        "memory": defaults.memory,
        "attention_compute": defaults.attention_compute_or_default,
        "attention_memory": defaults.attention_memory_or_default,
        "gemm_half_rows": 256.0 if alt else max(defaults.gemm_half_rows, 8.0),
        "gemm_rows_exponent": 0.6 if alt else defaults.gemm_rows_exponent,
        "overlap": 0.5 if alt else min(defaults.overlap, 0.95),
        "layer_overhead_us": max(defaults.layer_overhead_us, 1.0),
        "step_overhead_ms": max(defaults.step_overhead_ms, 0.5),
        "allreduce_latency_us": defaults.allreduce_latency_us or gpu.fabric.latency_us or 5.0,
        "collective": defaults.collective or COLLECTIVE_EFFICIENCY[gpu.fabric.kind],
    }
    out = {}
    for n, (lo, hi) in bounds.items():
        out[n] = min(max(values[n], lo + (hi - lo) * 1e-3), hi - (hi - lo) * 1e-3)
    return out


@dataclass(frozen=True)
class Fit:
    factors: CostFactors
    fitted: tuple[str, ...]
    error: ErrorStats


def fit_gpu(
    rows: Sequence[Row],
    gpu: GPUSpec,
    *,
    keep: frozenset[str] = frozenset(),
    max_evaluations: int = 4000,
    source: str = "measurements",
) -> Fit:
    """Fit ``gpu``'s cost factors to ``rows`` (all of that GPU type and of one format, from which the
    fit starts: ``gpu.factors_for(format)``); the factors named in ``keep`` stay as ``gpu`` has them
    (measured another way)."""
    formats = {r.run_dtype for r in rows}
    if len(formats) > 1:
        raise ValueError(f"fit_gpu fits one format at a time, got rows in {sorted(formats)}")
    run_dtype = formats.pop() if formats else "fp16"
    names = [n for n in fitted_names(rows) if n not in keep]
    values = sum(len(r.values) for r in rows)
    need = ROWS_PER_FACTOR * len(names)
    if values < need:
        raise HetserveError(
            f"{source}: {values} measurement(s) of {gpu.name} are too few to fit its {len(names)} factors "
            f"({', '.join(names)}); give at least {need} (more batch sizes, prompt lengths or TP degrees)"
        )
    defaults = gpu.factors_for(run_dtype)
    bounds = fit_bounds(rows, names)
    measured = np.log([m for r in rows for _, m in r.values])
    scale = np.array([SCALE[n] for n in names])
    algorithms = ("ring", "one-shot") if any(r.tp > 1 for r in rows) else (defaults.allreduce,)

    best: tuple[float, CostFactors] | None = None
    for algorithm in algorithms:
        for alt in (False, True):
            x0 = _start(defaults, gpu, bounds, alt)
            origin = np.array([x0[n] for n in names])

            def factors_at(x, algorithm=algorithm) -> CostFactors:
                return defaults.model_copy(update=dict(zip(names, map(float, x)), allreduce=algorithm))

            def residuals(x, origin=origin, factors_at=factors_at) -> np.ndarray:
                trial = with_factors(gpu, run_dtype, factors_at(x))
                cache: dict = {}
                pred = [p for r in rows for p in predict_ms(r, trial, cache)]
                bad = [p for p in pred if not p > 0]
                if bad:
                    return np.concatenate([np.full(len(pred), 10.0), (x - origin) / scale * PRIOR_WEIGHT])
                return np.concatenate([np.log(pred) - measured, (x - origin) / scale * PRIOR_WEIGHT])

            result = least_squares(
                residuals,
                origin,
                bounds=([bounds[n][0] for n in names], [bounds[n][1] for n in names]),
                x_scale=scale,
                max_nfev=max_evaluations,
                xtol=1e-10,
                ftol=1e-10,
            )
            cost = float(result.cost)
            if best is None or cost < best[0]:
                best = (cost, factors_at(result.x))
    assert best is not None
    factors = _tidy(best[1], bounds)
    return Fit(factors, tuple(names), errors(rows, with_factors(gpu, run_dtype, factors)))


def with_factors(gpu: GPUSpec, run_dtype: RunDType, factors: CostFactors) -> GPUSpec:
    """``gpu`` with ``factors`` for servers that compute in ``run_dtype`` (the other formats as before)."""
    per_dtype = {**gpu.efficiency_by_run_dtype, run_dtype: factors}
    return gpu.model_copy(update={"efficiency_by_run_dtype": per_dtype})


def _tidy(factors: CostFactors, bounds: dict[str, tuple[float, float]]) -> CostFactors:
    """Round fitted factors to 4 significant figures (the file stays readable; the rounding moves a
    prediction by < 0.05%)."""
    update = {}
    for n, (lo, hi) in bounds.items():
        value = getattr(factors, n)
        update[n] = lo if value - lo < (hi - lo) * 1e-6 else float(f"{value:.4g}")
    return factors.model_copy(update=update)


# ---- held-out rows ----------------------------------------------------------------------------------
HOLDOUT_COLUMNS = ("tp", "batch", "prompt", "model", "gpu")


def _column(row: Row, column: str):
    if column == "model":
        return row.model.name
    if column == "gpu":
        return row.gpu.name
    if column == "tp":
        return row.tp
    if column == "batch":
        return row.batch_tokens if isinstance(row, LayerRow) else row.batch
    if isinstance(row, LayerRow):
        return None  # per-layer rows have no prompt length
    return row.prompt


def holdout_split(
    rows: Sequence[Row], *, fraction: float | None = None, by: str | None = None, seed: int = 0
) -> tuple[list[Row], list[Row]]:
    """``(fit, held_out)``. ``fraction``: a random share of rows (fixed by ``seed``). ``by``: ``COLUMN``
    holds out the rows with the largest value of a numeric column (extrapolation: fit on TP 2 and 4,
    check TP 8), ``COLUMN=VALUE`` the rows with that value (e.g. ``model=llama-2-70b``)."""
    if fraction is not None:
        if not 0 < fraction < 1:
            raise HetserveError(f"--holdout={fraction} must be between 0 and 1 (a share of the rows)")
        order = list(range(len(rows)))
        random.Random(seed).shuffle(order)
        cut = set(order[: max(1, round(fraction * len(rows)))])
        return [r for i, r in enumerate(rows) if i not in cut], [r for i, r in enumerate(rows) if i in cut]
    if by is None:
        return list(rows), []
    column, _, value = by.partition("=")
    if column not in HOLDOUT_COLUMNS:
        raise HetserveError(f"--holdout-by={by}: column must be one of {', '.join(HOLDOUT_COLUMNS)}")
    keys = [_column(r, column) for r in rows]
    if any(k is None for k in keys):
        raise HetserveError(f"--holdout-by={by}: per-layer measurements have no '{column}' column")
    if value:
        pick: Callable = lambda k: str(k) == value
    else:
        if column in ("model", "gpu"):
            raise HetserveError(f"--holdout-by={by}: name the {column} to hold out, e.g. {column}=NAME")
        top = max(keys)
        pick = lambda k: k == top
    held = [r for r, k in zip(rows, keys) if pick(k)]
    if not held:
        raise HetserveError(f"--holdout-by={by}: no row has {column} = {value}")
    if len(held) == len(rows):
        raise HetserveError(f"--holdout-by={by}: every row would be held out; nothing is left to fit")
    return [r for r, k in zip(rows, keys) if not pick(k)], held


def fit_gemm_curve(points, peak_tflops: float) -> tuple[float, float, float, float]:
    """``(compute, gemm_half_rows, gemm_rows_exponent, median APE %)`` of the GEMM efficiency curve
    ``compute * (rows / (rows + half_rows)) ** exponent`` through measured products (``GemmPoint``s:
    rows, k, n, ms) against ``peak_tflops``."""
    rows = np.array([p.rows for p in points], dtype=float)
    flops = np.array([2.0 * p.rows * p.k * p.n for p in points])
    measured = np.log([p.ms * 1e-3 for p in points])

    def residuals(x):
        compute, half, exponent = x
        eff = compute * (rows / (rows + half)) ** exponent
        return np.log(flops / (peak_tflops * 1e12 * eff)) - measured

    result = least_squares(residuals, [0.8, 16.0, 1.0], bounds=([0.01, 0.0, 0.2], [1.0, 8192.0, 2.0]))
    apes = np.abs(np.expm1(-residuals(result.x))) * 100
    compute, half, exponent = (float(f"{v:.4g}") for v in result.x)
    return compute, half, exponent, float(np.median(apes))
