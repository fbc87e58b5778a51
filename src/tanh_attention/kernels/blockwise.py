"""Blocked CPU kernels for tanh attention, and the memory-efficient op ``attn_lean``.

The ``n x m`` matrices (scores, ``a``, their gradients) are processed one block of rows
``i0:i1`` and columns ``j0:j1`` at a time, so a block stays in cache while its tanh, its
mask and its matrix products use it. Each block runs the block form of the formulas
(``formulas.forward_block_``, ``vjp_block_``, ``jvp_block_``); its tanh comes from
``kernels.cpu.scores_tanh`` (oneDNN's matmul with a fused tanh where available), and its
products ``x @ y^T (+ c)`` from ``kernels.cpu.matmul_t``.

- :func:`forward`: ``(o, a)``, or ``(o, None)`` without ever holding more than one block of
  ``a`` (the memory-efficient path).
- :func:`backward`: the VJP from a saved ``a``, or, with ``a=None``, recomputing each block
  of ``a`` from q and k.
- :func:`jvp`: ``t_o`` from recomputed blocks.

With ``causal``, each row block stops at its last row's diagonal: blocks wholly above the
diagonal are never visited, so causal attention costs about half. Batch dimensions
broadcast: inputs are flattened to ``(B, rows, features)`` (copying only inputs that were
broadcast, never anything of size ``n x m``), and gradients are summed back to each input's
shape. bfloat16 and float16 inputs are computed in float32 and rounded once at the end.

The registered ops (``torch.ops.tanh_attention.attn_lean`` and its backward op) follow, with
fake kernels, autograd, vmap rules, autocast and forward AD.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterator, Sequence
from typing import Any

import torch
import torch.autograd.forward_ad as fwAD
from torch import Tensor

from .. import formulas
from .._checks import batch_shape, validate_attn_inputs
from .._registration import (
    backward_autograd_kernel,
    backward_vmap_rule,
    forward_autograd_kernel,
    forward_vmap_rule,
    install_autograd_kernel,
    placeholders,
    register_autocast,
)
from ..function import AttnFunction
from ..reference import NAMESPACE
from . import memory
from .cpu import matmul_t, scores_tanh

__all__ = [
    "BLOCK_COLS",
    "BLOCK_ROWS",
    "attn_lean",
    "attn_lean_backward",
    "backward",
    "forward",
    "jvp",
]

# Block sizes: a float32 block of BLOCK_ROWS x BLOCK_COLS is 2 MiB, the L2 caches of the two
# cores of the machine benchmarks/RESULTS.md was measured on. Larger blocks amortize Python
# and oneDNN call overhead; smaller ones stay in cache (benchmarks/blocks.py measures it).
BLOCK_ROWS = 512
BLOCK_COLS = 1024
# Problems with fewer n * m entries than this are grouped, several per block, so that a
# large batch of small problems is not one Python iteration per problem.
_SMALL = 16384


@dataclasses.dataclass(frozen=True)
class _Tile:
    """One block: problems ``batch``, rows ``rows`` and columns ``cols`` of the n x m matrix."""

    batch: slice
    rows: slice
    cols: slice
    causal_diagonal: int | None  # see formulas' block-form notes


class _Problem:
    """The inputs of one call, flattened to ``(B, rows, features)``, and its blocks."""

    def __init__(
        self,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        attn_mask: Tensor | None,
        causal: bool,
        block_rows: int | None,
        block_cols: int | None,
    ) -> None:
        memory.warm_heap()  # block buffers stay in the heap, not faulted in again per block
        self.batch = batch_shape(q, k, v)
        self.size = math.prod(self.batch)
        self.n, self.d = q.shape[-2:]
        self.m, self.e = k.shape[-2], v.shape[-1]
        self.dtype, self.device = q.dtype, q.device
        # bfloat16/float16 accumulate in float32 (design: one rounding at the end).
        self.compute = torch.float32 if q.dtype in (torch.bfloat16, torch.float16) else q.dtype
        self.causal = causal
        self.mask = None if attn_mask is None else attn_mask.expand(*self.batch, self.n, self.m)
        self.rows = max(1, min(self.n, block_rows or BLOCK_ROWS))
        # Causal: each row block stops at its last row's diagonal (causal_end), so the work
        # is about (n + rows) / 2n of n x m whatever the block width.
        self.cols = max(1, min(self.m, block_cols or BLOCK_COLS))
        entries = self.n * self.m
        whole = self.rows == self.n and self.cols == self.m
        self.group = (
            max(1, (BLOCK_ROWS * BLOCK_COLS) // entries) if whole and entries < _SMALL else 1
        )
        # Nothing to compute when a is all zeros (d = 0) or empty; e = 0 still has an a.
        self.trivial = self.size * entries == 0 or self.d == 0

    def flat(self, t: Tensor | None, rows: int, cols: int, compute: bool = True) -> Tensor | None:
        """``t`` expanded to the batch shape as ``(B, rows, cols)``; a copy only if broadcast."""
        if t is None:
            return None
        t = t.expand(*self.batch, rows, cols).reshape(self.size, rows, cols)
        return t.to(self.compute) if compute else t

    def zeros(self, rows: int, cols: int) -> Tensor:
        return torch.zeros(self.size, rows, cols, dtype=self.compute, device=self.device)

    def tiles(self) -> Iterator[_Tile]:
        """Every block, row block by row block; causal skips blocks wholly above the diagonal."""
        for b0 in range(0, self.size, self.group):
            batch = slice(b0, min(self.size, b0 + self.group))
            for i0 in range(0, self.n, self.rows):
                i1 = min(self.n, i0 + self.rows)
                end = self.causal_end(i1)
                for j0 in range(0, end, self.cols):
                    j1 = min(end, j0 + self.cols)
                    crosses = self.causal and j1 - 1 > i0
                    yield _Tile(batch, slice(i0, i1), slice(j0, j1), i0 - j0 if crosses else None)

    def causal_end(self, i1: int) -> int:
        """The first column that no row above ``i1`` keeps (m if not causal): the row blocks
        end where the causal boundary does, not at a whole column block."""
        return min(self.m, i1) if self.causal else self.m

    def mask_block(self, tile: _Tile) -> Tensor | None:
        """The attn_mask block of ``tile`` as ``(G, rows, cols)`` (a view unless G > 1)."""
        if self.mask is None:
            return None
        blocks = [
            self.mask[self._index(b)][tile.rows, tile.cols]
            for b in range(tile.batch.start, tile.batch.stop)
        ]
        return blocks[0].unsqueeze(0) if len(blocks) == 1 else torch.stack(blocks)

    def _index(self, b: int) -> tuple[int, ...]:
        index = []
        for size in reversed(self.batch):
            b, r = divmod(b, size)
            index.append(r)
        return tuple(reversed(index))

    def unflat(self, t: Tensor, like: Tensor) -> Tensor:
        """A ``(B, rows, cols)`` gradient summed back to the shape and dtype of ``like``."""
        t = t.reshape(*self.batch, *t.shape[-2:])
        return formulas._sum_to(t, like.shape).to(like.dtype)


@torch.no_grad()  # in-place block updates: not differentiable (see module doc)
def forward(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    attn_mask: Tensor | None = None,
    scale: float = 1.0,
    causal: bool = False,
    *,
    need_weights: bool = True,
    block_rows: int | None = None,
    block_cols: int | None = None,
) -> tuple[Tensor, Tensor | None]:
    """``o = a @ v`` with ``a = M * tanh(scale * q @ k^T)``, block by block.

    Args:
        q: ``(..., n, d)``.  k: ``(..., m, d)``.  v: ``(..., m, e)`` (batch dims broadcast).
        attn_mask: optional bool mask broadcastable to ``(*batch, n, m)``, True = takes part.
        scale, causal: as in ``formulas.forward``.
        need_weights: also return ``a``; with False nothing of size ``n x m`` is allocated.
        block_rows, block_cols: block size (default ``BLOCK_ROWS`` x ``BLOCK_COLS``).

    Returns:
        ``(o, a)``: ``(*batch, n, e)`` and ``(*batch, n, m)``, or ``(o, None)``.
    """
    p = _Problem(q, k, v, attn_mask, causal, block_rows, block_cols)
    o = torch.zeros(p.size, p.n, p.e, dtype=p.compute, device=q.device)
    a = torch.empty(*p.batch, p.n, p.m, dtype=q.dtype, device=q.device) if need_weights else None
    if p.trivial:
        return o.reshape(*p.batch, p.n, p.e).to(p.dtype), None if a is None else a.zero_()
    q3, k3, v3 = p.flat(q, p.n, p.d), p.flat(k, p.m, p.d), p.flat(v, p.m, p.e)
    a3 = None if a is None else a.view(p.size, p.n, p.m)
    assert q3 is not None and k3 is not None and v3 is not None
    for t in p.tiles():
        block = scores_tanh(q3[t.batch, t.rows], k3[t.batch, t.cols], scale)
        formulas.forward_block_(
            o[t.batch, t.rows],
            block,
            v3[t.batch, t.cols],
            causal_diagonal=t.causal_diagonal,
            attn_mask=p.mask_block(t),
        )
        if a3 is not None:
            a3[t.batch, t.rows, t.cols].copy_(block)
            if t.cols.stop == p.causal_end(t.rows.stop) < p.m:
                a3[t.batch, t.rows, t.cols.stop :].zero_()  # the causally skipped blocks
    return o.reshape(*p.batch, p.n, p.e).to(p.dtype), a


@torch.no_grad()  # in-place block updates: not differentiable (see module doc)
def backward(
    grad_o: Tensor | None,
    grad_a: Tensor | None,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    a: Tensor | None,
    attn_mask: Tensor | None = None,
    scale: float = 1.0,
    causal: bool = False,
    needs: Sequence[bool] = (True, True, True),
    *,
    block_rows: int | None = None,
    block_cols: int | None = None,
) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    """Gradients of ``<grad_o, o> + <grad_a, a>`` w.r.t. q, k, v, block by block.

    Args:
        grad_o: ``(*batch, n, e)`` or None.  grad_a: ``(*batch, n, m)`` or None (needs ``a``).
        q, k, v, attn_mask, scale, causal: the forward's arguments.
        a: the forward's ``(*batch, n, m)`` weights, or None to recompute each block of it
            (then no tensor of size ``n x m`` is allocated).
        needs: which of (q, k, v) want a gradient.
        block_rows, block_cols: block size.

    Returns:
        ``(g_q, g_k, g_v)`` shaped like q, k, v; None where not needed or with no
        contributing term (as ``formulas.vjp``).
    """
    if a is None and grad_a is not None:
        raise ValueError("blockwise.backward: grad_a needs the saved weights a")
    need_q, need_k, need_v = needs
    need_q = need_q and (grad_o is not None or grad_a is not None)
    need_k = need_k and (grad_o is not None or grad_a is not None)
    need_v = need_v and grad_o is not None
    if not (need_q or need_k or need_v):
        return None, None, None
    p = _Problem(q, k, v, attn_mask, causal, block_rows, block_cols)
    # Recomputing, each block is made transposed (tanh(scale * k_J @ q_I^T), cols x rows), so
    # that only g_q's product reads a block transposed (formulas.vjp_block_; measured by
    # benchmarks/orientation.py). With a saved a, transposing its blocks would cost a copy.
    transposed = a is None
    g_q = p.zeros(p.n, p.d) if need_q else None
    g_k = p.zeros(p.m, p.d) if need_k else None
    g_v = p.zeros(p.m, p.e) if need_v else None
    if not p.trivial:
        q3, k3, v3 = p.flat(q, p.n, p.d), p.flat(k, p.m, p.d), p.flat(v, p.m, p.e)
        assert q3 is not None and k3 is not None and v3 is not None
        g_o3 = p.flat(grad_o, p.n, p.e)
        g_a3 = p.flat(grad_a, p.n, p.m, compute=False)
        a3 = p.flat(a, p.n, p.m, compute=False)
        for t in p.tiles():
            mask = p.mask_block(t)
            if a3 is None:
                a_block = scores_tanh(k3[t.batch, t.cols], q3[t.batch, t.rows], scale)
                formulas.keep_block_(
                    a_block, causal_diagonal=t.causal_diagonal, attn_mask=mask, transposed=True
                )
            else:
                a_block = a3[t.batch, t.rows, t.cols].to(p.compute)
            formulas.vjp_block_(
                None if g_q is None else g_q[t.batch, t.rows],
                None if g_k is None else g_k[t.batch, t.cols],
                None if g_v is None else g_v[t.batch, t.cols],
                None if g_o3 is None else g_o3[t.batch, t.rows],
                None if g_a3 is None else g_a3[t.batch, t.rows, t.cols].to(p.compute),
                q3[t.batch, t.rows],
                k3[t.batch, t.cols],
                v3[t.batch, t.cols],
                a_block,
                scale=scale,
                causal_diagonal=t.causal_diagonal,
                attn_mask=mask,
                matmul_t=matmul_t,
                transposed=transposed,
            )
    return (
        None if g_q is None else p.unflat(g_q, q),
        None if g_k is None else p.unflat(g_k, k),
        None if g_v is None else p.unflat(g_v, v),
    )


@torch.no_grad()  # in-place block updates: not differentiable (see module doc)
def jvp(
    t_q: Tensor | None,
    t_k: Tensor | None,
    t_v: Tensor | None,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    attn_mask: Tensor | None = None,
    scale: float = 1.0,
    causal: bool = False,
    *,
    block_rows: int | None = None,
    block_cols: int | None = None,
) -> Tensor:
    """The tangent ``t_o`` of ``o`` (``formulas.jvp``), recomputing each block of ``a``.

    Args:
        t_q, t_k, t_v: tangents shaped like q, k, v, or None.
        q, k, v, attn_mask, scale, causal: the forward's arguments.

    Returns:
        ``t_o`` of shape ``(*batch, n, e)`` (zeros when no tangent is given).
    """
    p = _Problem(q, k, v, attn_mask, causal, block_rows, block_cols)
    t_o = torch.zeros(p.size, p.n, p.e, dtype=p.compute, device=q.device)
    if not p.trivial and not (t_q is None and t_k is None and t_v is None):
        q3, k3, v3 = p.flat(q, p.n, p.d), p.flat(k, p.m, p.d), p.flat(v, p.m, p.e)
        assert q3 is not None and k3 is not None and v3 is not None
        tq3, tk3, tv3 = p.flat(t_q, p.n, p.d), p.flat(t_k, p.m, p.d), p.flat(t_v, p.m, p.e)
        for t in p.tiles():
            mask = p.mask_block(t)
            a_block = scores_tanh(q3[t.batch, t.rows], k3[t.batch, t.cols], scale)
            formulas.keep_block_(a_block, causal_diagonal=t.causal_diagonal, attn_mask=mask)
            formulas.jvp_block_(
                t_o[t.batch, t.rows],
                None if tq3 is None else tq3[t.batch, t.rows],
                None if tk3 is None else tk3[t.batch, t.cols],
                None if tv3 is None else tv3[t.batch, t.cols],
                q3[t.batch, t.rows],
                k3[t.batch, t.cols],
                v3[t.batch, t.cols],
                a_block,
                scale=scale,
                causal_diagonal=t.causal_diagonal,
                attn_mask=mask,
                matmul_t=matmul_t,
            )
    return t_o.reshape(*p.batch, p.n, p.e).to(q.dtype)


# --------------------------------------------------------------------------------------------
# The memory-efficient op: torch.ops.tanh_attention.attn_lean -> o
# --------------------------------------------------------------------------------------------


@torch.library.custom_op(f"{NAMESPACE}::attn_lean", mutates_args=())
def attn_lean(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    attn_mask: Tensor | None = None,
    scale: float = 1.0,
    causal: bool = False,
) -> Tensor:
    """Tanh attention's output ``o = (M * tanh(scale * q @ k^T)) @ v``, never building ``a``.

    Why: the weights are ``n x m``; at n = m = 32768 they alone take 4 GiB in float32. This op
    works in blocks and saves only q, k and v for backward, which recomputes each block's
    tanh, so its extra memory is bounded by the block size.

    Args:
        q: ``(..., n, d)``.  k: ``(..., m, d)``.  v: ``(..., m, e)`` (batch dims broadcast).
        attn_mask: optional bool mask broadcastable to ``(*batch, n, m)``, True = takes part.
        scale: score multiplier.  causal: keep only ``j <= i``.

    Returns:
        ``o`` of shape ``(*batch, n, e)``.

    Raises:
        TypeError, ValueError: bad input, as ``tanh_attention.attn``.

    Example:
        >>> q, v = torch.randn(2, 3, dtype=torch.float64), torch.randn(2, 4, dtype=torch.float64)
        >>> o = torch.ops.tanh_attention.attn_lean(q, q, v)
        >>> bool(torch.allclose(o, torch.tanh(q @ q.T) @ v))
        True
    """
    validate_attn_inputs(q, k, v, attn_mask, scale=scale, causal=causal)
    return forward(q, k, v, attn_mask, scale, causal, need_weights=False)[0]


@attn_lean.register_fake
def _attn_lean_fake(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    attn_mask: Tensor | None = None,
    scale: float = 1.0,
    causal: bool = False,
) -> Tensor:
    batch = validate_attn_inputs(q, k, v, attn_mask, scale=scale, causal=causal)
    return q.new_empty((*batch, q.shape[-2], v.shape[-1]))


@torch.library.custom_op(f"{NAMESPACE}::attn_lean_backward", mutates_args=())
def attn_lean_backward(
    grad_o: Tensor,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    attn_mask: Tensor | None,
    scale: float,
    causal: bool,
    needs: Sequence[bool],
) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients of ``<grad_o, o>`` w.r.t. the inputs flagged in ``needs``, recomputing ``a``.

    Args:
        grad_o: ``(*batch, n, e)``.  q, k, v, attn_mask, scale, causal: the forward's.
        needs: three bools for (q, k, v).

    Returns:
        ``(g_q, g_k, g_v)`` shaped like q, k, v where ``needs`` asks, else empty ``(0,)``.
    """
    grads = backward(grad_o, None, q, k, v, None, attn_mask, scale, causal, needs)
    return placeholders(grads, (q, k, v), needs)


@attn_lean_backward.register_fake
def _attn_lean_backward_fake(
    grad_o: Tensor,
    q: Tensor,
    k: Tensor,
    v: Tensor,
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


# The same, as plain differentiable torch code (it builds a): what the transforms that trace
# through the op see, and the formula of the backward op's own backward.


def _attn_lean_formulas(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    attn_mask: Tensor | None = None,
    scale: float = 1.0,
    causal: bool = False,
) -> Tensor:
    validate_attn_inputs(q, k, v, attn_mask, scale=scale, causal=causal)
    return formulas.forward(q, k, v, attn_mask, scale=scale, causal=causal)[0]


def _attn_lean_backward_formulas(
    grad_o: Tensor,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    attn_mask: Tensor | None,
    scale: float,
    causal: bool,
    needs: Sequence[bool],
) -> tuple[Tensor, Tensor, Tensor]:
    a = formulas.forward(q, k, v, attn_mask, scale=scale, causal=causal)[1]
    grads = formulas.vjp(
        grad_o, None, q, k, v, a, attn_mask, scale=scale, causal=causal, needs=needs
    )
    return placeholders(grads, (q, k, v), needs)


# --------------------------------------------------------------------------------------------
# Autograd: attn_lean -> attn_lean_backward -> the formulas (plain torch, so it goes on)
# --------------------------------------------------------------------------------------------


def _lean_setup_context(ctx: Any, inputs: tuple[Any, ...], output: Tensor) -> None:
    q, k, v, attn_mask, scale, causal = inputs
    ctx.save_for_backward(q, k, v, attn_mask)  # nothing of size n x m
    ctx.scale, ctx.causal = scale, causal
    ctx.set_materialize_grads(False)


def _lean_backward_rule(ctx: Any, grad_o: Tensor | None) -> tuple[Any, ...]:
    needs = [bool(need) and grad_o is not None for need in ctx.needs_input_grad[:3]]
    if not any(needs):
        return None, None, None, None, None, None
    q, k, v, attn_mask = ctx.saved_tensors
    grads = attn_lean_backward(grad_o, q, k, v, attn_mask, ctx.scale, ctx.causal, needs)
    g_q, g_k, g_v = (g if need else None for g, need in zip(grads, needs, strict=True))
    return g_q, g_k, g_v, None, None, None


attn_lean.register_autograd(_lean_backward_rule, setup_context=_lean_setup_context)


def _lean_backward_setup_context(ctx: Any, inputs: tuple[Any, ...], output: Any) -> None:
    grad_o, q, k, v, attn_mask, scale, causal, needs = inputs
    ctx.save_for_backward(grad_o, q, k, v, attn_mask)
    ctx.scale, ctx.causal, ctx.needs = scale, causal, list(needs)
    ctx.set_materialize_grads(False)


def _lean_backward_backward_rule(
    ctx: Any, xi_q: Tensor | None, xi_k: Tensor | None, xi_v: Tensor | None
) -> tuple[Any, ...]:
    """Double backward, from the differentiable formulas (this builds ``a``, n x m).

    ``formulas.vjp_of_vjp`` gives the cotangent ``d_a`` of ``a``, which here is not an input
    of the op but a function of q and k: ``formulas.vjp`` with ``grad_a = d_a`` carries it on.
    """
    grad_o, q, k, v, attn_mask = ctx.saved_tensors
    scale, causal = ctx.scale, ctx.causal
    xi_q, xi_k, xi_v = (
        xi if need else None for xi, need in zip((xi_q, xi_k, xi_v), ctx.needs, strict=True)
    )
    a = formulas.forward(q, k, v, attn_mask, scale=scale, causal=causal)[1]
    d_g_o, _, d_q, d_k, d_v, d_a = formulas.vjp_of_vjp(
        xi_q, xi_k, xi_v, grad_o, None, q, k, v, a, attn_mask, scale=scale, causal=causal
    )
    if d_a is not None:
        via_q, via_k, _ = formulas.vjp(
            None, d_a, q, k, v, a, attn_mask, scale=scale, causal=causal, needs=(True, True, False)
        )
        assert via_q is not None and via_k is not None
        d_q = via_q if d_q is None else d_q + via_q
        d_k = via_k if d_k is None else d_k + via_k
    return d_g_o, d_q, d_k, d_v, None, None, None, None


attn_lean_backward.register_autograd(
    _lean_backward_backward_rule, setup_context=_lean_backward_setup_context
)


# --------------------------------------------------------------------------------------------
# vmap rules, autocast, and Autograd kernels for every autograd context (see _registration)
# --------------------------------------------------------------------------------------------


def _attn_lean_with_tangents(
    q: Tensor, k: Tensor, v: Tensor, attn_mask: Tensor | None, scale: float, causal: bool
) -> Tensor:
    """Forward-over-reverse: the backward must carry tangents too; AttnFunction's does."""
    return AttnFunction.apply(q, k, v, attn_mask, scale, causal)[0]


def _attn_lean_dual_output(
    o: Tensor,
    primals: Sequence[Tensor],
    tangent: Sequence[Tensor | None],
    attn_mask: Tensor | None,
    scale: float,
    causal: bool,
) -> Tensor:
    """Forward AD: ``o`` with its tangent, recomputing the blocks of ``a``."""
    (t_q, t_k, t_v), (q, k, v) = tangent, primals
    if torch._C._are_functorch_transforms_active():
        # Under torch.func (jacfwd = vmap of jvp) the tensors may be batched, which the
        # in-place block kernels cannot take: the plain formulas can (they build a).
        a = formulas.forward(q, k, v, attn_mask, scale=scale, causal=causal)[1]
        t_o = formulas.jvp(t_q, t_k, t_v, q, k, v, a, attn_mask, scale=scale, causal=causal)[0]
    else:
        t_o = jvp(t_q, t_k, t_v, q, k, v, attn_mask, scale, causal)
    return fwAD.make_dual(o, t_o)


attn_lean.register_vmap(forward_vmap_rule(attn_lean, 0))
attn_lean_backward.register_vmap(backward_vmap_rule(attn_lean_backward, leading=1))
register_autocast(attn_lean)
install_autograd_kernel(
    attn_lean,
    forward_autograd_kernel(_attn_lean_formulas, _attn_lean_with_tangents, _attn_lean_dual_output),
)
install_autograd_kernel(
    attn_lean_backward, backward_autograd_kernel(_attn_lean_backward_formulas, 5)
)
