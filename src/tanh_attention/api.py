"""The public function ``tanh_attention.attn``: validates, then picks the implementation.

Two implementations compute the same formulas and differ only in which PyTorch machinery
they work with (design.md section 4):

- the registered op ``torch.ops.tanh_attention.attn``: eager autograd (any order), vmap,
  ``torch.compile``, ``torch.export``, autocast; forward AD but not forward-over-reverse, and
  no ``torch.func`` reverse-mode transforms (``grad``, ``vjp``, ``jacrev``);
- ``AttnFunction``: every ``torch.func`` transform and all of forward AD, but Dynamo refuses
  an autograd.Function that defines ``jvp``.

``implementation()`` makes that choice, in one place, from the calling context. Where it picks
the registered op and ``need_weights=False``, ``attn`` calls the memory-efficient op
``torch.ops.tanh_attention.attn_lean`` instead (``kernels/blockwise.py``), which returns ``o``
only and allocates nothing of size ``n x m`` in forward or backward.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.autograd.forward_ad as fwAD
from torch import Tensor

from . import ops
from ._checks import validate_attn_inputs
from .function import AttnFunction
from .kernels import blockwise

__all__ = ["attn", "implementation"]

Implementation = Literal["op", "function"]


def implementation() -> Implementation:
    """Which implementation ``attn`` uses when called in the current context.

    Returns:
        ``"op"`` (the registered op ``torch.ops.tanh_attention.attn``) when compiling,
        exporting or in plain eager mode; ``"function"`` (``AttnFunction``) inside a
        ``torch.func`` transform or a ``torch.autograd.forward_ad.dual_level``.
    """
    if torch.compiler.is_compiling():
        return "op"
    if torch._C._are_functorch_transforms_active() or fwAD._current_level >= 0:
        return "function"
    return "op"


def attn(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    scale: float = 1.0,
    causal: bool = False,
    need_weights: bool = True,
    attn_mask: Tensor | None = None,
) -> tuple[Tensor, Tensor | None]:
    """Tanh attention: ``a = tanh(scale * q @ k^T)`` (masked entries exactly 0), ``o = a @ v``.

    The element-wise attention of PyTorch's Autograd Onboarding Lab, with batching, scale and
    masks. Gradients (first and higher order), forward AD and every ``torch.func`` transform
    use the hand-derived formulas of ``docs/derivation.md``.

    Args:
        q: queries ``(..., n, d)``.
        k: keys ``(..., m, d)``.
        v: values ``(..., m, e)``. Batch dims of q, k, v broadcast as in ``torch.matmul``;
            gradients of broadcast inputs are summed back to their shapes.
        scale: multiplies the scores ``q @ k^T`` (finite).
        causal: keep only ``j <= i`` (top-left aligned, as ``scaled_dot_product_attention``).
        need_weights: return ``a``; with False the weights are returned as None and, in
            eager mode, under ``torch.compile`` and ``torch.export``, never built: the
            memory-efficient op ``torch.ops.tanh_attention.attn_lean`` computes ``o`` block
            by block and its backward recomputes each block of ``a``.
        attn_mask: optional bool mask broadcastable to ``(*batch, n, m)``; True = takes part
            (the convention of ``scaled_dot_product_attention``). Combined with ``causal``
            the two intersect. Masked entries of ``a`` are exactly 0 with zero gradient.

    Returns:
        ``(o, a)``: ``o`` of shape ``(*batch, n, e)`` and ``a`` of shape ``(*batch, n, m)``,
        or ``(o, None)`` when ``need_weights=False``.

    Raises:
        TypeError: a non-tensor input, an unsupported or mixed dtype, a non-bool flag, a
            non-bool mask.
        ValueError: rank below 2, mismatched feature or key sizes, batch dims that do not
            broadcast, mixed devices, a non-finite scale, a mask of the wrong shape.

    Example:
        >>> q = torch.randn(2, 3, dtype=torch.float64)
        >>> k = torch.randn(2, 3, dtype=torch.float64)
        >>> v = torch.randn(2, 4, dtype=torch.float64)
        >>> o, a = attn(q, k, v)
        >>> bool(torch.allclose(o, torch.tanh(q @ k.T) @ v))
        True
    """
    validate_attn_inputs(q, k, v, attn_mask, scale=scale, causal=causal, need_weights=need_weights)
    scale = float(scale)
    if implementation() == "function":
        o, a = AttnFunction.apply(q, k, v, attn_mask, scale, causal)
        return o, (a if need_weights else None)
    if not need_weights:
        return blockwise.attn_lean(q, k, v, attn_mask, scale, causal), None
    return ops.attn(q, k, v, attn_mask, scale, causal)
