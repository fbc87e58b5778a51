"""``F.linear`` for the layer's projections, its three products by oneDNN where that is faster.

On the AMD EPYC of benchmarks/RESULTS.md, ``torch.mm`` runs MKL's float32 kernel at about
95 GFLOP/s (its AVX2 path) where oneDNN's reaches 210: a layer's projections, which cost
more than its attention at short sequences, take half the time by oneDNN. The same probe
that chooses the attention kernels' products (``kernels.cpu.product_method``) decides; on
CPUs where MKL is the faster (Intel), this is ``F.linear``.

oneDNN is used for float32 CPU tensors in plain eager calls only (``ops.plain_eager``: no
compiler, tracer, ``torch.func`` transform or dispatch mode, which see ``F.linear``
itself), with 2-D weights and at least ``_MIN_ENTRIES`` output entries (below that a oneDNN
call costs more than it saves). A backward that is itself differentiated
(``create_graph=True``) computes its products with differentiable torch ops.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from . import ops
from ._torch_private import linear_pointwise
from .kernels.cpu import product_method

__all__ = ["linear"]

# Outputs (N x out) with fewer entries take F.linear: a oneDNN call costs about 13 us of its
# own. Measured on the AMD EPYC (in = 64, one thread, torch / oneDNN): N x out = 64 x 64, 8.2 /
# 15 us; 128 x 128, 24.5 / 22.2 us; 256 x 192, 67 / 41 us. The weight gradient g^T @ x reads
# both operands transposed and breaks even later (128 x 128: 25.7 / 31.3 us; 512 x 64, 47.9 /
# 46.9 us), so it needs twice as many.
_MIN_ENTRIES = 16384


def _mm(x: Tensor, w: Tensor) -> Tensor:
    """``x @ w^T`` by oneDNN: x ``(N, in)``, w ``(out, in)``, either read with any strides."""
    op = linear_pointwise()
    assert op is not None
    return op(x, w, None, "none", [], "")


def _affine(x: Tensor, w: Tensor, b: Tensor | None) -> Tensor:
    """``x @ w^T + b`` by oneDNN, without autograd."""
    out = _mm(x, w)
    return out if b is None else out.add_(b)


class _OneDnnLinear(torch.autograd.Function):
    """``x @ w^T + b`` with all three products by oneDNN (x already ``(N, in)``)."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, w: Tensor, b: Tensor | None) -> Tensor:  # type: ignore[override]
        ctx.save_for_backward(x, w)
        ctx.has_bias = b is not None
        return _affine(x, w, b)

    @staticmethod
    def backward(ctx: Any, g: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        x, w = ctx.saved_tensors
        need_x, need_w, need_b = ctx.needs_input_grad
        if torch.is_grad_enabled():  # create_graph: differentiable products
            g_x = g @ w if need_x else None
            g_w = g.mT @ x if need_w else None
        else:
            g_x = _mm(g, w.mT) if need_x else None
            g_w = None
            if need_w:
                g_w = _mm(g.mT, x.mT) if g.numel() >= 2 * _MIN_ENTRIES else g.mT @ x
        g_b = g.sum(0) if need_b and ctx.has_bias else None
        return g_x, g_w, g_b


def _by_onednn(x: Tensor, w: Tensor, b: Tensor | None) -> bool:
    tensors = (x, w, b)
    return (
        x.device.type == "cpu"
        and w.dim() == 2
        and x.dim() >= 1
        and all(t is None or t.dtype == torch.float32 for t in tensors)
        and x.shape[-1] == w.shape[1]
        and x.numel() > 0
        and x.numel() // x.shape[-1] * w.shape[0] >= _MIN_ENTRIES
        and ops.plain_eager(tensors)
        and product_method(torch.float32)[0] == "onednn"
    )


def linear(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """``F.linear(x, weight, bias)``: the same result, shapes and autograd, faster on CPUs
    where oneDNN's product beats torch's (module doc).

    Args:
        x: ``(..., in)``.  weight: ``(out, in)``.  bias: ``(out,)`` or None.

    Returns:
        ``(..., out)``.

    Example:
        >>> x, w = torch.randn(3, 4), torch.randn(5, 4)
        >>> bool(torch.allclose(linear(x, w), x @ w.T, atol=1e-6))
        True
    """
    if not _by_onednn(x, weight, bias):
        return F.linear(x, weight, bias)
    flat = x.reshape(-1, x.shape[-1])
    if not torch.is_grad_enabled() or not any(
        t is not None and t.requires_grad for t in (x, weight, bias)
    ):
        out = _affine(flat, weight, bias)
    else:
        out = _OneDnnLinear.apply(flat, weight, bias)
    return out.reshape(*x.shape[:-1], weight.shape[0])
