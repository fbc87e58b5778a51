"""Every use of private PyTorch API, each behind a fallback.

The package needs a few things PyTorch 2.13 offers only privately:

- replacing a ``custom_op``'s generated Autograd kernel (``make_autograd_impl``,
  ``CustomOpDef._opoverload`` / ``_lib`` / ``_name``), so that forward AD and ``torch.func``
  reverse mode give the right answers through the explicit ops (torch 2.13's own kernel
  drops tangents silently and fails under ``torch.func.grad``);
- whether a ``torch.func`` reverse-mode transform is processing the current op (the
  functorch interpreter stack), and whether a tensor is a functorch wrapper;
- whether a torch function or dispatch mode is active (the lengths of the mode stacks);
- a data-dependent assertion inside a compiled graph (``torch._assert_async``);
- oneDNN's matmul with a fused elementwise epilogue (``torch.ops.mkldnn._linear_pointwise``),
  the fast ``tanh(q @ k^T)`` of the CPU kernels;
- the differentiable all-gather of ``torch.distributed._functional_collectives``
  (``all_gather_single_autograd`` from torch 2.13, ``all_gather_tensor_autograd`` before);
- whether a module is installed, asked inside a ``torch.compile`` region
  (:func:`module_available`: torch 2.13's Dynamo folds ``importlib.util.find_spec`` to a
  constant, 2.11's refuses to trace it).

If any of it is missing, ``import tanh_attention`` still works: :data:`AUTOGRAD_KERNEL_REASON`
says why the explicit ops cannot serve forward AD and ``torch.func`` (the dispatcher then
sends such calls to the composite, which needs none of this), and :func:`linear_pointwise`
returns None (the CPU kernels then use ``torch.matmul`` and ``torch.tanh``).
"""

from __future__ import annotations

import functools
import importlib.util
import warnings
from collections.abc import Callable
from typing import Any

import torch
import torch.autograd.forward_ad as fwAD
from torch import Tensor

__all__ = [
    "AUTOGRAD_KERNEL_REASON",
    "all_gather_autograd",
    "assert_async",
    "functorch_active",
    "install_autograd_kernel",
    "is_functorch_wrapped",
    "is_legacy_batched",
    "linear_pointwise",
    "modes_active",
    "module_available",
    "tangents",
    "under_functorch_grad",
]


def _autograd_kernel_reason() -> str | None:
    try:
        from torch._library.autograd import make_autograd_impl  # noqa: F401
        from torch._library.custom_ops import CustomOpDef
    except ImportError as err:
        return f"this PyTorch has no torch._library.autograd.make_autograd_impl ({err})"
    if not all(hasattr(CustomOpDef, name) for name in ("register_autograd", "register_kernel")):
        return "this PyTorch's CustomOpDef lacks register_autograd/register_kernel"
    if not hasattr(torch._C, "_functorch") or not hasattr(
        torch._C._functorch, "get_interpreter_stack"
    ):
        return "this PyTorch has no torch._C._functorch.get_interpreter_stack"
    return None


# Why the explicit ops cannot serve forward AD and torch.func here, or None if they can.
AUTOGRAD_KERNEL_REASON: str | None = _autograd_kernel_reason()


def install_autograd_kernel(op: Any, kernel: Callable[..., Any]) -> bool:
    """Replace ``op``'s Autograd kernel by ``kernel(generated, keyset, *args)``.

    ``generated`` is the kernel ``register_autograd`` made (plain reverse mode). Returns False,
    changing nothing, where this PyTorch lacks what it needs (:data:`AUTOGRAD_KERNEL_REASON`).
    """
    if AUTOGRAD_KERNEL_REASON is not None:
        return False
    from torch._library.autograd import make_autograd_impl

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
    return True


def tangents(tensors: tuple[Tensor | None, ...]) -> list[Tensor | None] | None:
    """The forward-AD tangents the tensors carry at the innermost level, or None if none does.

    Reads only the tensors (a tensor made dual in another thread's level carries nothing
    here), so a call that carries no tangent takes the plain path whatever other threads do.
    """
    if not torch._C._is_fwd_grad_enabled() or getattr(fwAD, "_current_level", 0) < 0:
        return None  # (no dual level is open in any thread: no tensor carries a tangent)
    found = [None if t is None else fwAD.unpack_dual(t).tangent for t in tensors]
    return found if any(t is not None for t in found) else None


def under_functorch_grad() -> bool:
    """True while a ``torch.func`` reverse-mode transform (grad, vjp, jacrev) processes the op.

    The interpreter stack is per thread.
    """
    if AUTOGRAD_KERNEL_REASON is not None:
        return False
    stack = torch._C._functorch.get_interpreter_stack()
    return bool(stack) and stack[-1].key() == torch._C._functorch.TransformType.Grad


# (Looked up once: the checks below run on every plain eager call, a few microseconds long.)
_FUNCTORCH_ACTIVE = getattr(torch._C, "_are_functorch_transforms_active", None)
_FUNCTION_MODES = getattr(torch._C, "_is_torch_function_mode_enabled", None)
_DISPATCH_MODES = getattr(torch._C, "_len_torch_dispatch_stack", None)
_LEGACY_BATCHED = getattr(torch._C._functorch, "is_legacy_batchedtensor", None)


def functorch_active() -> bool:
    """True inside any ``torch.func`` transform in this thread (vmap, grad, jvp, ...)."""
    return bool(_FUNCTORCH_ACTIVE()) if _FUNCTORCH_ACTIVE is not None else False


def modes_active() -> bool:
    """True while a torch function mode or a dispatch mode is active in this thread (fake
    tensors, export and other tracers, flop counters, ``with torch.device(...)``)."""
    if _FUNCTION_MODES is None or _DISPATCH_MODES is None:
        return True  # cannot tell: assume one is
    return bool(_FUNCTION_MODES()) or _DISPATCH_MODES() > 0


def is_legacy_batched(t: Tensor) -> bool:
    """Whether ``t`` is batched by the legacy vmap (``torch._vmap_internals``, which
    ``gradcheck``'s batched-gradient check uses)."""
    return bool(_LEGACY_BATCHED(t)) if _LEGACY_BATCHED is not None else False


def is_functorch_wrapped(t: Tensor) -> bool:
    """Whether ``t`` is a ``torch.func`` wrapper (batched by vmap, or tracked by grad/jvp)."""
    check = getattr(torch._C._functorch, "is_functorch_wrapped_tensor", None)
    return bool(check(t)) if check is not None else False


@functools.cache
def linear_pointwise() -> Callable[..., Tensor] | None:
    """oneDNN's ``_linear_pointwise(x, w, bias, attr, scalars, algorithm)``: ``attr(x @ w^T)``
    with the elementwise ``attr`` ("tanh", "none", ...) in the product's epilogue; None where
    this PyTorch build has no oneDNN or no such op."""
    if not torch.backends.mkldnn.is_available():
        return None
    return getattr(torch.ops.mkldnn, "_linear_pointwise", None)


def assert_async(condition: Tensor, message: str) -> None:
    """Assert a 0-d bool tensor inside a compiled graph (no data-dependent Python branch);
    it raises RuntimeError with ``message`` when the graph runs. Where this PyTorch has no
    ``torch._assert_async``, nothing is asserted."""
    check = getattr(torch, "_assert_async", None)
    if check is not None:
        check(condition, message)


def _constant_under_compile(fn: Callable[[str], bool]) -> Callable[[str], bool]:
    # Dynamo calls the function while tracing and uses its result as a constant, as torch
    # 2.13's Dynamo does with importlib.util.find_spec itself (2.11's raises Unsupported).
    assume = getattr(getattr(torch, "_dynamo", None), "assume_constant_result", None)
    return assume(fn) if assume is not None else fn  # type: ignore[no-any-return]


@_constant_under_compile
def module_available(name: str) -> bool:
    """Whether the top-level module ``name`` can be imported (``importlib.util.find_spec``),
    without importing it; callable inside a ``torch.compile`` region (a constant there)."""
    return importlib.util.find_spec(name) is not None


def all_gather_autograd(x: Tensor, group: Any) -> Tensor:
    """All-gather ``x`` along dim 0 over the process group ``group`` in rank order, the
    backward reduce-scattering (summing) the gradient; the result may be an async collective
    tensor (``funcol.wait_tensor`` it). torch 2.13 names it ``all_gather_single_autograd``;
    earlier releases ``all_gather_tensor_autograd`` (the same op,
    ``_c10d_functional_autograd.all_gather_into_tensor``)."""
    from torch.distributed import _functional_collectives as funcol

    gather = getattr(funcol, "all_gather_single_autograd", None)
    if gather is None:
        return _all_gather_tensor_autograd(x, group)
    return gather(x, 0, group)  # type: ignore[no-any-return]


def _all_gather_tensor_autograd(x: Tensor, group: Any) -> Tensor:
    """:func:`all_gather_autograd` before torch 2.13 (``all_gather_tensor_autograd``), whose
    backward's reduce-scatter refuses a non-contiguous gradient (the caller's ``movedim``
    makes one): the gradient is made contiguous on its way in."""
    from torch.distributed import _functional_collectives as funcol

    g = funcol.wait_tensor(funcol.all_gather_tensor_autograd(x, 0, group))
    return _ContiguousGrad.apply(g)  # type: ignore[no-any-return]


class _ContiguousGrad(torch.autograd.Function):
    """The identity; its backward passes the gradient on contiguous."""

    @staticmethod
    def forward(ctx: Any, x: Tensor) -> Tensor:
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> Tensor:
        return grad.contiguous()
