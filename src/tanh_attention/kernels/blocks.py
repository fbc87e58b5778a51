"""The formulas of ``formulas.py`` on one block of the ``n x m`` matrices, in place.

Each function takes rows ``i0:i1`` and columns ``j0:j1`` of the n x m matrices, accumulates the
block's contribution into buffers the caller owns and does its elementwise work in the one
block buffer it makes. Every tensor is ``(G, rows, features)``: G problems with equal shapes,
no broadcasting. The block's tanh is not computed here (``kernels/cpu.py`` does it in the
matmul's epilogue), and the products ``x @ y^T (+ c)`` go through ``matmul_t``, which a
caller may pass a faster one for. In-place updates make these functions non-differentiable:
the drivers (``kernels/blockwise.py``) call them with autograd off, outside vmap.
``tests/test_kernels.py`` checks them against an independent float64 reference.

A block's keep-mask is ``M[i0:i1, j0:j1]``: ``causal_diagonal`` is ``i0 - j0 + D`` (D the
variant's diagonal, ``formulas.causal_diagonal``) when the causal boundary crosses the block
(entry (r, c) is kept iff ``j0 + c <= i0 + r + D``, i.e. tril with that diagonal) and None
when causal keeps the whole block; ``attn_mask`` is the mask's block.

``transposed=True`` holds a block as its transpose, ``(G, cols, rows)``: the same entries, so
the same masks (given as for the untransposed block), but then two of the backward's three
products read the block without transposing it, which makes the recomputing backward
faster (docs/derivation.md section 8).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

__all__ = [
    "AddProduct",
    "MatmulT",
    "ScoreGrad",
    "TanhBackward",
    "add_product_",
    "forward_block_",
    "jvp_block_",
    "keep_block_",
    "tanh_backward_",
    "vjp_block_",
]


def _matmul_t(x: Tensor, y: Tensor, add: Tensor | None = None) -> Tensor:
    """``x @ y^T + add`` in a new tensor (``add`` None: no term)."""
    return torch.matmul(x, y.mT) if add is None else torch.baddbmm(add, x, y.mT)


MatmulT = Callable[[Tensor, Tensor, "Tensor | None"], Tensor]
# ``add_product(acc, x, y, alpha, first=...)``: :func:`add_product_`'s contract.
AddProduct = Callable[..., Tensor]
# ``tanh_backward(g, g_a, a)``: :func:`tanh_backward_`'s contract.
TanhBackward = Callable[[Tensor, "Tensor | None", Tensor], Tensor]
# ``score_grad(x, y, g_a, a)``: ``(x @ y^T + g_a) * (1 - a^2)`` in a new tensor in one pass, or
# None where it does not serve (the product and ``tanh_backward`` then run apart).
ScoreGrad = Callable[[Tensor, Tensor, "Tensor | None", Tensor], "Tensor | None"]


def tanh_backward_(g: Tensor, g_a: Tensor | None, a: Tensor) -> Tensor:
    """In place: ``g = (g + g_a) * (1 - a^2)`` (``g_a`` None: no term), all ``(G, rows,
    cols)`` alike; ``g`` is a buffer of its own. Returns ``g``."""
    if g_a is not None:
        g.add_(g_a)
    return torch.ops.aten.tanh_backward.grad_input(g, a, grad_input=g)


def add_product_(
    acc: Tensor, x: Tensor, y: Tensor, alpha: float = 1.0, *, first: bool = False
) -> Tensor:
    """In place: ``acc += alpha * x @ y``, or ``acc = alpha * x @ y`` with ``first`` (acc's
    old contents, uninitialized memory included, are ignored: the caller then needs no
    zeros). A float32 accumulator of bfloat16 blocks takes each block's product in bfloat16
    (the fast kernels, accumulating in float32 inside) and adds it in float32, so the sum
    over blocks is never rounded to bfloat16."""
    if acc.dtype == x.dtype:
        return acc.baddbmm_(x, y, beta=0.0 if first else 1.0, alpha=alpha)
    # oneDNN's bfloat16 product copies a transposed left operand that is a block of a larger
    # matrix (the saved weights read as a^T: 1.8 ms for 1024 x 512 @ 512 x 64 on an AMD EPYC
    # with AVX512-BF16, against 0.37 ms for the same product as (y^T @ x^T)^T, which reads
    # that block as its right operand in place; a whole matrix transposed it reads as it is).
    product = torch.bmm(y.mT, x.mT).mT if _strided_transposed(x) else torch.bmm(x, y)
    if first:
        return acc.copy_(product).mul_(alpha)
    return acc.add_(product, alpha=alpha)


def _strided_transposed(x: Tensor) -> bool:
    """Whether ``x`` (G, rows, cols) is a transposed block of a larger matrix: its rows are
    columns of the memory it reads, and its transpose is not contiguous."""
    return x.shape[-1] > 1 and x.stride(-2) == 1 and not x.mT.is_contiguous()


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
    dropout: Tensor | None = None,
    dropout_scale: float = 1.0,
    first: bool = False,
    add_product: AddProduct = add_product_,
) -> Tensor:
    """One block of ``formulas.forward``, given ``tanh(x)`` of the block in ``a``::

        a = M * a  (* K)      (in place)        o += s * a @ v

    where dropout keeps the weights ``K`` and scales them by ``s`` (``D = s * K``).

    Args:
        o: ``(G, rows, e)`` accumulator for the block's rows of ``o``.
        a: ``(G, rows, cols)``, ``tanh(scale * q_i @ k_j^T)`` on entry, the block of ``a`` on
            return.
        v: ``(G, cols, e)``, the block's rows of ``v``.
        causal_diagonal, attn_mask: the block's keep-mask.
        dropout: None, or the block ``K`` of the weights dropout keeps (1/0, a's dtype).
        dropout_scale: ``s = 1 / (1 - p)``, the factor of the kept weights.
        first: ``o = ...`` instead of ``o += ...`` (the one block of its rows).
        add_product: computes ``acc (+)= alpha * x @ y`` (:func:`add_product_`'s contract,
            its default), which a caller may pass a faster one for.

    Returns:
        ``a``, masked (and dropped, not yet scaled by ``s``).
    """
    keep_block_(a, causal_diagonal=causal_diagonal, attn_mask=attn_mask)
    if dropout is not None:
        a.mul_(dropout)
    add_product(o, a, v, dropout_scale, first=first)
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
    dropout: Tensor | None = None,
    dropout_scale: float = 1.0,
    first_rows: bool = False,
    first_cols: bool = False,
    add_product: AddProduct = add_product_,
    tanh_backward: TanhBackward = tanh_backward_,
    score_grad: ScoreGrad | None = None,
) -> None:
    """One block of ``formulas.vjp``, accumulated into the gradient buffers::

        G    = g_o @ v^T + g_a                  (one new block buffer)
        g_x  = M * G * (1 - a^2)                (in place in G)
        g_q += scale * g_x @ k     g_k += scale * g_x^T @ q     g_v += a^T @ g_o

    With dropout factors ``D = s * K`` (the forward used ``a * D``, and ``g_a`` is the gradient
    of that): ``G *= K`` before ``g_x``, whose products take ``s * scale``, and
    ``g_v += s * (a * K)^T @ g_o``.

    or, with ``transposed``, the same on the transposed block (``G^T = v @ g_o^T + g_a^T``,
    then ``g_q += scale * (g_x^T)^T @ k``, ``g_k += scale * g_x^T @ q``, ``g_v += a^T @ g_o``):
    only ``g_q``'s product then reads a block transposed.

    Args:
        g_q, g_k, g_v: accumulators ``(G, rows, d)``, ``(G, cols, d)``, ``(G, cols, e)`` for
            the block's rows of each gradient, or None where that gradient is not wanted.
        g_o: ``(G, rows, e)`` or None.  g_a: ``(G, rows, cols)`` (transposed: ``(G, cols,
            rows)``) or None (absent terms are dropped, as in ``formulas.vjp``; both None is a
            no-op).
        q: ``(G, rows, d)``.  k: ``(G, cols, d)``.  v: ``(G, cols, e)``.
        a: ``(G, rows, cols)`` (transposed: ``(G, cols, rows)``), the block of ``a`` (masked
            entries 0). Not modified.
        scale, causal_diagonal, attn_mask: the forward's scale and the block's keep-mask.
        matmul_t: computes ``x @ y^T + c`` (``c`` None: no term) in a new tensor.
        transposed: ``a``, ``g_a`` and the block buffer are held transposed.
        dropout: None, or the block ``K`` of the weights dropout keeps (1/0, a's dtype),
            held as ``a`` is; ``a`` is then the block before dropout.
        dropout_scale: ``s``, the factor of the kept weights.
        first_rows: write ``g_q`` instead of adding to it (the one block of its rows).
        first_cols: write ``g_k`` and ``g_v`` instead (the one block of its columns).
        add_product: computes ``acc (+)= alpha * x @ y`` (default :func:`add_product_`).
        tanh_backward: computes ``g = (g + g_a) * (1 - a^2)`` in place (default
            :func:`tanh_backward_`).
        score_grad: None, or computes ``g_x`` before its mask in one pass where it can
            (:data:`ScoreGrad`; not with dropout, whose factors come between).
    """
    # a_rc, g_rc, dropout_rc: views of the blocks as (rows, cols), however they are held.
    a_rc = a.mT if transposed else a
    dropout_rc = None if dropout is None else dropout.mT if transposed else dropout
    if (g_q is not None or g_k is not None) and (g_o is not None or g_a is not None):
        if g_o is None:
            assert g_a is not None
            g = g_a if dropout is None else g_a * dropout
            g = torch.ops.aten.tanh_backward(g, a)
        else:
            x, y = (v, g_o) if transposed else (g_o, v)
            fused = None if score_grad is None or dropout is not None else score_grad(x, y, g_a, a)
            if fused is not None:
                g = fused
            else:
                g = matmul_t(x, y, None)
                if dropout is not None:
                    if g_a is not None:
                        g.add_(g_a)
                    g, g_a = g.mul_(dropout), None
                tanh_backward(g, g_a, a)
        keep_block_(g, causal_diagonal=causal_diagonal, attn_mask=attn_mask, transposed=transposed)
        g_rc = g.mT if transposed else g
        if g_q is not None:
            add_product(g_q, g_rc, k, scale * dropout_scale, first=first_rows)
        if g_k is not None:
            add_product(g_k, g_rc.mT, q, scale * dropout_scale, first=first_cols)
    if g_v is not None and g_o is not None:
        dropped = a_rc if dropout_rc is None else a_rc * dropout_rc
        add_product(g_v, dropped.mT, g_o, dropout_scale, first=first_cols)


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
    add_product: AddProduct = add_product_,
) -> None:
    """One block of ``formulas.jvp``'s ``t_o``, accumulated into ``t_o``::

        t_x/scale = t_q @ k^T + q @ t_k^T        (one new block buffer)
        t_o += scale * (M * (1 - a^2) * t_x/scale) @ v  +  a @ t_v

    Args:
        t_o: ``(G, rows, e)`` accumulator for the block's rows of ``t_o``.
        t_q, t_k, t_v: the blocks of the input tangents (None when absent).
        q, k, v, a: as in :func:`vjp_block_`.
        scale, causal_diagonal, attn_mask: the forward's scale and the block's keep-mask.
        matmul_t: computes ``x @ y^T + c`` (``c`` None: no term) in a new tensor.
        add_product: computes ``acc += alpha * x @ y`` (default :func:`add_product_`).
    """
    t = None
    if t_q is not None:
        t = matmul_t(t_q, k, None)
    if t_k is not None:
        t = matmul_t(q, t_k, None) if t is None else t.baddbmm_(q, t_k.mT)
    if t is not None:
        torch.ops.aten.tanh_backward.grad_input(t, a, grad_input=t)
        keep_block_(t, causal_diagonal=causal_diagonal, attn_mask=attn_mask)
        add_product(t_o, t, v, scale)
    if t_v is not None:
        add_product(t_o, a, t_v)
