"""The derived math of tanh attention, written once as plain differentiable torch code.

Each function here is one formula of ``docs/derivation.md`` (the document names them). Every
implementation in the package computes these formulas: the composite op runs ``forward``
under autograd, the autograd.Function and the explicit op call ``vjp``/``jvp``, and the
explicit backward op's own backward calls ``vjp_of_vjp``. Because the code is plain torch, it
is itself differentiable, which is what makes higher-order derivatives work. The ``*_block_``
functions at the end are the same formulas on one block of the ``n x m`` matrices, evaluated in
place for the fast kernels (``kernels/blockwise.py``); they are not differentiable.

Notation (batch dimensions ``...`` broadcast as in ``torch.matmul``)::

    q (..., n, d)   k (..., m, d)   v (..., m, e)
    x = scale * q @ k^T                          (..., n, m)
    a = M * tanh(x)                              (..., n, m)   M: 0/1 keep-mask
    o = a @ v                                    (..., n, e)

In-place ops below act only on fresh intermediates whose old values autograd does not need
(``tanh_`` of a matmul output, ``mul_`` by a Python scalar), and never take a
second tensor operand: under vmap that operand may be batched where the target is not.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

__all__ = [
    "forward",
    "forward_block_",
    "jvp",
    "jvp_block_",
    "keep",
    "keep_block_",
    "vjp",
    "vjp_block_",
    "vjp_of_vjp",
]


def _sum_to(g: Tensor, shape: Sequence[int]) -> Tensor:
    """Reduce a gradient over the batch dimensions its input was broadcast along."""
    return g if g.shape == tuple(shape) else g.sum_to_size(tuple(shape))


def keep(s: Tensor, *, causal: bool, attn_mask: Tensor | None) -> Tensor:
    """Zero the entries of an ``(..., n, m)`` tensor that the keep-mask M drops: ``M * s``.

    Causal keeps ``j <= i`` (top-left aligned, as ``scaled_dot_product_attention``'s
    ``is_causal``); ``attn_mask`` keeps its True entries; both together keep the intersection.
    Both act out of place: ``tril_`` has no vmap batching rule, and under vmap a batched mask
    may not be written into an unbatched tensor. (The fused kernels avoid the copies.)
    """
    if causal:
        s = s.tril()
    if attn_mask is not None:
        s = s.masked_fill(attn_mask.logical_not(), 0)
    return s


def _scores(q: Tensor, k: Tensor, scale: float) -> Tensor:
    """``x = scale * q @ k^T``, scaling the smaller operand."""
    return torch.matmul(q * scale if scale != 1.0 else q, k.mT)


def forward(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    attn_mask: Tensor | None = None,
    *,
    scale: float = 1.0,
    causal: bool = False,
) -> tuple[Tensor, Tensor]:
    """Forward: ``a = M * tanh(scale * q @ k^T)``, ``o = a @ v``.

    Masked scores are set to 0 before tanh, so ``a`` is exactly 0 there (tanh(0) = 0) and
    autograd of this code gives them exactly zero gradient. (Masking with -inf, as softmax
    attention does, would give tanh(-inf) = -1.)

    Args:
        q: ``(..., n, d)``.  k: ``(..., m, d)``.  v: ``(..., m, e)``.
        attn_mask: optional bool ``(..., n, m)``-broadcastable mask, True = takes part.
        scale: multiplies the scores.  causal: keep only ``j <= i``.

    Returns:
        ``(o, a)`` with shapes ``(*batch, n, e)`` and ``(*batch, n, m)``.
    """
    x = keep(_scores(q, k, scale), causal=causal, attn_mask=attn_mask)
    a = x.tanh_()
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
    causal: bool = False,
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
            g = torch.matmul(g_o, v.mT)
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
                g_q = _sum_to(torch.matmul(g_x, k).mul_(scale), q.shape)
            if need_k:
                g_k = _sum_to(torch.matmul(g_x.mT, q).mul_(scale), k.shape)
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
    causal: bool = False,
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
    causal: bool = False,
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
        g = torch.matmul(g_o, v.mT) if g_o is not None else None
        if g_a is not None:
            g = g_a if g is None else g + g_a
        assert g is not None  # one of g_o, g_a is present (checked above)
        g_x = keep(torch.ops.aten.tanh_backward(g, a), causal=causal, attn_mask=attn_mask)
        xi_g = keep(torch.ops.aten.tanh_backward(xi_x, a), causal=causal, attn_mask=attn_mask)
        if xi_k is not None:
            d_q = _sum_to(torch.matmul(g_x, xi_k).mul_(scale), q.shape)
        if xi_q is not None:
            d_k = _sum_to(torch.matmul(g_x.mT, xi_q).mul_(scale), k.shape)
        if g_a is not None:
            d_g_a = _sum_to(xi_g, g_a.shape)
        if g_o is not None:
            d_g_o = torch.matmul(xi_g, v)
            d_v = _sum_to(torch.matmul(xi_g.mT, g_o), v.shape)
        d_a = (a * g * xi_x).mul_(-2)
    if xi_v is not None and g_o is not None:
        d_g_o_v = torch.matmul(a, xi_v)
        d_g_o = d_g_o_v if d_g_o is None else d_g_o + d_g_o_v
        d_a_v = torch.matmul(g_o, xi_v.mT)
        d_a = d_a_v if d_a is None else d_a + d_a_v
    if d_g_o is not None:
        assert g_o is not None
        d_g_o = _sum_to(d_g_o, g_o.shape)
    if d_a is not None:
        d_a = _sum_to(d_a, a.shape)
    return d_g_o, d_g_a, d_q, d_k, d_v, d_a


# --------------------------------------------------------------------------------------------
# Block form, for the kernels (kernels/blockwise.py)
#
# The same formulas restricted to one block of rows i0:i1 and columns j0:j1 of the n x m
# matrices, evaluated in place: each function accumulates the block's contribution into
# buffers the caller owns and does its elementwise work in the one block buffer it makes.
# Every tensor is (G, rows, features): G problems with equal shapes, no broadcasting. The
# block's tanh is not computed here (kernels/cpu.py does it in the matmul's epilogue), and the
# products ``x @ y^T (+ c)`` go through ``matmul_t``, which a kernel may pass a faster one for.
# In-place updates make these functions non-differentiable: kernels call them with autograd
# off, outside vmap. tests/test_kernels.py checks them against forward/vjp/jvp above.
#
# A block's keep-mask is M[i0:i1, j0:j1]: ``causal_diagonal`` is i0 - j0 when the causal
# boundary crosses the block (entry (r, c) is kept iff j0 + c <= i0 + r, i.e. tril with that
# diagonal) and None when causal keeps the whole block; ``attn_mask`` is the mask's block.
#
# ``transposed=True`` holds a block as its transpose, (G, cols, rows): the same entries, so
# the same masks (given as for the untransposed block), but then two of the backward's three
# products read the block without transposing it, which makes the recomputing backward
# faster (docs/derivation.md section 8 has the measurement).
# --------------------------------------------------------------------------------------------


def _matmul_t(x: Tensor, y: Tensor, add: Tensor | None = None) -> Tensor:
    """``x @ y^T + add`` in a new tensor (``add`` None: no term)."""
    return torch.matmul(x, y.mT) if add is None else torch.baddbmm(add, x, y.mT)


MatmulT = Callable[[Tensor, Tensor, "Tensor | None"], Tensor]


def keep_block_(
    s: Tensor,
    *,
    causal_diagonal: int | None,
    attn_mask: Tensor | None,
    transposed: bool = False,
) -> Tensor:
    """In place: ``M * s`` for one block ``s`` (see the block-form notes above); returns ``s``.

    With ``transposed``, ``s`` holds the block's transpose: entry (c, r) is kept iff
    ``j0 + c <= i0 + r``, i.e. ``triu`` with diagonal ``-(i0 - j0)``, and ``attn_mask`` (the
    untransposed block's) is read transposed.
    """
    if causal_diagonal is not None:
        if transposed:
            s.triu_(-causal_diagonal)
        else:
            s.tril_(causal_diagonal)
    if attn_mask is not None:
        s.masked_fill_((attn_mask.mT if transposed else attn_mask).logical_not(), 0)
    return s


def forward_block_(
    o: Tensor,
    a: Tensor,
    v: Tensor,
    *,
    causal_diagonal: int | None = None,
    attn_mask: Tensor | None = None,
) -> Tensor:
    """One block of :func:`forward`, given ``tanh(x)`` of the block in ``a``::

        a = M * a        (in place)        o += a @ v

    Args:
        o: ``(G, rows, e)`` accumulator for the block's rows of ``o``.
        a: ``(G, rows, cols)``, ``tanh(scale * q_i @ k_j^T)`` on entry, the block of ``a`` on
            return.
        v: ``(G, cols, e)``, the block's rows of ``v``.
        causal_diagonal, attn_mask: the block's keep-mask.

    Returns:
        ``a``, masked.
    """
    keep_block_(a, causal_diagonal=causal_diagonal, attn_mask=attn_mask)
    o.baddbmm_(a, v)
    return a


def vjp_block_(
    g_q: Tensor | None,
    g_k: Tensor | None,
    g_v: Tensor | None,
    g_o: Tensor | None,
    g_a: Tensor | None,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    a: Tensor,
    *,
    scale: float = 1.0,
    causal_diagonal: int | None = None,
    attn_mask: Tensor | None = None,
    matmul_t: MatmulT = _matmul_t,
    transposed: bool = False,
) -> None:
    """One block of :func:`vjp`, accumulated into the gradient buffers::

        G    = g_o @ v^T + g_a                  (one new block buffer)
        g_x  = M * G * (1 - a^2)                (in place in G)
        g_q += scale * g_x @ k     g_k += scale * g_x^T @ q     g_v += a^T @ g_o

    or, with ``transposed``, the same on the transposed block (``G^T = v @ g_o^T + g_a^T``,
    then ``g_q += scale * (g_x^T)^T @ k``, ``g_k += scale * g_x^T @ q``, ``g_v += a^T @ g_o``):
    only ``g_q``'s product then reads a block transposed.

    Args:
        g_q, g_k, g_v: accumulators ``(G, rows, d)``, ``(G, cols, d)``, ``(G, cols, e)`` for
            the block's rows of each gradient, or None where that gradient is not wanted.
        g_o: ``(G, rows, e)`` or None.  g_a: ``(G, rows, cols)`` (transposed: ``(G, cols,
            rows)``) or None (absent terms are dropped, as in :func:`vjp`; both None is a
            no-op).
        q: ``(G, rows, d)``.  k: ``(G, cols, d)``.  v: ``(G, cols, e)``.
        a: ``(G, rows, cols)`` (transposed: ``(G, cols, rows)``), the block of ``a`` (masked
            entries 0). Not modified.
        scale, causal_diagonal, attn_mask: the forward's scale and the block's keep-mask.
        matmul_t: computes ``x @ y^T + c`` (``c`` None: no term) in a new tensor.
        transposed: ``a``, ``g_a`` and the block buffer are held transposed.
    """
    # a_rc, g_rc: views of the blocks as (rows, cols), however they are held.
    a_rc = a.mT if transposed else a
    if (g_q is not None or g_k is not None) and (g_o is not None or g_a is not None):
        if g_o is None:
            assert g_a is not None
            g = torch.ops.aten.tanh_backward(g_a, a)
        else:
            g = matmul_t(v, g_o, g_a) if transposed else matmul_t(g_o, v, g_a)
            torch.ops.aten.tanh_backward.grad_input(g, a, grad_input=g)
        keep_block_(g, causal_diagonal=causal_diagonal, attn_mask=attn_mask, transposed=transposed)
        g_rc = g.mT if transposed else g
        if g_q is not None:
            g_q.baddbmm_(g_rc, k, alpha=scale)
        if g_k is not None:
            g_k.baddbmm_(g_rc.mT, q, alpha=scale)
    if g_v is not None and g_o is not None:
        g_v.baddbmm_(a_rc.mT, g_o)


def jvp_block_(
    t_o: Tensor,
    t_q: Tensor | None,
    t_k: Tensor | None,
    t_v: Tensor | None,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    a: Tensor,
    *,
    scale: float = 1.0,
    causal_diagonal: int | None = None,
    attn_mask: Tensor | None = None,
    matmul_t: MatmulT = _matmul_t,
) -> None:
    """One block of :func:`jvp`'s ``t_o``, accumulated into ``t_o``::

        t_x/scale = t_q @ k^T + q @ t_k^T        (one new block buffer)
        t_o += scale * (M * (1 - a^2) * t_x/scale) @ v  +  a @ t_v

    Args:
        t_o: ``(G, rows, e)`` accumulator for the block's rows of ``t_o``.
        t_q, t_k, t_v: the blocks of the input tangents (None when absent).
        q, k, v, a: as in :func:`vjp_block_`.
        scale, causal_diagonal, attn_mask: the forward's scale and the block's keep-mask.
        matmul_t: computes ``x @ y^T + c`` (``c`` None: no term) in a new tensor.
    """
    t = None
    if t_q is not None:
        t = matmul_t(t_q, k, None)
    if t_k is not None:
        t = matmul_t(q, t_k, None) if t is None else t.baddbmm_(q, t_k.mT)
    if t is not None:
        torch.ops.aten.tanh_backward.grad_input(t, a, grad_input=t)
        keep_block_(t, causal_diagonal=causal_diagonal, attn_mask=attn_mask)
        t_o.baddbmm_(t, v, alpha=scale)
    if t_v is not None:
        t_o.baddbmm_(a, t_v)
