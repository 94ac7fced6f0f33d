"""Measured per-layer sensitivity to weight quantisation (``hetserve quality --sensitivity``).

A sensitivity file records, for one model, the perplexity change (in percent) of quantising each decoder
layer alone to 8 and to 4 bits, every other layer kept at the model's own precision, on a fixed text:

    model: smollm2-135m
    num_layers: 30
    tokens: 421                 # tokens of the text measured on
    group_size: 64
    base_perplexity: 24.18
    change_pct:                 # bits -> one value per layer (layer 0 first)
      8: [0.01, -0.02, ...]
      4: [1.93, 0.41, ...]
    source: hetserve quality --sensitivity smollm2-135m (the engine's own int8/int4 kernels)

``plan --sensitivity FILE`` turns it into the planner's per-layer weights (``weights``): the change at the
lowest width measured (4 bits: the largest, least noisy signal), each layer at least ``FLOOR_SHARE`` of the
mean change (a change at or below zero is measurement noise on a short text, not a layer that gains from
quantisation), scaled to mean 1. Without a file the planner uses its assumed curve (planner/quality.py).
"""

from __future__ import annotations

import math
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, model_validator

from ..errors import HetserveError
from .loading import load_yaml_model
from .models import ModelSpec

#: Least weight of a layer, as a share of the mean measured change (keeps every layer's weight positive).
FLOOR_SHARE = 0.05
MEASURED_BITS = (8, 4)


class SensitivityFile(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str = Field(min_length=1, description="the model measured (name or path as given)")
    num_layers: int = Field(gt=0, le=1024)
    tokens: int = Field(gt=1, description="tokens of the text the perplexity was measured on")
    group_size: int = Field(gt=0)
    base_perplexity: float = Field(gt=0, allow_inf_nan=False)
    change_pct: dict[int, list[float]] = Field(
        min_length=1, description="weight bits -> perplexity change in percent per layer, layer 0 first"
    )
    source: str = ""

    @model_validator(mode="after")
    def _check(self) -> SensitivityFile:
        for bits, changes in self.change_pct.items():
            if bits not in MEASURED_BITS:
                raise ValueError(f"change_pct: {bits} bits is not measured; use {list(MEASURED_BITS)}")
            if len(changes) != self.num_layers:
                raise ValueError(
                    f"change_pct.{bits}: {len(changes)} values for num_layers {self.num_layers}; give one "
                    "per layer"
                )
            if not all(math.isfinite(c) and c > -100 for c in changes):
                raise ValueError(f"change_pct.{bits}: every change must be a finite percentage above -100")
        return self

    def weights(self) -> list[float]:
        """The planner's per-layer sensitivity: the change at the lowest width measured, floored at
        ``FLOOR_SHARE`` of the mean positive change, scaled to mean 1."""
        changes = self.change_pct[min(self.change_pct)]
        positive = [c for c in changes if c > 0]
        if not positive:
            return [1.0] * self.num_layers  # no layer measurably hurt: all alike
        floor = FLOOR_SHARE * sum(positive) / len(positive)
        raw = [max(c, floor) for c in changes]
        mean = sum(raw) / len(raw)
        return [r / mean for r in raw]


def load_sensitivity(path: str | Path) -> SensitivityFile:
    return load_yaml_model(SensitivityFile, path, "sensitivity file")


def with_sensitivity(model: ModelSpec, path: str | Path) -> ModelSpec:
    """``model`` with the per-layer sensitivity measured in the file at ``path``."""
    sens = load_sensitivity(path)
    if sens.num_layers != model.num_layers:
        raise HetserveError(
            f"measured {sens.num_layers} layers of {sens.model}, but {model.name} has {model.num_layers}; "
            f"measure this model with 'hetserve quality --sensitivity MODEL --out FILE'",
            source=str(path),
        )
    return model.model_copy(update={"layer_sensitivity": sens.weights(), "sensitivity_source": str(path)})
