"""GPU specs: one accelerator type, with a source for every figure.

The shipped catalogue lives in ``specs/data/gpus.yaml``; a cluster file may add GPUs or override fields
of catalogued ones (``gpus:`` section). Throughput figures are *dense* (no structured sparsity).
"""

from __future__ import annotations

import typing
from functools import cache, lru_cache
from importlib import resources
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from ..vocabulary import RunDType

Vendor = Literal["nvidia", "amd", "huawei", "intel", "other"]
FabricKind = Literal["nvlink", "xgmi", "hccs", "pcie", "roce", "infinity-fabric", "none"]
DType = Literal["fp32", "fp16", "bf16", "fp8", "int8", "int4"]

#: Numeric dtypes in the order a cost model prefers for 16-bit work.
HALF_DTYPES: tuple[DType, ...] = ("bf16", "fp16")


class Strict(BaseModel):
    """Base for every user-facing spec: unknown keys are errors (catches misspelt keys), numbers are
    finite (``.inf``/``.nan`` are refused) and true/false is not a number (``count: true`` is refused
    where YAML would make it 1)."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    @model_validator(mode="before")
    @classmethod
    def _no_bool_numbers(cls, data: Any) -> Any:
        if isinstance(data, dict):
            numeric = _numeric_fields(cls)
            for name, value in data.items():
                if name in numeric and _holds_bool(value):
                    raise ValueError(f"{name}: true/false is not a number; give a number")
        return data


@cache
def _numeric_fields(model: type[BaseModel]) -> frozenset[str]:
    """The fields of ``model`` whose type does not take true/false."""
    return frozenset(name for name, f in model.model_fields.items() if not _admits_bool(f.annotation))


def _holds_bool(value: Any) -> bool:
    """A bool, or a list or mapping with a bool among its values (one level: nested specs check theirs)."""
    kind = type(value)
    if kind is bool:
        return True
    if kind is list or kind is tuple:
        return bool in map(type, value)
    if kind is dict:
        return bool in map(type, value.values())
    return False


def _admits_bool(annotation: Any) -> bool:
    """Whether a field's type takes true/false itself (bool) or leaves it to a nested spec to judge."""
    if annotation is bool or annotation is Any:
        return True
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return True
    return any(_admits_bool(arg) for arg in typing.get_args(annotation))


#: Bounds of a GPU's figures: wide enough for any real accelerator, narrow enough that no cost-model
#: time overflows or takes forever to simulate (a fabric of 0 GB/s would divide by zero).
MIN_GB_PER_S, MAX_GB_PER_S = 0.01, 1e6
MAX_LATENCY_US = 1e6
MAX_MEMORY_GB = 1e5
MAX_TFLOPS = 1e6
MAX_WATTS = 1e5
MAX_PRICE_PER_HOUR = 1e5


class Fabric(Strict):
    kind: FabricKind
    gb_per_s: float = Field(
        ge=MIN_GB_PER_S, le=MAX_GB_PER_S, description="GB/s per direction per GPU (at least 0.01)"
    )
    latency_us: float = Field(
        default=5.0, ge=0, le=MAX_LATENCY_US, description="one-hop latency of a collective step"
    )


AllReduceAlgorithm = Literal["ring", "one-shot", "auto"]


class CostFactors(Strict):
    """The cost model's correction factors for one GPU type (the ``efficiency:`` key of a GPU entry).

    The defaults reproduce the plain roofline: every GEMM at ``compute`` of peak whatever its shape,
    compute and memory traffic fully overlapped, attention at the GEMM factors, 20 us per layer, no
    per-step cost, ring all-reduces over the fabric at ``COLLECTIVE_EFFICIENCY`` of its bandwidth.
    ``hetserve calibrate`` and ``hetserve profile`` fit them to measurements of the engine a user runs
    (docs/costmodel.md lists each factor, its default and the source of the default).
    """

    compute: float = Field(
        default=0.7, gt=0, le=1, description="fraction of peak FLOPS a large GEMM sustains"
    )
    memory: float = Field(
        default=0.8, gt=0, le=1, description="fraction of peak memory bandwidth weight reads sustain"
    )
    gemm_half_rows: float = Field(
        default=0.0,
        ge=0,
        le=1e5,
        description="rows (batch or chunk tokens) at which a GEMM reaches half of `compute` (with exponent "
        "1); 0 = all shapes at `compute`",
    )
    gemm_rows_exponent: float = Field(
        default=1.0,
        gt=0,
        le=4,
        description="shape of the GEMM efficiency curve: efficiency = compute x (rows / (rows + "
        "gemm_half_rows)) ** exponent; below 1 the curve rises more slowly (CPU and small-GEMM kernels)",
    )
    overlap: float = Field(
        default=1.0,
        ge=0,
        le=1,
        description="how far compute and memory traffic overlap: 1 = the slower of the two (roofline), "
        "0 = their sum",
    )
    attention_compute: float | None = Field(
        default=None, gt=0, le=1, description="fraction of peak FLOPS of prefill attention; default: compute"
    )
    attention_memory: float | None = Field(
        default=None, gt=0, le=1, description="fraction of peak bandwidth of decode KV reads; default: memory"
    )
    layer_overhead_us: float = Field(
        default=20.0, ge=0, le=1e5, description="fixed time per layer and step (launches, norms, small ops)"
    )
    step_overhead_ms: float = Field(
        default=0.0,
        ge=0,
        le=1e4,
        description="fixed time per engine step (scheduler, input preparation), once per step of a pipeline",
    )
    request_overhead_ms: float = Field(
        default=0.0,
        ge=0,
        le=1e4,
        description="fixed time per request before its first step (the serving stack's API, tokeniser and "
        "hand-over to the engine), beyond the steps' own overhead",
    )
    allreduce: AllReduceAlgorithm = Field(
        default="ring", description="tensor-parallel all-reduce: ring, one-shot (NVSwitch-style) or auto"
    )
    allreduce_latency_us: float | None = Field(
        default=None, ge=0, le=1e5, description="latency of one all-reduce step; default: fabric latency_us"
    )
    collective: float | None = Field(
        default=None,
        gt=0,
        le=1,
        description="fraction of fabric bandwidth collectives achieve; default: per fabric kind",
    )

    @property
    def attention_compute_or_default(self) -> float:
        return self.attention_compute if self.attention_compute is not None else self.compute

    @property
    def attention_memory_or_default(self) -> float:
        return self.attention_memory if self.attention_memory is not None else self.memory


class GPUSpec(Strict):
    name: str
    vendor: Vendor
    memory_gb: float = Field(gt=0, le=MAX_MEMORY_GB, description="device memory, GB (1e9 bytes)")
    memory_bw_gb_per_s: float = Field(ge=MIN_GB_PER_S, le=MAX_GB_PER_S, description="memory bandwidth, GB/s")
    tflops: dict[DType, float] = Field(description="dense TFLOPS (TOPS for int) per dtype")
    fabric: Fabric
    tdp_w: float = Field(gt=0, le=MAX_WATTS)
    idle_w: float | None = Field(
        default=None, ge=0, le=MAX_WATTS, description="idle draw; default 20% of TDP"
    )
    price_per_hour: float = Field(ge=0, le=MAX_PRICE_PER_HOUR, description="USD per GPU-hour")
    weight_dtypes: list[str] = Field(description="weight formats with a native or fused kernel path")
    kv_dtypes: list[DType]
    efficiency: CostFactors = CostFactors()
    efficiency_by_run_dtype: dict[RunDType, CostFactors] = Field(
        default={},
        description="cost factors of servers that compute in a given format (fp32, bf16, fp16), where the "
        "engine's speed differs by format more than the peaks say (a CPU without a native bf16 matrix-vector "
        "path); a format not listed uses `efficiency`. Default: none (every format uses `efficiency`); "
        "`hetserve profile` writes one entry per format it measured besides its main one",
    )
    sources: dict[str, str] = Field(description="field name -> where the figure comes from")
    notes: str = ""

    @model_validator(mode="after")
    def _check(self) -> GPUSpec:
        for dtype, value in self.tflops.items():
            if not 0.001 <= value <= MAX_TFLOPS:
                raise ValueError(
                    f"tflops.{dtype} must be between 0.001 and {MAX_TFLOPS:g} (leave the dtype out if "
                    "unsupported)"
                )
        if not any(d in self.tflops for d in ("fp16", "bf16")):
            raise ValueError("tflops needs fp16 or bf16: the cost model times 16-bit work with it")
        return self

    def __hash__(self) -> int:  # specs key cost-model caches; equal specs share a name
        return hash(self.name)

    @property
    def idle_watts(self) -> float:
        return self.idle_w if self.idle_w is not None else 0.2 * self.tdp_w

    @property
    def half_tflops(self) -> float:
        """Dense 16-bit tensor throughput (the faster of bf16/fp16 the GPU has)."""
        return max(self.tflops.get(d, 0.0) for d in HALF_DTYPES)

    def factors_for(self, run_dtype: RunDType) -> CostFactors:
        """The cost factors of a server that computes in ``run_dtype``: its own entry, else ``efficiency``."""
        return self.efficiency_by_run_dtype.get(run_dtype, self.efficiency)

    def run_tflops(self, run_dtype: RunDType) -> float:
        """Peak of the 16-bit-weight GEMMs of a server that computes in ``run_dtype``: that format's own
        figure when ``tflops`` lists it, else the 16-bit peak (``half_tflops``)."""
        return self.tflops.get(run_dtype) or self.half_tflops

    def tflops_for_bits(self, weight_bits: int) -> float:
        """Throughput of a matmul whose weights have ``weight_bits``; activations stay 16-bit unless
        the GPU has a native low-precision path (fp8/int8 at 8 bits)."""
        if weight_bits == 8:
            native = max(self.tflops.get("fp8", 0.0), self.tflops.get("int8", 0.0))
            if native and ("fp8" in self.weight_dtypes or "int8" in self.weight_dtypes):
                return native
        return self.half_tflops

    def has_native_weight_path(self, weight_bits: int) -> bool:
        """Whether low-bit weights run without a separate dequantisation pass."""
        if weight_bits >= 16:
            return True
        names = {8: ("fp8", "int8"), 4: ("int4", "fp4", "nf4"), 3: ("int3",)}.get(weight_bits, ())
        return any(n in self.weight_dtypes for n in names)


class GPUOverride(Strict):
    """Fields a cluster file may change on a catalogued GPU (or, all given, a new one)."""

    vendor: Vendor | None = None
    memory_gb: float | None = Field(default=None, gt=0, le=MAX_MEMORY_GB)
    memory_bw_gb_per_s: float | None = Field(default=None, ge=MIN_GB_PER_S, le=MAX_GB_PER_S)
    tflops: dict[DType, float] | None = None
    fabric: Fabric | None = None
    tdp_w: float | None = Field(default=None, gt=0, le=MAX_WATTS)
    idle_w: float | None = Field(default=None, ge=0, le=MAX_WATTS)
    price_per_hour: float | None = Field(default=None, ge=0, le=MAX_PRICE_PER_HOUR)
    weight_dtypes: list[str] | None = None
    kv_dtypes: list[DType] | None = None
    efficiency: CostFactors | None = None
    efficiency_by_run_dtype: dict[RunDType, CostFactors] | None = None
    sources: dict[str, str] | None = None
    notes: str | None = None
    base: str | None = Field(default=None, description="catalogued GPU to start from")
    calibration: str | None = Field(
        default=None,
        description="calibration file (from `hetserve calibrate`) whose factors for this GPU type apply; "
        "relative to the cluster file",
    )


class Catalog(Strict):
    gpus: list[GPUSpec]


@lru_cache(maxsize=1)
def builtin_gpus() -> dict[str, GPUSpec]:
    """The shipped catalogue, keyed by name."""
    from .loading import load_yaml_model

    path = resources.files("hetserve.specs").joinpath("data/gpus.yaml")
    catalog = load_yaml_model(Catalog, path)
    return {gpu.name: gpu for gpu in catalog.gpus}
