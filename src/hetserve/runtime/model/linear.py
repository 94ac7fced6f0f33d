"""Linear projections for small batches on CPU: ``project(linear, x)`` is ``linear(x)``, computed in
whichever form keeps every BLAS thread busy when a decode step has only a few rows."""

from __future__ import annotations

import torch
from torch import Tensor, nn

# Projections of a decode batch (a few rows) on CPU: BLAS splits x @ W^T between its threads by rows,
# which leaves them short of work (with one row, a matrix-vector product that scales poorly). Up to this
# many rows an fp32 ``nn.Linear`` is computed so that the threads split the output features instead:
# 1.3-2x faster products on two threads from 2 to 128 rows (4-32 rows most), no slower on one.
FEW_ROWS = 128
_CHUNK = 4096  # output features per product of a very wide projection (the LM head); ~10% faster than one


def _fast_path(linear: nn.Module, x: Tensor) -> bool:
    """An fp32 ``nn.Linear`` on CPU with a few rows (one row only with several threads to split it)."""
    rows = x.shape[0] if x.dim() == 2 else 0
    return (
        type(linear) is nn.Linear
        and 0 < rows <= FEW_ROWS
        and x.device.type == "cpu"
        and linear.weight.dtype == torch.float32
        and (rows > 1 or torch.get_num_threads() > 1)
    )


def _by_halves(linear: nn.Linear, x: Tensor) -> Tensor | None:
    """``linear(x)`` as [2, rows, out / 2]: one batched product over the two halves of the output
    features (a thread each, each streaming its half of the weight as the one-product form does).
    None when the weight is neither [out, in] nor input-major contiguous, or out is odd."""
    w = linear.weight
    n, k = w.shape
    if n % 2:
        return None
    if w.is_contiguous():
        halves = w.view(2, n // 2, k).transpose(1, 2)  # [2, in, out / 2] views
    elif w.t().is_contiguous():
        halves = w.t().view(k, 2, n // 2).transpose(0, 1)
    else:
        return None
    xs = x.expand(2, *x.shape)
    if linear.bias is None:
        return torch.bmm(xs, halves)
    return torch.baddbmm(linear.bias.view(2, 1, n // 2), xs, halves)


def _transposed_product(linear: nn.Linear, x: Tensor) -> Tensor:
    """W @ x^T for an [out, in] contiguous weight (the threads split W's rows), as a [rows, out] view."""
    w, b = linear.weight, linear.bias
    n = w.shape[0]
    if n <= 2 * _CHUNK:
        return (torch.mm(w, x.t()) if b is None else torch.addmm(b[:, None], w, x.t())).t()
    out = torch.empty(n, x.shape[0], dtype=x.dtype, device=x.device)
    for s in range(0, n, _CHUNK):
        if b is None:
            torch.mm(w[s : s + _CHUNK], x.t(), out=out[s : s + _CHUNK])
        else:
            torch.addmm(b[s : s + _CHUNK, None], w[s : s + _CHUNK], x.t(), out=out[s : s + _CHUNK])
    return out.t()


def _form(linear: nn.Module, x: Tensor) -> str:
    """How ``project`` computes ``linear(x)``: ``transposed`` (W @ x^T: an [out, in] contiguous fp32 weight
    and several rows), ``halves`` (a few rows otherwise) or ``module`` (the module itself)."""
    if not _fast_path(linear, x):
        return "module"
    return "transposed" if x.shape[0] > 1 and linear.weight.is_contiguous() else "halves"


def project(linear: nn.Module, x: Tensor) -> Tensor:
    """``linear(x)`` for x [rows, in], in the form ``_form`` picks (W @ x^T is a transposed view; by halves is
    joined with a small copy when there are several rows)."""
    form = _form(linear, x)
    if form == "transposed":
        return _transposed_product(linear, x)
    y = _by_halves(linear, x) if form == "halves" else None
    if y is None:
        return linear(x)
    return y.transpose(0, 1).reshape(x.shape[0], -1)


def project_halves(linear: nn.Module, x: Tensor) -> tuple[Tensor, Tensor]:
    """The two halves of ``linear(x)``'s output features (gate and up of a fused projection), by halves
    when ``project`` would take that form: no joining copy."""
    y = _by_halves(linear, x) if _form(linear, x) == "halves" else None
    if y is not None:
        return y[0], y[1]
    return project(linear, x).chunk(2, dim=-1)
