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

from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.autograd.forward_ad as fwAD
from torch import Tensor

from . import formulas
from ._checks import validate_attn_inputs
from ._registration import (
    forward_extras,
    install_autograd_kernel,
    placeholders,
    tangents,
    to_batched,
    under_functorch_grad,
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
# vmap rules (_registration.to_batched aligns the inputs; the ops broadcast the batch)
# --------------------------------------------------------------------------------------------


def _attn_vmap(
    info: Any, in_dims: Sequence[int | None], q: Tensor, k: Tensor, v: Tensor, *rest: Any
) -> tuple[tuple[Tensor, Tensor], tuple[int, int]]:
    attn_mask, scale, causal = forward_extras(rest)
    dims = (*in_dims, None)[:4]  # in_dims covers only the arguments actually passed
    q_, k_, v_, m_ = to_batched(info.batch_size, (q, k, v, attn_mask), dims)
    assert q_ is not None and k_ is not None and v_ is not None
    return attn(q_, k_, v_, m_, scale, causal), (0, 0)


def _attn_backward_vmap(
    info: Any,
    in_dims: Sequence[int | None],
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
) -> tuple[tuple[Tensor, ...], tuple[int | None, ...]]:
    size = info.batch_size
    batched = to_batched(size, (grad_o, grad_a, q, k, v, a, attn_mask), in_dims[:7])
    grads = attn_backward(*batched, scale, causal, needs)  # type: ignore[arg-type]
    # Each gradient comes back shaped like its padded input: drop the padding. Placeholders
    # are not batched.
    out = tuple(
        g.reshape(size, *(x.shape if bd is None else x.movedim(bd, 0).shape[1:])) if need else g
        for g, x, bd, need in zip(grads, (q, k, v), in_dims[2:5], needs, strict=True)
    )
    return out, tuple(0 if need else None for need in needs)


attn.register_vmap(_attn_vmap)
attn_backward.register_vmap(_attn_backward_vmap)

# Under autocast the op runs in the autocast dtype, like the matmuls of the composite.
attn.register_autocast("cpu", torch.bfloat16)
if torch.amp.is_autocast_available("cuda"):
    attn.register_autocast("cuda", torch.float16)


# --------------------------------------------------------------------------------------------
# Autograd kernels: every autograd context, not only plain reverse mode (see _registration)
# --------------------------------------------------------------------------------------------


def _attn_autograd(generated: Callable[..., Any], keyset: Any, *args: Any) -> Any:
    q, k, v = args[:3]
    attn_mask, scale, causal = forward_extras(args[3:])
    if under_functorch_grad():
        # functorch differentiates the aten ops of the formulas.
        return _attn_formulas(q, k, v, attn_mask, scale, causal)
    tangent = tangents((q, k, v))
    if tangent is None:
        return generated(keyset, *args)
    if torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v)):
        # Forward-over-reverse: the backward must carry tangents too; AttnFunction's does.
        return AttnFunction.apply(q, k, v, attn_mask, scale, causal)
    primals = [fwAD.unpack_dual(t).primal for t in (q, k, v)]
    o, a = generated(keyset, *primals, *args[3:])
    t_q, t_k, t_v = tangent
    q_p, k_p, v_p = primals
    t_o, t_a = formulas.jvp(t_q, t_k, t_v, q_p, k_p, v_p, a, attn_mask, scale=scale, causal=causal)
    assert t_o is not None
    return fwAD.make_dual(o, t_o), fwAD.make_dual(a, t_a)


def _attn_backward_autograd(generated: Callable[..., Any], keyset: Any, *args: Any) -> Any:
    if under_functorch_grad() or tangents(args[:6]) is not None:
        # Forward AD over the backward (forward-over-reverse, jvp of grad): the formulas as
        # plain torch code, which forward AD and functorch see through.
        return _attn_backward_formulas(*args)
    return generated(keyset, *args)


install_autograd_kernel(attn, _attn_autograd)
install_autograd_kernel(attn_backward, _attn_backward_autograd)
