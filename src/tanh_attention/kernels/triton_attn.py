"""Fused Triton kernels for tanh attention, read top to bottom: the tanh, the forward kernel,
the two backward kernels (no atomics: deterministic), and the host functions that launch them
(``forward``, ``backward``, with the signatures of ``kernels/blockwise.py``).

Imported only when the triton backend runs (``backends/triton.py``): this module imports
Triton at its top. ``TRITON_INTERPRET=1`` must be set before it is first imported for the
kernels to run on CPU tensors (Triton reads it when ``@triton.jit`` runs).

The math is ``formulas.py``'s, one block of rows ``BLOCK_M`` by columns ``BLOCK_N`` at a
time, nothing of size ``n x m`` kept (no softmax, so no running max and no LSE):

    s = dot(q_i, k_j) * scale (fp32; fp64 for float64 inputs), masked scores replaced by 0
    a = tanh(s) (an accurate form; ``tanh.approx.f32`` on a GPU behind ``FAST_TANH``)
    o_i = sum_j a_ij v_j
    g_x = M * (g_o v^T + g_a) * (1 - a^2)
    g_q = scale * g_x @ k  (one program per query block)
    g_k = scale * g_x^T @ q, g_v = a^T @ g_o  (one program per key block)

Causal (both variants): blocks wholly above the diagonal are skipped, but only when the host
found every input those blocks would multiply by zero finite (``SKIP``); otherwise every block
is visited and NaN/inf propagate exactly as in the dense composite. Skipped blocks of ``a``
are written as zeros. Batch dims: inputs are expanded to the batch of all inputs and
flattened to ``(B, rows, cols)`` (a copy only where a view cannot express it); the kernels
take strides, so stride-0 broadcasts (shared k/v heads, key-padding masks) are not copied.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import triton
import triton.language as tl
from torch import Tensor

from .. import formulas
from .._checks import validate_attn_inputs

__all__ = ["backward", "forward", "tanh"]

# --------------------------------------------------------------------------------------------
# tanh
# --------------------------------------------------------------------------------------------

# tanh(x) = x + x^3 P(x^2) for |x| < 0.55, P of degree 6 fitted by least squares in relative
# error: 0.8 ulp in float32 (tests/triton_cases.py sweeps it), where 2*sigmoid(2x) - 1 is
# ~1000 ulp off near 0. Above 0.55, (1 - e) / (1 + e) with e = exp(-2|x|): 1.8 ulp.


@triton.jit
def _tanh_poly32(x):
    x2 = x * x
    r = -0.0009271077849799694
    r = r * x2 + 0.0033654266830374035
    r = r * x2 - 0.008810531718813944
    r = r * x2 + 0.021862635992639934
    r = r * x2 - 0.053967773545218055
    r = r * x2 + 0.13333331728683578
    r = r * x2 - 0.33333333315107194
    return x + x * x2 * r


@triton.jit
def _tanh_poly64(x):
    # The Taylor series to x^35: 2 ulp in float64 for |x| < 0.55.
    x2 = x * x
    r = -1.7406618963571648e-07
    r = r * x2 + 4.294911078273806e-07
    r = r * x2 - 1.0597268320104654e-06
    r = r * x2 + 2.6147711512907546e-06
    r = r * x2 - 6.451689215655431e-06
    r = r * x2 + 1.5918905069328964e-05
    r = r * x2 - 3.927832388331683e-05
    r = r * x2 + 9.691537956929451e-05
    r = r * x2 - 0.00023912911424355248
    r = r * x2 + 0.000590027440945586
    r = r * x2 - 0.0014558343870513183
    r = r * x2 + 0.003592128036572481
    r = r * x2 - 0.008863235529902197
    r = r * x2 + 0.021869488536155203
    r = r * x2 - 0.05396825396825397
    r = r * x2 + 0.13333333333333333
    r = r * x2 - 0.3333333333333333
    return x + x * x2 * r


@triton.jit
def _tanh(x, FAST: tl.constexpr):
    """tanh of a float32 (or float64) block; NaN stays NaN, +-inf gives +-1."""
    if FAST:
        # One SFU instruction, about 2^-11 relative error (sm_75+); never in the interpreter.
        return tl.inline_asm_elementwise(
            "tanh.approx.f32 $0, $1;", "=r,r", [x], dtype=tl.float32, is_pure=True, pack=1
        )
    else:
        ax = tl.abs(x)
        e = tl.exp(-2.0 * ax)  # <= e^-1.1 where used: 1 - e loses nothing
        big = (1.0 - e) / (1.0 + e)
        big = tl.where(x < 0, -big, big)
        if x.dtype == tl.float64:  # noqa: SIM108  (resolved when the kernel is compiled)
            small = _tanh_poly64(x)
        else:
            small = _tanh_poly32(x)
        small = tl.where(x == 0.0, x, small)  # keeps the sign of -0.0
        return tl.where(ax < 0.55, small, big)


@triton.jit
def _tanh_kernel(X, Y, size, FAST: tl.constexpr, BLOCK: tl.constexpr):
    """``y = tanh(x)`` elementwise, for the accuracy tests and the GPU check."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    x = tl.load(X + offs, mask=offs < size, other=0.0)
    tl.store(Y + offs, _tanh(x, FAST), mask=offs < size)


def tanh(x: Tensor, *, fast: bool = False, block: int = 1024) -> Tensor:
    """The kernels' tanh applied elementwise to a float32/float64 tensor (tests, benchmarks;
    ``fast``: ``tanh.approx.f32``, float32 on a GPU only)."""
    x = x.contiguous()
    y = torch.empty_like(x)
    if x.numel():
        _tanh_kernel[(triton.cdiv(x.numel(), block),)](x, y, x.numel(), FAST=fast, BLOCK=block)
    return y


# --------------------------------------------------------------------------------------------
# The kernels' shared block: scores, keep-mask and a for rows ``rows`` x columns ``cols``
# --------------------------------------------------------------------------------------------


@triton.jit
def _weights(
    q, K, MASK, b, rows, cols, scale, n, m, d, diag,
    skb, skn, skd, smb, smn, smm,
    HAS_MASK: tl.constexpr, CAUSAL: tl.constexpr, FAST_TANH: tl.constexpr,
    BLOCK_D: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    """``(a, keep, k)`` of one block; ``q`` is the loaded ``(BLOCK_M, BLOCK_D)`` query block."""
    cd = tl.arange(0, BLOCK_D)
    cols64 = cols.to(tl.int64)
    k = tl.load(
        K + b * skb + cols64[:, None] * skn + cd[None, :] * skd,
        mask=(cols[:, None] < m) & (cd[None, :] < d),
        other=0.0,
    )
    s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale  # scaled after the product
    keep = (rows[:, None] < n) & (cols[None, :] < m)
    if CAUSAL:
        keep = keep & (cols[None, :] <= rows[:, None] + diag)
    if HAS_MASK:
        mk = tl.load(
            MASK + b * smb + rows.to(tl.int64)[:, None] * smn + cols64[None, :] * smm,
            mask=keep,
            other=0,
        )
        keep = keep & (mk != 0)
    s = tl.where(keep, s, 0.0)  # before tanh: a masked NaN score gives a = 0
    a = tl.where(keep, _tanh(s, FAST_TANH), 0.0)
    return a, keep, k


# --------------------------------------------------------------------------------------------
# Forward: one program per (query block, batch-head)
# --------------------------------------------------------------------------------------------


@triton.jit
def _forward_kernel(
    Q, K, V, MASK, O, A, SCALE, n, m, d, e, diag,
    sqb, sqn, sqd, skb, skn, skd, svb, svn, sve, smb, smn, smm,
    sob, son, soe, sab, san, sam,
    HAS_MASK: tl.constexpr, CAUSAL: tl.constexpr, SKIP: tl.constexpr, NEED_A: tl.constexpr,
    FAST_TANH: tl.constexpr, PRECISION: tl.constexpr, ACC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_E: tl.constexpr,
):  # fmt: skip
    tl.static_assert(BLOCK_M >= 16 and BLOCK_N >= 16, "tl.dot needs blocks of 16 or more")
    tl.static_assert(BLOCK_D >= 16 and BLOCK_E >= 16, "head dims are padded to 16 or more")
    pid = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)  # int64 offsets: B * n * d may exceed 2^31
    scale = tl.load(SCALE)
    rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    rows64 = rows.to(tl.int64)
    cd = tl.arange(0, BLOCK_D)
    ce = tl.arange(0, BLOCK_E)
    q = tl.load(
        Q + b * sqb + rows64[:, None] * sqn + cd[None, :] * sqd,
        mask=(rows[:, None] < n) & (cd[None, :] < d),
        other=0.0,
    )
    acc = tl.zeros([BLOCK_M, BLOCK_E], dtype=ACC)
    hi = m
    if CAUSAL and SKIP:
        # The last row of the block keeps columns j <= pid * BLOCK_M + BLOCK_M - 1 + diag.
        hi = tl.minimum(tl.maximum((pid + 1) * BLOCK_M + diag, 0), m)
    for start in range(0, hi, BLOCK_N):
        cols = start + tl.arange(0, BLOCK_N)
        a, _, _ = _weights(
            q, K, MASK, b, rows, cols, scale, n, m, d, diag, skb, skn, skd, smb, smn, smm,
            HAS_MASK, CAUSAL, FAST_TANH, BLOCK_D, PRECISION,
        )  # fmt: skip
        cols64 = cols.to(tl.int64)
        if NEED_A:
            tl.store(
                A + b * sab + rows64[:, None] * san + cols64[None, :] * sam,
                a.to(A.dtype.element_ty),
                mask=(rows[:, None] < n) & (cols[None, :] < m),
            )
        v = tl.load(
            V + b * svb + cols64[:, None] * svn + ce[None, :] * sve,
            mask=(cols[:, None] < m) & (ce[None, :] < e),
            other=0.0,
        )
        acc += tl.dot(a.to(v.dtype), v, input_precision=PRECISION)
    tl.store(
        O + b * sob + rows64[:, None] * son + ce[None, :] * soe,
        acc.to(O.dtype.element_ty),
        mask=(rows[:, None] < n) & (ce[None, :] < e),
    )
    if NEED_A and CAUSAL and SKIP:
        # The skipped blocks of a are zeros (a is allocated uninitialized).
        lo = tl.cdiv(hi, BLOCK_N) * BLOCK_N
        for start in range(lo, m, BLOCK_N):
            cols = start + tl.arange(0, BLOCK_N)
            tl.store(
                A + b * sab + rows64[:, None] * san + cols.to(tl.int64)[None, :] * sam,
                tl.zeros([BLOCK_M, BLOCK_N], dtype=A.dtype.element_ty),
                mask=(rows[:, None] < n) & (cols[None, :] < m),
            )


# --------------------------------------------------------------------------------------------
# Backward: g_q over query blocks, (g_k, g_v) over key blocks, each recomputing tanh
# --------------------------------------------------------------------------------------------


@triton.jit
def _grad_x(
    a, keep, GO, GA, b, rows, cols, v, n, m, e,
    sgob, sgon, sgoe, sgab, sgan, sgam,
    HAS_GO: tl.constexpr, HAS_GA: tl.constexpr, ACC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_E: tl.constexpr,
    PRECISION: tl.constexpr,
):  # fmt: skip
    """``(g_x, g_o)`` of one block: ``g_x = M * (g_o v^T + g_a) * (1 - a^2)``."""
    rows64 = rows.to(tl.int64)
    ce = tl.arange(0, BLOCK_E)
    g = tl.zeros([BLOCK_M, BLOCK_N], dtype=ACC)
    go = tl.zeros([BLOCK_M, BLOCK_E], dtype=v.dtype)
    if HAS_GO:
        go = tl.load(
            GO + b * sgob + rows64[:, None] * sgon + ce[None, :] * sgoe,
            mask=(rows[:, None] < n) & (ce[None, :] < e),
            other=0.0,
        )
        g += tl.dot(go, tl.trans(v), input_precision=PRECISION)
    if HAS_GA:
        ga = tl.load(
            GA + b * sgab + rows64[:, None] * sgan + cols.to(tl.int64)[None, :] * sgam,
            mask=keep,
            other=0.0,
        )
        g += ga.to(ACC)
    g = tl.where(keep, g * (1.0 - a * a), 0.0)
    return g, go


@triton.jit
def _backward_q_kernel(
    Q, K, V, MASK, GO, GA, GQ, SCALE, n, m, d, e, diag,
    sqb, sqn, sqd, skb, skn, skd, svb, svn, sve, smb, smn, smm,
    sgob, sgon, sgoe, sgab, sgan, sgam, sgqb, sgqn, sgqd,
    HAS_MASK: tl.constexpr, CAUSAL: tl.constexpr, SKIP: tl.constexpr,
    HAS_GO: tl.constexpr, HAS_GA: tl.constexpr,
    FAST_TANH: tl.constexpr, PRECISION: tl.constexpr, ACC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_E: tl.constexpr,
):  # fmt: skip
    tl.static_assert(BLOCK_M >= 16 and BLOCK_N >= 16, "tl.dot needs blocks of 16 or more")
    tl.static_assert(BLOCK_D >= 16 and BLOCK_E >= 16, "head dims are padded to 16 or more")
    pid = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    scale = tl.load(SCALE)
    rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    rows64 = rows.to(tl.int64)
    cd = tl.arange(0, BLOCK_D)
    ce = tl.arange(0, BLOCK_E)
    q = tl.load(
        Q + b * sqb + rows64[:, None] * sqn + cd[None, :] * sqd,
        mask=(rows[:, None] < n) & (cd[None, :] < d),
        other=0.0,
    )
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=ACC)
    hi = m
    if CAUSAL and SKIP:
        hi = tl.minimum(tl.maximum((pid + 1) * BLOCK_M + diag, 0), m)
    for start in range(0, hi, BLOCK_N):
        cols = start + tl.arange(0, BLOCK_N)
        a, keep, k = _weights(
            q, K, MASK, b, rows, cols, scale, n, m, d, diag, skb, skn, skd, smb, smn, smm,
            HAS_MASK, CAUSAL, FAST_TANH, BLOCK_D, PRECISION,
        )  # fmt: skip
        v = tl.load(
            V + b * svb + cols.to(tl.int64)[:, None] * svn + ce[None, :] * sve,
            mask=(cols[:, None] < m) & (ce[None, :] < e),
            other=0.0,
        )
        g, _ = _grad_x(
            a, keep, GO, GA, b, rows, cols, v, n, m, e, sgob, sgon, sgoe, sgab, sgan, sgam,
            HAS_GO, HAS_GA, ACC, BLOCK_M, BLOCK_N, BLOCK_E, PRECISION,
        )  # fmt: skip
        acc += tl.dot(g.to(k.dtype), k, input_precision=PRECISION)
    tl.store(
        GQ + b * sgqb + rows64[:, None] * sgqn + cd[None, :] * sgqd,
        (acc * scale).to(GQ.dtype.element_ty),
        mask=(rows[:, None] < n) & (cd[None, :] < d),
    )


@triton.jit
def _backward_kv_kernel(
    Q, K, V, MASK, GO, GA, GK, GV, SCALE, n, m, d, e, diag,
    sqb, sqn, sqd, skb, skn, skd, svb, svn, sve, smb, smn, smm,
    sgob, sgon, sgoe, sgab, sgan, sgam, sgkb, sgkn, sgkd, sgvb, sgvn, sgve,
    HAS_MASK: tl.constexpr, CAUSAL: tl.constexpr, SKIP: tl.constexpr,
    HAS_GO: tl.constexpr, HAS_GA: tl.constexpr, NEED_K: tl.constexpr, NEED_V: tl.constexpr,
    FAST_TANH: tl.constexpr, PRECISION: tl.constexpr, ACC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_E: tl.constexpr,
):  # fmt: skip
    tl.static_assert(BLOCK_M >= 16 and BLOCK_N >= 16, "tl.dot needs blocks of 16 or more")
    tl.static_assert(BLOCK_D >= 16 and BLOCK_E >= 16, "head dims are padded to 16 or more")
    pid = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    scale = tl.load(SCALE)
    cols = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    cols64 = cols.to(tl.int64)
    cd = tl.arange(0, BLOCK_D)
    ce = tl.arange(0, BLOCK_E)
    v = tl.load(
        V + b * svb + cols64[:, None] * svn + ce[None, :] * sve,
        mask=(cols[:, None] < m) & (ce[None, :] < e),
        other=0.0,
    )
    acc_k = tl.zeros([BLOCK_N, BLOCK_D], dtype=ACC)
    acc_v = tl.zeros([BLOCK_N, BLOCK_E], dtype=ACC)
    lo = 0
    if CAUSAL and SKIP:
        # Row i keeps column j iff i >= j - diag: rows before the block's first column's are
        # all masked.
        lo = (tl.maximum(pid * BLOCK_N - diag, 0) // BLOCK_M) * BLOCK_M
    for start in range(lo, n, BLOCK_M):
        rows = start + tl.arange(0, BLOCK_M)
        q = tl.load(
            Q + b * sqb + rows.to(tl.int64)[:, None] * sqn + cd[None, :] * sqd,
            mask=(rows[:, None] < n) & (cd[None, :] < d),
            other=0.0,
        )
        a, keep, _ = _weights(
            q, K, MASK, b, rows, cols, scale, n, m, d, diag, skb, skn, skd, smb, smn, smm,
            HAS_MASK, CAUSAL, FAST_TANH, BLOCK_D, PRECISION,
        )  # fmt: skip
        g, go = _grad_x(
            a, keep, GO, GA, b, rows, cols, v, n, m, e, sgob, sgon, sgoe, sgab, sgan, sgam,
            HAS_GO, HAS_GA, ACC, BLOCK_M, BLOCK_N, BLOCK_E, PRECISION,
        )  # fmt: skip
        if NEED_K:
            acc_k += tl.dot(tl.trans(g.to(q.dtype)), q, input_precision=PRECISION)
        if NEED_V:
            acc_v += tl.dot(tl.trans(a.to(go.dtype)), go, input_precision=PRECISION)
    if NEED_K:
        tl.store(
            GK + b * sgkb + cols64[:, None] * sgkn + cd[None, :] * sgkd,
            (acc_k * scale).to(GK.dtype.element_ty),
            mask=(cols[:, None] < m) & (cd[None, :] < d),
        )
    if NEED_V:
        tl.store(
            GV + b * sgvb + cols64[:, None] * sgvn + ce[None, :] * sgve,
            acc_v.to(GV.dtype.element_ty),
            mask=(cols[:, None] < m) & (ce[None, :] < e),
        )


# --------------------------------------------------------------------------------------------
# Host side: layout, launch configuration, the Kernels functions
# --------------------------------------------------------------------------------------------


def _pow2(x: int) -> int:
    return max(16, triton.next_power_of_2(x))


class _Launch:
    """One call's layout: inputs flattened to ``(B, rows, cols)`` over the batch of all
    inputs (views where strides allow), the compute dtype and the launch constants."""

    def __init__(
        self,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        attn_mask: Tensor | None,
        scale: float,
        causal: str,
        block_m: int | None,
        block_n: int | None,
        fast_tanh: bool = False,
        precision: str = "ieee",
    ) -> None:
        s = validate_attn_inputs(q, k, v, attn_mask, scale=scale, causal=causal)
        self.shapes = s
        self.batch, self.weights_batch = tuple(s.batch), tuple(s.weights_batch)
        self.size = math.prod(self.batch)
        self.n, self.m, self.d, self.e = s.n, s.m, s.d, s.e
        self.dtype, self.device = q.dtype, q.device
        # Triton's interpreter computes bfloat16 wrongly (triton-lang/triton#11584): upcast.
        self.upcast = q.dtype == torch.bfloat16 and q.device.type == "cpu"
        self.io = torch.float32 if self.upcast else q.dtype
        self.acc = torch.float64 if q.dtype == torch.float64 else torch.float32
        self.scale = torch.tensor([scale], dtype=self.acc, device=q.device)
        diag = formulas.causal_diagonal(causal, self.n, self.m)
        self.causal = diag is not None
        self.diag = 0 if diag is None else diag
        self.mask = None if attn_mask is None else self.flat(attn_mask.view(torch.uint8), s.n, s.m)
        self.q, self.k, self.v = (self.flat(t) for t in (q, k, v))
        self.block_d, self.block_e = _pow2(self.d), _pow2(self.e)
        gpu = q.device.type == "cuda"
        big = max(self.block_d, self.block_e)
        # GPU blocks: 64 x 64 up to d = 128; smaller above, where q, k and v tiles of 256
        # columns (and fp32 accumulators) would not fit in shared memory and registers.
        self.block_m = block_m or ((64 if big <= 128 else 32) if gpu else 32)
        self.block_n = block_n or ((64 if big <= 128 else 32) if gpu else 32)
        self.num_stages = 2 if big <= 128 else 1
        # FAST_TANH: tanh.approx.f32 (a GPU instruction; the interpreter has no inline asm).
        self.fast_tanh = fast_tanh and q.device.type == "cuda" and self.acc == torch.float32
        # "ieee": float32 dots in float32 ("tf32" is faster on a GPU but rounds the inputs).
        self.precision = precision
        self.num_warps = 4 if big <= 64 else 8
        self.empty = min(self.size, self.n, self.m, self.d, self.e) == 0

    def flat(self, t: Tensor, rows: int | None = None, cols: int | None = None) -> Tensor:
        """``t`` expanded to ``(*batch, rows, cols)`` (its own last two dims by default) as
        ``(B, rows, cols)`` in the kernels' input dtype: a view where strides allow."""
        rows = t.shape[-2] if rows is None else rows
        cols = t.shape[-1] if cols is None else cols
        x = t.expand(*self.batch, rows, cols).reshape(self.size, rows, cols)
        return x.to(self.io) if x.dtype != self.io and x.dtype != torch.uint8 else x

    def skip(self, *inputs: Tensor | None) -> bool:
        """Whether causal blocks may be skipped: every input they would multiply by zero is
        finite (otherwise the dense result has NaN there and so must ours)."""
        return self.causal and all(t is None or bool(torch.isfinite(t).all()) for t in inputs)

    def consts(self) -> dict[str, object]:
        return {
            "FAST_TANH": self.fast_tanh,
            "PRECISION": self.precision,
            "ACC": tl.float64 if self.acc == torch.float64 else tl.float32,
            "BLOCK_M": self.block_m,
            "BLOCK_N": self.block_n,
            "BLOCK_D": self.block_d,
            "BLOCK_E": self.block_e,
            "num_warps": self.num_warps,
            "num_stages": self.num_stages,
        }

    def mask_args(self) -> tuple[Tensor, int, int, int]:
        if self.mask is None:
            return self.q, 0, 0, 0  # never read
        sb, sn, sm = self.mask.stride()
        return self.mask, sb, sn, sm

    def _replicas(self) -> list[int]:
        """The dims of the full batch that only v has (``a`` repeats along them)."""
        wb = self.weights_batch
        pad = (1,) * (len(self.batch) - len(wb)) + wb
        return [i for i, (w, h) in enumerate(zip(pad, self.batch, strict=True)) if w == 1 != h]

    def once(self, grad_a: Tensor) -> Tensor:
        """``grad_a`` over the full batch, counted once: zeros on all but the first replica
        along v's own batch dims (the kernels' g_x sums over every replica)."""
        dims = self._replicas()
        if not dims:
            return grad_a
        full = grad_a.new_zeros(*self.batch, self.n, self.m)
        first = full
        for dim in dims:
            first = first.narrow(dim, 0, 1)
        first.copy_(grad_a.expand(first.shape))
        return full

    def weights_of(self, a: Tensor) -> Tensor:
        """``a`` computed over the batch of all inputs, cut to the batch of q, k and the mask
        (v's own batch dims repeat it)."""
        wb = self.weights_batch
        if wb == self.batch:
            return a
        pad = (1,) * (len(self.batch) - len(wb)) + wb
        a = a.view(*self.batch, self.n, self.m)
        for dim, (want, have) in enumerate(zip(pad, self.batch, strict=True)):
            if want == 1 and have != 1:
                a = a.narrow(dim, 0, 1)
        return a.reshape(*wb, self.n, self.m).clone()


def forward(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    attn_mask: Tensor | None,
    scale: float,
    causal: str,
    *,
    need_weights: bool,
    block_m: int | None = None,
    block_n: int | None = None,
    fast_tanh: bool = False,
    precision: str = "ieee",
) -> tuple[Tensor, Tensor | None]:
    """``(o, a)``, or ``(o, None)`` without ever building ``a``. ``o`` has the batch of all
    inputs, ``a`` that of q, k and the mask."""
    L = _Launch(q, k, v, attn_mask, scale, causal, block_m, block_n, fast_tanh, precision)
    if L.empty:
        o_0, a_0 = formulas.forward(q, k, v, attn_mask, scale=scale, causal=causal)
        return o_0.contiguous().clone(), (a_0.contiguous().clone() if need_weights else None)
    o = torch.empty(*L.batch, L.n, L.e, dtype=L.io, device=L.device)
    o_flat = o.view(L.size, L.n, L.e)
    a_full = a_flat = None
    if need_weights:
        a_full = torch.empty(*L.batch, L.n, L.m, dtype=L.io, device=L.device)
        a_flat = a_full.view(L.size, L.n, L.m)
    a_arg = o_flat if a_flat is None else a_flat
    grid = (triton.cdiv(L.n, L.block_m), L.size)
    _forward_kernel[grid](
        L.q, L.k, L.v, L.mask_args()[0], o_flat, a_arg, L.scale, L.n, L.m, L.d, L.e, L.diag,
        *L.q.stride(), *L.k.stride(), *L.v.stride(), *L.mask_args()[1:],
        *o_flat.stride(), *(a_arg.stride() if a_flat is not None else (0, 0, 0)),
        HAS_MASK=L.mask is not None, CAUSAL=L.causal, SKIP=L.skip(L.v),
        NEED_A=need_weights, **L.consts(),
    )  # fmt: skip
    a = None if a_full is None else L.weights_of(a_full)
    if L.upcast:
        o = o.to(L.dtype)
        a = None if a is None else a.to(L.dtype)
    return o, a


def _sum_to(g: Tensor, x: Tensor) -> Tensor:
    """A gradient over the batch of all inputs summed back to the shape of input ``x``."""
    return g.sum_to_size(x.shape).to(x.dtype)


def backward(
    grad_o: Tensor | None,
    grad_a: Tensor | None,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    a: Tensor | None,
    attn_mask: Tensor | None,
    scale: float,
    causal: str,
    needs: Sequence[bool],
    *,
    block_m: int | None = None,
    block_n: int | None = None,
    fast_tanh: bool = False,
    precision: str = "ieee",
) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    """``(g_q, g_k, g_v)``, each None where not needed; ``a`` is always recomputed (the
    kernels recompute tanh block by block, so saved weights save nothing here)."""
    del a
    need_q, need_k, need_v = (bool(x) for x in needs)
    need_v = need_v and grad_o is not None
    if grad_o is None and grad_a is None:
        need_q = need_k = False
    if not (need_q or need_k or need_v):
        return None, None, None
    L = _Launch(q, k, v, attn_mask, scale, causal, block_m, block_n, fast_tanh, precision)
    if L.empty:
        o_a = formulas.forward(q, k, v, attn_mask, scale=scale, causal=causal)
        grads = formulas.vjp(
            grad_o, grad_a, q, k, v, o_a[1], attn_mask, scale=scale, causal=causal,
            needs=(need_q, need_k, need_v),
        )  # fmt: skip
        return grads
    go = None if grad_o is None else L.flat(grad_o)
    ga = None if grad_a is None else L.flat(L.once(grad_a))
    go_arg = L.q if go is None else go
    ga_arg = L.q if ga is None else ga
    go_strides = (0, 0, 0) if go is None else go.stride()
    ga_strides = (0, 0, 0) if ga is None else ga.stride()
    skip = L.skip(L.q, L.k, L.v, go)
    common = {
        "HAS_MASK": L.mask is not None,
        "CAUSAL": L.causal,
        "SKIP": skip,
        "HAS_GO": go is not None,
        "HAS_GA": ga is not None,
        **L.consts(),
    }
    mask_arg, *mask_strides = L.mask_args()
    g_q = g_k = g_v = None
    if need_q:
        g_q = torch.empty(L.size, L.n, L.d, dtype=L.acc, device=L.device)
        _backward_q_kernel[(triton.cdiv(L.n, L.block_m), L.size)](
            L.q, L.k, L.v, mask_arg, go_arg, ga_arg, g_q, L.scale, L.n, L.m, L.d, L.e, L.diag,
            *L.q.stride(), *L.k.stride(), *L.v.stride(), *mask_strides,
            *go_strides, *ga_strides, *g_q.stride(), **common,
        )  # fmt: skip
    if need_k or need_v:
        gk = torch.empty(L.size, L.m, L.d, dtype=L.acc, device=L.device) if need_k else L.q
        gv = torch.empty(L.size, L.m, L.e, dtype=L.acc, device=L.device) if need_v else L.q
        _backward_kv_kernel[(triton.cdiv(L.m, L.block_n), L.size)](
            L.q, L.k, L.v, mask_arg, go_arg, ga_arg, gk, gv, L.scale,
            L.n, L.m, L.d, L.e, L.diag,
            *L.q.stride(), *L.k.stride(), *L.v.stride(), *mask_strides,
            *go_strides, *ga_strides,
            *(gk.stride() if need_k else (0, 0, 0)), *(gv.stride() if need_v else (0, 0, 0)),
            NEED_K=need_k, NEED_V=need_v, **common,
        )  # fmt: skip
        g_k = gk if need_k else None
        g_v = gv if need_v else None

    def back(g: Tensor | None, x: Tensor) -> Tensor | None:
        if g is None:
            return None
        rows, cols = g.shape[-2:]
        return _sum_to(g.view(*L.batch, rows, cols), x)

    return back(g_q, q), back(g_k, k), back(g_v, v)
