"""Per-layer precision under a quality budget (LLM-PQ's idea, with a documented proxy).

Each layer gets a *sensitivity* score: how much quantising it hurts quality, relative to the others.
Measured, it is read from a sensitivity file (``hetserve quality --sensitivity``, ``plan --sensitivity``:
specs/sensitivity.py); without one it is an assumption, the shape reported across LLM quantisation
studies: the first and last layers are the most sensitive, the middle ones the least. The budget is a hard constraint on
the share of sensitivity-weighted bits removed:

    removed = sum_l s_l * (16 - b_l) / sum_l (s_l * 16)  <=  quality budget

``--quality lossless`` (budget 0, the default, as an engine serves a checkpoint unless told to quantise)
keeps every layer at 16 bits; 0.3 lets about half of the layers go to 8 bits and a few of the least
sensitive to 4, or all of them to 8 bits plus a little.
"""

from __future__ import annotations

import math

from ..errors import HetserveError
from ..specs.models import ModelSpec

DEFAULT_QUALITY = 0.0
BIT_STEPS = (16, 8, 4)  # the widths the planner assigns (3-bit is readable in plans, not chosen)


def parse_quality(value: str | float | None) -> float:
    """``lossless`` -> 0; a number in [0, 0.75] -> that budget; None -> the default (lossless)."""
    if value is None:
        return DEFAULT_QUALITY
    if isinstance(value, str) and value.strip().lower() == "lossless":
        return 0.0
    try:
        q = float(value)
    except (TypeError, ValueError):
        raise HetserveError(
            f"--quality={value!r}: use 'lossless' or a number in [0, 0.75] (the share of "
            "sensitivity-weighted weight bits that may be removed)"
        ) from None
    if not 0 <= q <= 0.75:
        raise HetserveError(
            f"--quality={q} is outside [0, 0.75]; 0 (lossless) keeps 16-bit weights, 0.75 "
            "allows 4-bit everywhere"
        )
    return q


def sensitivity(model: ModelSpec) -> list[float]:
    """Relative sensitivity per layer: the model's measured weights (``plan --sensitivity``), else the
    assumed curve: 1 in the middle, up to 3 at the first and last layers."""
    if model.layer_sensitivity is not None:
        return list(model.layer_sensitivity)
    n = model.num_layers
    width = max(1.0, n / 16)
    return [1.0 + 2.0 * math.exp(-l / width) + 2.0 * math.exp(-(n - 1 - l) / width) for l in range(n)]


def sensitivity_basis(model: ModelSpec) -> str:
    """Where ``sensitivity(model)`` comes from, in words for a plan's explanation."""
    if model.layer_sensitivity is not None:
        return f"per-layer sensitivity measured ({model.sensitivity_source or 'given'})"
    return (
        "per-layer sensitivity assumed (1 in the middle, 3 at the ends; measure it with "
        "'hetserve quality --sensitivity MODEL' and pass --sensitivity FILE)"
    )


def removed_share(bits: list[int] | tuple[int, ...], sens: list[float]) -> float:
    return sum(s * (16 - b) for s, b in zip(sens, bits)) / (16 * sum(sens))


def describe_bits(bits: list[int] | tuple[int, ...]) -> str:
    """'16-bit layers 0-3, 8-bit layers 4-27, ...' for explanations."""
    parts = []
    start = 0
    for i in range(1, len(bits) + 1):
        if i == len(bits) or bits[i] != bits[start]:
            span = f"{start}" if i - 1 == start else f"{start}-{i - 1}"
            parts.append(f"{bits[start]}-bit layers {span}")
            start = i
    return ", ".join(parts)
