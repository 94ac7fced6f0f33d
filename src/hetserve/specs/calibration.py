"""A calibration file: fitted cost factors per GPU type, with how well they fit.

Written by ``hetserve calibrate`` (and, for the profiled device, ``hetserve profile``); read wherever
the cost model runs (``--calibration`` on estimate, simulate, plan and compare, ``calibration:`` on a
GPU in a cluster file). A GPU type's calibration holds one fit per format its measurements ran in
(fp32, bf16, fp16): the main one, and the others under ``per_dtype``. Applying it replaces the
``efficiency:`` factors of the GPU types it names with the main fit's and ``efficiency_by_run_dtype``
with the others'; everything else about the GPU stays the catalogue's.

Version 1 files (before fits per format) load unchanged: their one factor set times every format.
"""

from __future__ import annotations

import statistics
from pathlib import Path

from pydantic import Field, field_validator, model_validator

from ..errors import HetserveError, allowed
from ..vocabulary import RunDType
from .gpus import CostFactors, GPUSpec, Strict
from .loading import load_yaml_model

#: Format of calibration and profile files: 2 added fits per run format (``GPUCalibration.dtype`` and
#: ``per_dtype``, ``GPUSpec.efficiency_by_run_dtype``); version 1 files read as they are.
CALIBRATION_VERSION = 2


class Versioned(Strict):
    version: int = Field(default=CALIBRATION_VERSION, description="file format (CALIBRATION_VERSION)")

    @field_validator("version")
    @classmethod
    def _readable(cls, version: int) -> int:
        if not 1 <= version <= CALIBRATION_VERSION:
            raise ValueError(
                f"a format this hetserve does not read (it reads 1 to {CALIBRATION_VERSION}); "
                "write the file again with this hetserve (`hetserve calibrate` or `hetserve profile`) or "
                "use the hetserve that wrote it"
            )
        return version


class PhaseError(Strict):
    n: int
    median_ape_pct: float
    p90_ape_pct: float


class FitError(Strict):
    n: int = Field(description="measurements compared")
    median_ape_pct: float
    p90_ape_pct: float
    by_phase: dict[str, PhaseError] = {}


class FactorFit(Strict):
    """Cost factors fitted to one engine's measurements in one format, with how well they fit."""

    factors: CostFactors
    fitted: list[str] = Field(description="factors fitted to the measurements (the rest are defaults)")
    engine: str = ""
    rows: int = Field(ge=0, description="measurement rows fitted")
    fit: FitError
    uncalibrated: FitError | None = Field(default=None, description="the default factors on the same rows")
    heldout: FitError | None = None
    heldout_uncalibrated: FitError | None = None


class GPUCalibration(FactorFit):
    """One GPU type's calibration: the fit of its main format (``factors``, which also time servers in
    a format without a fit of its own) and a fit per further format its measurements ran in."""

    dtype: RunDType | None = Field(
        default=None,
        description="format of the rows ``factors`` was fitted to (the one with the most rows; `hetserve "
        "profile`: the first of --dtypes); absent in version 1 files",
    )
    per_dtype: dict[RunDType, FactorFit] = Field(
        default={},
        description="fits to the rows of each further format, for servers that compute in it (default: "
        "none; every format uses ``factors``)",
    )

    @model_validator(mode="after")
    def _main_not_repeated(self) -> GPUCalibration:
        if self.dtype is not None and self.dtype in self.per_dtype:
            raise ValueError(
                f"per_dtype.{self.dtype}: {self.dtype} is the main format (dtype), fitted in `factors`; "
                "remove one of the two"
            )
        return self

    def apply_to(self, gpu: GPUSpec) -> GPUSpec:
        """``gpu`` timed with these fits: ``efficiency`` the main one, ``efficiency_by_run_dtype`` the
        others (replacing any the GPU had: they were not fitted with these)."""
        per_dtype = {dtype: fit.factors for dtype, fit in self.per_dtype.items()}
        return gpu.model_copy(update={"efficiency": self.factors, "efficiency_by_run_dtype": per_dtype})


class CalibrationFile(Versioned):
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
        out[name] = calibration.gpus[name].apply_to(gpus[name])
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
    dtype: RunDType = Field(default="fp32", description="the format the engine ran in")


class ServedSteps(Strict):
    """Requests run one at a time through ``hetserve serve --plan`` (one worker) and through the engine
    in-process, in pairs (request i served, then run in-process, before request i + 1): the serving
    runtime's time per step is the pairs' difference."""

    dtype: RunDType = Field(description="the format the worker and the engine ran in")
    prompt: int = Field(ge=1, description="prompt tokens of each request")
    output: int = Field(ge=2, description="output tokens of each request")
    served_tpot_ms: list[float] = Field(
        min_length=1, description="per request: (last token - first token) / (tokens - 1), at the client"
    )
    engine_step_ms: list[float] = Field(
        min_length=1, description="per request: the mean in-process decode step"
    )
    served_ttft_ms: list[float] = Field(
        default=[], description="per request: from sending it to its first token, at the client"
    )
    engine_first_step_ms: list[float] = Field(
        default=[], description="per request: its first in-process step (the prefill and the first token)"
    )

    @model_validator(mode="after")
    def _paired(self) -> ServedSteps:
        if len(self.served_tpot_ms) != len(self.engine_step_ms):
            raise ValueError(
                f"served_tpot_ms has {len(self.served_tpot_ms)} requests, engine_step_ms "
                f"{len(self.engine_step_ms)}: they are pairs, one of each per request"
            )
        if len(self.served_ttft_ms) != len(self.engine_first_step_ms):
            raise ValueError(
                f"served_ttft_ms has {len(self.served_ttft_ms)} requests, engine_first_step_ms "
                f"{len(self.engine_first_step_ms)}: they are pairs, one of each per request"
            )
        return self

    @property
    def request_overhead_ms(self) -> float:
        """Time per request serving adds before its first step: the median of the pairs' first-token
        differences less the time per step (which its first step pays as every step does); none when not
        measured (profiles written before it) or measured faster."""
        if not self.served_ttft_ms:
            return 0.0
        pairs = zip(self.served_ttft_ms, self.engine_first_step_ms)
        return max(0.0, statistics.median(served - engine for served, engine in pairs) - self.overhead_ms)

    @property
    def overhead_ms(self) -> float:
        """Time per step serving adds: the median of the pairs' differences (none when the runtime
        measured faster: noise, not a negative cost)."""
        pairs = zip(self.served_tpot_ms, self.engine_step_ms)
        return max(0.0, statistics.median(served - engine for served, engine in pairs))


class ProfileMeasurements(Strict):
    gemm: list[GemmPoint] = []
    attention: list[AttentionPoint] = Field(default=[], description="in the main format only")
    copy_gb_per_s: float = Field(gt=0, description="memory bandwidth of a large tensor copy")
    allreduce: list[TransferPoint] = []
    kv_handoff: list[TransferPoint] = []
    engine: list[EngineRow] = []
    serving: ServedSteps | None = Field(
        default=None,
        description="the serving runtime's time per step, added to every engine row before the fit (none: "
        "not measured, as with --quick and in version 1 files; the factors then describe the engine "
        "in-process)",
    )

    @property
    def serving_overhead_ms(self) -> float:
        """Time per step the serving runtime adds to the engine rows' steps (0 when not measured)."""
        return self.serving.overhead_ms if self.serving is not None else 0.0


class ProfileFile(Versioned):
    """``hetserve profile``'s output: the device as a GPU type, the raw measurements, and the factors
    fitted to the engine's whole-model rows, one fit per format the engine was measured in."""

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
    return profile.calibration.apply_to(profile.device)
