"""The compiled small-call forward (``kernels/small.c`` through ``native.try_attn``): its
values against the float64 reference at every padding and causal case, on one thread and
two, non-finite inputs, the calls it declines (it reads raw memory, so it must check for
itself), its load-time check, and which calls reach it."""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor

import tanh_attention
from samples import reference
from tanh_attention.formulas import causal_diagonal
from tanh_attention.kernels import blockwise, native

pytestmark = pytest.mark.skipif(
    native.unavailable_reason() is not None,
    reason=f"the compiled kernels are unavailable here: {native.unavailable_reason()}",
)

CAUSAL = ["none", "top_left", "bottom_right"]
F32 = torch.float32


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
    # float32 sums of d and m terms (the reference's are float64)
    tol = {"rtol": 1e-5, "atol": 2e-6 * math.sqrt(max(q.shape[-1], m))}
    torch.testing.assert_close(o.double(), o_ref, equal_nan=True, **tol)
    if not need_weights:
        assert a is None
        return
    assert a is not None and a.shape == a_ref.shape and a.is_contiguous()
    torch.testing.assert_close(a.double(), a_ref, equal_nan=True, rtol=0, atol=tol["atol"])
    masked = a_ref == 0
    assert torch.equal(a[masked], torch.zeros_like(a[masked]))


SHAPES = [
    # (batch, n, m, d, e): rows and columns that need no padding, and each that does
    ((), 16, 16, 64, 64),
    ((1, 1), 16, 16, 16, 16),
    ((3,), 5, 19, 7, 9),
    ((2, 3), 1, 33, 3, 1),
    ((2,), 17, 1, 1, 17),
    ((4, 4), 8, 8, 128, 128),
    ((), 64, 48, 32, 20),
    ((2,), 3, 2, 5, 4),  # n > m: bottom-right rows above the diagonal keep nothing
]


@pytest.mark.parametrize("threads", [1, 2], indirect=True)
@pytest.mark.parametrize("need_weights", [True, False])
@pytest.mark.parametrize("causal", CAUSAL)
@pytest.mark.parametrize(("batch", "n", "m", "d", "e"), SHAPES, ids=str)
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
@pytest.mark.parametrize("causal", CAUSAL)
def test_problems_split_over_threads(causal: str, threads: int) -> None:
    """Enough work for the parallel region (TA_SMALL_PARALLEL_MIN), an odd number of
    problems so the shares differ."""
    q, k, v = _inputs((7,), 64, 64, 40, 24)
    assert 7 * 64 * 64 * (40 + 24) >= 2**20
    _check(q, k, v, 0.2, causal, need_weights=True)


@settings(max_examples=60, deadline=None)
@given(
    batch=st.sampled_from([(), (2,), (2, 3)]),
    n=st.integers(1, 40),
    m=st.integers(1, 40),
    d=st.integers(1, 70),
    e=st.integers(1, 40),
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
    q, k, v = _inputs(batch, n, m, d, e, seed)
    _check(q, k, v, scale, causal, need_weights)


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


def test_huge_scores_saturate() -> None:
    """Scores beyond float32's range (a scale near its largest) give weights of exactly
    +-1, as the reference's tanh(+-inf)."""
    q, k, v = _inputs((), 4, 6, 3, 2)
    _check(q, k, v, 3e38, "none", need_weights=True)


def _declined(q: Any, k: Any, v: Any, scale: float = 0.5) -> bool:
    return native.try_attn(q, k, v, scale, None, True) is None


def test_declines_what_it_does_not_serve(monkeypatch: pytest.MonkeyPatch) -> None:
    q, k, v = _inputs((2, 3), 4, 5, 6, 7)
    assert not _declined(q, k, v)
    for dtype in (torch.float64, torch.bfloat16, torch.float16):
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
    big = _inputs((), 257, 256, 1, 1)
    assert native.SMALL_MAX_ENTRIES < 257 * 256
    assert _declined(*big)
    monkeypatch.setattr(native, "SMALL_MAX_WORK", 2 * 3 * 4 * 5 * (6 + 7) - 1)
    assert _declined(q, k, v)
    monkeypatch.setattr(native, "SMALL_MAX_WORK", 2 * 3 * 4 * 5 * (6 + 7))
    assert not _declined(q, k, v)
    monkeypatch.setattr(native, "_load", lambda: (None, "unavailable in this test"))
    assert _declined(q, k, v)


def test_the_load_check_refuses_a_wrong_kernel() -> None:
    """The check on load has teeth: a kernel that writes nothing, or one that says it
    failed, is refused."""
    assert native._check_attn(native._load()[0].attn) is None  # type: ignore[union-attr]
    assert "wrong" in str(native._check_attn(lambda *args: 0))
    assert "wrong" in str(native._check_attn(lambda *args: 1))


def _record_try_attn(monkeypatch: pytest.MonkeyPatch) -> list[bool]:
    """Calls of blockwise's try_attn: True for each call it served."""
    served: list[bool] = []
    real = blockwise.try_attn

    def recording(*args: Any) -> Any:
        out = real(*args)
        served.append(out is not None)
        return out

    monkeypatch.setattr(blockwise, "try_attn", recording)
    return served


@pytest.mark.parametrize("causal", [False, True, "bottom_right"])
@pytest.mark.parametrize("need_weights", [True, False])
def test_small_inference_calls_reach_it(
    causal: bool | str, need_weights: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """tanh_attention.attn of a small float32 call with nothing to differentiate: computed
    by the compiled forward, and right."""
    served = _record_try_attn(monkeypatch)
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
    served = _record_try_attn(monkeypatch)
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
