"""The compiled attention kernels (``kernels/attn.c`` through ``native.try_attn`` and
``native.try_attn_backward``), both builds (vectors of 8 floats, and of 16 from
``attn_wide.c``): forward values and gradients against float64 (the reference's autograd, and
the VJP from the definition for non-finite inputs) at sizes on and off the register block,
each causal case, the forward's blocks of rows, one thread and two; the calls they decline
(they read raw memory, so they must check for themselves); the load-time check; and which
calls reach them."""

from __future__ import annotations

import math
import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from torch import Tensor
from torch.nn.attention.bias import causal_lower_right

import tanh_attention
from samples import keep_mask, o_atol, reference
from tanh_attention.formulas import causal_diagonal
from tanh_attention.kernels import blockwise, native

pytestmark = pytest.mark.skipif(
    native.vector_floats() is None,
    reason="the compiled attention kernels serve no call here: "
    f"{native.unavailable_reason() or 'no AVX2 and FMA'}",
)

CAUSAL = ["none", "top_left", "bottom_right"]
F32 = torch.float32


@pytest.fixture(autouse=True, params=[8, 16], ids=["vec8", "vec16"])
def vector_floats(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> int:
    """Each test runs on both builds of attn.c, whatever this CPU would pick (one without
    AVX-512 runs the 16-float build as narrower machine vectors: slower, the same
    arithmetic)."""
    monkeypatch.setattr(native, "_use_wide", lambda *args: request.param == 16)
    return int(request.param)


@pytest.fixture
def threads(request: pytest.FixtureRequest) -> Iterator[int]:
    before = torch.get_num_threads()
    torch.set_num_threads(request.param)
    yield request.param
    torch.set_num_threads(before)


def _inputs(batch: tuple[int, ...], n: int, m: int, d: int, e: int, seed: int = 0) -> list[Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [
        torch.randn(*batch, rows, cols, generator=gen) for rows, cols in ((n, d), (m, d), (m, e))
    ]


def _check(q: Tensor, k: Tensor, v: Tensor, scale: float, causal: str, need_weights: bool) -> None:
    """try_attn serves the call, and agrees with the float64 reference (masked weights
    exactly 0); a NaN or infinity lands where the reference has it."""
    n, m = q.shape[-2], k.shape[-2]
    done = native.try_attn(q, k, v, scale, causal_diagonal(causal, n, m), need_weights)
    assert done is not None, "the call was declined"
    o, a = done
    o_ref, a_ref = reference(q.double(), k.double(), v.double(), None, scale, causal)
    assert o.dtype == F32 and o.shape == o_ref.shape and o.is_contiguous()
    # float32 sums of d and m terms (the reference's are float64); a score's rounding error
    # grows with the scale, until tanh saturates (then its slope shrinks faster)
    grow = min(max(1.0, abs(scale)), 4.0)
    tol = {"rtol": 1e-5, "atol": 2e-6 * math.sqrt(max(q.shape[-1], m)) * grow}
    torch.testing.assert_close(o.double(), o_ref, equal_nan=True, **tol)
    if not need_weights:
        assert a is None
        return
    assert a is not None and a.shape == a_ref.shape and a.is_contiguous()
    torch.testing.assert_close(a.double(), a_ref, equal_nan=True, rtol=0, atol=tol["atol"])
    masked = a_ref == 0
    assert torch.equal(a[masked], torch.zeros_like(a[masked]))


def _vjp(
    g_o: Tensor | None,
    g_a: Tensor | None,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    scale: float,
    causal: str,
    dtype: torch.dtype = torch.float64,
) -> tuple[Tensor, Tensor, Tensor]:
    """The VJP from the definition, in ``dtype`` (a dropped entry's score gradient is exactly
    0, whatever flows into it):
    ``g_x = M * (g_o v^T + g_a) * (1 - a^2)``, ``g_q = scale g_x k``, ``g_k = scale g_x^T q``,
    ``g_v = a^T g_o``."""
    q, k, v = (x.to(dtype) for x in (q, k, v))
    a = reference(q, k, v, None, scale, causal)[1]
    big = torch.zeros_like(a)
    if g_o is not None:
        big = big + g_o.to(dtype) @ v.mT
    if g_a is not None:
        big = big + g_a.to(dtype)
    g_x = torch.where(keep_mask(a.shape[-2], a.shape[-1], causal), big * (1 - a * a), 0.0)
    g_v = torch.zeros_like(v) if g_o is None else a.mT @ g_o.to(dtype)
    return scale * g_x @ k, scale * g_x.mT @ q, g_v


def _check_backward(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    scale: float,
    causal: str,
    outputs: str,
    saved: bool,
    seed: int = 1,
    g_o_last: float | None = None,
) -> None:
    """try_attn_backward serves the call, and its gradients agree with autograd of the
    float64 reference and with the VJP from the definition (NaN and infinity included;
    ``g_o_last``: the first entry of g_o's last row)."""
    n, m = q.shape[-2], k.shape[-2]
    diagonal = causal_diagonal(causal, n, m)
    gen = torch.Generator().manual_seed(seed)
    g_o = torch.randn(*q.shape[:-1], v.shape[-1], generator=gen) if "o" in outputs else None
    if g_o is not None and g_o_last is not None:
        g_o[..., -1, 0] = g_o_last
    g_a = torch.randn(*q.shape[:-1], m, generator=gen) if "a" in outputs else None
    a = None
    if saved:
        done = native.try_attn(q, k, v, scale, diagonal, True)
        assert done is not None
        a = done[1]
    got = native.try_attn_backward(g_o, g_a, q, k, v, a, scale, diagonal)
    assert got is not None, "the call was declined"
    want = _vjp(g_o, g_a, q, k, v, scale, causal)
    # float32 sums of n, m, d or e terms: at most a few times the composite's own float32
    # error (the definition's VJP computed in float32), and never far above float32 rounding;
    # as in _check, more with the scale (1 x 1 x 1 x 4 at scale 3.0: 1.78e-5 against 1.70e-5)
    composite = _vjp(g_o, g_a, q, k, v, scale, causal, dtype=F32)
    grow = min(max(1.0, abs(scale)), 4.0)
    for g, w, c, x in zip(got, want, composite, (q, k, v), strict=True):
        assert g.dtype == F32 and g.shape == x.shape and g.is_contiguous()
        finite = torch.isfinite(w)
        composite_error = (c.double() - w)[finite].abs().max().item() if finite.any() else 0.0
        atol = max(4 * composite_error, 4e-6 * max(q.shape[-1], m, n)) * grow
        torch.testing.assert_close(g.double(), w, equal_nan=True, rtol=1e-5, atol=atol)
    if all(torch.isfinite(x).all() for x in (q, k, v, g_o) if x is not None):
        leaves = [x.double().requires_grad_() for x in (q, k, v)]
        o_ref, a_ref = reference(*leaves, None, scale, causal)
        pairs = [(o, g) for o, g in ((o_ref, g_o), (a_ref, g_a)) if g is not None]
        autograd = torch.autograd.grad(
            [o for o, _ in pairs], leaves, [g.double() for _, g in pairs], allow_unused=True
        )
        for g, w, c in zip(got, autograd, composite, strict=True):
            w = torch.zeros_like(g, dtype=torch.float64) if w is None else w
            atol = max(4 * (c.double() - w).abs().max().item(), 4e-6 * max(q.shape[-1], m, n))
            torch.testing.assert_close(g.double(), w, rtol=1e-5, atol=atol * grow)


SHAPES = [
    # (batch, n, m, d, e): sizes on and off the register block (6 x 16 or 6 x 32) in each
    # dimension
    ((), 16, 16, 64, 64),
    ((1, 1), 16, 16, 16, 16),
    ((3,), 5, 19, 7, 9),
    ((2, 3), 1, 13, 3, 1),
    ((2,), 17, 1, 1, 17),
    ((4, 4), 8, 8, 128, 128),
    ((), 64, 48, 32, 20),
    ((2,), 3, 2, 5, 4),  # n > m: bottom-right rows above the diagonal keep nothing
]


# Calls of several blocks of rows (attn.c: at most 32768 scores a block, the backward's at
# least 48 rows, causal blocks 24, for a single problem at two threads one block a thread):
# last blocks and register blocks of fewer rows, and problems whose blocks threads share.
LONG = [
    ((2,), 70, 600, 8, 20),  # 54 + 16 rows
    ((), 200, 200, 33, 17),  # 162 + 38; one problem for two threads
    ((3,), 64, 1024, 16, 16),  # forward 30 + 30 + 4, backward 48 + 16
    ((), 100, 20, 4, 4),  # n > m: bottom-right blocks that keep nothing
]


@pytest.mark.parametrize("threads", [1, 2], indirect=True)
@pytest.mark.parametrize("need_weights", [True, False])
@pytest.mark.parametrize("causal", CAUSAL)
@pytest.mark.parametrize(("batch", "n", "m", "d", "e"), SHAPES + LONG, ids=str)
def test_matches_the_reference(
    batch: tuple[int, ...],
    n: int,
    m: int,
    d: int,
    e: int,
    causal: str,
    need_weights: bool,
    threads: int,
) -> None:
    q, k, v = _inputs(batch, n, m, d, e)
    _check(q, k, v, 1 / math.sqrt(d), causal, need_weights)


@pytest.mark.parametrize("threads", [1, 2], indirect=True)
@pytest.mark.parametrize("saved", [True, False], ids=["saved_a", "recomputed_a"])
@pytest.mark.parametrize("outputs", ["o", "a", "oa"])
@pytest.mark.parametrize("causal", CAUSAL)
@pytest.mark.parametrize(("batch", "n", "m", "d", "e"), SHAPES + LONG, ids=str)
def test_gradients_match_the_reference(
    batch: tuple[int, ...],
    n: int,
    m: int,
    d: int,
    e: int,
    causal: str,
    outputs: str,
    saved: bool,
    threads: int,
) -> None:
    q, k, v = _inputs(batch, n, m, d, e)
    _check_backward(q, k, v, 1 / math.sqrt(d), causal, outputs, saved)


@pytest.mark.parametrize("threads", [1, 2], indirect=True)
@pytest.mark.parametrize("causal", CAUSAL)
def test_problems_split_over_threads(causal: str, threads: int) -> None:
    """Enough work for the parallel region (native.PARALLEL_MIN), an odd number of
    problems so the shares differ."""
    q, k, v = _inputs((7,), 64, 64, 40, 24)
    assert native.PARALLEL_MIN <= 7 * 64 * 64 * (40 + 24)
    _check(q, k, v, 0.2, causal, need_weights=True)
    _check_backward(q, k, v, 0.2, causal, "oa", saved=False)


@pytest.mark.parametrize("threads", [1, 2], indirect=True)
@pytest.mark.parametrize("value", [math.nan, math.inf], ids=["nan", "inf"])
@pytest.mark.parametrize("where", ["v_first", "v_last", "k_last", "q_last", "g_o"])
@pytest.mark.parametrize("causal", ["top_left", "bottom_right"])
def test_causal_blocks_skip_only_where_inputs_are_finite(
    causal: str, where: str, value: float, threads: int
) -> None:
    """Causal blocks stop at their last row's diagonal only where what the masked zeros
    would multiply is finite (the forward: v; the backward: q, k and g_o): a NaN or infinity
    there still meets the masked 0 of every row, as in the composite's products. (One
    problem with work enough for threads: at two, its blocks are shared out.)"""
    q, k, v = _inputs((1,), 100, 600, 16, 16, seed=4)
    assert native.PARALLEL_MIN <= 100 * 600 * 32
    inputs = {"v_first": v[0, 0], "v_last": v[0, -1], "k_last": k[0, -1], "q_last": q[0, -1]}
    if where in inputs:
        inputs[where][0] = value
    _check(q, k, v, 0.5, causal, need_weights=True)
    for saved in (True, False):
        _check_backward(
            q, k, v, 0.5, causal, "oa", saved, g_o_last=value if where == "g_o" else None
        )


def test_long_sums_are_as_accurate_as_the_composite() -> None:
    """Sums over thousands of keys or queries (``o``'s over m, ``g_k``'s and ``g_v``'s over n)
    err no more than the composite's float32 products do against float64: a sum of 2048
    terms taken in order, or of hundreds of blocks' sums in turn, errs several times more."""
    q, k, v = _inputs((), 2048, 2048, 16, 16, seed=5)
    g_o = torch.randn(2048, 16, generator=torch.Generator().manual_seed(6))
    done = native.try_attn(q, k, v, 0.25, None, False)
    grads = native.try_attn_backward(g_o, None, q, k, v, None, 0.25, None)
    assert done is not None and grads is not None
    want = _vjp(g_o, None, q, k, v, 0.25, "none")
    composite = _vjp(g_o, None, q, k, v, 0.25, "none", dtype=F32)
    o_ref = reference(q.double(), k.double(), v.double(), None, 0.25)[0]
    o_composite = torch.tanh(q @ k.mT * 0.25) @ v
    pairs = [(done[0], o_composite, o_ref), *zip(grads, composite, want, strict=True)]
    for got, theirs, exact in pairs:
        error = (got.double() - exact).abs().max().item()
        assert error <= 2 * (theirs.double() - exact).abs().max().item() + 1e-6


@settings(max_examples=60, deadline=None)
@given(
    batch=st.sampled_from([(), (2,), (2, 3)]),
    n=st.integers(1, 40),
    m=st.integers(1, 40),
    d=st.integers(1, 70),
    e=st.integers(1, 70),
    causal=st.sampled_from(CAUSAL),
    need_weights=st.booleans(),
    scale=st.sampled_from([1.0, 0.125, -0.7, 3.0]),
    seed=st.integers(0, 2**16),
)
def test_any_small_shape(
    batch: tuple[int, ...],
    n: int,
    m: int,
    d: int,
    e: int,
    causal: str,
    need_weights: bool,
    scale: float,
    seed: int,
) -> None:
    assume(m <= native.MAX_KEYS_PER_QUERY * n)  # (more: a decoding step, declined)
    q, k, v = _inputs(batch, n, m, d, e, seed)
    _check(q, k, v, scale, causal, need_weights)
    _check_backward(q, k, v, scale, causal, "oa" if need_weights else "o", saved=need_weights)


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf], ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize("where", ["q", "k", "v"])
@pytest.mark.parametrize("causal", CAUSAL)
def test_nonfinite_inputs_propagate_as_in_the_composite(
    causal: str, where: str, value: float
) -> None:
    """One non-finite entry (q's first row, k's or v's last key): the reference's NaN and
    infinity pattern, including 0 * inf through masked weights and padded rows and columns
    that must not leak into the result."""
    q, k, v = _inputs((2,), 5, 7, 3, 5)
    {"q": q[0, 0], "k": k[0, -1], "v": v[0, -1]}[where][0] = value
    _check(q, k, v, 0.5, causal, need_weights=True)
    for saved in (True, False):
        _check_backward(
            q, k, v, 0.5, causal, "oa", saved, g_o_last=value if where == "g_o" else None
        )


def test_huge_scores_saturate() -> None:
    """Scores beyond float32's range (a scale near its largest) give weights of exactly
    +-1, as the reference's tanh(+-inf)."""
    q, k, v = _inputs((), 4, 6, 3, 2)
    _check(q, k, v, 3e38, "none", need_weights=True)


@pytest.mark.parametrize("kind", ["attn", "decode"])
def test_declines_what_it_does_not_serve(kind: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """try_attn, and try_decode for a decoding step's shapes, decline what they cannot read
    (each input its own problem: the kernels read raw memory)."""

    def _declined(q: Any, k: Any, v: Any, scale: float = 0.5) -> bool:
        if kind == "decode":
            return native.try_decode(q, k, v, scale, None) is None
        return native.try_attn(q, k, v, scale, None, True) is None

    q, k, v = _inputs((2, 3), 4, 5 if kind == "attn" else 100, 6, 7)
    assert not _declined(q, k, v)
    for dtype in (torch.float64, torch.float16, *([torch.bfloat16] * (kind == "attn"))):
        assert _declined(q.to(dtype), k.to(dtype), v.to(dtype))
    assert _declined(q, k.double(), v)  # mixed dtypes
    assert _declined(q, k, v.double())

    def strided(x: Tensor) -> Tensor:  # the same values, not contiguous
        return x.transpose(-1, -2).contiguous().transpose(-1, -2)

    assert _declined(strided(q), k, v)
    assert _declined(q, strided(k), v)
    assert _declined(q, k, strided(v))
    assert _declined(q, k[:, :1], v[:, :1])  # a batch dim that broadcasts
    assert _declined(q[0], k, v)  # ranks differ
    assert _declined(q[:, :, :0], k, v)  # n = 0
    assert _declined(q[..., :0], k[..., :0], v)  # d = 0
    assert _declined(q, k, v[..., :0])  # e = 0
    assert _declined(q[:0], k[:0], v[:0])  # no problem
    assert _declined(q, k[..., :5], v)  # k's d differs from q's
    assert _declined(q, k, v[:, :, :4])  # v's m differs from k's
    assert _declined(q[0, 0, 0], k[0, 0, 0], v[0, 0, 0])  # 1-D
    assert _declined(q, k, v, scale=3.5e38)  # beyond float32
    assert _declined(q, k, v, scale=math.nan)
    if kind == "decode":  # a bfloat16 cache is read as it is, with a bfloat16 query only
        assert not _declined(q.bfloat16(), k.bfloat16(), v.bfloat16())
        assert _declined(q, k.bfloat16(), v.bfloat16())
        assert _declined(q.half(), k.half(), v.half())
    # decoding steps (more than 16 keys a query) are try_decode's, up to 16 queries
    steps = [(1, 17), (2, 33), (16, 257), (17, 300)]
    served = [_declined(*_inputs((2,), n, m, 4, 4)) is False for n, m in steps]
    assert served == ([True, True, True, False] if kind == "decode" else [False] * 4)
    assert _declined(*_inputs((2,), 1, 16, 4, 4)) is (kind == "decode")
    monkeypatch.setattr(native, "_load", lambda: (None, "unavailable in this test"))
    assert _declined(q, k, v)


# Decoding steps (try_decode): 1 to 16 queries, more than 16 keys a query, in
# one of attn.c's groups of keys (DECODE_KEYS: 1024, in pieces of 256) or several; enough work
# for threads (a single problem's keys shared between them, or problems shared).
DECODE = [
    ((3,), 1, 40, 7, 9),  # (one to four queries: a dot product per score, see attn.c's FEW)
    ((2,), 2, 300, 33, 17),
    ((3,), 4, 80, 7, 9),
    ((2,), 4, 600, 40, 35),  # (bfloat16 rows in pieces of 16 entries, split, then the rest)
    ((1,), 1, 700, 64, 48),
    ((2, 2), 5, 1100, 16, 20),
    ((1,), 16, 2500, 64, 64),  # threads share its keys
    ((3,), 16, 1500, 32, 32),  # threads share the problems
    ((), 16, 300, 33, 17),
    ((2,), 3, 1030, 128, 8),
]

# Decoding steps take the 8-float build whatever the CPU (native._served): one run each.
ONE_BUILD = pytest.mark.parametrize("vector_floats", [8], indirect=True, ids=["vec8"])


@ONE_BUILD
@pytest.mark.parametrize("threads", [1, 2], indirect=True)
@pytest.mark.parametrize("causal", CAUSAL)
@pytest.mark.parametrize("dtype", [F32, torch.bfloat16], ids=str)
@pytest.mark.parametrize(("batch", "n", "m", "d", "e"), DECODE, ids=str)
def test_decoding_steps_match_the_reference(
    batch: tuple[int, ...],
    n: int,
    m: int,
    d: int,
    e: int,
    causal: str,
    dtype: torch.dtype,
    threads: int,
) -> None:
    """o against float64 of the same (bfloat16: rounded) inputs: float32 sums, and for a
    bfloat16 cache one rounding of o at the end."""
    q, k, v = (x.to(dtype) for x in _inputs(batch, n, m, d, e, seed=7))
    o = native.try_decode(q, k, v, 1 / math.sqrt(d), causal_diagonal(causal, n, m))
    assert o is not None, "the call was declined"
    o_ref = reference(q.double(), k.double(), v.double(), None, 1 / math.sqrt(d), causal)[0]
    assert o.shape == o_ref.shape and o.dtype == dtype and o.is_contiguous()
    rtol = 1e-5 if dtype == F32 else 2**-8  # (bfloat16: half an ulp of o)
    torch.testing.assert_close(o.double(), o_ref, rtol=rtol, atol=2e-6 * math.sqrt(max(d, m)))


@ONE_BUILD
@pytest.mark.parametrize("threads", [1, 2], indirect=True)
@pytest.mark.parametrize("dtype", [F32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf], ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize("where", ["q", "k_first", "k_mid", "k_last", "v_first", "v_mid", "v_last"])
@pytest.mark.parametrize("causal", CAUSAL)
def test_decoding_steps_propagate_nonfinite_inputs(
    causal: str, where: str, value: float, dtype: torch.dtype, threads: int
) -> None:
    """A NaN or infinity reaches the rows of o the composite's reaches, also through the
    weights a causal mask zeroes (0 * inf), and no other (queries past n in the register
    panel must not leak); in a bfloat16 cache read in place (past its first piece) an
    infinity stays one, whatever the entry before it (read with it: see attn.c's
    bf16_entry)."""
    q, k, v = (x.to(dtype) for x in _inputs((1,), 5, 2000, 64, 64, seed=8))
    assert native.PARALLEL_MIN <= 5 * 2000 * 128  # (two threads share the keys)
    target = {"q": q[0, 2], "k_first": k[0, 0], "k_mid": k[0, 700], "k_last": k[0, -1]}
    target |= {"v_first": v[0, 0], "v_mid": v[0, 700], "v_last": v[0, -1]}
    target[where][3] = value
    o = native.try_decode(q, k, v, 0.5, causal_diagonal(causal, 5, 2000))
    assert o is not None
    o_ref = reference(q.double(), k.double(), v.double(), None, 0.5, causal)[0]
    rtol = 1e-5 if dtype == F32 else 2**-8
    torch.testing.assert_close(o.double(), o_ref, equal_nan=True, rtol=rtol, atol=1e-4)


@ONE_BUILD
@pytest.mark.parametrize("offset", [1, 2, 3], ids=lambda x: f"offset{x}")
def test_decoding_steps_read_a_bfloat16_cache_at_any_address(offset: int) -> None:
    """A bfloat16 cache read in place whose rows begin 2, 4 or 6 bytes past an aligned
    address (a view into a larger storage): the same o as float64."""
    q, k, v = (x.to(torch.bfloat16) for x in _inputs((2,), 6, 700, 30, 18, seed=12))
    k, v = (
        torch.empty(x.numel() + offset, dtype=x.dtype)[offset:].view_as(x).copy_(x) for x in (k, v)
    )
    o = native.try_decode(q, k, v, 0.2, None)
    assert o is not None
    o_ref = reference(q.double(), k.double(), v.double(), None, 0.2)[0]
    torch.testing.assert_close(o.double(), o_ref, rtol=2**-8, atol=1e-4)


_GUARDED = """
import ctypes, mmap, sys
import torch
from tanh_attention.kernels import native

libc = ctypes.CDLL(None, use_errno=True)
libc.mmap.restype = ctypes.c_void_p
libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t] + [ctypes.c_int] * 3 + [ctypes.c_long]
libc.mprotect.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
page = mmap.PAGESIZE

def guarded(like):
    # like's values in memory that begins a page, after a page that cannot be read
    size = like.numel() * like.element_size()
    flags = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS
    base = libc.mmap(None, 2 * page + size, mmap.PROT_READ | mmap.PROT_WRITE, flags, -1, 0)
    assert base not in (None, ctypes.c_void_p(-1).value)
    assert libc.mprotect(base, page, 0) == 0  # (PROT_NONE)
    raw = (ctypes.c_char * size).from_address(base + page)
    return torch.frombuffer(raw, dtype=like.dtype).view_as(like).copy_(like)

torch.set_num_threads(int(sys.argv[1]))
n = int(sys.argv[2])
gen = torch.Generator().manual_seed(13)
q = torch.randn(1, n, 64, generator=gen).bfloat16()
m = 8400 // n
k, v = (guarded(torch.randn(1, m, 64, generator=gen).bfloat16()) for _ in range(2))
assert native.PARALLEL_MIN <= n * m * 128  # (with two threads, they share the keys)
o = native.try_decode(q, k, v, 0.125, None)
assert o is not None, "declined"
exact = torch.tanh(q.double() @ k.double().mT * 0.125) @ v.double()
print((o.double() - exact).abs().max().item() / exact.abs().max().item())
"""


@ONE_BUILD
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="maps memory with libc's mmap")
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("n", [1, 4])
def test_decoding_steps_read_nothing_before_a_bfloat16_cache(n: int, threads: int) -> None:
    """A bfloat16 cache that begins a page after one that cannot be read: the step reads
    none of it (bf16_entry reads 2 bytes before each entry, so a tensor's first piece is
    widened for the products; few_keys, n = 1, reads each entry alone), one thread or two
    sharing the keys. In a process of its own: a read there is a segmentation fault."""
    command = [sys.executable, "-c", _GUARDED, str(threads), str(n)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, f"exit status {done.returncode}: {done.stderr[-2000:]}"
    assert float(done.stdout.split()[-1]) < 2**-8


@ONE_BUILD
def test_decoding_sums_are_as_accurate_as_the_composite() -> None:
    """o sums over a long cache (16384 keys, in chunks added in turn) err no more than the
    composite's float32 products do against float64."""
    q, k, v = _inputs((2,), 16, 16384, 16, 16, seed=9)
    o = native.try_decode(q, k, v, 0.25, None)
    assert o is not None
    exact = reference(q.double(), k.double(), v.double(), None, 0.25)[0]
    composite = torch.tanh(q @ k.mT * 0.25) @ v
    error = (o.double() - exact).abs().max().item()
    assert error <= 2 * (composite.double() - exact).abs().max().item() + 1e-6


def test_backward_declines_gradients_it_cannot_read() -> None:
    q, k, v = _inputs((2, 3), 4, 5, 6, 7)
    g_o, a = torch.randn(2, 3, 4, 7), torch.randn(2, 3, 4, 5)

    def declined(*args: Any) -> bool:
        return native.try_attn_backward(*args, q, k, v, a, 0.5, None) is None

    assert not declined(g_o, None)
    assert declined(g_o.double(), None)
    assert declined(g_o[..., :6], None)  # not o's shape
    assert declined(g_o[:1], None)  # a batch dim that broadcasts
    assert declined(None, a[..., :4])  # not a's shape
    assert declined(None, a.double())
    assert native.try_attn_backward(g_o, None, q, k, v, a[0], 0.5, None) is None
    assert native.try_attn_backward(g_o, None, q, k, v.double(), None, 0.5, None) is None


def test_backward_copies_gradients_that_are_not_contiguous() -> None:
    """A broadcast gradient (what ``o.sum().backward()`` sends) is read as its values."""
    q, k, v = _inputs((2,), 4, 5, 6, 7)
    g_o = torch.ones(()).expand(2, 4, 7)
    got = native.try_attn_backward(g_o, None, q, k, v, None, 0.5, 0)
    want = native.try_attn_backward(g_o.contiguous(), None, q, k, v, None, 0.5, 0)
    assert got is not None and want is not None
    for g, w in zip(got, want, strict=True):
        assert torch.equal(g, w)
    for g, w in zip(got, _vjp(g_o, None, q, k, v, 0.5, "top_left"), strict=True):
        torch.testing.assert_close(g.double(), w, rtol=1e-5, atol=1e-5)


def test_the_load_check_refuses_a_wrong_kernel(vector_floats: int) -> None:
    """The check on load has teeth: a kernel that writes nothing, or one that says it
    failed, is refused, forward or backward."""
    library = native._load()[0]
    assert library is not None
    attn, backward, decode = library.wide if vector_floats == 16 else library.narrow
    assert native._check_attn(attn, backward, vector_floats) is None
    assert native._check_decode(decode) is None
    for wrong in (lambda *args: 0, lambda *args: 1):
        assert "wrong" in str(native._check_attn(wrong, backward, vector_floats))
        assert "wrong" in str(native._check_attn(attn, wrong, vector_floats))
        assert "wrong" in str(native._check_decode(wrong))


def _record_served(monkeypatch: pytest.MonkeyPatch, name: str) -> list[bool]:
    """Calls of blockwise's ``name`` (try_attn or try_attn_backward): True for each call it
    served."""
    served: list[bool] = []
    real = getattr(blockwise, name)

    def recording(*args: Any) -> Any:
        out = real(*args)
        served.append(out is not None)
        return out

    monkeypatch.setattr(blockwise, name, recording)
    return served


@pytest.mark.parametrize("causal", [False, True, "bottom_right"])
@pytest.mark.parametrize("need_weights", [True, False])
def test_small_inference_calls_reach_it(
    causal: bool | str, need_weights: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """tanh_attention.attn of a small float32 call with nothing to differentiate: computed
    by the compiled forward, and right."""
    served = _record_served(monkeypatch, "try_attn")
    q, k, v = _inputs((2, 4), 16, 24, 32, 32)
    with torch.no_grad():
        o, a = tanh_attention.attn(q, k, v, scale=0.3, causal=causal, need_weights=need_weights)
    assert served == [True]
    variant = {False: "none", True: "top_left"}.get(causal, causal)  # type: ignore[call-overload]
    o_ref, a_ref = reference(q.double(), k.double(), v.double(), None, 0.3, variant)
    torch.testing.assert_close(o.double(), o_ref, rtol=1e-5, atol=2e-5)
    if need_weights:
        torch.testing.assert_close(a.double(), a_ref, rtol=0, atol=2e-6)
    else:
        assert a is None


def test_other_calls_take_the_other_paths(monkeypatch: pytest.MonkeyPatch) -> None:
    """A mask, float64 or a broadcast batch dim: not served (and still right)."""
    served = _record_served(monkeypatch, "try_attn")
    q, k, v = _inputs((2, 3), 6, 8, 4, 5)
    mask = torch.rand(6, 8, generator=torch.Generator().manual_seed(0)) < 0.6
    o, _ = blockwise.forward(q, k, v, mask, 0.5, "none")
    assert served == []
    want = reference(q.double(), k.double(), v.double(), mask, 0.5)[0]
    torch.testing.assert_close(o.double(), want, rtol=1e-5, atol=2e-6)
    for inputs in ((q.double(), k.double(), v.double()), (q, k[:1], v[:1])):
        served.clear()
        o, _ = blockwise.forward(*inputs, None, 0.5, "top_left")
        assert served == [False]
        want = reference(*(x.double() for x in inputs), None, 0.5, "top_left")[0]
        torch.testing.assert_close(o.double(), want, rtol=1e-5, atol=2e-6)


@pytest.mark.parametrize("causal", [False, True, "bottom_right"])
@pytest.mark.parametrize("need_weights", [True, False])
def test_small_training_calls_reach_it(
    causal: bool | str, need_weights: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """tanh_attention.attn of a small float32 call that is differentiated: the forward and
    the backward by the compiled kernels (not the aten ops of blockwise.graph, which cost
    more), and gradients right."""
    served = _record_served(monkeypatch, "try_attn")
    served_backward = _record_served(monkeypatch, "try_attn_backward")
    q, k, v = (x.requires_grad_() for x in _inputs((2, 4), 8, 12, 16, 16))
    o, a = tanh_attention.attn(q, k, v, scale=0.3, causal=causal, need_weights=need_weights)
    gen = torch.Generator().manual_seed(2)
    outputs = [o] if a is None else [o, a]
    grads_out = [torch.randn(t.shape, generator=gen) for t in outputs]
    got = torch.autograd.grad(outputs, (q, k, v), grads_out)
    assert served == [True] and served_backward == [True]
    variant = {False: "none", True: "top_left"}.get(causal, causal)  # type: ignore[call-overload]
    leaves = [x.detach().double().requires_grad_() for x in (q, k, v)]
    o_ref, a_ref = reference(*leaves, None, 0.3, variant)
    refs = [o_ref] if a is None else [o_ref, a_ref]
    want = torch.autograd.grad(refs, leaves, [g.double() for g in grads_out])
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g.double(), w, rtol=1e-5, atol=2e-5)


def test_without_full_width_vectors_calls_keep_the_aten_path(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """On a CPU where neither build runs at its full width (no AVX2 and FMA, or not x86-64),
    the kernels serve no call, and attention is still right."""
    library = native._load()[0]
    assert library is not None
    monkeypatch.setattr(native, "_load", lambda: (library._replace(vector_floats=0), None))
    assert native.vector_floats() is None
    q, k, v = _inputs((2,), 8, 12, 16, 16)
    assert native.try_attn(q, k, v, 0.5, None, True) is None
    assert native.try_attn_backward(torch.ones(2, 8, 16), None, q, k, v, None, 0.5, None) is None
    o, a = tanh_attention.attn(q, k, v, scale=0.5)
    o_ref, a_ref = reference(q.double(), k.double(), v.double(), None, 0.5)
    torch.testing.assert_close(o.double(), o_ref, rtol=1e-5, atol=2e-5)
    torch.testing.assert_close(a.double(), a_ref, rtol=0, atol=2e-6)


def test_avx512_takes_the_wide_build_where_its_panels_fill(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Where the CPU runs 16-float vectors (AVX-512), calls whose d, e and m fill 32-column
    panels as fully as 16-column ones take them; others keep the 8-float build (32-column
    panels of 16 columns would be half zeros)."""
    monkeypatch.undo()  # (the real choice, not the fixture's)
    library = native._load()[0]
    assert library is not None
    wide = library._replace(vector_floats=16)
    monkeypatch.setattr(native, "_load", lambda: (wide, None))
    assert native.vector_floats(64) == 16 and native.vector_floats(32, 24) == 16
    assert native.vector_floats(16) == 8 and native.vector_floats(64, 16) == 8
    assert native.vector_floats(64, m=16) == 8 and native.vector_floats(64, m=40) == 8
    assert native.vector_floats(64, m=64) == 16 and native.vector_floats(64, m=1000) == 16
    assert native.vector_floats(100) == 8 and native.vector_floats(120) == 16
    assert native.vector_floats(64, m=300) == 8 and native.vector_floats(64, m=1008) == 16
    for d, m, kernels in (
        (16, 64, library.narrow),
        (64, 16, library.narrow),
        (64, 64, library.wide),
    ):
        call = native._served(*_inputs((2,), 8, m, d, d), 0.5)
        assert call is not None and call.kernels is kernels


@ONE_BUILD
def test_decoding_steps_reach_it(monkeypatch: pytest.MonkeyPatch) -> None:
    """tanh_attention.attn of a float32 decoding step in inference, without weights
    (bottom-right causal, a cache of 32 keys a query): o by the compiled decoding step."""
    served = _record_served(monkeypatch, "try_decode")
    q, k, v = _inputs((2, 2), 4, 128, 16, 8, seed=10)
    with torch.no_grad():
        o, a = tanh_attention.attn(q, k, v, scale=0.3, causal="bottom_right", need_weights=False)
        assert served == [True] and a is None
        o_ref = reference(q.double(), k.double(), v.double(), None, 0.3, "bottom_right")[0]
        torch.testing.assert_close(o.double(), o_ref, rtol=1e-5, atol=2e-5)
        served.clear()
        tanh_attention.attn(q, k, v, scale=0.3, causal="bottom_right")  # weights: not a step
        assert served == []


@ONE_BUILD
@pytest.mark.parametrize("dtype", [F32, torch.bfloat16], ids=str)
@pytest.mark.parametrize(
    ("n", "causal", "served"), [(1, True, True), (3, False, True), (2, True, False)]
)
def test_grouped_query_decoding_steps(
    n: int, causal: bool, served: bool, dtype: torch.dtype, monkeypatch: pytest.MonkeyPatch
) -> None:
    """scaled_dot_product_attention(enable_gqa=True) of a decoding step: four query heads a
    key/value head run as one problem of 4 n queries where nothing is masked (one query,
    bottom-right; or no mask), else the aten path; o against float64 either way."""
    record = _record_served(monkeypatch, "try_decode")
    gen = torch.Generator().manual_seed(11)
    q = torch.randn(2, 8, n, 32, generator=gen).to(dtype)
    k, v = (torch.randn(2, 2, 300, cols, generator=gen).to(dtype) for cols in (32, 24))
    mask = causal_lower_right(n, 300) if causal else None
    with torch.no_grad():
        o = tanh_attention.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
    assert record == [served]
    k64, v64 = (x.double().repeat_interleave(4, dim=1) for x in (k, v))
    keep = torch.ones(n, 300, dtype=torch.bool).tril(300 - n) if causal else True
    scores = torch.tanh(q.double() @ k64.mT / math.sqrt(32))
    want = torch.where(torch.as_tensor(keep), scores, 0.0) @ v64
    rtol = 1e-5 if dtype == F32 else 2**-8
    # (the compiled step sums float32 weights; the aten path may round them: o_atol)
    k_all, v_all = (x.repeat_interleave(4, dim=1) for x in (k, v))
    mask_all = torch.as_tensor(keep)
    atol = 1e-4 if served else o_atol(dtype, 1e-4, q, k_all, v_all, 32**-0.5, attn_mask=mask_all)
    torch.testing.assert_close(o.double(), want, rtol=rtol, atol=atol)


@pytest.fixture
def pairs_restored() -> Iterator[bool]:
    """Whether this CPU multiplies bfloat16 pairs (native.decode_pairs), restored after."""
    here = native.decode_pairs()
    yield here
    native.decode_pairs(True)


@pytest.mark.parametrize(
    ("groups", "n", "d", "threads"),
    [(1, 16, 128, 2), (3, 16, 128, 2), (3, 5, 8, 1), (3, 3, 34, 1)],
    indirect=["threads"],
)
def test_decoding_by_bfloat16_pairs_sums_as_float32_does(
    groups: int, n: int, d: int, threads: int, pairs_restored: bool
) -> None:
    """A bfloat16 decoding step with its scores by bfloat16 pairs (AVX512-BF16, where the CPU
    has it) and by float32 products: both within float32 sums of float64, whatever the
    pieces (past the first piece of keys, which is widened), d, and the threads (two: one
    problem's keys shared out, or problems shared out)."""
    if not pairs_restored:
        pytest.skip("this CPU has no AVX512-BF16 (native.decode_pairs() is False)")
    gen = torch.Generator().manual_seed(17)
    q = torch.randn(groups, n, d, generator=gen).bfloat16()
    k, v = (torch.randn(groups, 1100, cols, generator=gen).bfloat16() for cols in (d, 24))
    if threads > 1:
        assert groups * n * 1100 * (d + 24) >= native.PARALLEL_MIN  # (the threads run)
    exact = torch.tanh(q.double() @ k.double().mT * 0.2) @ v.double()
    for on in (True, False):
        assert native.decode_pairs(on) is on
        o = native.try_decode(q, k, v, 0.2, None)
        assert o is not None
        torch.testing.assert_close(o.double(), exact, rtol=2**-8, atol=1e-4)


def test_decoding_by_pairs_needs_queries_of_bfloat16_values(pairs_restored: bool) -> None:
    """The compiled step given float32 queries that are no bfloat16 values and an even d
    (the kernel's own API; try_decode always passes bfloat16 values) multiplies by float32
    products: as accurate as float32, where pairs would err by q's rounding (2**-9)."""
    library = native._load()[0]
    if library is None:
        pytest.skip(f"no compiled kernels: {native.unavailable_reason()}")
    gen = torch.Generator().manual_seed(19)
    q = torch.randn(2, 7, 16, generator=gen)
    k, v = (torch.randn(2, 600, 16, generator=gen).bfloat16() for _ in range(2))
    o = torch.empty(2, 7, 16)
    pointers = [t.data_ptr() for t in (q, k, v, o)]
    assert library.narrow.decode(*pointers, 2, 7, 600, 16, 16, 0.3, 600, 1, 1) == 0
    exact = torch.tanh(q.double() @ k.double().mT * 0.3) @ v.double()
    torch.testing.assert_close(o.double(), exact, rtol=1e-5, atol=2e-5)
