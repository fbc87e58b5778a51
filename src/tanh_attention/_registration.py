"""Helpers shared by the registered ops (``ops.py``, ``kernels/blockwise.py``).

- :func:`to_batched`: the vmap rules' input alignment.
- :func:`forward_extras`: the optional forward arguments, defaults filled in.
- :func:`placeholders`: a backward op's outputs where a gradient is absent.
- :func:`install_autograd_kernel`, :func:`tangents`, :func:`under_functorch_grad`: an op's
  Autograd kernel that serves every autograd context, not only plain reverse mode.

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
    "forward_extras",
    "install_autograd_kernel",
    "placeholders",
    "tangents",
    "to_batched",
    "under_functorch_grad",
]


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
