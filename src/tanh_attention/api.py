"""The public function ``tanh_attention.attn``: validates, then runs the backend that fits.

Validation (``_checks.py``) comes first, so bad input fails before any work; the dispatcher
(``dispatch.py``) then picks the first backend of ``tanh_attention.backends()`` that supports
the call, or the one named by ``backend=``. Every backend computes the same formulas and
returns the same shapes as the composite; every one works under autograd (any order),
forward AD, ``torch.func``, ``torch.compile`` and ``torch.export``.
"""

from __future__ import annotations

from typing import Literal, overload

import torch
from torch import Tensor

from . import dispatch
from ._checks import normalize_causal, validate_attn_inputs
from .backends import Inputs

__all__ = ["attn"]

CausalArg = bool | Literal["top_left", "bottom_right"]


def _as_scale(scale: float) -> float:
    """A Python float for the ops' ``float`` argument; a symbolic scale stays symbolic."""
    if isinstance(scale, torch.SymFloat):
        return scale  # type: ignore[return-value]  # a SymFloat is the float of a traced call
    if isinstance(scale, torch.SymInt):
        return torch.sym_float(scale)  # type: ignore[return-value]
    if torch.compiler.is_compiling():
        return scale  # float() of a traced scale would specialize it
    return float(scale)


def _validate_backend(backend: object) -> None:
    if backend is not None and not isinstance(backend, str):
        raise TypeError(
            "attn(): argument 'backend' must be None or a backend name (str), but got "
            f"{type(backend).__name__}."
        )


@overload
def attn(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    scale: float = ...,
    causal: CausalArg = ...,
    need_weights: Literal[True] = ...,
    attn_mask: Tensor | None = ...,
    backend: str | None = ...,
) -> tuple[Tensor, Tensor]: ...


@overload
def attn(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    scale: float = ...,
    causal: CausalArg = ...,
    need_weights: Literal[False],
    attn_mask: Tensor | None = ...,
    backend: str | None = ...,
) -> tuple[Tensor, None]: ...


@overload
def attn(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    scale: float = ...,
    causal: CausalArg = ...,
    need_weights: bool,
    attn_mask: Tensor | None = ...,
    backend: str | None = ...,
) -> tuple[Tensor, Tensor | None]: ...


def attn(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    scale: float = 1.0,
    causal: CausalArg = False,
    need_weights: bool = True,
    attn_mask: Tensor | None = None,
    backend: str | None = None,
) -> tuple[Tensor, Tensor | None]:
    """Tanh attention: ``a = M * tanh(scale * q @ k^T)`` (masked entries exactly 0), ``o = a @ v``.

    The element-wise attention of PyTorch's Autograd Onboarding Lab, with batching, scale,
    causal masks and boolean masks. Gradients (first and higher order), forward AD and every
    ``torch.func`` transform use the hand-derived formulas of ``docs/derivation.md``.

    Args:
        q: queries ``(..., n, d)``.
        k: keys ``(..., m, d)``.
        v: values ``(..., m, e)``. Batch dims of q, k, v (and the mask) broadcast as in
            ``torch.matmul``; gradients of broadcast inputs are summed back to their shapes.
        scale: multiplies the scores ``q @ k^T`` (any finite number; the scores are scaled
            after the product, so a large scale saturates the weights to +-1, never NaN).
        causal: ``False``; ``True`` or ``"top_left"``: row i keeps keys ``j <= i`` (as
            ``scaled_dot_product_attention(is_causal=True)``); ``"bottom_right"``: the n
            queries are the last n of m positions, row i keeps ``j <= i + m - n`` (a decoding
            step with a KV cache).
        need_weights: return ``a``; with False the weights are returned as None and, on the
            backends that say ``memory_efficient``, never built (the backward recomputes each
            block of ``a``).
        attn_mask: optional bool mask that broadcasts with ``(*batch, n, m)``; True = takes
            part (the convention of ``scaled_dot_product_attention``). Combined with
            ``causal`` the two intersect. Masked entries of ``a`` are exactly 0 with zero
            gradient.
        backend: None (the first backend of ``tanh_attention.backends()`` that supports the
            call) or a backend's name (forced; it must support the call).

    Returns:
        ``(o, a)``: ``o`` of shape ``(*batch, n, e)`` (the batch of q, k, v and the mask) and
        ``a`` of shape ``(*weights_batch, n, m)`` (the batch of q, k and the mask: exactly
        what ``tanh(scale * q @ k^T)`` gives), or ``(o, None)`` when ``need_weights=False``.

    Raises:
        TypeError: a non-tensor input, a nested or sparse tensor, an unsupported or mixed
            dtype, a non-bool flag or mask, a non-number scale, a non-string backend.
        ValueError: rank below 2, mismatched feature or key sizes, batch dims that do not
            broadcast, mixed devices, a non-finite scale, a mask of the wrong shape, an
            unknown causal variant or backend, or a backend that cannot run the call (the
            message lists why, for each backend).

    Non-finite inputs propagate as in the composite ``(M * tanh(scale * q @ k^T)) @ v``: a
    NaN or infinity in v reaches every row through ``0 * inf`` (masks make weights 0, not
    keys absent); in q or k, it reaches the rows whose scores it enters.

    Example:
        >>> q = torch.randn(2, 3, dtype=torch.float64)
        >>> k = torch.randn(2, 3, dtype=torch.float64)
        >>> v = torch.randn(2, 4, dtype=torch.float64)
        >>> o, a = attn(q, k, v)
        >>> bool(torch.allclose(o, torch.tanh(q @ k.T) @ v))
        True
        >>> o, none = attn(q, k, v, causal="bottom_right", need_weights=False)
        >>> bool(torch.allclose(o, torch.tanh(q @ k.T).tril() @ v)), none
        (True, None)
    """
    shapes = validate_attn_inputs(
        q, k, v, attn_mask, scale=scale, causal=causal, need_weights=need_weights
    )
    _validate_backend(backend)
    inputs = Inputs(
        q, k, v, attn_mask, _as_scale(scale), normalize_causal(causal), need_weights, shapes
    )
    return dispatch.select(inputs, backend)(inputs)
