"""Blocked CPU kernels for tanh attention: forward, backward and JVP, pure functions.

The ``n x m`` matrices (scores, ``a``, their gradients) are processed one block of rows
``i0:i1`` and columns ``j0:j1`` at a time, so a block stays in cache while its tanh, its
mask and its matrix products use it. Each block runs the block form of the formulas
(``kernels/blocks.py``); its tanh comes from ``kernels.cpu.scores_tanh`` (oneDNN's matmul
with a fused tanh where available), and its products ``x @ y^T (+ c)`` from
``kernels.cpu.matmul_t``. These functions know nothing of autograd or op registration
(``ops.py`` registers them); they run with autograd off.

- :func:`forward`: ``(o, a)``, or ``(o, None)`` without ever holding more than one block of
  ``a`` (the memory-efficient path).
- :func:`backward`: the VJP from a saved ``a``, or, with ``a=None``, recomputing each block
  of ``a`` from q and k.
- :func:`jvp`: ``t_o`` from recomputed blocks.

Calls with at most ``_PLAIN_MAX_ENTRIES`` score entries in all (float32, float64, no dropout)
run on whole tensors instead: there the drivers' own cost exceeds what blocks save
(benchmarks/RESULTS.md, "A second machine"); their ``a`` is at most that small. Where q, k
and v share one batch shape, the whole call is one block of all its problems (``_Whole``:
the block formulas, with the blocks' tanh); where a batch dim broadcasts, ``formulas.forward``
/ ``formulas.vjp`` run on the whole tensors (with the kernels' ``kernels.cpu.tanh_``). The
very smallest of the one-block calls, where a backward may follow, are recorded as aten ops
for autograd instead (:func:`graph`, ``_GRAPH_MAX_ENTRIES``). Before all of these, a float32
call without a mask or dropout goes to the compiled kernels (``kernels/attn.c`` through
``native.try_attn`` and ``native.try_attn_backward``) where those serve it (contiguous inputs
of one batch shape, not a decoding step: ``native.MAX_KEYS_PER_QUERY``): one C call instead
of a dozen aten calls, each of which costs microseconds before it computes, with products
near the core's peak; such calls are never recorded as aten ops. A float32 or bfloat16
decoding step's ``o`` (at most ``native.DECODE_MAX_QUERIES`` queries, no ``a``) takes
``native.try_decode``, which reads the cache once, in place.

Causal (both variants): each row block stops at its last row's diagonal, so blocks wholly
above it are never visited and causal attention costs about half. That skipping changes no
result: it happens only when every input a skipped block would multiply by its zeros is
finite. Otherwise every block is visited and a NaN or infinity propagates through ``0 * inf``
exactly as in ``a @ v`` of the composite (the package's rule for non-finite inputs; see
docs/derivation.md).

Batch dimensions broadcast: inputs are flattened to ``(B, rows, features)`` over the batch
shape of all inputs (copying only inputs that were broadcast), gradients are summed back to
each input's shape, and ``a`` has the batch shape of q, k and the mask. bfloat16 and float16
inputs are computed in float32 and rounded once at the end (a decoding step's keys and
values, few queries against a long cache, are converted block by block or read as they
are, never converted whole: ``_Problem.decode``); a scale too large for float32 is
computed in float64. Every returned tensor owns its memory (none is a view of a buffer).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable, Iterator, Sequence
from typing import Any, TypeVar

import torch
from torch import Tensor

from .. import formulas
from .._checks import call_shapes
from ..dropout import Dropout
from ..formulas import causal_diagonal
from . import memory
from .blocks import forward_block_, jvp_block_, keep_block_, vjp_block_
from .cpu import (
    FUSED_MIN_ENTRIES,
    add_product_,
    few_rows_method,
    matmul_t,
    method_name,
    scaled_tanh_,
    score_grad,
    scores_tanh,
    tanh_,
    tanh_backward_,
)
from .native import block_pairs, serves, try_attn, try_attn_backward, try_decode

__all__ = ["BLOCK_COLS", "BLOCK_ROWS", "backward", "forward", "graph", "jvp"]

# Block sizes: a float32 block of BLOCK_ROWS x BLOCK_COLS is 2 MiB, about the L2 cache of a
# core of the machines benchmarks/RESULTS.md was measured on. Larger blocks amortize Python
# and oneDNN call overhead; smaller ones stay in cache (benchmarks/blocks.py measures it).
BLOCK_ROWS = 512
BLOCK_COLS = 1024
# Problems of at most this many n * m entries are grouped, several per block, so that a
# large batch of small problems is not one Python iteration per problem
# (benchmarks/small_problems.py; on the AVX2 AMD EPYC of benchmarks/RESULTS.md, 4 x 8
# problems of 256 x 256, d = 64: forward 23.0 -> 17.0 ms grouped 8 to a block, with weights
# forward+backward 42.1 -> 34.8 ms; 512 x 512 problems gain little or lose).
# (A block of several problems is one grouped oneDNN call, kernels/cpu.py.) With inputs
# broadcast over the batch, grouping copies their blocks: then only much smaller problems.
_SMALL = 65536
_SMALL_SHARED = 16384
# The dtype each input dtype is computed in, and the largest finite value of each.
_COMPUTE = {torch.bfloat16: torch.float32, torch.float16: torch.float32}
_LARGEST = {dtype: torch.finfo(dtype).max for dtype in (torch.float32, torch.float64)}
# Up to this many queries a bfloat16 or float16 forward reads K and V block by block in
# their own dtype, never converting the whole cache (see forward and _Problem.decode) ...
_FEW_ROWS = 16
# ... and where its products convert each block to float32 first (kernels/cpu.py,
# few_rows_method), a block's keys and values hold at most this many entries (8 MiB in
# float32: 2 heads of 4096 keys at d = 128), so that the converted copies stay in the warm
# heap and in cache (on the AVX2 AMD EPYC of benchmarks/RESULTS.md, 32 heads, 16 queries
# against 4096 keys, d = 128: 18 ms two heads to a block, 24 ms all 32 in one).
_CONVERTED_ENTRIES = 2**21
# Calls with at most this many score entries in all run the formulas on whole tensors
# (formulas.py: the composite's few aten calls, with the hand-derived VJP): there the cost
# is per call, and the blocked drivers' own cost exceeds what blocks save. Where oneDNN's
# fused tanh is the faster method, only calls below its own threshold (kernels/cpu.py).
_PLAIN_MAX_ENTRIES = 65536


# Calls of at most this many score entries that share one batch shape and may be
# differentiated are recorded as aten ops (``graph``), whose autograd nodes are C++, unless
# the compiled kernels serve their forward and backward: an autograd.Function (ops._Eager)
# whose forward and backward are aten calls in Python costs more than their arithmetic.
# Beyond it the kernels' faster tanh pays for the Function (on the AVX2 AMD EPYC of
# benchmarks/RESULTS.md, o-only forward+backward against the composite: 4 x 4 x 16 x 16
# 1.30x by the Function with aten calls, 0.89x as aten ops; 8 x 4 x 32 x 32, 32768 entries,
# 0.96x and 0.95x; with the compiled kernels' forward and backward, 1 x 1 x 16 x 64 0.83x by
# the Function, 1.07x as aten ops).
_GRAPH_MAX_ENTRIES = 16384


def _plain(q: Tensor, k: Tensor, v: Tensor, scale: float, dropout: Dropout | None) -> bool:
    """Whether this call is small enough for the whole-tensor formulas (see above)."""
    entries = max(math.prod(t.shape[:-2]) for t in (q, k, v)) * q.shape[-2] * k.shape[-2]
    return _small(q, entries, scale, dropout)


def _small(q: Tensor, entries: int, scale: float, dropout: Dropout | None) -> bool:
    """Whether a call of ``entries`` score entries in all runs on whole tensors (see above):
    no dropout, float32 or float64 with the scale in range, at most ``_PLAIN_MAX_ENTRIES``
    entries, and below oneDNN's threshold where its fused tanh is the faster method."""
    if not _whole_kind(q, scale, dropout) or entries > _PLAIN_MAX_ENTRIES:
        return False
    return entries <= FUSED_MIN_ENTRIES or method_name(q.dtype, q.device) != "onednn"


def _whole_kind(q: Tensor, scale: float, dropout: Dropout | None) -> bool:
    """No dropout, and float32 or float64 with the scale in range: the kind of call the
    whole-tensor paths take (they compute in q's dtype, scaling the finished scores)."""
    largest = _LARGEST.get(q.dtype)
    return dropout is None and largest is not None and abs(scale) <= largest


class _Whole:
    """A small call whose q, k and v share one batch shape, as one block of ``G`` problems
    (the whole ``n x m`` matrices at once): the block formulas of ``kernels/blocks.py`` on
    ``(G, rows, features)`` views, each product one ``bmm``-like call. Where it applies
    (:meth:`of`), it replaces the whole-tensor formulas, whose broadcasting products and
    separate scaling pass cost more aten calls (on the AVX2 AMD EPYC of benchmarks/
    RESULTS.md, a 1 x 1 x 16 x 64 forward: 60 us through ``formulas.forward``, the
    composite 28 us)."""

    __slots__ = ("batch", "d", "diagonal", "e", "k", "m", "mask", "n", "q", "size", "v")

    def __init__(
        self,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        attn_mask: Tensor | None,
        causal: str,
        batch: torch.Size,
        size: int,
    ) -> None:
        self.batch, self.size = batch, size
        self.n, self.d, self.m, self.e = q.shape[-2], q.shape[-1], v.shape[-2], v.shape[-1]
        self.q, self.k, self.v = _three_d(q, k, v, size, len(batch))
        self.diagonal, self.mask = _block_keep(attn_mask, causal, batch, size, self.n, self.m)

    @staticmethod
    def of(
        q: Tensor,
        k: Tensor,
        v: Tensor,
        attn_mask: Tensor | None,
        scale: float,
        causal: str,
        dropout: Dropout | None,
    ) -> _Whole | None:
        """The call as one block, or None where :func:`_small` says no, where a batch dim
        broadcasts or where the call is empty (those take ``formulas.py``)."""
        shared = _one_batch(q, k, v)
        if shared is None:
            return None
        batch, size, entries = shared
        if not _small(q, entries, scale, dropout) or not _mask_fits(q, k, v, attn_mask, batch):
            return None
        return _Whole(q, k, v, attn_mask, causal, batch, size)

    def weights(self, scale: float) -> Tensor:
        """``a = M * tanh(scale * q @ k^T)`` as ``(G, n, m)``, recomputed."""
        a = scores_tanh(self.q, self.k, scale, prescale=False)
        return keep_block_(a, causal_diagonal=self.diagonal, attn_mask=self.mask)

    def forward(self, scale: float, need_weights: bool) -> tuple[Tensor, Tensor | None]:
        """``(o, a)`` (``a`` None unless ``need_weights``), each in memory of its own: the
        block formulas' forward in its fewest aten calls (two ``bmm`` and the kernels' tanh,
        which scales as it reads; the keep-mask only where there is one)."""
        a = self.q.new_empty((*self.batch, self.n, self.m)) if need_weights else None
        a3 = torch.bmm(self.q, self.k.mT, out=None if a is None else self._3d(a))
        a3 = scaled_tanh_(a3, scale)  # (in place: the scale is in range, see _small)
        if self.diagonal is not None or self.mask is not None:
            keep_block_(a3, causal_diagonal=self.diagonal, attn_mask=self.mask)
        o = self.q.new_empty((*self.batch, self.n, self.e))
        torch.bmm(a3, self.v, out=self._3d(o))
        return o, a

    def _3d(self, t: Tensor) -> Tensor:
        """A contiguous ``(*batch, rows, cols)`` tensor as ``(G, rows, cols)``."""
        return t.view(self.size, t.shape[-2], t.shape[-1])

    def backward(
        self,
        grad_o: Tensor | None,
        grad_a: Tensor | None,
        a: Tensor | None,
        scale: float,
        needs: tuple[bool, bool, bool],
    ) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
        """``(g_q, g_k, g_v)`` (None where not in ``needs``, which the caller has narrowed to
        the gradients some output gradient reaches); ``a`` None: recomputed."""
        a3 = self.weights(scale) if a is None else a.reshape(self.size, self.n, self.m)
        shapes = (
            (*self.batch, self.n, self.d),
            (*self.batch, self.m, self.d),
            (*self.batch, self.m, self.e),
        )
        g_q, g_k, g_v = (
            self.q.new_empty(shape) if need else None
            for shape, need in zip(shapes, needs, strict=True)
        )
        vjp_block_(
            None if g_q is None else g_q.view(self.size, self.n, self.d),
            None if g_k is None else g_k.view(self.size, self.m, self.d),
            None if g_v is None else g_v.view(self.size, self.m, self.e),
            None if grad_o is None else grad_o.reshape(self.size, self.n, self.e),
            None if grad_a is None else grad_a.reshape(self.size, self.n, self.m),
            self.q,
            self.k,
            self.v,
            a3,
            scale=scale,
            causal_diagonal=self.diagonal,
            attn_mask=self.mask,
            matmul_t=matmul_t,
            first_rows=True,
            first_cols=True,
        )
        return g_q, g_k, g_v


def _one_batch(q: Tensor, k: Tensor, v: Tensor) -> tuple[torch.Size, int, int] | None:
    """``(batch, G, entries)``: the batch shape q, k and v share, its number of problems
    and of score entries in all; None where a batch dim broadcasts or the call is empty
    (no problem, query, key or feature), which the one-block paths leave to others."""
    q_shape, v_shape = q.shape, v.shape
    batch = q_shape[:-2]
    if batch != k.shape[:-2] or batch != v_shape[:-2] or 0 in (q_shape[-1], v_shape[-1]):
        return None
    size = math.prod(batch)
    entries = size * q_shape[-2] * v_shape[-2]
    return None if entries == 0 else (batch, size, entries)


def _three_d(
    q: Tensor, k: Tensor, v: Tensor, size: int, batch_dims: int
) -> tuple[Tensor, Tensor, Tensor]:
    """q, k and v of one batch shape as ``(G, rows, features)``: views, or copies where the
    batch dims cannot merge."""
    if batch_dims == 1:
        return q, k, v
    return (
        q.reshape(size, q.shape[-2], q.shape[-1]),
        k.reshape(size, k.shape[-2], k.shape[-1]),
        v.reshape(size, v.shape[-2], v.shape[-1]),
    )


def _block_keep(
    attn_mask: Tensor | None, causal: str, batch: torch.Size, size: int, n: int, m: int
) -> tuple[int | None, Tensor | None]:
    """The keep-mask of all ``size`` problems as one block: the causal diagonal (None where
    it keeps every entry) and the mask as ``(G, n, m)`` (None without one)."""
    diagonal = causal_diagonal(causal, n, m)
    # (A diagonal at or past the last column keeps every entry: a decoding step.)
    if diagonal is not None and diagonal >= m - 1:
        diagonal = None
    if attn_mask is None:
        return diagonal, None
    return diagonal, attn_mask.expand(*batch, n, m).reshape(size, n, m)


def graph(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    attn_mask: Tensor | None = None,
    scale: float = 1.0,
    causal: str = "none",
    *,
    need_weights: bool = True,
) -> tuple[Tensor, Tensor | None] | None:
    """:func:`forward` of a very small call as differentiable aten ops, for autograd to
    record where a backward may follow (``ops.OpPair.eager``), or None for any other call.

    Args:
        q: ``(..., n, d)``.  k: ``(..., m, d)``.  v: ``(..., m, e)``, one batch shape.
        attn_mask, scale, causal, need_weights: as for :func:`forward` (no dropout).

    Returns:
        ``(o, a)`` (``a`` None unless ``need_weights``), ``(*batch, n, e)`` and
        ``(*batch, n, m)`` views of the ``(G, ...)`` results of all problems as one block (as
        :class:`_Whole` computes them, but with torch's tanh, whose autograd formula the
        graph needs), where the call has at most ``_GRAPH_MAX_ENTRIES`` score entries, one
        batch shape, no mask batch dims of its own, and is float32 or float64 with the scale
        in range, and the compiled kernels do not serve its forward and backward; else None
        (the caller runs :func:`forward` and :func:`backward` in an autograd.Function).

    Example:
        >>> q = torch.randn(2, 3, 4, dtype=torch.float64, requires_grad=True)
        >>> o, a = graph(q, q, q, causal="top_left")
        >>> o.sum().backward()
        >>> q.grad.shape
        torch.Size([2, 3, 4])
    """
    shared = _one_batch(q, k, v)
    if shared is None or shared[2] > _GRAPH_MAX_ENTRIES:
        return None
    if attn_mask is None and serves(q, k, v, scale):
        return None  # (the compiled kernels' forward and backward cost less: see above)
    batch, size, _ = shared
    if not _whole_kind(q, scale, None) or not _mask_fits(q, k, v, attn_mask, batch):
        return None
    n, m, e = q.shape[-2], v.shape[-2], v.shape[-1]
    q3, k3, v3 = _three_d(q, k, v, size, len(batch))
    diagonal, mask = _block_keep(attn_mask, causal, batch, size, n, m)
    # Scaled and masked before tanh (whose node keeps its result; masked scores are 0, and
    # tanh(0) = 0), in place on the product, which no node keeps. tanh is torch's: the
    # kernels' own is not differentiable.
    x = torch.bmm(q3, k3.mT)
    if scale != 1.0:
        x = x.mul_(scale)
    if diagonal is not None or mask is not None:
        x = keep_block_(x, causal_diagonal=diagonal, attn_mask=mask)
    a3 = x.tanh_()
    o = torch.bmm(a3, v3).view(*batch, n, e)
    return o, (a3.view(*batch, n, m) if need_weights else None)


def _mask_fits(
    q: Tensor, k: Tensor, v: Tensor, attn_mask: Tensor | None, batch: torch.Size
) -> bool:
    """Whether the mask (if any) brings no batch dims of its own beyond q's, k's and v's."""
    if attn_mask is None:
        return True
    shapes = call_shapes(q, k, v, attn_mask)
    return shapes is not None and shapes.batch == batch


def _owned(t: Tensor) -> Tensor:
    """``t`` in memory of its own (a returned tensor is never a view of a buffer)."""
    return t if t._base is None else t.clone()


def _all_finite(t: Tensor | None) -> bool:
    """Whether ``t`` holds no NaN or infinity, by one reduction: a sum of finite values that
    overflows reads as non-finite, which only costs the skipping, never a wrong answer."""
    if t is None or t.numel() == 0:
        return True
    total = t.sum(dtype=torch.float32) if t.dtype in (torch.float16, torch.bfloat16) else t.sum()
    return bool(torch.isfinite(total))


class _Broadcast:
    """A broadcast input seen as ``(B, rows, cols)`` without materializing the broadcast:
    ``[batch, rows(, cols)]`` returns ``(G, r, c)``, a view of the input's memory for one
    problem (a copy only of the G tiny problems a grouped block holds)."""

    def __init__(self, full: Tensor, problem: _Problem) -> None:
        self.full, self.problem = full, problem

    def __getitem__(self, index: tuple[slice, ...]) -> Tensor:
        batch, rest = index[0], index[1:]
        blocks = [
            self.full[self.problem.batch_index(b)][rest] for b in range(batch.start, batch.stop)
        ]
        return blocks[0].unsqueeze(0) if len(blocks) == 1 else torch.stack(blocks)


_F = TypeVar("_F", bound=Callable[..., Any])


def _without_grad(fn: _F) -> _F:
    """``torch.no_grad()`` as a decorator, without its cost where grad is already off (the
    ops call the kernels from autograd formulas and inference paths, where it is: entering
    and leaving the context costs microseconds, a share of a small call)."""

    @functools.wraps(fn)
    def run(*args: Any, **kwargs: Any) -> Any:
        if not torch.is_grad_enabled():
            return fn(*args, **kwargs)
        with torch.no_grad():
            return fn(*args, **kwargs)

    return run  # type: ignore[return-value]  # the same signature


class _Converted:
    """Blocks copied into ``dtype`` in buffers that every block of a call reuses, one per
    slot: a half-precision decoding step converts its keys and values block by block, and
    the copies neither allocate nor fault in fresh memory per block (on the AVX2 AMD EPYC
    of benchmarks/RESULTS.md, 32 heads, 16 bfloat16 queries against 4096 keys, d = 128:
    20 ms with a new tensor per block, 16 ms reusing two buffers)."""

    def __init__(self, dtype: torch.dtype) -> None:
        self.dtype = dtype
        self.buffers: dict[int, Tensor] = {}

    def __call__(self, slot: int, block: Tensor) -> Tensor:
        """``block`` in ``dtype``, in slot ``slot``'s buffer (valid until its next use)."""
        buffer = self.buffers.get(slot)
        if buffer is None or buffer.numel() < block.numel():
            buffer = torch.empty(block.numel(), dtype=self.dtype, device=block.device)
            self.buffers[slot] = buffer
        return buffer[: block.numel()].view(block.shape).copy_(block)


@dataclasses.dataclass(frozen=True)
class _Tile:
    """One block: problems ``batch``, rows ``rows`` and columns ``cols`` of the n x m matrix."""

    batch: slice
    rows: slice
    cols: slice
    causal_diagonal: int | None  # see kernels/blocks.py


class _Problem:
    """The inputs of one call, flattened to ``(B, rows, features)``, and its blocks.

    ``skip``: whether blocks wholly above the causal boundary are skipped; the drivers keep
    it only where the inputs those blocks would multiply by zero are all finite (module doc).
    """

    def __init__(
        self,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        attn_mask: Tensor | None,
        scale: float,
        causal: str,
        block_rows: int | None,
        block_cols: int | None,
    ) -> None:
        # The op bodies validated the call (kernels run after validation, see ops.py).
        shapes = call_shapes(q, k, v, attn_mask)
        if shapes is None:
            raise ValueError("blockwise: the batch dims of q, k, v and attn_mask do not broadcast")
        memory.warm_heap()  # block buffers stay in the heap, not faulted in again per block
        self.batch, self.weights_batch = shapes.batch, shapes.weights_batch
        self.size = math.prod(self.batch)
        self.n, self.m, self.d, self.e = shapes.n, shapes.m, shapes.d, shapes.e
        self.dtype, self.device = q.dtype, q.device
        # bfloat16/float16 accumulate in float32 (one rounding at the end); a scale beyond
        # float32's range would meet 0 * inf there, so such calls compute in float64.
        self.compute = _COMPUTE.get(q.dtype, q.dtype)
        if abs(scale) > _LARGEST[self.compute]:
            self.compute = torch.float64
        self.scale = scale
        # bfloat16 where the CPU multiplies it natively (oneDNN's bf16 kernels, probed): the
        # blocks stay bfloat16, each block's products accumulate in float32 inside oneDNN,
        # and the sums over blocks (o, the gradients) are float32 (blocks.add_product_).
        self.native = (
            q.dtype == torch.bfloat16
            and self.compute == torch.float32
            and method_name(q.dtype, q.device) == "onednn"
        )
        self.blocks = q.dtype if self.native else self.compute
        # A bfloat16 or float16 decoding step (few queries, a long cache) is bound by
        # reading K and V, so they are never converted whole: "native" products read them
        # as they are, "float32" converts each block (cpu.few_rows_method says which; None:
        # not such a call).
        self.decode: str | None = None
        if (
            q.dtype in _COMPUTE
            and self.compute == torch.float32
            and not self.native
            and self.n <= _FEW_ROWS
        ):
            self.decode = few_rows_method(q.dtype, q.device)[0]
        self.diagonal = causal_diagonal(causal, self.n, self.m)
        self.skip = self.diagonal is not None
        self.mask = None if attn_mask is None else attn_mask.expand(*self.batch, self.n, self.m)
        # The mask as (1 or B, n, m) where that is a view: one mask for all problems (a causal
        # or padding pattern shared by the batch), or one per problem.
        self.mask_shared = attn_mask is not None and math.prod(attn_mask.shape[:-2]) == 1
        self.mask_flat = None
        if attn_mask is not None and (self.mask_shared or self.batch == attn_mask.shape[:-2]):
            own = attn_mask.expand(*attn_mask.shape[:-2], self.n, self.m)
            try:
                self.mask_flat = own.view(-1, self.n, self.m)
            except RuntimeError:  # its strides allow no such view: blocks are gathered instead
                self.mask_flat = None
                self.mask_shared = False
        # bfloat16 blocks by pairs (native.block_pairs), not causal: twice the rows, the
        # bytes of a float32 block. Their passes are the faster, so each block's aten and
        # Python calls weigh more (n = m = 4096, d = 64, o-only forward+backward, two
        # threads: 54.5 ms in blocks of 512 x 1024, 50.0 in 1024 x 1024; with weights 71.1
        # and 63.2). Causal calls keep the smaller blocks, which skip more of the masked
        # half (1 x 8 x 1024 x 64: 42.3 ms, one block of 1024 rows 53.1).
        tall = self.native and self.diagonal is None and block_pairs()
        rows = 2 * BLOCK_ROWS if tall else BLOCK_ROWS
        self.rows = max(1, min(self.n, block_rows or rows))
        cols = block_cols or BLOCK_COLS
        if block_cols is None and self.rows < rows:
            # Few rows (a decoding step): wider blocks of the same area, so a long cache is a
            # few blocks, not one Python iteration per 1024 keys.
            cols = max(BLOCK_COLS, (rows * BLOCK_COLS) // self.rows)
        self.cols = max(1, min(self.m, cols))
        if self.decode == "float32":
            self.cols = max(1, min(self.cols, _CONVERTED_ENTRIES // max(1, self.d + self.e)))
        entries = self.n * self.m
        whole = self.rows == self.n and self.cols == self.m
        # Grouping copies the blocks of broadcast inputs (keys shared by heads): only for
        # problems too small for that copy to matter.
        self.group = 1
        if whole and entries <= _SMALL:
            shared = any(math.prod(t.shape[:-2]) != self.size for t in (q, k, v))
            if entries < _SMALL_SHARED or not shared:
                self.group = max(1, (BLOCK_ROWS * BLOCK_COLS) // entries)
            if self.decode == "float32":
                width = self.m * (self.d + self.e)
                self.group = max(1, min(self.group, _CONVERTED_ENTRIES // max(1, width)))
        self.empty = self.size * entries == 0
        self._dropout_keys: tuple[Tensor, Tensor] | None = None

    def dropout_block(
        self, dropout: Dropout | None, tile: _Tile, *, transposed: bool = False
    ) -> Tensor | None:
        """Which weights of ``tile``'s block dropout keeps (1/0 in the blocks' dtype, held as
        the block is), or None without dropout. The mask is keyed by each problem's index in
        ``a``'s batch, so problems that differ only along v's own batch dims share it, as
        they share ``a``. The row and column keys are made once per call (linear in n, m)."""
        if dropout is None:
            return None
        if self._dropout_keys is None:
            weights: Tensor | range = range(self.size)
            if self.weights_batch != self.batch:
                own = (1,) * (len(self.batch) - len(self.weights_batch)) + self.weights_batch
                index = torch.arange(math.prod(self.weights_batch)).reshape(own)
                weights = index.expand(self.batch).reshape(-1)
            self._dropout_keys = (
                dropout.row_keys(weights, range(self.n), self.device),
                dropout.col_keys(range(self.m), self.device),
            )
        rows, cols = self._dropout_keys
        return dropout.keep_block(
            rows[tile.batch, tile.rows], cols[tile.cols], transposed=transposed, dtype=self.blocks
        )

    def flat(
        self, t: Tensor | None, rows: int, cols: int, compute: bool = True
    ) -> Tensor | _Broadcast | None:
        """``t`` as ``(B, rows, cols)`` over the batch, indexed ``[batch, rows(, cols)]`` by
        the drivers: a view where ``t`` has the whole batch, else a :class:`_Broadcast` whose
        blocks are views of ``t``'s own memory (keys and values shared by heads, as GQA
        shares them, are never copied per head). ``compute``: in the compute dtype."""
        if t is None:
            return None
        if compute and t.dtype != self.compute:
            t = t.to(self.compute)  # t's own size: no broadcast copy
        if t.shape[:-2] == self.batch:
            return t.reshape(self.size, rows, cols)
        full = t.expand(*self.batch, rows, cols)
        if full.shape[:-2] == t.shape[:-2]:
            return full.reshape(self.size, rows, cols)
        return _Broadcast(full, self)

    def zeros(self, rows: int, cols: int, *, written: bool = False) -> Tensor:
        """A ``(*batch, rows, cols)`` accumulator in the compute dtype; ``written``: its
        blocks write it (``first``) rather than add to it, so it is left uninitialized."""
        make = torch.empty if written else torch.zeros
        return make(*self.batch, rows, cols, dtype=self.compute, device=self.device)

    @property
    def whole_rows(self) -> bool:
        """Whether each row block is one block (all the columns it visits): its products
        then write the rows of ``o`` and ``g_q`` (``first``) instead of adding to zeros.
        Short sequences, where zero-filling costs as much as the products."""
        # (Every row block visits some column: causal skipping may leave none to the first.)
        first_end = self.causal_end(min(self.n, self.rows))
        return not self.empty and self.cols >= self.m and first_end > 0

    @property
    def whole_cols(self) -> bool:
        """Whether each column block is one block that visits every column (one row block,
        no causal skipping of columns): its products then write ``g_k`` and ``g_v``."""
        return not self.empty and self.rows >= self.n and self.causal_end(self.n) == self.m

    def keep_skipping_if_finite(
        self, columns: Sequence[Tensor | None] = (), rows: Sequence[Tensor | None] = ()
    ) -> None:
        """Skip causal blocks only if the keys (``columns``: tensors ``(..., m, .)``) and the
        queries (``rows``: ``(..., n, .)``) that skipped blocks would multiply by zero are
        all finite; else visit every block (the package's rule for non-finite inputs)."""
        if not self.skip:
            return
        ends = [self.causal_end(min(self.n, i0 + self.rows)) for i0 in range(0, self.n, self.rows)]
        starts = range(0, self.n, self.rows)
        skipping = [i0 for i0, end in zip(starts, ends, strict=True) if end < self.m]
        if not skipping:
            self.skip = False  # nothing would be skipped: no check needed
            return
        first_col = ends[0]  # the row blocks' ends grow with the rows
        last_row = min(self.n, skipping[-1] + self.rows)
        finite = all(_all_finite(None if t is None else t[..., first_col:, :]) for t in columns)
        finite = finite and all(
            _all_finite(None if t is None else t[..., :last_row, :]) for t in rows
        )
        self.skip = finite

    def prescale(self, q: Tensor, k: Tensor) -> bool:
        """Whether ``(scale * q) @ k^T`` cannot overflow where ``q @ k^T`` does not, for
        oneDNN's fused tanh, which needs q scaled before its product: true when ``s * |q_i|
        * |k_j|`` (which bounds every partial sum) and ``s * |q_i|``, ``s * |k_j|`` stay well
        inside the compute dtype for all rows, ``s = |scale|``. Otherwise the scores are
        scaled after the product (formulas.scaled). The other tanh methods scale the
        finished sums in the product itself (kernels/cpu.py): no question, no look."""
        s = abs(self.scale)
        if method_name(self.blocks, self.device) != "onednn":
            return True
        if s <= 1.0 or q.numel() == 0 or k.numel() == 0:
            # |s * x| <= |x| for every partial sum: no overflow where q @ k^T has none (the
            # usual 1/sqrt(d) needs no look at the data, and no sync).
            return True
        top = torch.finfo(self.compute).max / 4
        # In the compute dtype but without a converted copy of q or k.
        big_q = torch.linalg.vector_norm(q, dim=-1, dtype=self.compute).amax().item()
        big_k = torch.linalg.vector_norm(k, dim=-1, dtype=self.compute).amax().item()
        return s * max(big_q, big_k, 1.0) <= top and s * big_q * big_k <= top

    def tiles(self) -> Iterator[_Tile]:
        """Every block, row block by row block; causal skips blocks wholly above the diagonal
        where ``skip`` allows."""
        for b0 in range(0, self.size, self.group):
            batch = slice(b0, min(self.size, b0 + self.group))
            for i0 in range(0, self.n, self.rows):
                i1 = min(self.n, i0 + self.rows)
                end = self.causal_end(i1)
                for j0 in range(0, end, self.cols):
                    j1 = min(end, j0 + self.cols)
                    diagonal = None
                    if self.diagonal is not None and j1 - 1 > i0 + self.diagonal:
                        diagonal = i0 - j0 + self.diagonal  # the boundary crosses the block
                    yield _Tile(batch, slice(i0, i1), slice(j0, j1), diagonal)

    def causal_end(self, i1: int) -> int:
        """The first column that no row above ``i1`` keeps where blocks may be skipped, else m:
        the row blocks end where the causal boundary does, not at a whole column block."""
        if not self.skip:
            return self.m
        assert self.diagonal is not None
        return max(0, min(self.m, i1 + self.diagonal))

    def mask_block(self, tile: _Tile) -> Tensor | None:
        """The attn_mask block of ``tile`` as ``(G, rows, cols)``, or ``(1, rows, cols)`` for a
        mask shared by every problem (the masking broadcasts it); a view unless the mask
        varies over only some batch dims and G > 1."""
        if self.mask is None:
            return None
        if self.mask_flat is not None:
            batch = slice(None) if self.mask_shared else tile.batch
            return self.mask_flat[batch, tile.rows, tile.cols]
        blocks = [
            self.mask[self.batch_index(b)][tile.rows, tile.cols]
            for b in range(tile.batch.start, tile.batch.stop)
        ]
        return blocks[0].unsqueeze(0) if len(blocks) == 1 else torch.stack(blocks)

    def batch_index(self, b: int) -> tuple[int, ...]:
        """The multi-index of flat problem ``b`` in the batch shape."""
        index = []
        for size in reversed(self.batch):
            b, r = divmod(b, size)
            index.append(r)
        return tuple(reversed(index))

    def weights_index(self) -> tuple[slice, ...] | None:
        """Where ``a``'s batch lies in the full batch (the first copy along the dims only v
        brings), or None when the two are the same."""
        if self.weights_batch == self.batch:
            return None
        own = (1,) * (len(self.batch) - len(self.weights_batch)) + self.weights_batch
        return tuple(
            slice(None) if w == b else slice(0, 1) for w, b in zip(own, self.batch, strict=True)
        )

    def reduce(self, t: Tensor, like: Tensor) -> Tensor:
        """A ``(*batch, rows, cols)`` gradient summed to the shape and dtype of ``like``, in
        memory of its own."""
        if t.shape != like.shape:
            t = t.sum_to_size(like.shape)  # a view of the sum where it drops leading dims
        t = t.to(like.dtype, memory_format=torch.contiguous_format)
        return t if t._base is None else t.clone()


@_without_grad  # in-place block updates: not differentiable (see module doc)
def forward(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    attn_mask: Tensor | None = None,
    scale: float = 1.0,
    causal: str = "none",
    *,
    need_weights: bool = True,
    dropout: Dropout | None = None,
    block_rows: int | None = None,
    block_cols: int | None = None,
) -> tuple[Tensor, Tensor | None]:
    """``o = a @ v`` with ``a = M * tanh(scale * q @ k^T)``, block by block.

    Args:
        q: ``(..., n, d)``.  k: ``(..., m, d)``.  v: ``(..., m, e)`` (batch dims broadcast).
        attn_mask: optional bool mask broadcastable to ``(*batch, n, m)``, True = takes part.
        scale: multiplies the scores.  causal: ``"none"``, ``"top_left"``, ``"bottom_right"``.
        need_weights: also return ``a``; with False nothing of size ``n x m`` is allocated
            (but for the smallest calls, see the module doc).
        dropout: None, or the call's dropout: each block's mask is made from its seed (and
            made again by :func:`backward`), never stored; ``a`` is returned after dropout.
        block_rows, block_cols: block size (default ``BLOCK_ROWS`` x ``BLOCK_COLS``).

    Returns:
        ``(o, a)``: ``(*batch, n, e)`` and ``(*weights_batch, n, m)``, or ``(o, None)``.

    Example:
        >>> q, v = torch.randn(3, 2), torch.randn(3, 4)
        >>> o, a = forward(q, q, v, causal="top_left", block_rows=2, block_cols=2)
        >>> bool(torch.allclose(o, torch.tanh(q @ q.T).tril() @ v, atol=1e-6))
        True
    """
    one_block = None
    if block_rows is None and block_cols is None:
        if attn_mask is None and dropout is None:
            diagonal = causal_diagonal(causal, q.shape[-2], k.shape[-2])
            done = try_attn(q, k, v, scale, diagonal, need_weights)
            if done is None and not need_weights:
                o = try_decode(q, k, v, scale, diagonal)
                done = None if o is None else (o, None)
            if done is not None:
                return done
        one_block = _Whole.of(q, k, v, attn_mask, scale, causal, dropout)
    if one_block is not None:
        return one_block.forward(scale, need_weights)
    if block_rows is None and block_cols is None and _plain(q, k, v, scale, dropout):
        whole_o, whole_a = formulas.forward(
            q, k, v, attn_mask, scale=scale, causal=causal, tanh=tanh_
        )
        return _owned(whole_o), (_owned(whole_a) if need_weights else None)
    p = _Problem(q, k, v, attn_mask, scale, causal, block_rows, block_cols)
    p.keep_skipping_if_finite(columns=[v])
    where = p.weights_index()
    # A half-precision decoding step (few queries, a long cache) is bound by reading K and
    # V: converting them whole to float32 would read and write them again. Where products
    # in their dtype are fast ("native"), those read them as they are (accumulating in
    # float32, as the composite's) and only the small blocks of scores and weights are
    # float32; elsewhere ("float32") each block is converted as it is used.
    decode = p.decode == "native"
    convert = p.decode == "float32"
    native = decode or convert or p.native
    drop_scale = 1.0 if dropout is None else dropout.scale
    whole = not decode and p.whole_rows
    o = p.zeros(p.n, p.e, written=whole)
    a = None
    if need_weights:
        a = torch.empty(*p.batch, p.n, p.m, dtype=q.dtype, device=q.device)
        if p.empty:
            a.zero_()
    if not p.empty:
        q3, k3, v3 = (
            p.flat(x, rows, cols, compute=not native)
            for x, rows, cols in ((q, p.n, p.d), (k, p.m, p.d), (v, p.m, p.e))
        )
        assert q3 is not None and k3 is not None and v3 is not None
        o3, a3 = o.view(p.size, p.n, p.e), None if a is None else a.view(p.size, p.n, p.m)
        prescale = decode or p.prescale(q, k)  # the decoding path scales after the product
        converted = _Converted(p.compute)
        # bfloat16 blocks by pairs write into any block of a (native.try_pairs_block): no
        # block buffer copied into it. (At n = m = 4096 those copies showed 15 ms of a 50 ms
        # forward, but that was the fresh a's page faults, which stay: the gain is the pass.)
        into_a = a3 is not None and a3.dtype == p.blocks == torch.bfloat16 and block_pairs()
        for t in p.tiles():
            out = None
            if decode:
                x = torch.matmul(q3[t.batch, t.rows], k3[t.batch, t.cols].mT)
                block = scaled_tanh_(x.float(), scale)
                keep_block_(block, causal_diagonal=t.causal_diagonal, attn_mask=p.mask_block(t))
                drop = p.dropout_block(dropout, t)
                if drop is not None:
                    block.mul_(drop)
                v_block = v3[t.batch, t.cols]
                product = torch.matmul(block.to(v_block.dtype), v_block)
                o3[t.batch, t.rows].add_(product, alpha=drop_scale)
            else:
                # A row block's one block is computed in a's memory, where it can be.
                if into_a or (whole and a3 is not None and a3.dtype == p.blocks):
                    out = a3[t.batch, t.rows, t.cols]  # type: ignore[index]
                    out = out if into_a or out.is_contiguous() else None
                q_block, k_block, v_block = (
                    q3[t.batch, t.rows],
                    k3[t.batch, t.cols],
                    v3[t.batch, t.cols],
                )
                if convert:
                    q_block = q_block.to(p.compute)
                    k_block, v_block = converted(0, k_block), converted(1, v_block)
                block = scores_tanh(q_block, k_block, scale, prescale, out=out)
                forward_block_(
                    o3[t.batch, t.rows],
                    block,
                    v_block,
                    causal_diagonal=t.causal_diagonal,
                    attn_mask=p.mask_block(t),
                    dropout=p.dropout_block(dropout, t),
                    dropout_scale=drop_scale,
                    first=whole,
                    add_product=add_product_,
                )
            if a3 is not None and out is not None:
                if drop_scale != 1.0:
                    block.mul_(drop_scale)
            elif a3 is not None:
                a3[t.batch, t.rows, t.cols].copy_(block)
                if drop_scale != 1.0:
                    a3[t.batch, t.rows, t.cols].mul_(drop_scale)
        if a3 is not None and p.skip:
            for i0 in range(0, p.n, p.rows):  # the blocks causal skipped are zeros
                i1 = min(p.n, i0 + p.rows)
                a3[:, i0:i1, p.causal_end(i1) :].zero_()
    if a is not None and where is not None:
        # v brought batch dims of its own: a is the same along them; keep one copy.
        a = a[where].reshape(*p.weights_batch, p.n, p.m).clone()
    return o.to(p.dtype), a


@_without_grad  # in-place block updates: not differentiable (see module doc)
def backward(
    grad_o: Tensor | None,
    grad_a: Tensor | None,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    a: Tensor | None,
    attn_mask: Tensor | None = None,
    scale: float = 1.0,
    causal: str = "none",
    needs: Sequence[bool] = (True, True, True),
    *,
    dropout: Dropout | None = None,
    block_rows: int | None = None,
    block_cols: int | None = None,
) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    """Gradients of ``<grad_o, o> + <grad_a, a>`` w.r.t. q, k, v, block by block.

    Args:
        grad_o: ``(*batch, n, e)`` or None.  grad_a: ``(*weights_batch, n, m)`` or None (needs
            ``a``).
        q, k, v, attn_mask, scale, causal: the forward's arguments.
        a: the forward's ``(*weights_batch, n, m)`` weights, or None to recompute each block
            of it (then no tensor of size ``n x m`` is allocated).
        needs: which of (q, k, v) want a gradient.
        dropout: the forward's dropout (its masks are made again from the seed); a saved
            ``a`` is then the forward's, after dropout.
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
    one_block = None
    if block_rows is None and block_cols is None:
        if attn_mask is None and dropout is None:
            diagonal = causal_diagonal(causal, q.shape[-2], k.shape[-2])
            done = try_attn_backward(grad_o, grad_a, q, k, v, a, scale, diagonal)
            if done is not None:
                small_q, small_k, small_v = done
                return (
                    small_q if need_q else None,
                    small_k if need_k else None,
                    small_v if need_v else None,
                )
        one_block = _Whole.of(q, k, v, attn_mask, scale, causal, dropout)
    if one_block is not None:
        return one_block.backward(grad_o, grad_a, a, scale, (need_q, need_k, need_v))
    if block_rows is None and block_cols is None and _plain(q, k, v, scale, dropout):
        if a is None:
            a = formulas.forward(q, k, v, attn_mask, scale=scale, causal=causal, tanh=tanh_)[1]
        grads = formulas.vjp(
            grad_o, grad_a, q, k, v, a, attn_mask, scale=scale, causal=causal,
            needs=(need_q, need_k, need_v),
        )  # fmt: skip
        g_q, g_k, g_v = (None if g is None else _owned(g.contiguous()) for g in grads)
        return g_q, g_k, g_v
    p = _Problem(q, k, v, attn_mask, scale, causal, block_rows, block_cols)
    p.keep_skipping_if_finite(
        columns=[k if need_q else None], rows=[q if need_k else None, grad_o if need_v else None]
    )
    # Recomputing, each block is made transposed (tanh(scale * k_J @ q_I^T), cols x rows), so
    # that only g_q's product reads a block transposed (blocks.vjp_block_; measured by
    # benchmarks/orientation.py). With a saved a, transposing its blocks would cost a copy.
    transposed = a is None
    g_q = p.zeros(p.n, p.d, written=p.whole_rows) if need_q else None
    g_k = p.zeros(p.m, p.d, written=p.whole_cols) if need_k else None

    def g_v_buffer() -> Tensor:
        if p.native and not transposed:
            # bfloat16 blocks of the saved a: g_v's products come transposed (add_product_
            # reads a block of a^T as (g_o^T a)^T), so g_v is kept as g_v^T, where they add
            # row by row.
            return p.zeros(p.e, p.m, written=p.whole_cols).mT
        return p.zeros(p.m, p.e, written=p.whole_cols)

    g_v = None
    where = p.weights_index()
    if grad_a is not None and where is not None:
        # grad_a belongs to one copy of a along v's own batch dims: the others get none.
        spread = torch.zeros(*p.batch, p.n, p.m, dtype=grad_a.dtype, device=grad_a.device)
        spread[where] = grad_a.reshape(spread[where].shape)
        grad_a = spread
    if not p.empty:
        convert = not p.native
        q3, k3 = p.flat(q, p.n, p.d, convert), p.flat(k, p.m, p.d, convert)
        v3 = p.flat(v, p.m, p.e, convert)
        assert q3 is not None and k3 is not None and v3 is not None
        g_o3 = p.flat(grad_o, p.n, p.e, convert)
        g_a3 = p.flat(grad_a, p.n, p.m, compute=False)
        a3 = p.flat(a, p.n, p.m, compute=False)
        g_q3 = None if g_q is None else g_q.view(p.size, p.n, p.d)
        g_k3 = None if g_k is None else g_k.view(p.size, p.m, p.d)
        g_v3 = None
        if (
            need_v
            and p.native
            and not p.skip
            and isinstance(a3, Tensor)
            and isinstance(g_o3, Tensor)
        ):
            # bfloat16 blocks, the saved a, no blocks skipped: g_v = a^T g_o in one product
            # (a is what multiplied v: masked, dropped and scaled), which reads a as it is:
            # block by block oneDNN copied each block of a^T (n = m = 4096, one thread, the
            # backward 65-69 ms against 63-65; benchmarks/RESULTS.md).
            g_v = torch.bmm(g_o3.mT, a3).mT.reshape(*p.batch, p.m, p.e)
        elif need_v:
            g_v = g_v_buffer()
            g_v3 = g_v.view(p.size, p.m, p.e)
        prescale = a3 is not None or p.prescale(q, k)
        drop_scale = 1.0 if dropout is None else dropout.scale
        for t in p.tiles():
            mask = p.mask_block(t)
            drop = p.dropout_block(dropout, t, transposed=transposed)
            if a3 is None:
                a_block = scores_tanh(k3[t.batch, t.cols], q3[t.batch, t.rows], scale, prescale)
                keep_block_(
                    a_block, causal_diagonal=t.causal_diagonal, attn_mask=mask, transposed=True
                )
            elif dropout is not None:
                # The saved a is after dropout: (1 - p) * a is the block before it where kept;
                # where dropped it is 0, and D = 0 there stops every term.
                a_block = (a3[t.batch, t.rows, t.cols] * (1.0 - dropout.p)).to(p.blocks)
            else:
                a_block = a3[t.batch, t.rows, t.cols].to(p.blocks)
            vjp_block_(
                None if g_q3 is None else g_q3[t.batch, t.rows],
                None if g_k3 is None else g_k3[t.batch, t.cols],
                None if g_v3 is None else g_v3[t.batch, t.cols],
                None if g_o3 is None else g_o3[t.batch, t.rows],
                None if g_a3 is None else g_a3[t.batch, t.rows, t.cols].to(p.blocks),
                q3[t.batch, t.rows],
                k3[t.batch, t.cols],
                v3[t.batch, t.cols],
                a_block,
                scale=scale,
                causal_diagonal=t.causal_diagonal,
                attn_mask=mask,
                matmul_t=matmul_t,
                transposed=transposed,
                dropout=drop,
                dropout_scale=drop_scale,
                first_rows=p.whole_rows,
                first_cols=p.whole_cols,
                add_product=add_product_,
                tanh_backward=tanh_backward_,
                score_grad=score_grad,
            )
    if need_v and g_v is None:  # (no block: the empty call's zeros)
        g_v = g_v_buffer()
    return (
        None if g_q is None else p.reduce(g_q, q),
        None if g_k is None else p.reduce(g_k, k),
        None if g_v is None else p.reduce(g_v, v),
    )


@_without_grad  # in-place block updates: not differentiable (see module doc)
def jvp(
    t_q: Tensor | None,
    t_k: Tensor | None,
    t_v: Tensor | None,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    attn_mask: Tensor | None = None,
    scale: float = 1.0,
    causal: str = "none",
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
    p = _Problem(q, k, v, attn_mask, scale, causal, block_rows, block_cols)
    p.keep_skipping_if_finite(columns=[v, t_v])
    t_o = p.zeros(p.n, p.e)
    if not p.empty and not (t_q is None and t_k is None and t_v is None):
        q3, k3, v3 = p.flat(q, p.n, p.d), p.flat(k, p.m, p.d), p.flat(v, p.m, p.e)
        assert q3 is not None and k3 is not None and v3 is not None
        tq3, tk3, tv3 = p.flat(t_q, p.n, p.d), p.flat(t_k, p.m, p.d), p.flat(t_v, p.m, p.e)
        t_o3 = t_o.view(p.size, p.n, p.e)
        prescale = p.prescale(q, k)
        for t in p.tiles():
            mask = p.mask_block(t)
            a_block = scores_tanh(q3[t.batch, t.rows], k3[t.batch, t.cols], scale, prescale)
            keep_block_(a_block, causal_diagonal=t.causal_diagonal, attn_mask=mask)
            jvp_block_(
                t_o3[t.batch, t.rows],
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
                add_product=add_product_,
            )
    return t_o.to(q.dtype)
