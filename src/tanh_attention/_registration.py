"""Helpers shared by the registered ops (``ops.py``, ``kernels/blockwise.py``).

- :func:`forward_vmap_rule`, :func:`backward_vmap_rule` (built on :func:`to_batched`): the
  vmap rules of a forward op and of its backward op.
- :func:`register_autocast`: the autocast dtypes of a forward op.
- :func:`forward_extras`: the optional forward arguments, defaults filled in.
- :func:`placeholders`: a backward op's outputs where a gradient is absent.
- :func:`forward_autograd_kernel`, :func:`backward_autograd_kernel` (installed with
  :func:`install_autograd_kernel`): an op's Autograd kernel that serves every autograd
  context, not only plain reverse mode.

torch.library.custom_op's generated Autograd kernel builds a graph only for inputs that
require grad. On torch 2.13 that drops forward-AD tangents silently (zero tangents under
torch.func.jvp) and fails under torch.func.grad. Each op gets a kernel that keeps the
generated one for plain reverse mode and routes the other contexts to code that handles them.
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

__all__ = [
    "backward_autograd_kernel",
    "backward_vmap_rule",
    "forward_autograd_kernel",
    "forward_extras",
    "forward_vmap_rule",
    "install_autograd_kernel",
    "placeholders",
    "register_autocast",
    "tangents",
    "to_batched",
    "under_functorch_grad",
]

# A kernel given the ``generated`` Autograd kernel, the dispatch keyset and the op's arguments.
AutogradKernel = Callable[..., Any]


def to_batched(
    size: int, tensors: Sequence[Tensor | None], in_dims: Sequence[int | None]
) -> list[Tensor | None]:
    """Align tensors for a vmap rule: the vmapped dim first and one logical batch rank.

    The ops' own broadcasting then handles the batch; unbatched inputs are expanded
    (stride 0) so that per-sample gradients are not summed over the vmapped dim.
    """
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


def forward_extras(rest: Sequence[Any]) -> tuple[Any, ...]:
    """``(attn_mask, scale, causal)`` from the arguments after q, k, v, defaults filled in."""
    defaults = (None, 1.0, False)
    return (*rest, *defaults[len(rest) :])


def tangents(tensors: Sequence[Tensor | None]) -> list[Tensor | None] | None:
    """The forward-AD tangents of ``tensors`` at the current level, or None if there are none."""
    if fwAD._current_level < 0 or not torch._C._is_fwd_grad_enabled():
        return None
    found = [None if t is None else fwAD.unpack_dual(t).tangent for t in tensors]
    return found if any(t is not None for t in found) else None


def under_functorch_grad() -> bool:
    """True while a torch.func reverse-mode transform (grad, vjp, jacrev) processes the op."""
    stack = torch._C._functorch.get_interpreter_stack()
    return bool(stack) and stack[-1].key() == torch._C._functorch.TransformType.Grad


def install_autograd_kernel(op: Any, kernel: Callable[..., Any]) -> None:
    """Replace ``op``'s Autograd kernel by ``kernel(generated, keyset, *args)``.

    ``generated`` is the kernel ``register_autograd`` made. This is the only place the package
    leans on private torch API (``make_autograd_impl``, ``CustomOpDef._lib``);
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


def placeholders(
    grads: Sequence[Tensor | None], inputs: Sequence[Tensor], needs: Sequence[bool]
) -> tuple[Tensor, Tensor, Tensor]:
    """A backward op's outputs: a custom op cannot return None, so a needed gradient without
    a contributing term is zeros and one not asked for is an empty ``(0,)`` tensor.

    Gradients are contiguous whatever the inputs' strides, as the fake kernels say (a
    compiled graph relies on the fake kernel's strides)."""
    g_q, g_k, g_v = (
        (x.new_zeros(x.shape) if g is None else g.contiguous()) if need else x.new_empty(0)
        for g, x, need in zip(grads, inputs, needs, strict=True)
    )
    return g_q, g_k, g_v


# --------------------------------------------------------------------------------------------
# vmap rules and autocast
# --------------------------------------------------------------------------------------------


def forward_vmap_rule(op: Any, out_dims: Any) -> Callable[..., Any]:
    """The vmap rule of a forward op ``op(q, k, v, attn_mask=None, scale=1.0, causal=False)``
    whose outputs all carry the batch first (``out_dims``: 0, or a tuple of zeros)."""

    def rule(
        info: Any, in_dims: Sequence[int | None], q: Tensor, k: Tensor, v: Tensor, *rest: Any
    ) -> Any:
        attn_mask, scale, causal = forward_extras(rest)
        dims = (*in_dims, None)[:4]  # in_dims covers only the arguments actually passed
        q_, k_, v_, m_ = to_batched(info.batch_size, (q, k, v, attn_mask), dims)
        return op(q_, k_, v_, m_, scale, causal), out_dims

    return rule


def backward_vmap_rule(op: Any, leading: int) -> Callable[..., Any]:
    """The vmap rule of a backward op ``op(*grads, q, k, v, *saved, attn_mask, scale, causal,
    needs) -> (g_q, g_k, g_v)``, with ``leading`` output gradients before q and its tensor
    arguments ending with ``attn_mask``."""

    def rule(info: Any, in_dims: Sequence[int | None], *args: Any) -> Any:
        *tensors, scale, causal, needs = args
        size = info.batch_size
        grads = op(*to_batched(size, tensors, in_dims[: len(tensors)]), scale, causal, needs)
        inputs = tensors[leading : leading + 3]
        # Each gradient comes back shaped like its padded input: drop the padding.
        # Placeholders (gradients not asked for) are not batched.
        out = tuple(
            g.reshape(size, *(x.shape if bd is None else x.movedim(bd, 0).shape[1:])) if need else g
            for g, x, bd, need in zip(
                grads, inputs, in_dims[leading : leading + 3], needs, strict=True
            )
        )
        return out, tuple(0 if need else None for need in needs)

    return rule


def register_autocast(op: Any) -> None:
    """Under autocast ``op`` runs in the autocast dtype, like the matmuls of the composite."""
    op.register_autocast("cpu", torch.bfloat16)
    if torch.amp.is_autocast_available("cuda"):
        op.register_autocast("cuda", torch.float16)


# --------------------------------------------------------------------------------------------
# Autograd kernels
# --------------------------------------------------------------------------------------------


def forward_autograd_kernel(
    formulas_op: Callable[..., Any],
    with_tangents: Callable[..., Any],
    dual_outputs: Callable[..., Any],
) -> AutogradKernel:
    """The Autograd kernel of a forward op ``op(q, k, v, attn_mask=None, scale=1.0, causal=False)``.

    Args:
        formulas_op: the op as plain differentiable torch code, same arguments (functorch's
            reverse mode differentiates its aten ops).
        with_tangents: the op as an autograd function whose backward carries tangents, same
            arguments (forward-over-reverse: inputs that require grad and carry tangents).
        dual_outputs: ``(outputs, primals, tangents, attn_mask, scale, causal)`` -> the
            outputs made dual with their tangents (plain forward AD).
    """

    def kernel(generated: AutogradKernel, keyset: Any, *args: Any) -> Any:
        q, k, v = args[:3]
        attn_mask, scale, causal = forward_extras(args[3:])
        if under_functorch_grad():
            return formulas_op(q, k, v, attn_mask, scale, causal)
        tangent = tangents((q, k, v))
        if tangent is None:
            return generated(keyset, *args)
        if torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v)):
            return with_tangents(q, k, v, attn_mask, scale, causal)
        primals = [fwAD.unpack_dual(t).primal for t in (q, k, v)]
        outputs = generated(keyset, *primals, *args[3:])
        return dual_outputs(outputs, primals, tangent, attn_mask, scale, causal)

    return kernel


def backward_autograd_kernel(formulas_op: Callable[..., Any], tensors: int) -> AutogradKernel:
    """The Autograd kernel of a backward op whose first ``tensors`` arguments are tensors:
    forward AD over it (forward-over-reverse, jvp of grad) and functorch's reverse mode get
    ``formulas_op`` (same arguments), plain torch code they see through."""

    def kernel(generated: AutogradKernel, keyset: Any, *args: Any) -> Any:
        if under_functorch_grad() or tangents(args[:tensors]) is not None:
            return formulas_op(*args)
        return generated(keyset, *args)

    return kernel
