"""Stage 4: the explicit operator ``torch.ops.tanh_attention.attn`` and its backward op.

``attn`` is a ``torch.library.custom_op`` whose autograd formula is the hand-derived VJP. The
backward is itself a registered op, ``attn_backward``, with its own autograd formula
(``formulas.vjp_of_vjp``), so double backward works and the backward stays one opaque node
under ``torch.compile`` and ``torch.export``. Both ops have fake kernels and vmap rules.

Forward-mode AD: on torch 2.13 a ``custom_op`` drops input tangents silently (its autograd
kernel only builds a graph for inputs that require grad), and ``torch.func.grad`` on it fails.
``_install_autograd_kernel`` wraps that kernel so that forward AD through ``attn`` gives the
right tangents (``formulas.jvp``), forward-over-reverse goes through ``AttnFunction``, and
``torch.func`` reverse mode differentiates the ops' bodies as plain torch code.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.autograd.forward_ad as fwAD
from torch import Tensor
from torch._library.autograd import make_autograd_impl

from . import formulas
from ._checks import validate_attn_inputs
from .function import AttnFunction
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
    grads = formulas.vjp(
        grad_o, grad_a, q, k, v, a, attn_mask, scale=scale, causal=causal, needs=needs
    )
    g_q, g_k, g_v = (
        (g if g is not None else torch.zeros_like(x)) if need else x.new_empty(0)
        for g, x, need in zip(grads, (q, k, v), needs, strict=True)
    )
    return g_q, g_k, g_v


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
        torch.empty_like(x) if need else x.new_empty(0)
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
# vmap rules: put the vmapped dim first and align every tensor's logical batch rank, so the
# ops' own broadcasting handles the batch; unbatched inputs are expanded (stride 0) so that
# per-sample gradients are not summed over the vmapped dim.
# --------------------------------------------------------------------------------------------


def _to_batched(
    size: int, tensors: Sequence[Tensor | None], in_dims: Sequence[int | None]
) -> list[Tensor | None]:
    logical = [
        t.dim() - (bd is not None) for t, bd in zip(tensors, in_dims, strict=True) if t is not None
    ]
    rank = max(logical)
    out: list[Tensor | None] = []
    for t, bd in zip(tensors, in_dims, strict=True):
        if t is None:
            out.append(None)
            continue
        t = t.expand(size, *t.shape) if bd is None else t.movedim(bd, 0)
        out.append(t.reshape(size, *([1] * (rank - t.dim() + 1)), *t.shape[1:]))
    return out


def _attn_vmap(
    info: Any, in_dims: Sequence[int | None], q: Tensor, k: Tensor, v: Tensor, *rest: Any
) -> tuple[tuple[Tensor, Tensor], tuple[int, int]]:
    attn_mask, scale, causal = _forward_extras(rest)
    dims = (*in_dims, None)[:4]  # in_dims covers only the arguments actually passed
    q_, k_, v_, m_ = _to_batched(info.batch_size, (q, k, v, attn_mask), dims)
    assert q_ is not None and k_ is not None and v_ is not None
    return attn(q_, k_, v_, m_, scale, causal), (0, 0)


def _forward_extras(rest: Sequence[Any]) -> tuple[Any, ...]:
    defaults = (None, 1.0, False)
    return (*rest, *defaults[len(rest) :])


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
    batched = _to_batched(size, (grad_o, grad_a, q, k, v, a, attn_mask), in_dims[:7])
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
# Autograd kernels: every autograd context, not only plain reverse mode
#
# torch.library.custom_op's generated Autograd kernel builds a graph only for inputs that
# require grad. On torch 2.13 that drops forward-AD tangents silently (zero tangents under
# torch.func.jvp) and fails under torch.func.grad. Each op below gets a kernel that keeps the
# generated one for plain reverse mode and routes the other contexts to code that handles them.
# --------------------------------------------------------------------------------------------


def _tangents(tensors: Sequence[Tensor | None]) -> list[Tensor | None] | None:
    """The forward-AD tangents of ``tensors`` at the current level, or None if there are none."""
    if fwAD._current_level < 0 or not torch._C._is_fwd_grad_enabled():
        return None
    tangents = [None if t is None else fwAD.unpack_dual(t).tangent for t in tensors]
    return tangents if any(t is not None for t in tangents) else None


def _under_functorch_grad() -> bool:
    """True while a torch.func reverse-mode transform (grad, vjp, jacrev) processes the op."""
    stack = torch._C._functorch.get_interpreter_stack()
    return bool(stack) and stack[-1].key() == torch._C._functorch.TransformType.Grad


def _attn_autograd(generated: Callable[..., Any], keyset: Any, *args: Any) -> Any:
    q, k, v = args[:3]
    attn_mask, scale, causal = _forward_extras(args[3:])
    if _under_functorch_grad():
        # The op's body is plain torch code: functorch differentiates its aten ops.
        return attn._init_fn(q, k, v, attn_mask, scale, causal)
    tangents = _tangents((q, k, v))
    if tangents is None:
        return generated(keyset, *args)
    if torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v)):
        # Forward-over-reverse: the backward must carry tangents too; AttnFunction's does.
        return AttnFunction.apply(q, k, v, attn_mask, scale, causal)
    primals = [fwAD.unpack_dual(t).primal for t in (q, k, v)]
    o, a = generated(keyset, *primals, *args[3:])
    t_q, t_k, t_v = tangents
    q_p, k_p, v_p = primals
    t_o, t_a = formulas.jvp(t_q, t_k, t_v, q_p, k_p, v_p, a, attn_mask, scale=scale, causal=causal)
    assert t_o is not None
    return fwAD.make_dual(o, t_o), fwAD.make_dual(a, t_a)


def _attn_backward_autograd(generated: Callable[..., Any], keyset: Any, *args: Any) -> Any:
    if _under_functorch_grad() or _tangents(args[:6]) is not None:
        # Forward AD over the backward (forward-over-reverse, jvp of grad): run its body as
        # plain torch code, which forward AD and functorch see through.
        return attn_backward._init_fn(*args)
    return generated(keyset, *args)


def _install_autograd_kernel(op: Any, kernel: Callable[..., Any]) -> None:
    """Replace ``op``'s Autograd kernel by ``kernel(generated, keyset, *args)``.

    ``generated`` is the kernel ``register_autograd`` made. This is the only place the package
    leans on private torch API (``make_autograd_impl``, ``CustomOpDef._lib``/``_init_fn``);
    ``pyproject.toml`` admits only the torch series it was checked on.
    """
    generated = make_autograd_impl(op._opoverload, op)
    with warnings.catch_warnings():
        # Replacing the kernel is the point; torch warns about any override.
        warnings.filterwarnings("ignore", message="(?s).*Overriding a previously registered kernel")
        op._lib.impl(
            op._name,
            functools.partial(kernel, generated),
            "Autograd",
            with_keyset=True,
            allow_override=True,
        )


_install_autograd_kernel(attn, _attn_autograd)
_install_autograd_kernel(attn_backward, _attn_backward_autograd)
