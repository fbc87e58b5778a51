"""The public functions: ``attn`` validates, then runs the backend that fits;
``scaled_dot_product_attention`` is SDPA's signature on top of it.

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
from torch.nn.attention.bias import CausalBias, CausalVariant

from . import dispatch, dropout, fastpath
from ._checks import normalize_causal, validate_attn_inputs
from .backends import Inputs

__all__ = ["attn", "scaled_dot_product_attention"]

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
    bias: Tensor | None = ...,
    dropout_p: float = ...,
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
    bias: Tensor | None = ...,
    dropout_p: float = ...,
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
    bias: Tensor | None = ...,
    dropout_p: float = ...,
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
    bias: Tensor | None = None,
    dropout_p: float = 0.0,
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
            backends that say ``memory_efficient``, not kept: the backward recomputes each
            block of ``a``, so memory stays linear in n. (Short sequences, whose ``a`` is at
            most twice the size of q, k and v together, keep it in plain eager calls:
            faster, and at most three times the inputs' memory; so do calls whose ``a`` has
            at most 65536 entries.)
        attn_mask: optional bool mask that broadcasts with ``(*batch, n, m)``; True = takes
            part (the convention of ``scaled_dot_product_attention``). Combined with
            ``causal`` the two intersect. Masked entries of ``a`` are exactly 0 with zero
            gradient.
        backend: None (the first backend of ``tanh_attention.backends()`` that supports the
            call) or a backend's name (forced; it must support the call).
        bias: optional float tensor of q's dtype, broadcastable like the mask, added to the
            scores before tanh (ALiBi, relative positions); it gets its gradient.
        dropout_p: drop each weight with this probability and scale the others by
            ``1 / (1 - dropout_p)``, following ``torch.manual_seed`` (one draw per call); ``a``
            is returned after dropout. The mask is a function of the draw and each weight's
            position (``tanh_attention.dropout``): the backward makes it again, so the
            memory-efficient path stores no mask, and every CPU path drops the same weights.

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
    no_dropout = type(dropout_p) is float and dropout_p == 0.0
    if attn_mask is None and bias is None and backend is None and no_dropout:
        # The plainest calls skip validation and dispatch (fastpath.py); it declines the rest.
        fast = fastpath.attn(q, k, v, scale, causal, need_weights)
        if fast is not None:
            return fast
    shapes = validate_attn_inputs(
        q,
        k,
        v,
        attn_mask,
        scale=scale,
        causal=causal,
        need_weights=need_weights,
        bias=bias,
        dropout_p=dropout_p,
    )
    _validate_backend(backend)
    inputs = Inputs(
        q,
        k,
        v,
        attn_mask,
        _as_scale(scale),
        normalize_causal(causal),
        need_weights,
        shapes,
        bias,
        dropout_p,
        dropout.draw_seed() if dropout_p > 0.0 else None,
    )
    return dispatch.select(inputs, backend)(inputs)


def _validate_sdpa_flags(is_causal: object, enable_gqa: object) -> None:
    for name, flag in (("is_causal", is_causal), ("enable_gqa", enable_gqa)):
        if not isinstance(flag, bool):
            raise TypeError(
                f"scaled_dot_product_attention(): argument '{name}' must be a bool, but got "
                f"{type(flag).__name__} ({flag!r})."
            )


def _sdpa_mask(
    attn_mask: Tensor | None, is_causal: bool
) -> tuple[Tensor | None, Tensor | None, CausalArg]:
    """SDPA's ``attn_mask``/``is_causal`` as ``(bool mask, additive bias, causal)``.

    A float mask is a bias on the scores; its ``-inf`` entries and those at or below
    ``finfo(dtype).min`` (HuggingFace's "masked") become False in the bool mask and 0 in the
    bias, so they take no part (weight and gradient exactly 0, never ``tanh(-inf) = -1``).
    """
    if attn_mask is None:
        return None, None, is_causal
    if is_causal:
        raise ValueError(
            "scaled_dot_product_attention(): pass either attn_mask or is_causal=True, not both "
            "(as torch.nn.functional.scaled_dot_product_attention). Combine them in one mask."
        )
    if isinstance(attn_mask, CausalBias):
        upper = attn_mask.variant == CausalVariant.UPPER_LEFT
        return None, None, "top_left" if upper else "bottom_right"
    if not isinstance(attn_mask, Tensor):
        raise TypeError(
            "scaled_dot_product_attention(): argument 'attn_mask' must be a bool or float "
            f"torch.Tensor, a CausalBias or None, but got {type(attn_mask).__name__}."
        )
    if attn_mask.dtype == torch.bool:
        return attn_mask, None, False
    if not attn_mask.is_floating_point():
        raise TypeError(
            "scaled_dot_product_attention(): expected 'attn_mask' to be bool (True = takes "
            f"part) or floating (an additive bias), but got attn_mask.dtype={attn_mask.dtype}."
        )
    dropped = attn_mask <= torch.finfo(attn_mask.dtype).min  # -inf too
    return dropped.logical_not(), attn_mask.masked_fill(dropped, 0.0), False


def _group_heads(t: Tensor | None, groups: int, heads: int) -> Tensor | None:
    """A mask or bias over query heads as ``(..., kv_heads, groups, n, m)`` (a view)."""
    if t is None or t.dim() < 3:
        return t
    if t.shape[-3] == heads:
        return t.unflatten(-3, (heads // groups, groups))
    return t.unsqueeze(-3)  # one head (or a broadcast one): shared by every group


def _sdpa(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attn_mask: Tensor | None,
    dropout_p: float,
    is_causal: bool,
    scale: float | None,
    enable_gqa: bool,
    need_weights: bool,
) -> tuple[Tensor, Tensor | None]:
    """:func:`scaled_dot_product_attention` that can also return the weights (HF's
    ``output_attentions``): ``(o, a or None)``, ``a`` with one head dim of query heads."""
    _validate_sdpa_flags(is_causal, enable_gqa)
    if not all(isinstance(t, Tensor) and t.dim() >= 2 for t in (query, key, value)):
        validate_attn_inputs(query, key, value)  # raises the precise error
    if scale is None:
        scale = query.shape[-1] ** -0.5
    mask, bias, causal = _sdpa_mask(attn_mask, is_causal)
    q, k, v = query, key, value
    groups = 1
    if enable_gqa and query.dim() >= 3 and key.dim() >= 3:
        heads, kv_heads = query.shape[-3], key.shape[-3]
        if kv_heads == 0 or heads % kv_heads or value.dim() < 3 or value.shape[-3] != kv_heads:
            raise ValueError(
                "scaled_dot_product_attention(): enable_gqa=True needs the query heads "
                "(dim -3) to be a multiple of the key/value heads, but got "
                f"query.shape={tuple(query.shape)}, key.shape={tuple(key.shape)}, "
                f"value.shape={tuple(value.shape)}."
            )
        groups = heads // kv_heads
        if groups > 1:
            # Query heads h = g_kv * groups + j share key/value head g_kv (SDPA's convention):
            # a view of q and stride-0 dims of k and v, no copy.
            q = query.unflatten(-3, (kv_heads, groups))
            k, v = key.unsqueeze(-3), value.unsqueeze(-3)
            mask, bias = _group_heads(mask, groups, heads), _group_heads(bias, groups, heads)
    o, a = attn(
        q,
        k,
        v,
        scale=scale,
        causal=causal,
        need_weights=need_weights,
        attn_mask=mask,
        bias=bias,
        dropout_p=dropout_p,
    )
    if groups > 1:
        o = o.flatten(-4, -3)
        a = None if a is None else a.flatten(-4, -3)
    return o, a


def scaled_dot_product_attention(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attn_mask: Tensor | None = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: float | None = None,
    enable_gqa: bool = False,
) -> Tensor:
    """Tanh attention with the signature of ``torch.nn.functional.scaled_dot_product_attention``.

    Why: models call attention through SDPA; replacing it by this function is a one-line
    change, with ``tanh(scores)`` in place of ``softmax(scores)`` (no normalisation over keys).

    Args:
        query: ``(N, ..., Hq, L, E)``.
        key: ``(N, ..., H, S, E)``.
        value: ``(N, ..., H, S, Ev)``.
        attn_mask: None; a bool mask broadcastable to ``(N, ..., Hq, L, S)``, True = takes
            part; a float mask, added to the scores before tanh (a bias: ALiBi, relative
            positions; it gets its gradient), whose ``-inf`` entries and entries at or below
            ``torch.finfo(dtype).min`` do not take part (weight and gradient exactly 0); or
            ``torch.nn.attention.bias.causal_upper_left(L, S)`` / ``causal_lower_right(L, S)``.
        dropout_p: dropout on the weights (unbiased, following ``torch.manual_seed``); like
            SDPA it applies whenever ``dropout_p > 0`` (pass 0.0 in eval mode).
        is_causal: keep keys ``j <= i`` (top-left, as SDPA). Not together with ``attn_mask``.
        scale: multiplies ``query @ key^T``; None is ``1 / sqrt(E)``.
        enable_gqa: ``Hq`` a multiple of ``H``; query head ``h`` uses key/value head
            ``h // (Hq / H)``, without copying key or value.

    Returns:
        ``(N, ..., Hq, L, Ev)``.

    Raises:
        TypeError, ValueError: bad input, as ``tanh_attention.attn``; a mask with
            ``is_causal=True``; head counts that do not group.

    Example:
        >>> q, k, v = (torch.randn(1, 4, 3, 8, dtype=torch.float64) for _ in range(3))
        >>> o = scaled_dot_product_attention(q, k[:, :2], v[:, :2], enable_gqa=True)
        >>> ref = torch.tanh(q @ k[:, :2].repeat_interleave(2, 1).mT / 8**0.5)
        >>> bool(torch.allclose(o, ref @ v[:, :2].repeat_interleave(2, 1)))
        True
    """
    return _sdpa(
        query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa, need_weights=False
    )[0]
