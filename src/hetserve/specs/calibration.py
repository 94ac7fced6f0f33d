"""A calibration file: fitted cost factors per GPU type, with how well they fit.

Written by ``hetserve calibrate`` (and, for the profiled device, ``hetserve profile``); read wherever
the cost model runs (``--calibration`` on estimate, simulate, plan and compare, ``calibration:`` on a
GPU in a cluster file). Applying a calibration replaces the ``efficiency:`` factors of the GPU types it
names; everything else about the GPU stays the catalogue's.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import Field

from ..errors import HetserveError, allowed
from .gpus import CostFactors, GPUSpec, Strict
from .loading import load_yaml_model

CALIBRATION_VERSION = 1


class PhaseError(Strict):
    n: int
    median_ape_pct: float
    p90_ape_pct: float


class FitError(Strict):
    n: int = Field(description="measurements compared")
    median_ape_pct: float
    p90_ape_pct: float
    by_phase: dict[str, PhaseError] = {}


class GPUCalibration(Strict):
    factors: CostFactors
    fitted: list[str] = Field(description="factors fitted to the measurements (the rest are defaults)")
    engine: str = ""
    rows: int = Field(ge=0, description="measurement rows fitted")
    fit: FitError
    uncalibrated: FitError | None = Field(default=None, description="the default factors on the same rows")
    heldout: FitError | None = None
    heldout_uncalibrated: FitError | None = None


class CalibrationFile(Strict):
    version: int = CALIBRATION_VERSION
    measurements: list[str] = Field(default=[], description="files the factors were fitted to")
    holdout: str = ""
    gpus: dict[str, GPUCalibration] = Field(min_length=1)


def load_calibration(path: str | Path) -> CalibrationFile:
    p = Path(path)
    if not p.is_file():
        raise HetserveError(f"calibration file {p} not found (write one with `hetserve calibrate`)")
    return load_yaml_model(CalibrationFile, p, "calibration file")


def apply_calibration(
    gpus: dict[str, GPUSpec], calibration: CalibrationFile, source: str, only: set[str] | None = None
) -> dict[str, GPUSpec]:
    """``gpus`` with the calibrated factors of every GPU type ``calibration`` covers (of ``only``, when
    given: the GPU types a cluster uses). Naming none of them is an error: the user meant to calibrate
    something."""
    wanted = set(gpus) if only is None else only
    hits = wanted & set(calibration.gpus)
    if not hits:
        raise HetserveError(
            f"calibration covers {allowed(calibration.gpus)}, none of the GPU types in use "
            f"({allowed(wanted)}); calibrate those types or drop --calibration",
            source=source,
        )
    out = dict(gpus)
    for name in hits:
        out[name] = gpus[name].model_copy(update={"efficiency": calibration.gpus[name].factors})
    return out


# ---- a profiled device ------------------------------------------------------------------------------
class GemmPoint(Strict):
    dtype: str
    rows: int = Field(gt=0)
    k: int = Field(gt=0)
    n: int = Field(gt=0)
    ms: float = Field(gt=0)
    tflops: float = Field(gt=0)


class AttentionPoint(Strict):
    phase: str
    tokens: int = Field(gt=0, description="prompt tokens (prefill) or sequences (decode)")
    context: int = Field(gt=0)
    ms: float = Field(gt=0)


class TransferPoint(Strict):
    bytes: int = Field(gt=0)
    ms: float = Field(gt=0)


class EngineRow(Strict):
    """One whole-model measurement of the real engine (the full-model CSV's columns)."""

    model: str
    tp: int = Field(ge=1)
    batch: int = Field(ge=1)
    prompt: int = Field(ge=1)
    output: int = Field(ge=1)
    prefill_ms: float = Field(gt=0)
    decode_ms: float = Field(gt=0)
    dtype: str = "fp32"


class ProfileMeasurements(Strict):
    gemm: list[GemmPoint] = []
    attention: list[AttentionPoint] = []
    copy_gb_per_s: float = Field(gt=0, description="memory bandwidth of a large tensor copy")
    allreduce: list[TransferPoint] = []
    kv_handoff: list[TransferPoint] = []
    engine: list[EngineRow] = []


class ProfileFile(Strict):
    """``hetserve profile``'s output: the device as a GPU type, the raw measurements, and the factors
    fitted to the engine's whole-model rows."""

    version: int = CALIBRATION_VERSION
    device: GPUSpec
    engine: str
    threads: int | None = None
    measurements: ProfileMeasurements
    calibration: GPUCalibration


def load_profile(path: str | Path) -> ProfileFile:
    p = Path(path)
    if not p.is_file():
        raise HetserveError(f"profile {p} not found (write one with `hetserve profile --out {p.name}`)")
    return load_yaml_model(ProfileFile, p, "profile")


def load_device(path: Path, field: str, source: str | None) -> GPUSpec:
    """The GPU type a profile describes, with its fitted factors (for a cluster file's ``include:``)."""
    try:
        profile = load_profile(path)
    except HetserveError as exc:
        raise HetserveError(f"{field}: {exc}", source=source) from None
    return profile.device.model_copy(update={"efficiency": profile.calibration.factors})
