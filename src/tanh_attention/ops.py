"""Stage 4: the explicit operator ``torch.ops.tanh_attention.attn`` and its backward op.

``attn`` is a ``torch.library.custom_op`` whose autograd formula is the hand-derived VJP. The
backward is itself a registered op, ``attn_backward``, with its own autograd formula
(``formulas.vjp_of_vjp``), so double backward works and the backward stays one opaque node
under ``torch.compile`` and ``torch.export``. Both ops have fake kernels and vmap rules.

The ops' bodies are the blocked CPU kernels of ``kernels/blockwise.py``: the forward writes
``a`` once (each block's tanh fused into its matmul, ``kernels/cpu.py``), and the backward
works block by block in one block-sized buffer, in place. Those kernels are not
differentiable; where a transform must see through the op (``torch.func`` reverse mode,
forward AD over the backward) it gets the same formulas as plain torch code instead.

Forward-mode AD: on torch 2.13 a ``custom_op`` drops input tangents silently (its autograd
kernel only builds a graph for inputs that require grad), and ``torch.func.grad`` on it fails.
``install_autograd_kernel`` wraps that kernel so that forward AD through ``attn`` gives the
right tangents (``formulas.jvp``), forward-over-reverse goes through ``AttnFunction``, and
``torch.func`` reverse mode differentiates the ops' bodies as plain torch code.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.autograd.forward_ad as fwAD
from torch import Tensor

from . import formulas
from ._checks import validate_attn_inputs
from ._registration import (
    backward_autograd_kernel,
    backward_vmap_rule,
    forward_autograd_kernel,
    forward_vmap_rule,
    install_autograd_kernel,
    placeholders,
    register_autocast,
)
from .function import AttnFunction
from .kernels import blockwise
from .reference import NAMESPACE

__all__ = ["attn", "attn_backward"]


# --------------------------------------------------------------------------------------------
# Forward op
# --------------------------------------------------------------------------------------------


@torch.library.custom_op(f"{NAMESPACE}::attn", mutates_args=())
def attn(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    attn_mask: Tensor | None = None,
    scale: float = 1.0,
    causal: bool = False,
) -> tuple[Tensor, Tensor]:
    """The explicit tanh attention op: ``a = M * tanh(scale * q @ k^T)``, ``o = a @ v``.

    Args:
        q: ``(..., n, d)``.  k: ``(..., m, d)``.  v: ``(..., m, e)``.
        attn_mask: optional bool mask broadcastable to ``(*batch, n, m)``, True = takes part.
        scale: score multiplier.  causal: keep only ``j <= i``.

    Returns:
        ``(o, a)``: ``(*batch, n, e)`` and ``(*batch, n, m)``.

    Example:
        >>> q, v = torch.randn(2, 3, dtype=torch.float64), torch.randn(2, 4, dtype=torch.float64)
        >>> o, a = torch.ops.tanh_attention.attn(q, q, v)
        >>> bool(torch.allclose(o, torch.tanh(q @ q.T) @ v))
        True
    """
    validate_attn_inputs(q, k, v, attn_mask, scale=scale, causal=causal)
    o, a = blockwise.forward(q, k, v, attn_mask, scale, causal, need_weights=True)
    assert a is not None
    return o, a


def _attn_formulas(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    attn_mask: Tensor | None = None,
    scale: float = 1.0,
    causal: bool = False,
) -> tuple[Tensor, Tensor]:
    """``attn`` as plain differentiable torch code, for transforms that trace through it."""
    validate_attn_inputs(q, k, v, attn_mask, scale=scale, causal=causal)
    return formulas.forward(q, k, v, attn_mask, scale=scale, causal=causal)


@attn.register_fake
def _attn_fake(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    attn_mask: Tensor | None = None,
    scale: float = 1.0,
    causal: bool = False,
) -> tuple[Tensor, Tensor]:
    batch = validate_attn_inputs(q, k, v, attn_mask, scale=scale, causal=causal)
    n, m, e = q.shape[-2], k.shape[-2], v.shape[-1]
    return q.new_empty((*batch, n, e)), q.new_empty((*batch, n, m))


# --------------------------------------------------------------------------------------------
# Backward op: (g_q, g_k, g_v), with an empty placeholder for a gradient not asked for
# --------------------------------------------------------------------------------------------


@torch.library.custom_op(f"{NAMESPACE}::attn_backward", mutates_args=())
def attn_backward(
    grad_o: Tensor | None,
    grad_a: Tensor | None,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    a: Tensor,
    attn_mask: Tensor | None,
    scale: float,
    causal: bool,
    needs: Sequence[bool],
) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients of ``<grad_o, o> + <grad_a, a>`` w.r.t. the inputs flagged in ``needs``.

    Args:
        grad_o: ``(*batch, n, e)`` or None.  grad_a: ``(*batch, n, m)`` or None.
        q, k, v: the forward's inputs.  a: the forward's output ``(*batch, n, m)``.
        attn_mask, scale, causal: as in the forward.
        needs: three bools for (q, k, v).

    Returns:
        ``(g_q, g_k, g_v)``, each shaped like its input where ``needs`` asks for it, and an
        empty ``(0,)`` tensor where it does not (a custom op cannot return None). A gradient
        with no contributing term (``g_v`` when ``grad_o`` is None) is zeros.
    """
    grads = blockwise.backward(grad_o, grad_a, q, k, v, a, attn_mask, scale, causal, needs)
    return placeholders(grads, (q, k, v), needs)


def _attn_backward_formulas(
    grad_o: Tensor | None,
    grad_a: Tensor | None,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    a: Tensor,
    attn_mask: Tensor | None,
    scale: float,
    causal: bool,
    needs: Sequence[bool],
) -> tuple[Tensor, Tensor, Tensor]:
    """``attn_backward`` as plain differentiable torch code (``formulas.vjp``)."""
    grads = formulas.vjp(
        grad_o, grad_a, q, k, v, a, attn_mask, scale=scale, causal=causal, needs=needs
    )
    return placeholders(grads, (q, k, v), needs)


@attn_backward.register_fake
def _attn_backward_fake(
    grad_o: Tensor | None,
    grad_a: Tensor | None,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    a: Tensor,
    attn_mask: Tensor | None,
    scale: float,
    causal: bool,
    needs: Sequence[bool],
) -> tuple[Tensor, Tensor, Tensor]:
    g_q, g_k, g_v = (
        x.new_empty(x.shape) if need else x.new_empty(0)  # contiguous, as the kernel's
        for x, need in zip((q, k, v), needs, strict=True)
    )
    return g_q, g_k, g_v


# --------------------------------------------------------------------------------------------
# Autograd: attn -> attn_backward -> formulas.vjp_of_vjp (plain torch, so it goes on)
# --------------------------------------------------------------------------------------------


def _attn_setup_context(ctx: Any, inputs: tuple[Any, ...], output: tuple[Tensor, Tensor]) -> None:
    q, k, v, attn_mask, scale, causal = inputs
    # a is saved, never x: the derivative needs only 1 - a^2.
    ctx.save_for_backward(q, k, v, output[1], attn_mask)
    ctx.scale, ctx.causal = scale, causal
    ctx.set_materialize_grads(False)  # an unused output's grad arrives as None, not zeros


def _attn_backward_rule(ctx: Any, grad_o: Tensor | None, grad_a: Tensor | None) -> tuple[Any, ...]:
    need_q, need_k, need_v = ctx.needs_input_grad[:3]
    needs = [
        (need_q or False) and (grad_o is not None or grad_a is not None),
        (need_k or False) and (grad_o is not None or grad_a is not None),
        (need_v or False) and grad_o is not None,
    ]
    if not any(needs):
        return None, None, None, None, None, None
    q, k, v, a, attn_mask = ctx.saved_tensors
    grads = attn_backward(grad_o, grad_a, q, k, v, a, attn_mask, ctx.scale, ctx.causal, needs)
    g_q, g_k, g_v = (g if need else None for g, need in zip(grads, needs, strict=True))
    return g_q, g_k, g_v, None, None, None


attn.register_autograd(_attn_backward_rule, setup_context=_attn_setup_context)


def _backward_setup_context(ctx: Any, inputs: tuple[Any, ...], output: Any) -> None:
    grad_o, grad_a, q, k, v, a, attn_mask, scale, causal, needs = inputs
    ctx.save_for_backward(grad_o, grad_a, q, k, v, a, attn_mask)
    ctx.scale, ctx.causal, ctx.needs = scale, causal, list(needs)
    ctx.set_materialize_grads(False)


def _backward_backward_rule(
    ctx: Any, xi_q: Tensor | None, xi_k: Tensor | None, xi_v: Tensor | None
) -> tuple[Any, ...]:
    grad_o, grad_a, q, k, v, a, attn_mask = ctx.saved_tensors
    # A placeholder output's cotangent carries nothing.
    xi_q, xi_k, xi_v = (
        xi if need else None for xi, need in zip((xi_q, xi_k, xi_v), ctx.needs, strict=True)
    )
    d = formulas.vjp_of_vjp(
        xi_q, xi_k, xi_v, grad_o, grad_a, q, k, v, a, attn_mask, scale=ctx.scale, causal=ctx.causal
    )
    return (*d, None, None, None, None)


attn_backward.register_autograd(_backward_backward_rule, setup_context=_backward_setup_context)


# --------------------------------------------------------------------------------------------
# vmap rules, autocast, and Autograd kernels for every autograd context (see _registration)
# --------------------------------------------------------------------------------------------


def _attn_dual_outputs(
    outputs: tuple[Tensor, Tensor],
    primals: Sequence[Tensor],
    tangent: Sequence[Tensor | None],
    attn_mask: Tensor | None,
    scale: float,
    causal: bool,
) -> tuple[Tensor, Tensor]:
    """Forward AD: ``(o, a)`` with the tangents of ``formulas.jvp`` (from the computed ``a``)."""
    (o, a), (t_q, t_k, t_v), (q, k, v) = outputs, tangent, primals
    t_o, t_a = formulas.jvp(t_q, t_k, t_v, q, k, v, a, attn_mask, scale=scale, causal=causal)
    assert t_o is not None
    return fwAD.make_dual(o, t_o), fwAD.make_dual(a, t_a)


attn.register_vmap(forward_vmap_rule(attn, (0, 0)))
attn_backward.register_vmap(backward_vmap_rule(attn_backward, leading=2))
register_autocast(attn)
install_autograd_kernel(
    attn, forward_autograd_kernel(_attn_formulas, AttnFunction.apply, _attn_dual_outputs)
)
install_autograd_kernel(attn_backward, backward_autograd_kernel(_attn_backward_formulas, 7))
