"""Timing measurements the cost model is fitted to, read from the files users have.

Two kinds of rows:

- ``LayerRow``: the time of ONE transformer layer (16-bit) for a prefill batch of ``batch_tokens``
  prompt tokens or a decode step of ``batch_tokens`` sequences, as in Helix's published per-layer
  profiles (columns ``model,machine,gpu,gpus_per_machine,phase,batch_tokens,ms_per_layer``);
- ``ModelRow``: a whole model on ``tp`` GPUs: the prefill of ``batch`` prompts of ``prompt`` tokens
  (``prefill_ms``) and the mean decode step of that batch while it writes ``output`` tokens
  (``decode_ms``); columns ``model,gpu,tp,batch,prompt,output,prefill_ms,decode_ms`` and optionally
  ``engine`` (the serving stack) and ``dtype`` (the format it computed in: fp16, bf16 or fp32;
  default fp16). ``hetserve profile`` writes its engine measurements as model rows.

Each row carries the format it ran in (``run_dtype``): factors are fitted per format.

Every reader names the file, row and column of the first mistake it finds (``HetserveError``).
"""

from __future__ import annotations

import csv
import math
from dataclasses import dataclass
from pathlib import Path

from ..errors import HetserveError, allowed, suggest
from ..specs.gpus import GPUSpec
from ..specs.models import ModelSpec, load_model
from ..vocabulary import RUN_DTYPES, RunDType

LAYER_COLUMNS = ("model", "machine", "gpu", "gpus_per_machine", "phase", "batch_tokens", "ms_per_layer")
MODEL_COLUMNS = ("model", "gpu", "tp", "batch", "prompt", "output", "prefill_ms", "decode_ms")
PHASES = ("prefill", "decode")
#: Largest measurement file read (bytes): far above any real sweep, small enough to refuse junk.
MAX_FILE_BYTES = 64 * 2**20


@dataclass(frozen=True)
class LayerRow:
    model: ModelSpec
    gpu: GPUSpec
    tp: int
    phase: str
    batch_tokens: int
    ms: float
    where: str  # "FILE row N"
    run_dtype: RunDType = "fp16"  # the per-layer format has no dtype column: one 16-bit layer

    @property
    def values(self) -> tuple[tuple[str, float], ...]:
        return ((self.phase, self.ms),)


@dataclass(frozen=True)
class ModelRow:
    model: ModelSpec
    gpu: GPUSpec
    tp: int
    batch: int
    prompt: int
    output: int
    prefill_ms: float
    decode_ms: float
    engine: str
    where: str
    run_dtype: RunDType = "fp16"  # the format the engine computed in (the CSV's dtype column)
    #: Time per step of the serving runtime the measurement lacks: a profile's in-process engine steps
    #: lack what ``serve --plan`` adds around each step (``ServedSteps``); 0 for a measured server.
    serving_overhead_ms: float = 0.0

    @property
    def values(self) -> tuple[tuple[str, float], ...]:
        """The step times as served: what the cost model predicts."""
        extra = self.serving_overhead_ms
        return (("prefill", self.prefill_ms + extra), ("decode", self.decode_ms + extra))


Row = LayerRow | ModelRow


class _Reader:
    """Cell access with one-line errors naming the file, row and column."""

    def __init__(self, path: Path, gpus: dict[str, GPUSpec]):
        self.path, self.gpus = path, gpus
        self._models: dict[str, ModelSpec] = {}

    def fail(self, line: int, column: str, message: str) -> HetserveError:
        return HetserveError(f"row {line}, column '{column}': {message}", source=str(self.path))

    def text(self, row: dict, line: int, column: str) -> str:
        value = (row.get(column) or "").strip()
        if not value:
            raise self.fail(line, column, "empty cell")
        return value

    def number(self, row: dict, line: int, column: str, *, integer: bool = False, positive: bool = True):
        raw = self.text(row, line, column)
        try:
            value = int(raw) if integer else float(raw)
        except ValueError:
            kind = "a whole number" if integer else "a number"
            raise self.fail(line, column, f"'{raw[:40]}' is not {kind}") from None
        if not math.isfinite(value):
            raise self.fail(line, column, f"{raw} is not a finite number")
        if positive and value <= 0:
            raise self.fail(line, column, f"{raw} must be > 0 (a time or size cannot be zero or negative)")
        if integer and value > 10**7:
            raise self.fail(line, column, f"{raw} is out of range (at most 10,000,000)")
        return value

    def run_dtype(self, row: dict, line: int) -> RunDType:
        dtype = (row.get("dtype") or "").strip() or "fp16"
        if dtype not in RUN_DTYPES:
            raise self.fail(line, "dtype", f"'{dtype}' is not one of {', '.join(RUN_DTYPES)}")
        return dtype

    def model(self, row: dict, line: int) -> ModelSpec:
        name = self.text(row, line, "model")
        if name not in self._models:
            try:
                self._models[name] = load_model(name)
            except HetserveError as exc:
                raise self.fail(line, "model", str(exc)) from None
        return self._models[name]

    def gpu(self, row: dict, line: int) -> GPUSpec:
        name = self.text(row, line, "gpu")
        if name not in self.gpus:
            raise self.fail(
                line,
                "gpu",
                f"unknown GPU '{name}'{suggest(name, self.gpus)}; known: {allowed(self.gpus)} "
                "(define it in a cluster file and pass --cluster)",
            )
        return self.gpus[name]

    def tp(self, row: dict, line: int, column: str, model: ModelSpec) -> int:
        tp = self.number(row, line, column, integer=True)
        try:
            model.check_tp(tp, column)
        except HetserveError as exc:
            raise self.fail(line, column, str(exc)) from None
        return tp


def engine_rows(
    rows, device: GPUSpec, engine: str, where: str, serving_overhead_ms: float = 0.0
) -> list[ModelRow]:
    """A profile's engine measurements (``EngineRow``s, from ``where``) as model rows on ``device``, each
    step lacking ``serving_overhead_ms`` of the serving runtime's time (the profile's ``serving``)."""
    out = []
    for i, e in enumerate(rows):
        at = f"{where} measurements.engine[{i}]"
        try:
            model = load_model(e.model)
        except HetserveError as exc:
            raise HetserveError(f"{at}.model: {exc}") from None
        out.append(
            ModelRow(
                model,
                device,
                e.tp,
                e.batch,
                e.prompt,
                e.output,
                e.prefill_ms,
                e.decode_ms,
                engine,
                at,
                e.dtype,
                serving_overhead_ms,
            )
        )
    return out


def _open_csv(path: Path) -> list[dict]:
    if not path.is_file():
        raise HetserveError(f"measurement file {path} not found (or not a regular file)")
    if path.stat().st_size > MAX_FILE_BYTES:
        raise HetserveError(f"{path}: larger than {MAX_FILE_BYTES // 2**20} MiB; not a measurement file")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise HetserveError(f"{path}: not UTF-8 text (byte {exc.start}); expected a CSV file") from None
    return list(csv.DictReader(text.splitlines()))


def read_csv(path: str | Path, gpus: dict[str, GPUSpec]) -> list[Row]:
    """Read a per-layer (Helix) or a full-model CSV, told apart by their header."""
    path = Path(path)
    records = _open_csv(path)
    header = set(records[0]) if records else set()
    if set(LAYER_COLUMNS) <= header:
        kind, columns = "layer", LAYER_COLUMNS
    elif set(MODEL_COLUMNS) <= header:
        kind, columns = "model", MODEL_COLUMNS
    else:
        if not records:
            raise HetserveError(f"{path}: no rows (a header and at least one measurement are needed)")
        layer_missing = [c for c in LAYER_COLUMNS if c not in header]
        model_missing = [c for c in MODEL_COLUMNS if c not in header]
        if len(model_missing) <= len(layer_missing):
            missing, what, need = model_missing, "full-model", MODEL_COLUMNS
        else:
            missing, what, need = layer_missing, "per-layer", LAYER_COLUMNS
        raise HetserveError(
            f"{path}: missing column(s) {', '.join(missing)}; the {what} format needs {','.join(need)}"
        )
    reader = _Reader(path, gpus)
    rows: list[Row] = []
    for i, rec in enumerate(records):
        line = i + 2  # the header is line 1
        if None in rec:
            raise reader.fail(line, str(columns[-1]), "more cells than header columns")
        model = reader.model(rec, line)
        gpu = reader.gpu(rec, line)
        where = f"{path} row {line}"
        if kind == "layer":
            phase = reader.text(rec, line, "phase")
            if phase not in PHASES:
                raise reader.fail(line, "phase", f"'{phase}' is not one of {', '.join(PHASES)}")
            rows.append(
                LayerRow(
                    model,
                    gpu,
                    reader.tp(rec, line, "gpus_per_machine", model),
                    phase,
                    reader.number(rec, line, "batch_tokens", integer=True),
                    reader.number(rec, line, "ms_per_layer"),
                    where,
                )
            )
        else:
            rows.append(
                ModelRow(
                    model,
                    gpu,
                    reader.tp(rec, line, "tp", model),
                    reader.number(rec, line, "batch", integer=True),
                    reader.number(rec, line, "prompt", integer=True),
                    reader.number(rec, line, "output", integer=True),
                    reader.number(rec, line, "prefill_ms"),
                    reader.number(rec, line, "decode_ms"),
                    (rec.get("engine") or "").strip(),
                    where,
                    reader.run_dtype(rec, line),
                )
            )
    return rows
