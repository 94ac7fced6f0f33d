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
from .loading import load_yaml_model, open_regular, show_value

#: Lowest and highest arrival rate (requests/s) a workload may ask for.
MIN_RATE, MAX_RATE = 1e-6, 100_000.0
#: Longest arrival window (s) a workload may ask for: 30 days.
MAX_DURATION_S = 30 * 86_400.0
#: Most requests one sample of a workload may hold (rate x duration, or a trace's rows).
MAX_REQUESTS = 10_000_000
#: Largest coefficient of variation of gamma inter-arrival times (bursty production traces: 2-8).
MAX_ARRIVAL_CV = 10.0
#: Most tokens of one prompt or one output.
MAX_TOKENS = 1 << 20
#: Largest coefficient of variation of a lognormal length.
MAX_LENGTH_CV = 100.0
#: Longest SLO target (ms): a day.
MAX_SLO_MS = 86_400_000.0
#: Largest trace file read, in bytes, and most rows (requests) in it.
MAX_TRACE_BYTES = 512 * 1024 * 1024
MAX_TRACE_ROWS = 5_000_000
#: Most prefix-block hash ids of one Mooncake request.
MAX_HASH_IDS = MAX_TOKENS // 16


# ---- arrivals ------------------------------------------------------------------------------------
class PoissonArrivals(Strict):
    kind: Literal["poisson"]
    rate: float = Field(ge=MIN_RATE, le=MAX_RATE, description="requests per second")


class GammaArrivals(Strict):
    kind: Literal["gamma"]
    rate: float = Field(ge=MIN_RATE, le=MAX_RATE, description="requests per second")
    cv: float = Field(
        gt=0,
        le=MAX_ARRIVAL_CV,
        description="coefficient of variation of inter-arrival times (1 = Poisson)",
    )


class TraceArrivals(Strict):
    kind: Literal["trace"]
    path: str
    format: Literal["azure", "mooncake", "auto"] = "auto"
    rate_scale: float = Field(default=1.0, ge=1e-6, le=1e6, description="multiply the trace's request rate")
    rate: float | None = Field(
        default=None, ge=MIN_RATE, le=MAX_RATE, description="rescale the trace to this mean rate"
    )


Arrivals = Annotated[PoissonArrivals | GammaArrivals | TraceArrivals, Field(discriminator="kind")]


# ---- lengths ---------------------------------------------------------------------------------------
class FixedLength(Strict):
    kind: Literal["fixed"]
    value: int = Field(ge=1, le=MAX_TOKENS)


class UniformLength(Strict):
    kind: Literal["uniform"]
    low: int = Field(ge=1, le=MAX_TOKENS)
    high: int = Field(ge=1, le=MAX_TOKENS)

    @model_validator(mode="after")
    def _order(self) -> UniformLength:
        if self.high < self.low:
            raise ValueError(f"high ({self.high}) must be >= low ({self.low})")
        return self


class LognormalLength(Strict):
    kind: Literal["lognormal"]
    mean: float = Field(gt=0, le=MAX_TOKENS)
    cv: float = Field(default=1.0, gt=0, le=MAX_LENGTH_CV)
    min: int = Field(default=1, ge=1, le=MAX_TOKENS)
    max: int = Field(default=32768, ge=1, le=MAX_TOKENS)

    @model_validator(mode="after")
    def _order(self) -> LognormalLength:
        if self.max < self.min:
            raise ValueError(f"max ({self.max}) must be >= min ({self.min})")
        return self


class EmpiricalLength(Strict):
    kind: Literal["empirical"]
    path: str
    format: Literal["azure", "mooncake", "auto"] = "auto"


Length = Annotated[
    FixedLength | UniformLength | LognormalLength | EmpiricalLength, Field(discriminator="kind")
]


class SLO(Strict):
    ttft_ms: float | None = Field(default=None, gt=0, le=MAX_SLO_MS, description="time to first token")
    tpot_ms: float | None = Field(
        default=None, gt=0, le=MAX_SLO_MS, description="time per output token after the first"
    )
    e2e_ms: float | None = Field(
        default=None, gt=0, le=MAX_SLO_MS, description="arrival -> last output token"
    )
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
    duration_s: float = Field(default=600.0, gt=0, le=MAX_DURATION_S)

    @model_validator(mode="after")
    def _lengths(self) -> WorkloadFile:
        if not isinstance(self.arrivals, TraceArrivals):
            missing = [k for k in ("prompt", "output") if getattr(self, k) is None]
            if missing:
                raise ValueError(f"'{missing[0]}' length distribution is required unless arrivals is a trace")
            expected = self.arrivals.rate * self.duration_s
            if expected > MAX_REQUESTS:
                raise ValueError(
                    f"arrivals.rate x duration_s is {expected:,.0f} requests, more than the "
                    f"{MAX_REQUESTS:,} a workload may hold; lower the rate or the duration"
                )
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
    (timestamp ms, input_length, output_length, hash_ids) as arrays; arrivals start at 0.

    The file must be a regular UTF-8 file of at most ``MAX_TRACE_BYTES`` and ``MAX_TRACE_ROWS`` rows;
    a row with a timestamp that is not a finite time or a token count outside 0..``MAX_TOKENS`` is an
    error naming its line."""
    p = Path(path)
    kind = _trace_format(p, fmt)
    times: list[float] = []
    prompts: list[int] = []
    outputs: list[int] = []
    hashes: list[tuple[int, ...]] = []
    line = 0

    def lines(raw):
        """The file's lines as text, counted in ``line``; a byte that is not UTF-8 names its line."""
        nonlocal line
        for number, data in enumerate(raw, 1):
            line = number
            try:
                yield data.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise HetserveError(
                    f"the trace is not UTF-8 text: byte 0x{data[exc.start]:02x} on line {number} cannot be "
                    "decoded; save it as UTF-8",
                    source=str(p),
                ) from None

    try:
        with open_regular(p, "trace file", MAX_TRACE_BYTES) as raw:
            if kind == "azure":
                reader = csv.DictReader(lines(raw))
                need = {"TIMESTAMP", "ContextTokens", "GeneratedTokens"}
                if not reader.fieldnames or not need <= set(reader.fieldnames):
                    found = [f[:40] for f in (reader.fieldnames or [])[:10]]
                    raise HetserveError(
                        f"an Azure trace needs columns {sorted(need)}, found {found}", source=str(p)
                    )
                for row in reader:
                    _count_row(len(times), p)
                    times.append(_azure_time(row["TIMESTAMP"]))
                    prompts.append(_tokens(row["ContextTokens"], "ContextTokens"))
                    outputs.append(_tokens(row["GeneratedTokens"], "GeneratedTokens"))
            else:
                for text_line in lines(raw):
                    if not text_line.strip():
                        continue
                    _count_row(len(times), p)
                    rec = json.loads(text_line)
                    if not isinstance(rec, dict):
                        raise ValueError(f"a record must be a JSON object, got a {type(rec).__name__}")
                    times.append(_finite_time(rec["timestamp"]) / 1000.0)
                    prompts.append(_tokens(rec["input_length"], "input_length"))
                    outputs.append(_tokens(rec["output_length"], "output_length"))
                    hashes.append(_hash_ids(rec.get("hash_ids", [])))
    except KeyError as exc:
        raise HetserveError(f"malformed {kind} trace: line {line} lacks {exc}", source=str(p)) from None
    except RecursionError:
        raise HetserveError(
            f"malformed {kind} trace: line {line} is nested too deeply", source=str(p)
        ) from None
    except (ValueError, TypeError, csv.Error) as exc:
        msg = " ".join(str(exc).split())[:200]
        raise HetserveError(f"malformed {kind} trace: line {line}: {msg}", source=str(p)) from None
    if not times:
        raise HetserveError("the trace holds no requests", source=str(p))
    t = np.asarray(times)
    order = np.argsort(t, kind="stable")
    t = t[order] - t[order][0]
    pr = np.maximum(np.asarray(prompts, dtype=np.int64)[order], 1)
    out = np.maximum(np.asarray(outputs, dtype=np.int64)[order], 1)
    hs = tuple(hashes[i] for i in order) if hashes else None
    return Trace(t, pr, out, hs)


def _count_row(rows: int, path: Path) -> None:
    if rows >= MAX_TRACE_ROWS:
        raise HetserveError(
            f"the trace has more than {MAX_TRACE_ROWS:,} requests; cut it to a window (e.g. with head)",
            source=str(path),
        )


def _tokens(value, column: str) -> int:
    """A token count of a trace row: a whole number from 0 to ``MAX_TOKENS``."""
    if isinstance(value, str):
        value = value.strip()
        number = int(value) if value.lstrip("-").isdigit() else None
    elif isinstance(value, int) and not isinstance(value, bool):
        number = value
    elif isinstance(value, float) and value.is_integer():
        number = int(value)
    else:
        number = None
    if number is None or not 0 <= number <= MAX_TOKENS:
        raise ValueError(
            f"{column} must be a whole number of tokens from 0 to {MAX_TOKENS:,}, got {show_value(value, 40)}"
        )
    return number


def _finite_time(value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"timestamp must be a finite number of milliseconds, got {show_value(value, 40)}")
    return float(value)


def _hash_ids(value) -> tuple[int, ...]:
    if not isinstance(value, list) or len(value) > MAX_HASH_IDS:
        raise ValueError(f"hash_ids must be a list of at most {MAX_HASH_IDS:,} integers")
    if not all(isinstance(h, int) and not isinstance(h, bool) for h in value):
        raise ValueError("hash_ids must hold integers only")
    return tuple(value)


def _azure_time(stamp: str | None) -> float:
    # "2023-11-16 18:17:03.9799600": seven fractional digits, more than datetime parses
    head, _, frac = (stamp or "").strip().partition(".")
    try:
        base = datetime.strptime(head, "%Y-%m-%d %H:%M:%S").timestamp()
        if frac and not frac.isdigit():
            raise ValueError
    except ValueError:
        raise ValueError(
            f"TIMESTAMP must be a time like 2023-11-16 18:17:03.979, got {repr(stamp)[:40]}"
        ) from None
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
        path = Path(p)
        try:
            path = path.expanduser()
        except RuntimeError:  # ~user of no known user: the path as written
            pass
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
        # the work is bounded where arrivals are drawn (at most MAX_REQUESTS) or by the trace's rows
        for flag, value in (("rate", rate), ("duration", duration_s)):
            if value is not None and not (math.isfinite(value) and value > 0):
                raise HetserveError(f"a {flag} of {value:g} is out of range: give a positive, finite number")
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
    """Arrival times in [0, horizon] with Gamma inter-arrivals of mean 1/rate and the given CV.

    Gaps are drawn in chunks until the horizon is passed. The work is bounded: at most ``MAX_REQUESTS``
    are expected, and the draws stop at four times the expected count (plus a margin for short windows),
    which a CV of at most ``MAX_ARRIVAL_CV`` passes with negligible probability; were it reached, the
    sample is refused rather than cut short."""
    expected = rate * horizon
    if not (math.isfinite(expected) and rate > 0 and horizon >= 0 and cv > 0):
        raise HetserveError(
            f"arrivals need a positive rate, duration and cv (got {rate:g}, {horizon:g}, {cv:g})"
        )
    if expected > MAX_REQUESTS:
        raise HetserveError(
            f"a rate of {rate:g} requests/s over {horizon:g} s is {expected:,.0f} requests, more than the "
            f"{MAX_REQUESTS:,} a sample may hold; lower the rate or the duration"
        )
    chunk = int(expected * 1.2 + 10 * math.sqrt(expected + 1) + 10)
    limit = 4 * chunk + 10_000
    shape = 1.0 / (cv * cv)
    scale = 1.0 / (rate * shape)
    parts: list[np.ndarray] = []
    drawn, last = 0, 0.0
    while last < horizon:
        if drawn >= limit:
            raise HetserveError(
                f"gamma arrivals with cv {cv:g} did not reach {horizon:g} s within {limit:,} requests; "
                "lower the cv"
            )
        size = min(chunk, limit - drawn)
        times = np.cumsum(rng.gamma(shape, scale, size=size)) + last
        parts.append(times)
        drawn += size
        last = float(times[-1])
    t = np.concatenate(parts)
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
