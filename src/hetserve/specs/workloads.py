"""Workload specs: arrivals, prompt/output lengths and SLOs; sampling them into request arrays.

A workload file (YAML)::

    name: chat
    arrivals: {kind: poisson, rate: 4.0}            # or gamma (rate, cv) or trace (path, format)
    prompt:   {kind: lognormal, mean: 1000, cv: 1.0, max: 8000}
    output:   {kind: lognormal, mean: 250, cv: 1.0, max: 2000}
    slo:      {ttft_ms: 2000, tpot_ms: 100, percentile: 90}
    duration_s: 600

With ``arrivals: {kind: trace, path: azure_2023_conv.csv}`` the timestamps *and* the lengths come
from the trace unless ``prompt``/``output`` are also given. Relative paths are relative to the
workload file.
"""

from __future__ import annotations

import csv
import json
import math
from dataclasses import dataclass
from datetime import datetime
from functools import lru_cache
from pathlib import Path
from typing import Annotated, Literal

import numpy as np
from pydantic import Field, model_validator

from ..errors import HetserveError
from .gpus import Strict
from .loading import load_yaml_model


# ---- arrivals ------------------------------------------------------------------------------------
class PoissonArrivals(Strict):
    kind: Literal["poisson"]
    rate: float = Field(gt=0, description="requests per second")


class GammaArrivals(Strict):
    kind: Literal["gamma"]
    rate: float = Field(gt=0, description="requests per second")
    cv: float = Field(gt=0, description="coefficient of variation of inter-arrival times (1 = Poisson)")


class TraceArrivals(Strict):
    kind: Literal["trace"]
    path: str
    format: Literal["azure", "mooncake", "auto"] = "auto"
    rate_scale: float = Field(default=1.0, gt=0, description="multiply the trace's request rate")
    rate: float | None = Field(default=None, gt=0, description="rescale the trace to this mean rate")


Arrivals = Annotated[PoissonArrivals | GammaArrivals | TraceArrivals, Field(discriminator="kind")]


# ---- lengths ---------------------------------------------------------------------------------------
class FixedLength(Strict):
    kind: Literal["fixed"]
    value: int = Field(ge=1)


class UniformLength(Strict):
    kind: Literal["uniform"]
    low: int = Field(ge=1)
    high: int = Field(ge=1)

    @model_validator(mode="after")
    def _order(self) -> UniformLength:
        if self.high < self.low:
            raise ValueError(f"high ({self.high}) must be >= low ({self.low})")
        return self


class LognormalLength(Strict):
    kind: Literal["lognormal"]
    mean: float = Field(gt=0)
    cv: float = Field(default=1.0, gt=0)
    min: int = Field(default=1, ge=1)
    max: int = Field(default=32768, ge=1)


class EmpiricalLength(Strict):
    kind: Literal["empirical"]
    path: str
    format: Literal["azure", "mooncake", "auto"] = "auto"


Length = Annotated[
    FixedLength | UniformLength | LognormalLength | EmpiricalLength, Field(discriminator="kind")
]


class SLO(Strict):
    ttft_ms: float | None = Field(default=None, gt=0, description="time to first token")
    tpot_ms: float | None = Field(default=None, gt=0, description="time per output token after the first")
    e2e_ms: float | None = Field(default=None, gt=0, description="arrival -> last output token")
    percentile: float = Field(default=90, gt=0, le=100)

    @model_validator(mode="after")
    def _e2e_covers_ttft(self) -> SLO:
        if self.e2e_ms is not None and self.ttft_ms is not None and self.e2e_ms < self.ttft_ms:
            raise ValueError(
                f"e2e_ms ({self.e2e_ms:g}) is below ttft_ms ({self.ttft_ms:g}); the end-to-end "
                "latency includes the time to the first token"
            )
        return self


class WorkloadFile(Strict):
    name: str = "workload"
    arrivals: Arrivals
    prompt: Length | None = None
    output: Length | None = None
    slo: SLO = SLO()
    duration_s: float = Field(default=600.0, gt=0)

    @model_validator(mode="after")
    def _lengths(self) -> WorkloadFile:
        if not isinstance(self.arrivals, TraceArrivals):
            missing = [k for k in ("prompt", "output") if getattr(self, k) is None]
            if missing:
                raise ValueError(f"'{missing[0]}' length distribution is required unless arrivals is a trace")
        return self


@dataclass
class Requests:
    """Sampled requests as parallel arrays (sorted by arrival)."""

    arrival_s: np.ndarray
    prompt_tokens: np.ndarray
    output_tokens: np.ndarray
    block_hashes: list[list[int]] | None = None  # Mooncake prefix-block hash ids, when known

    def __len__(self) -> int:
        return len(self.arrival_s)

    @property
    def duration_s(self) -> float:
        return float(self.arrival_s[-1] - self.arrival_s[0]) if len(self) > 1 else 0.0


@dataclass(frozen=True)
class Trace:
    arrival_s: np.ndarray
    prompt_tokens: np.ndarray
    output_tokens: np.ndarray
    block_hashes: tuple[tuple[int, ...], ...] | None


def _trace_format(path: Path, fmt: str) -> str:
    if fmt != "auto":
        return fmt
    if path.suffix in (".jsonl", ".json"):
        return "mooncake"
    if path.suffix == ".csv":
        return "azure"
    raise HetserveError(f"cannot tell the trace format of {path.name}; set format: azure or mooncake")


@lru_cache(maxsize=8)
def read_trace(path: str, fmt: str = "auto") -> Trace:
    """An Azure LLM-inference CSV (TIMESTAMP, ContextTokens, GeneratedTokens) or a Mooncake JSONL
    (timestamp ms, input_length, output_length, hash_ids) as arrays; arrivals start at 0."""
    p = Path(path)
    if not p.exists():
        raise HetserveError(
            f"trace file not found: {p}; give a path relative to the workload file, or "
            "fetch the trace (docs/workloads.md says where)"
        )
    kind = _trace_format(p, fmt)
    times: list[float] = []
    prompts: list[int] = []
    outputs: list[int] = []
    hashes: list[tuple[int, ...]] = []
    try:
        if kind == "azure":
            with p.open(newline="") as fh:
                reader = csv.DictReader(fh)
                need = {"TIMESTAMP", "ContextTokens", "GeneratedTokens"}
                if not reader.fieldnames or not need <= set(reader.fieldnames):
                    raise HetserveError(
                        f"an Azure trace needs columns {sorted(need)}, found {reader.fieldnames}",
                        source=str(p),
                    )
                for row in reader:
                    times.append(_azure_time(row["TIMESTAMP"]))
                    prompts.append(int(row["ContextTokens"]))
                    outputs.append(int(row["GeneratedTokens"]))
        else:
            with p.open() as fh:
                for line in fh:
                    if not line.strip():
                        continue
                    rec = json.loads(line)
                    times.append(float(rec["timestamp"]) / 1000.0)
                    prompts.append(int(rec["input_length"]))
                    outputs.append(int(rec["output_length"]))
                    hashes.append(tuple(rec.get("hash_ids", ())))
    except (KeyError, ValueError) as exc:
        if isinstance(exc, HetserveError):
            raise
        raise HetserveError(f"malformed {kind} trace: {exc}", source=str(p)) from None
    if not times:
        raise HetserveError("the trace holds no requests", source=str(p))
    t = np.asarray(times)
    order = np.argsort(t, kind="stable")
    t = t[order] - t[order][0]
    pr = np.maximum(np.asarray(prompts)[order], 1)
    out = np.maximum(np.asarray(outputs)[order], 1)
    hs = tuple(hashes[i] for i in order) if hashes else None
    return Trace(t, pr, out, hs)


def _azure_time(stamp: str) -> float:
    # "2023-11-16 18:17:03.9799600": seven fractional digits, more than datetime parses
    head, _, frac = stamp.strip().partition(".")
    base = datetime.strptime(head, "%Y-%m-%d %H:%M:%S").timestamp()
    return base + (float("0." + frac) if frac else 0.0)


class Workload:
    """A validated workload; ``sample`` turns it into concrete requests."""

    def __init__(self, spec: WorkloadFile, base_dir: Path = Path("."), source: str | None = None):
        self.spec = spec
        self.name = spec.name
        self.slo = spec.slo
        self.base_dir = base_dir
        self.source = source
        for field, value in (("arrivals", spec.arrivals), ("prompt", spec.prompt), ("output", spec.output)):
            if isinstance(value, (TraceArrivals, EmpiricalLength)):
                try:
                    read_trace(str(self._path(value.path)), value.format)
                except HetserveError as exc:
                    raise HetserveError(f"{field}.path: {exc}", source=source) from None

    @classmethod
    def load(cls, path: str | Path) -> Workload:
        spec = load_yaml_model(WorkloadFile, path, "workload file")
        return cls(spec, Path(path).parent, source=str(path))

    def _path(self, p: str) -> Path:
        path = Path(p).expanduser()
        return path if path.is_absolute() else self.base_dir / path

    def _trace(self, value) -> Trace:
        return read_trace(str(self._path(value.path)), value.format)

    @property
    def mean_rate(self) -> float:
        a = self.spec.arrivals
        if isinstance(a, TraceArrivals):
            tr = self._trace(a)
            span = float(tr.arrival_s[-1]) or 1.0
            return a.rate if a.rate else len(tr.arrival_s) / span * a.rate_scale
        return a.rate

    def length_stats(self, percentile: float, seed: int = 0, n: int = 20000) -> tuple[float, float, float]:
        """Mean prompt and output tokens, and output tokens at ``percentile`` (0-100: what an E2E target at
        that percentile is planned for), from one sample (exact for traces; sampled for distributions)."""
        rng = np.random.default_rng(seed)
        trace = self._trace(self.spec.arrivals) if isinstance(self.spec.arrivals, TraceArrivals) else None
        p = self._lengths(self.spec.prompt, n, rng, trace, "prompt")
        o = self._lengths(self.spec.output, n, rng, trace, "output")
        return float(np.mean(p)), float(np.mean(o)), float(np.percentile(o, percentile))

    def long_request(self, seed: int = 0, percentile: float = 99, n: int = 2000) -> float:
        """Prompt + output tokens of a long request: the ``percentile`` of about ``n`` sampled requests (what
        a KV share must hold so that long requests are not dropped)."""
        reqs = self.sample(seed=seed, duration_s=n / max(self.mean_rate, 1e-9))
        total = reqs.prompt_tokens + reqs.output_tokens
        if not len(total):
            prompt, output, _ = self.length_stats(percentile, seed)
            return prompt + output
        return float(np.percentile(total, percentile))

    def sample(self, seed: int = 0, duration_s: float | None = None, rate: float | None = None) -> Requests:
        """Requests arriving within ``duration_s`` (default: the file's; a trace: its length unless
        given). ``rate`` overrides the mean arrival rate (used by the planner's rate search)."""
        rng = np.random.default_rng(seed)
        a = self.spec.arrivals
        hashes = None
        trace = None
        if isinstance(a, TraceArrivals):
            trace = self._trace(a)
            scale = a.rate_scale
            if a.rate or rate:
                native = len(trace.arrival_s) / max(float(trace.arrival_s[-1]), 1e-9)
                scale = (rate or a.rate) / native
            t = trace.arrival_s / scale
            keep = t <= duration_s if duration_s is not None else np.ones(len(t), bool)
            t = t[keep]
            n = len(t)
            idx = np.nonzero(keep)[0]
            if trace.block_hashes is not None:
                hashes = [list(trace.block_hashes[i]) for i in idx]
        else:
            horizon = duration_s if duration_s is not None else self.spec.duration_s
            lam = rate or a.rate
            cv = a.cv if isinstance(a, GammaArrivals) else 1.0
            t = _gamma_arrivals(rng, lam, cv, horizon)
            n = len(t)
            idx = None
        prompt = self._lengths(self.spec.prompt, n, rng, trace, "prompt", idx)
        output = self._lengths(self.spec.output, n, rng, trace, "output", idx)
        return Requests(t, prompt, output, hashes)

    def _lengths(self, dist, n, rng, trace: Trace | None, which: str, idx=None) -> np.ndarray:
        if dist is None:
            assert trace is not None
            col = trace.prompt_tokens if which == "prompt" else trace.output_tokens
            return (col[idx] if idx is not None else col[:n]).copy()
        return sample_lengths(
            dist, n, rng, self._trace(dist) if isinstance(dist, EmpiricalLength) else None, which
        )


def _gamma_arrivals(rng: np.random.Generator, rate: float, cv: float, horizon: float) -> np.ndarray:
    """Arrival times in [0, horizon] with Gamma inter-arrivals of mean 1/rate and the given CV."""
    expected = int(rate * horizon * 1.2 + 10 * math.sqrt(rate * horizon + 1) + 10)
    shape = 1.0 / (cv * cv)
    scale = 1.0 / (rate * shape)
    gaps = rng.gamma(shape, scale, size=expected)
    t = np.cumsum(gaps)
    while t[-1] < horizon:
        more = np.cumsum(rng.gamma(shape, scale, size=expected)) + t[-1]
        t = np.concatenate([t, more])
    return t[t <= horizon]


def sample_lengths(dist, n: int, rng: np.random.Generator, trace: Trace | None, which: str) -> np.ndarray:
    if isinstance(dist, FixedLength):
        return np.full(n, dist.value, dtype=np.int64)
    if isinstance(dist, UniformLength):
        return rng.integers(dist.low, dist.high + 1, size=n)
    if isinstance(dist, LognormalLength):
        sigma2 = math.log(1 + dist.cv**2)
        mu = math.log(dist.mean) - sigma2 / 2
        x = rng.lognormal(mu, math.sqrt(sigma2), size=n)
        return np.clip(np.rint(x), dist.min, dist.max).astype(np.int64)
    assert trace is not None
    col = trace.prompt_tokens if which == "prompt" else trace.output_tokens
    return rng.choice(col, size=n, replace=True)
