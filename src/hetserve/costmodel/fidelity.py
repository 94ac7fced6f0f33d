"""Compare the cost model with published per-layer latency measurements.

The reference table (one row per measurement) has the columns
``model, machine, gpu, gpus_per_machine, phase, batch_tokens, ms_per_layer``: the time of ONE
transformer layer at 16-bit for a prefill batch of ``batch_tokens`` prompt tokens, or a decode step of
``batch_tokens`` sequences. Multi-GPU machines are treated as one tensor-parallel group.

What the table does not say, and is assumed here (the same for every row, never fitted per point):
prefill batches are made of prompts of ``PREFILL_PROMPT`` tokens (the last one shorter), and decode
sequences hold ``DECODE_CONTEXT`` tokens of context (about the mean of the conversation trace the
measurements served: ~750 prompt + ~240 output tokens).
"""

from __future__ import annotations

import csv
import statistics
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

from ..errors import HetserveError
from ..specs.gpus import GPUSpec
from ..specs.models import ModelSpec, load_model
from .roofline import BatchShape, RooflineCostModel, ServerShape

PREFILL_PROMPT = 1024
DECODE_CONTEXT = 1000
#: The reference's GPU names -> catalogue names.
GPU_NAMES = {"a100-40gb": "a100-40gb", "l4": "l4", "t4": "t4", "v100-16gb": "v100-16gb"}


@dataclass(frozen=True)
class Point:
    model: str
    machine: str
    gpu: str
    tp: int
    phase: str
    batch_tokens: int
    measured_ms: float
    predicted_ms: float

    @property
    def ape(self) -> float:
        """Absolute percentage error."""
        return abs(self.predicted_ms - self.measured_ms) / self.measured_ms * 100


def layer_batch(phase: str, batch_tokens: int) -> BatchShape:
    if phase == "prefill":
        full, rest = divmod(batch_tokens, PREFILL_PROMPT)
        prompts = [PREFILL_PROMPT] * full + ([rest] if rest else [])
        return BatchShape.prefill(prompts)
    return BatchShape.decode(batch_tokens, batch_tokens * DECODE_CONTEXT)


def compare(path: str | Path, gpus: dict[str, GPUSpec]) -> list[Point]:
    p = Path(path)
    if not p.exists():
        raise HetserveError(f"reference profile not found: {p}")
    points = []
    models: dict[str, ModelSpec] = {}
    cms: dict[str, RooflineCostModel] = {}
    with p.open(newline="") as fh:
        for row in csv.DictReader(fh):
            name = row["model"]
            if name not in models:
                models[name] = load_model(name)
                cms[name] = RooflineCostModel(models[name])
            gpu = gpus[GPU_NAMES[row["gpu"]]]
            tp = int(row["gpus_per_machine"])
            bt = int(row["batch_tokens"])
            shape = ServerShape(gpu, tp, (16,), first=False, last=False)
            pred = cms[name].batch_time(shape, layer_batch(row["phase"], bt)) * 1e3
            points.append(
                Point(name, row["machine"], gpu.name, tp, row["phase"], bt, float(row["ms_per_layer"]), pred)
            )
    return points


def summarise(points: list[Point], key=lambda p: (p.gpu, p.phase)) -> dict[tuple, dict[str, float]]:
    """Median and worst absolute percentage error per group (default: per GPU and phase)."""
    groups: dict[tuple, list[float]] = defaultdict(list)
    for pt in points:
        groups[key(pt)].append(pt.ape)
    return {
        k: {"n": len(v), "median_ape": statistics.median(v), "worst_ape": max(v)}
        for k, v in sorted(groups.items())
    }
