"""Weight-only quantisation of the decoder's linear layers: int8 or int4, group-wise, per layer.

A plan gives each layer a weight precision (``bits``: 16, 8 or 4). ``quantize_model`` replaces the four
projections of every decoder layer (``qkv_proj``, ``o_proj``, ``gate_up_proj``, ``down_proj``) whose
layer is marked 8 or 4 with a ``QuantLinear``; 16 keeps the model's own dtype. Embeddings, norms and
the LM head stay as they are.

Formats (``G`` = group size, consecutive input columns of one output row; 64 or 128):

* int8 -- symmetric: ``w ~= q * s`` with ``q`` in [-127, 127] (int8) and one scale ``s`` per group;
* int4 -- asymmetric: ``w ~= q * s + m`` with ``q`` in [0, 15] and a scale ``s`` and offset ``m`` (the
  group's minimum) per group. Two values share a byte: within a group, the first ``G/2`` columns sit in
  the low nibbles and the last ``G/2`` in the high nibbles.

Groups run along the input features, so on a tensor-parallel shard they must divide the shard's own:
``o_proj`` takes its query heads x head_dim, ``down_proj`` its intermediate columns.

Scales and offsets are stored as float16, rounded so that no value has to be clipped: every weight is
within ``s / 2`` of its dequantised value. The forward pass dequantises the weight on the fly into a
scratch buffer shared by all quantised layers of the thread and multiplies in the activations' dtype,
so only the packed weights stay resident.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import HetserveError

SUPPORTED_BITS = (16, 8, 4)
GROUP_SIZES = (64, 128)
_PROJECTIONS = (
    ("self_attn", "qkv_proj"),
    ("self_attn", "o_proj"),
    ("mlp", "gate_up_proj"),
    ("mlp", "down_proj"),
)
_FP16_MIN_NORMAL = 2.0**-14
_NIBBLES = 0x0F0F0F0F


class QuantGroupError(HetserveError, ValueError):
    """A projection's input features are not a multiple of the quantisation group size."""


def _scale_up(s: Tensor) -> Tensor:
    """float16 scales >= ``s`` (so no quantised value overflows its range), at least fp16's smallest normal."""
    s = torch.clamp(s * (1 + 2.0**-10), min=_FP16_MIN_NORMAL)
    s16 = s.to(torch.float16)
    low = s16.float() < s
    if low.any():  # round-to-nearest went down: step to the next float16 up
        s16[low] = torch.nextafter(s16[low], torch.tensor(float("inf"), dtype=torch.float16))
    return s16


def _offset_down(m: Tensor) -> Tensor:
    """float16 offsets <= ``m``."""
    m16 = (m - m.abs() * 2.0**-10).to(torch.float16)
    high = m16.float() > m
    if high.any():
        m16[high] = torch.nextafter(m16[high], torch.tensor(float("-inf"), dtype=torch.float16))
    return m16


#: Fractions of a group's range tried as clipping at each end (int4 range search).
_SHRINK = (0.02, 0.04, 0.06, 0.08, 0.10, 0.12, 0.14)


def _int4_fit(groups: Tensor, low: Tensor, high: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Offset and scale (float16) for the range [low, high] of each group, and the squared error."""
    offset = _offset_down(low)
    scale = _scale_up((high - offset.float()) / 15)
    o, s = offset.float()[..., None], scale.float()[..., None]
    q = torch.round((groups - o) / s).clamp_(0, 15)
    return offset, scale, (q * s + o - groups).pow_(2).sum(-1)


def _int4_ranges(groups: Tensor, search: bool, rows: int = 1024) -> tuple[Tensor, Tensor]:
    """Per-group float16 offsets and scales. Without ``search``: the group's [min, max] (no value is
    clipped, every error <= s / 2). With it: each end is then moved inwards by up to 14% of the range
    (first the low end, then the high end) where that lowers the group's squared error -- clipping a
    rare extreme value buys a finer step for all the others."""
    offsets, scales = [], []
    for g in groups.split(rows):
        low, high = g.amin(-1), g.amax(-1)
        offset, scale, err = _int4_fit(g, low, high)
        if search:
            span = high - low
            for end in ("low", "high"):
                for t in _SHRINK:
                    a = low + span * t if end == "low" else low
                    b = high if end == "low" else high - span * t
                    o, s, e = _int4_fit(g, a, b)
                    better = e < err
                    offset, scale, err = (
                        torch.where(better, o, offset),
                        torch.where(better, s, scale),
                        torch.minimum(e, err),
                    )
                    if end == "low":
                        low = torch.where(better, a, low)
                    else:
                        high = torch.where(better, b, high)
        offsets.append(offset)
        scales.append(scale)
    return torch.cat(offsets), torch.cat(scales)


class QuantLinear(nn.Module):
    """A linear layer ``y = x W^T + b`` holding ``W`` as group-wise int8 or int4."""

    def __init__(self, linear: nn.Linear, bits: int, group_size: int = 64, search: bool = True):
        super().__init__()
        if bits not in (8, 4):
            raise ValueError(f"QuantLinear stores 8 or 4 bits, not {bits}")
        if group_size not in GROUP_SIZES:
            raise ValueError(f"group size {group_size} is not supported; use one of {GROUP_SIZES}")
        w = linear.weight.detach()
        out_features, in_features = w.shape
        if in_features % group_size:
            raise ValueError(
                f"{in_features} input features are not a multiple of the group size {group_size}"
            )
        self.bits, self.group_size = bits, group_size
        self.in_features, self.out_features = in_features, out_features
        self.dtype = w.dtype
        groups = w.float().reshape(out_features, in_features // group_size, group_size)
        if bits == 8:
            scale = _scale_up(groups.abs().amax(-1) / 127)
            q = torch.round(groups / scale.float()[..., None]).clamp_(-127, 127).to(torch.int8)
            self.register_buffer("qweight", q.reshape(out_features, in_features))
            self.register_buffer("offset", None)
        else:
            offset, scale = _int4_ranges(groups, search)
            q = torch.round((groups - offset.float()[..., None]) / scale.float()[..., None]).clamp_(0, 15)
            q = q.to(torch.uint8)
            half = group_size // 2
            self.register_buffer("qweight", (q[..., :half] | (q[..., half:] << 4)).contiguous())
            self.register_buffer("offset", offset)
        self.register_buffer("scale", scale)
        self.bias = (
            None if linear.bias is None else nn.Parameter(linear.bias.detach().clone(), requires_grad=False)
        )

    @classmethod
    def from_weight(
        cls, weight: Tensor, bits: int, group_size: int = 64, bias: Tensor | None = None, search: bool = True
    ) -> QuantLinear:
        linear = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device="meta")
        linear.weight = nn.Parameter(weight, requires_grad=False)
        if bias is not None:
            linear.bias = nn.Parameter(bias, requires_grad=False)
        return cls(linear, bits, group_size, search)

    @property
    def nbytes(self) -> int:
        """Bytes held for the weight (packed values, scales, offsets; not the bias)."""
        return sum(
            t.numel() * t.element_size() for t in (self.qweight, self.scale, self.offset) if t is not None
        )

    def dequantize(self, out: Tensor | None = None) -> Tensor:
        """The weight [out_features, in_features] in ``self.dtype`` (written into ``out`` if given)."""
        n, k, g = self.out_features, self.in_features, self.group_size
        if out is None:
            out = torch.empty(n, k, dtype=self.dtype, device=self.qweight.device)
        groups = out.view(n, k // g, g)
        if self.bits == 8:
            groups.copy_(self.qweight.view(n, k // g, g))
            groups.mul_(self.scale[..., None])
            return out
        # Unpack four bytes at a time: int32 views, nibbles masked with 0x0F0F0F0F.
        nibbles = _scratch(n * k, torch.uint8, out.device, slot=1).view(n, k // g, 2, g // 2)
        packed = self.qweight.view(torch.int32)  # [n, k/g, g/8]
        wide = nibbles.view(torch.int32)  # [n, k/g, 2, g/8]
        torch.bitwise_and(packed, _NIBBLES, out=wide[:, :, 0])
        torch.bitwise_right_shift(packed, 4, out=wide[:, :, 1])
        wide[:, :, 1].bitwise_and_(_NIBBLES)
        groups.copy_(nibbles.view(n, k // g, g))
        groups.mul_(self.scale[..., None]).add_(self.offset[..., None])
        return out

    def forward(self, x: Tensor) -> Tensor:
        weight = self.dequantize(
            _scratch(self.out_features * self.in_features, self.dtype, x.device).view(
                self.out_features, self.in_features
            )
        )
        return F.linear(x, weight, self.bias)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, "
            f"group_size={self.group_size}"
        )


_local = threading.local()


def _scratch(numel: int, dtype: torch.dtype, device: torch.device, slot: int = 0) -> Tensor:
    """A per-thread reusable buffer of at least ``numel`` elements (grown as needed, never shrunk)."""
    buffers = _local.__dict__.setdefault("buffers", {})
    key = (slot, dtype, str(device))
    buf = buffers.get(key)
    # a buffer made under torch.inference_mode cannot be written outside it: make another
    if buf is None or buf.numel() < numel or (buf.is_inference() and not torch.is_inference_mode_enabled()):
        buf = buffers[key] = torch.empty(numel, dtype=dtype, device=device)
    return buf[:numel]


# ---- whole models ---------------------------------------------------------------------------
def parse_layer_bits(bits: int | Sequence[int], num_layers: int) -> list[int]:
    """One bit-width per layer from a single value or a per-layer list; HetserveError when invalid."""
    per_layer = [bits] * num_layers if isinstance(bits, int) else list(bits)
    if len(per_layer) != num_layers:
        raise HetserveError(
            f"bits: {len(per_layer)} values for {num_layers} layers; give one value or one per layer"
        )
    bad = [b for b in per_layer if b not in SUPPORTED_BITS]
    if bad:
        raise HetserveError(f"bits: {bad[0]} is not supported by the engine; use 16 (model dtype), 8 or 4")
    return per_layer


def quantize_model(
    model: nn.Module, bits: int | Sequence[int], group_size: int = 64, search: bool = True
) -> nn.Module:
    """Quantise ``model``'s decoder layers in place: ``bits`` is one width or one per layer held.
    ``search``: int4 clipping-range search (see ``_int4_ranges``)."""
    if group_size not in GROUP_SIZES:
        raise HetserveError(f"group size {group_size} is not supported; use one of {list(GROUP_SIZES)}")
    per_layer = parse_layer_bits(bits, len(model.layers))
    # A tensor-parallel shard's o_proj and down_proj take only its heads' and columns' inputs.
    tp = getattr(model, "tp", None)
    where = f" on tensor-parallel rank {tp.rank} of {tp.size}" if tp is not None and tp.size > 1 else ""
    for layer, b in zip(model.layers, per_layer):
        if b != 16:
            quantize_layer(layer, b, group_size, search, where)
    return model


def quantize_layer(
    layer: nn.Module, bits: int, group_size: int = 64, search: bool = True, where: str = ""
) -> list[tuple[nn.Module, str, nn.Linear]]:
    """Quantise one decoder layer's projections in place; returns (parent, name, original) for each, so
    that ``restore_layer`` can put the originals back (a per-layer sensitivity sweep)."""
    originals = []
    for parent_name, name in _PROJECTIONS:
        parent = getattr(layer, parent_name)
        current = getattr(parent, name)
        if isinstance(current, QuantLinear):
            raise HetserveError("the model is already quantised; quantise a freshly loaded model")
        if current.in_features % group_size:
            fits = [g for g in GROUP_SIZES if current.in_features % g == 0]
            fix = (
                f"use group size {fits[0]}"
                if fits
                else f"no supported group size {list(GROUP_SIZES)} divides it; keep these layers at 16 bits"
            )
            raise QuantGroupError(
                f"{name} has {current.in_features} input features{where}, not a multiple "
                f"of the group size {group_size}; {fix}"
            )
        setattr(parent, name, QuantLinear(current, bits, group_size, search))
        originals.append((parent, name, current))
    return originals


def restore_layer(originals: list[tuple[nn.Module, str, nn.Linear]]) -> None:
    """Undo ``quantize_layer``."""
    for parent, name, linear in originals:
        setattr(parent, name, linear)


def layer_bits(model: nn.Module) -> list[int]:
    """The weight precision of each decoder layer (16 for unquantised layers)."""
    return [
        layer.mlp.down_proj.bits if isinstance(layer.mlp.down_proj, QuantLinear) else 16
        for layer in model.layers
    ]


def linear_weight_bytes(model: nn.Module) -> int:
    """Bytes of the decoder layers' projection weights as stored (packed values + scales + offsets)."""
    total = 0
    for layer in model.layers:
        for parent_name, name in _PROJECTIONS:
            m = getattr(getattr(layer, parent_name), name)
            total += m.nbytes if isinstance(m, QuantLinear) else m.weight.numel() * m.weight.element_size()
    return total
