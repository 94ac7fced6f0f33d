"""One GPU type's calibration from its measurements: a fit per format the engine ran in.

An engine's speed differs by format more than a GPU's peaks say: on a CPU without a native bf16
matrix-vector path a bf16 decode step is slower than an fp32 one although a large bf16 matrix product
runs faster. So the rows of each format (``run_dtype``: fp32, bf16, fp16) get their own fit, and a
server is timed with the fit of the format it computes in (``GPUSpec.factors_for``). The main fit is
the one of ``main`` (``hetserve profile``: the first of ``--dtypes``) or else of the format with the
most rows (the first one seen on a tie); it also times servers in formats no row measured.
"""

from __future__ import annotations

from collections.abc import Sequence

from ..errors import HetserveError
from ..specs.calibration import FactorFit, FitError, GPUCalibration
from ..specs.gpus import GPUSpec
from ..vocabulary import RunDType
from .fit import ErrorStats, errors, fit_gpu
from .measurements import Row


def by_run_dtype(rows: Sequence[Row]) -> dict[RunDType, list[Row]]:
    """``rows`` grouped by the format they ran in, formats in the order they first appear."""
    out: dict[RunDType, list[Row]] = {}
    for row in rows:
        out.setdefault(row.run_dtype, []).append(row)
    return out


def main_run_dtype(groups: dict[RunDType, list[Row]], main: RunDType | None = None) -> RunDType:
    """``main`` if given (it must have rows), else the format with the most rows (the first on a tie)."""
    if main is not None:
        if main not in groups:
            raise HetserveError(f"no measurement ran in {main}, the main format; measure it or pick another")
        return main
    return max(groups, key=lambda dtype: len(groups[dtype]))  # max keeps the first of equal counts


def _stats(error: ErrorStats) -> FitError:
    return FitError.model_validate(error.as_dict())


def calibrate_gpu(
    rows: Sequence[Row],
    gpu: GPUSpec,
    *,
    engine: str,
    source: str,
    held: Sequence[Row] = (),
    main: RunDType | None = None,
    baseline: GPUSpec | None = None,
) -> GPUCalibration:
    """The calibration of ``gpu`` from ``rows`` (all of it): each format's rows fitted apart, from that
    format's factors on ``gpu``. ``held``: rows of ``gpu`` kept out of the fit and only predicted (each
    with its format's fit). ``baseline``: the GPU whose factors the ``uncalibrated`` errors are of
    (default ``gpu``). Raises HetserveError when a format has too few rows for its factors or all of a
    format's rows are held out."""
    baseline = baseline or gpu
    groups = by_run_dtype(rows)
    if not groups:
        raise HetserveError(f"{source}: no measurement of {gpu.name} to fit")
    held_groups = by_run_dtype(held)
    unfitted = sorted(held_groups.keys() - groups.keys())
    if unfitted:
        raise HetserveError(
            f"every {unfitted[0]} measurement of {gpu.name} is held out; hold out fewer rows to calibrate "
            f"{gpu.name} in {unfitted[0]}"
        )
    fits: dict[RunDType, FactorFit] = {}
    for dtype, mine in groups.items():
        fit = fit_gpu(mine, gpu, source=f"{source} ({dtype} rows)")
        fitted = gpu.model_copy(update={"efficiency": fit.factors, "efficiency_by_run_dtype": {}})
        theirs = held_groups.get(dtype, [])
        fits[dtype] = FactorFit(
            factors=fit.factors,
            fitted=list(fit.fitted),
            engine=engine,
            rows=len(mine),
            fit=_stats(fit.error),
            uncalibrated=_stats(errors(mine, baseline)),
            heldout=_stats(errors(theirs, fitted)) if theirs else None,
            heldout_uncalibrated=_stats(errors(theirs, baseline)) if theirs else None,
        )
    dtype = main_run_dtype(groups, main)
    return GPUCalibration(**dict(fits.pop(dtype)), dtype=dtype, per_dtype=fits)
