"""The derived math of tanh attention, written once as plain differentiable torch code.

Each function here is one formula of ``docs/derivation.md`` (the document names them). Every
implementation in the package computes these formulas: the composite op runs ``forward``
under autograd, the autograd.Function and the explicit op call ``vjp``/``jvp``, and the
explicit backward op's own backward calls ``vjp_of_vjp``. Because the code is plain torch, it
is itself differentiable, which is what makes higher-order derivatives work. The kernels
(``kernels/``) compute the same formulas block by block; they are tested against an
independent reference, not against this file.

Notation (batch dimensions ``...`` broadcast as in ``torch.matmul``)::

    q (..., n, d)   k (..., m, d)   v (..., m, e)
    x = scale * q @ k^T                          (..., n, m)
    a = M * tanh(x)                              (..., n, m)   M: 0/1 keep-mask
    o = a @ v                                    (..., n, e)

``a`` has the batch shape of q, k and the mask; ``o`` that of all of them with v. Scores are
scaled after the product, never q before it: ``(q * scale) @ k^T`` can overflow to
``inf - inf = NaN`` where ``q @ k^T`` is finite and the exact weights are +-1.

In-place ops below act only on fresh intermediates whose old values autograd does not need
(``tanh_`` of a matmul output, ``mul_`` by a Python scalar), and never take a
second tensor operand: under vmap that operand may be batched where the target is not.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from . import dropout

__all__ = [
    "causal_diagonal",
    "forward",
    "jvp",
    "keep",
    "scaled",
    "vjp",
    "vjp_of_vjp",
]


def _sum_to(g: Tensor, shape: Sequence[int]) -> Tensor:
    """Reduce a gradient over the batch dimensions its input was broadcast along."""
    return g if g.shape == tuple(shape) else g.sum_to_size(tuple(shape))


def causal_diagonal(causal: str, n: int, m: int) -> int | None:
    """The diagonal below which (inclusive) a causal variant keeps entries of an n x m matrix.

    Entry ``(i, j)`` is kept iff ``j <= i + diagonal``: 0 for ``"top_left"`` (as
    ``scaled_dot_product_attention``'s ``is_causal``), ``m - n`` for ``"bottom_right"`` (the
    n queries are the last n of m positions, as in a decoding step); None for ``"none"``.
    """
    if causal == "none":
        return None
    if causal == "top_left":
        return 0
    if causal == "bottom_right":
        return m - n
    raise ValueError(f"causal must be 'none', 'top_left' or 'bottom_right', got {causal!r}")


def keep(s: Tensor, *, causal: str, attn_mask: Tensor | None) -> Tensor:
    """Zero the entries of an ``(..., n, m)`` tensor that the keep-mask M drops: ``M * s``.

    ``causal`` keeps the entries :func:`causal_diagonal` says; ``attn_mask`` keeps its True
    entries (and broadcasts ``s`` to its batch dims); both together keep the intersection.
    Both act out of place: ``tril_`` has no vmap batching rule, and under vmap a batched mask
    may not be written into an unbatched tensor. Masked entries become exactly 0 even where
    ``s`` is NaN or infinite.
    """
    diagonal = causal_diagonal(causal, s.shape[-2], s.shape[-1])
    if diagonal is not None and diagonal < s.shape[-1] - 1:  # (else it keeps every entry:
        s = s.tril(diagonal)  # a decoding step's one query sees the whole cache)
    if attn_mask is not None:
        s = s.masked_fill(attn_mask.logical_not(), 0)
    return s


def scaled(x: Tensor, scale: float) -> Tensor:
    """``scale * x``, where ``0 * scale`` stays 0 even if ``scale`` overflows x's dtype.

    A float32 (or bfloat16) tensor times a Python float above its largest finite value would
    meet ``0 * inf = NaN``; there the product is taken in float64 and rounded, which gives
    ``+-inf`` (saturating tanh to +-1) where ``x != 0`` and 0 where ``x == 0``.
    """
    if isinstance(scale, float | int):
        if scale == 1.0:
            return x
        if abs(scale) > _largest(x.dtype):
            return (x.double() * scale).to(x.dtype)
    return x * scale


@functools.cache
def _largest(dtype: torch.dtype) -> float:
    return torch.finfo(dtype).max


def _scores(q: Tensor, k: Tensor, scale: float) -> Tensor:
    """``x = scale * q @ k^T``, scaled after the product (see the module doc)."""
    return scaled(torch.matmul(q, k.mT), scale)


def forward(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    attn_mask: Tensor | None = None,
    *,
    scale: float = 1.0,
    causal: str = "none",
    bias: Tensor | None = None,
    dropout_p: float = 0.0,
    dropout_seed: Tensor | None = None,
    tanh: Callable[[Tensor], Tensor] = torch.tanh,
) -> tuple[Tensor, Tensor]:
    """Forward: ``a = M * tanh(scale * q @ k^T + bias)``, ``o = dropout(a) @ v``.

    Masked scores are set to 0 before tanh, so ``a`` is exactly 0 there (tanh(0) = 0) and
    autograd of this code gives them exactly zero gradient. (Masking with -inf, as softmax
    attention does, would give tanh(-inf) = -1.)

    Args:
        q: ``(..., n, d)``.  k: ``(..., m, d)``.  v: ``(..., m, e)``.
        attn_mask: optional bool ``(..., n, m)``-broadcastable mask, True = takes part.
        scale: multiplies the scores.  causal: ``"none"``, ``"top_left"`` or ``"bottom_right"``.
        bias: optional ``(..., n, m)``-broadcastable float tensor added to the scores before
            tanh (its masked entries do not matter: they are replaced by 0).
        dropout_p: each weight is dropped with this probability and the others scaled by
            ``1 / (1 - dropout_p)``: the mask of ``dropout.py``, from ``dropout_seed`` (None:
            one drawn from torch's generator, so ``torch.manual_seed`` fixes it).
        dropout_seed: the mask's seed, an int64 tensor (the same as the kernels': the same
            seed drops the same weights on every path).
        tanh: computes tanh of the kept scores; the CPU kernels pass their own (in place,
            by the fastest accurate method of the machine, ``kernels/cpu.py``) for the small
            calls they run here without autograd.

    Returns:
        ``(o, a)`` with shapes ``(*batch, n, e)`` and ``(*weights_batch, n, m)``; ``a`` after
        dropout.

    The bias and dropout terms have no hand-derived rule here: only the composite op takes
    them, and autograd derives their backward (``g_bias = g_x``, summed to bias's shape).
    """
    x = _scores(q, k, scale)
    if bias is not None:
        x = x + bias
    a = tanh(keep(x, causal=causal, attn_mask=attn_mask))
    if dropout_p > 0.0:
        seed = dropout.draw_seed() if dropout_seed is None else dropout_seed
        kept = dropout.keep_mask(dropout_p, seed, a.shape, a.device)
        a = a * (kept.to(a.dtype) * dropout.Dropout(dropout_p, seed).scale)
    return torch.matmul(a, v), a


def vjp(
    g_o: Tensor | None,
    g_a: Tensor | None,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    a: Tensor,
    attn_mask: Tensor | None = None,
    *,
    scale: float = 1.0,
    causal: str = "none",
    needs: Sequence[bool] = (True, True, True),
) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    """Reverse mode (VJP): gradients of ``<g_o, o> + <g_a, a>`` w.r.t. q, k, v.

    ``g_x = M * (g_o @ v^T + g_a) * (1 - a^2)`` is formed once and shared::

        g_q = scale * g_x @ k      g_k = scale * g_x^T @ q      g_v = a^T @ g_o

    An absent output gradient (None) drops its term; nothing is built for it. ``needs``
    says which of (q, k, v) want a gradient; the others are returned as None. Gradients are
    summed back to each input's shape over broadcast batch dimensions.

    Args:
        g_o: ``(*batch, n, e)`` or None.  g_a: ``(*batch, n, m)`` or None.
        q, k, v, a: the forward's inputs and its output ``a``.

    Returns:
        ``(g_q, g_k, g_v)``, each shaped like its input, or None.
    """
    need_q, need_k, need_v = needs
    g_q = g_k = g_v = None
    if need_q or need_k:
        if g_o is not None:
            # Summed to a's batch first: v may carry batch dims that a lacks.
            g = _sum_to(torch.matmul(g_o, v.mT), a.shape)
            if g_a is not None:
                g = g + g_a
        elif g_a is not None:
            g = g_a
        else:
            g = None
        if g is not None:
            # (1 - a^2) * g in one fused, differentiable kernel; M applied after, because a
            # masked entry has a = 0 and so (1 - a^2) = 1 there.
            g_x = keep(torch.ops.aten.tanh_backward(g, a), causal=causal, attn_mask=attn_mask)
            if need_q:
                g_q = _sum_to(scaled(torch.matmul(g_x, k), scale), q.shape)
            if need_k:
                g_k = _sum_to(scaled(torch.matmul(g_x.mT, q), scale), k.shape)
    if need_v and g_o is not None:
        g_v = _sum_to(torch.matmul(a.mT, g_o), v.shape)
    return g_q, g_k, g_v


def jvp(
    t_q: Tensor | None,
    t_k: Tensor | None,
    t_v: Tensor | None,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    a: Tensor,
    attn_mask: Tensor | None = None,
    *,
    scale: float = 1.0,
    causal: str = "none",
) -> tuple[Tensor | None, Tensor]:
    """Forward mode (JVP): tangents of ``(o, a)`` given tangents of ``(q, k, v)``::

        t_x = scale * (t_q @ k^T + q @ t_k^T)
        t_a = M * (1 - a^2) * t_x
        t_o = t_a @ v + a @ t_v

    An absent input tangent (None) drops its term. Returns ``(t_o, t_a)``; ``t_o`` is None
    only when no tangent was given, and ``t_a`` is a stride-0 zero when neither q nor k has
    a tangent.
    """
    t_x = None
    if t_q is not None:
        t_x = _scores(t_q, k, scale)
    if t_k is not None:
        t_xk = _scores(q, t_k, scale)
        t_x = t_xk if t_x is None else t_x + t_xk
    t_o = None
    if t_x is not None:
        t_a = keep(torch.ops.aten.tanh_backward(t_x, a), causal=causal, attn_mask=attn_mask)
        t_o = torch.matmul(t_a, v)
    else:
        # a does not depend on v. A stride-0 zero says so without an n x m buffer (autograd
        # rejects None as an output tangent here).
        t_a = torch.zeros((), dtype=a.dtype, device=a.device).expand(a.shape)
    if t_v is not None:
        t_av = torch.matmul(a, t_v)
        t_o = t_av if t_o is None else t_o + t_av
    return t_o, t_a


def vjp_of_vjp(
    xi_q: Tensor | None,
    xi_k: Tensor | None,
    xi_v: Tensor | None,
    g_o: Tensor | None,
    g_a: Tensor | None,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    a: Tensor,
    attn_mask: Tensor | None = None,
    *,
    scale: float = 1.0,
    causal: str = "none",
) -> tuple[Tensor | None, ...]:
    """Double backward: the VJP of :func:`vjp` itself, as a function of its tensor inputs.

    Given cotangents ``xi_q, xi_k, xi_v`` of ``(g_q, g_k, g_v)`` (None when absent), with
    ``G = g_o @ v^T + g_a`` and ``g_x = M * G * (1 - a^2)``::

        xi_x   = scale * (xi_q @ k^T + q @ xi_k^T)
        xi_G   = M * (1 - a^2) * xi_x
        d g_o  = xi_G @ v + a @ xi_v           d g_a = xi_G
        d q    = scale * g_x @ xi_k            d k   = scale * g_x^T @ xi_q
        d v    = xi_G^T @ g_o                  d a   = -2 * a * G * xi_x + g_o @ xi_v^T

    (``d a`` needs no M: a is 0 wherever M is.) ``d a`` reaches q and k through the forward's
    own backward, since ``a`` is the forward op's output.

    Returns:
        ``(d_g_o, d_g_a, d_q, d_k, d_v, d_a)``, each shaped like its input, or None.
    """
    if g_o is None and g_a is None:
        return (None,) * 6
    xi_x = None
    if xi_q is not None:
        xi_x = _scores(xi_q, k, scale)
    if xi_k is not None:
        xi_xk = _scores(q, xi_k, scale)
        xi_x = xi_xk if xi_x is None else xi_x + xi_xk

    d_g_o = d_g_a = d_q = d_k = d_v = d_a = None
    if xi_x is not None:
        g = _sum_to(torch.matmul(g_o, v.mT), a.shape) if g_o is not None else None
        if g_a is not None:
            g = g_a if g is None else g + g_a
        assert g is not None  # one of g_o, g_a is present (checked above)
        g_x = keep(torch.ops.aten.tanh_backward(g, a), causal=causal, attn_mask=attn_mask)
        xi_g = keep(torch.ops.aten.tanh_backward(xi_x, a), causal=causal, attn_mask=attn_mask)
        if xi_k is not None:
            d_q = _sum_to(scaled(torch.matmul(g_x, xi_k), scale), q.shape)
        if xi_q is not None:
            d_k = _sum_to(scaled(torch.matmul(g_x.mT, xi_q), scale), k.shape)
        if g_a is not None:
            d_g_a = _sum_to(xi_g, g_a.shape)
        if g_o is not None:
            d_g_o = torch.matmul(xi_g, v)
            d_v = _sum_to(torch.matmul(xi_g.mT, g_o), v.shape)
        d_a = (a * g * xi_x).mul_(-2)
    if xi_v is not None and g_o is not None:
        d_g_o_v = torch.matmul(a, xi_v)
        d_g_o = d_g_o_v if d_g_o is None else d_g_o + d_g_o_v
        d_a_v = _sum_to(torch.matmul(g_o, xi_v.mT), a.shape)  # v may bring batch dims
        d_a = d_a_v if d_a is None else d_a + d_a_v
    if d_g_o is not None:
        assert g_o is not None
        d_g_o = _sum_to(d_g_o, g_o.shape)
    if d_a is not None:
        d_a = _sum_to(d_a, a.shape)
    return d_g_o, d_g_a, d_q, d_k, d_v, d_a
