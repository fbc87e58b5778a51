"""The Triton backend under Triton's interpreter, on CPU tensors.

Not collected by the suite itself (the name does not match ``test_*.py``): ``test_triton.py``
runs this file in a subprocess with ``TRITON_INTERPRET=1`` in its environment, which must be
set before ``tanh_attention`` (and so Triton's kernels) are imported. Run it by hand with::

    TRITON_INTERPRET=1 python -m pytest tests/triton_cases.py

The checks follow test_opinfo.py: the OpInfo samples forced through
``attn(..., backend="triton")`` with and without weights, against the float64 ``reference``
of samples.py; gradcheck (float64 works in the interpreter); float32 and float16 within 3x of
the composite's own error (no bfloat16 here: triton-lang/triton#11584); blocks crossed with
16/32 blocks through the kernel functions directly; NaN propagation past skipped causal
blocks; opcheck; torch.compile(aot_eager); the kernels' tanh within 4 ulp.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch.autograd import gradcheck, gradgradcheck

if os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip(
        "run with TRITON_INTERPRET=1 set before import (test_triton.py does)",
        allow_module_level=True,
    )

import tanh_attention
from samples import F64, SAMPLES, Sample, as_fn, build, keep_mask, reference
from tanh_attention.backends import triton as triton_backend

triton_attn = pytest.importorskip("tanh_attention.kernels.triton_attn")

SMALL = [s for s in SAMPLES if not s.large]
SMALL_IDS = [s.name for s in SMALL]


def _forced(need_weights: bool) -> Callable[..., Any]:
    def f(q: Any, k: Any, v: Any, m: Any, s: float, c: str) -> Any:
        o, a = tanh_attention.attn(
            q, k, v, scale=s, causal=c, attn_mask=m, need_weights=need_weights, backend="triton"
        )
        assert (a is None) != need_weights
        return (o, a) if need_weights else (o,)

    return f


WITH_A, O_ONLY = _forced(True), _forced(False)
impls = pytest.mark.parametrize("weights", [True, False], ids=["weights", "o_only"])
small = pytest.mark.parametrize("sample", SMALL, ids=SMALL_IDS)


def _impl(weights: bool) -> Callable[..., Any]:
    return WITH_A if weights else O_ONLY


# --------------------------------------------------------------------------------------------
# The OpInfo samples through attn(..., backend="triton")
# --------------------------------------------------------------------------------------------


@impls
@small
def test_forward_matches_reference(weights: bool, sample: Sample) -> None:
    leaves = build(sample, requires_grad=False)
    got = as_fn(_impl(weights), sample)(*leaves)
    want = as_fn(reference, sample)(*leaves)
    for y, y_ref in zip(got, want, strict=False):
        assert y.shape == y_ref.shape and y.dtype == F64
        torch.testing.assert_close(y, y_ref, rtol=1e-12, atol=1e-12)
        assert y._base is None, "an output is a view of an internal buffer"
    if weights and sample.masked:
        a, a_ref = got[1], want[1]
        assert torch.equal(a[a_ref == 0], torch.zeros_like(a[a_ref == 0]))


# Batched gradients (vmap over the backward op) on a few samples: each costs several launches.
BATCHED = {"n_ne_m", "mask_key_padding", "bottom_right_n_gt_m", "noncontiguous"}


# o only: the samples with masks (the lean kernels share every other path with the weights).
GRADCHECK = [(True, s) for s in SMALL] + [(False, s) for s in SMALL if s.masked]


@pytest.mark.parametrize(
    ("weights", "sample"),
    GRADCHECK,
    ids=[f"{s.name}-{'weights' if w else 'o_only'}" for w, s in GRADCHECK],
)
def test_gradcheck(weights: bool, sample: Sample) -> None:
    leaves = build(sample)
    f = as_fn(_impl(weights), sample)
    assert gradcheck(
        f,
        tuple(leaves),
        check_undefined_grad=weights,
        check_batched_grad=sample.name in BATCHED,
        fast_mode=True,
    )


@impls
@pytest.mark.parametrize(
    "sample", [s for s in SMALL if s.name in ("n_ne_m", "mask_and_bottom_right", "self_attention")]
)
def test_gradgradcheck(weights: bool, sample: Sample) -> None:
    leaves = build(sample)
    assert gradgradcheck(as_fn(_impl(weights), sample), tuple(leaves), fast_mode=True)


@impls
@small
def test_gradients_match_reference(weights: bool, sample: Sample) -> None:
    leaves = build(sample)
    got = as_fn(_impl(weights), sample)(*leaves)
    want = as_fn(reference, sample)(*leaves)[: len(got)]
    cot = [torch.randn_like(y) for y in want]
    g = torch.autograd.grad(got, leaves, cot, allow_unused=True)
    w = torch.autograd.grad(want, leaves, cot, allow_unused=True)
    for gi, wi, x in zip(g, w, leaves, strict=True):
        gi = torch.zeros_like(x) if gi is None else gi
        wi = torch.zeros_like(x) if wi is None else wi
        torch.testing.assert_close(gi, wi, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("sample", [s for s in SMALL if s.masked], ids=lambda s: s.name)
def test_masked_entries_get_zero_gradient(sample: Sample) -> None:
    leaves = build(sample)
    _, a = as_fn(WITH_A, sample)(*leaves)
    _, a_ref = as_fn(reference, sample)(*[x.detach() for x in leaves])
    dropped = (a_ref == 0).to(a.dtype)
    for g in torch.autograd.grad((a * dropped).sum(), leaves, allow_unused=True):
        if g is not None:
            assert torch.equal(g, torch.zeros_like(g))


# Tolerance: within 3x the composite's own error at the same precision (floor: one eps of the
# result's size, where the composite happens to be exact).
LOW = [torch.float32, torch.float16]


def _error(y: torch.Tensor, y_ref: torch.Tensor) -> float:
    return float((y.double() - y_ref).abs().max()) if y.numel() else 0.0


LOW_SAMPLES = [
    s
    for s in SMALL
    if s.name
    in (
        "d_ne_e_scaled",
        "batched_heads_shared_kv",
        "v_batch_only_causal",
        "noncontiguous",
        "causal_n_eq_m",
        "bottom_right_decode",
        "mask_and_bottom_right",
        "mask_full_row",
    )
]


@pytest.mark.parametrize("dtype", LOW, ids=str)
@impls
@pytest.mark.parametrize("sample", LOW_SAMPLES, ids=lambda s: s.name)
def test_low_precision_within_3x_of_composite(
    weights: bool, sample: Sample, dtype: torch.dtype
) -> None:
    low = build(sample, dtype=dtype)
    exact = [x.detach().double().requires_grad_() for x in low]
    comp = [x.detach().clone().requires_grad_() for x in low]
    got = as_fn(_impl(weights), sample)(*low)
    ref = as_fn(reference, sample)(*exact)[: len(got)]
    base = as_fn(reference, sample)(*comp)[: len(got)]  # the composite, in dtype
    assert all(y.dtype == dtype for y in got)
    cot = [torch.randn_like(y) for y in ref]
    grads = torch.autograd.grad(got, low, [c.to(dtype) for c in cot], allow_unused=True)
    grads_ref = torch.autograd.grad(ref, exact, cot, allow_unused=True)
    grads_base = torch.autograd.grad(base, comp, [c.to(dtype) for c in cot], allow_unused=True)
    eps = torch.finfo(dtype).eps
    triples = list(zip(got, ref, base, strict=True))
    triples += [t for t in zip(grads, grads_ref, grads_base, strict=True) if t[1] is not None]
    for y, y_ref, y_base in triples:
        floor = eps * (1.0 + float(y_ref.detach().abs().max())) if y_ref.numel() else 0.0
        assert _error(y, y_ref) <= 3 * max(_error(y_base, y_ref), floor), (
            _error(y, y_ref),
            _error(y_base, y_ref),
        )


# --------------------------------------------------------------------------------------------
# Across blocks: the kernel functions with small blocks, both causal alignments, masks
# --------------------------------------------------------------------------------------------

BLOCK_CASES = {
    # (q batch, n, m, d, e, mask shape or None, causal, scale)
    "plain": ((2,), 50, 70, 24, 20, None, "none", 0.3),
    "top_left_n_eq_m": ((2,), 64, 64, 32, 16, None, "top_left", 0.5),
    "top_left_n_gt_m": ((1,), 100, 37, 16, 24, None, "top_left", -0.4),
    "bottom_right_n_lt_m": ((2,), 37, 100, 20, 20, None, "bottom_right", 0.4),
    "bottom_right_n_gt_m": ((1,), 70, 40, 20, 20, None, "bottom_right", 0.4),
    "mask_key_padding": ((2,), 48, 80, 16, 16, (2, 1, 80), "none", 0.4),
    "mask_and_causal": ((2,), 60, 60, 16, 16, (60, 60), "bottom_right", 0.4),
}


BLOCK_PAIRS = [
    (name, bm, bn)
    for name in BLOCK_CASES
    for bm, bn in (
        [(16, 16), (32, 16), (16, 32)]
        if name in ("top_left_n_gt_m", "mask_and_causal")
        else [(16, 16)]
    )
]


@pytest.mark.parametrize(("name", "block_m", "block_n"), BLOCK_PAIRS, ids=str)
def test_kernels_across_blocks(name: str, block_m: int, block_n: int) -> None:
    qb, n, m, d, e, mask_shape, causal, scale = BLOCK_CASES[name]
    q, k, v = (
        torch.randn(*qb, n, d, dtype=F64),
        torch.randn(m, d, dtype=F64),
        torch.randn(*qb, m, e, dtype=F64),
    )
    mask = None if mask_shape is None else torch.rand(mask_shape) < 0.7
    blocks = {"block_m": block_m, "block_n": block_n}
    o, a = triton_attn.forward(q, k, v, mask, scale, causal, need_weights=True, **blocks)
    o_ref, a_ref = reference(q, k, v, mask, scale, causal)
    torch.testing.assert_close(o, o_ref, rtol=1e-12, atol=1e-12)
    assert a is not None
    torch.testing.assert_close(a, a_ref, rtol=1e-12, atol=1e-12)
    assert torch.equal(a[a_ref == 0], torch.zeros_like(a[a_ref == 0]))  # skipped blocks too
    o_only, none = triton_attn.forward(q, k, v, mask, scale, causal, need_weights=False, **blocks)
    assert none is None and torch.equal(o_only, o)
    g_o, g_a = torch.randn_like(o_ref), torch.randn_like(a_ref)
    leaves = [x.clone().requires_grad_() for x in (q, k, v)]
    want = torch.autograd.grad(reference(*leaves, mask, scale, causal), leaves, (g_o, g_a))
    for grad_a in (g_a, None):
        got = triton_attn.backward(
            g_o, grad_a, q, k, v, None, mask, scale, causal, [True, True, True], **blocks
        )
        if grad_a is None:
            want = torch.autograd.grad(reference(*leaves, mask, scale, causal)[0], leaves, g_o)
        for g, w in zip(got, want, strict=True):
            assert g is not None
            torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-10)
    # grad_a only: no g_v; needs honoured.
    g_q, g_k, g_v = triton_attn.backward(
        None, g_a, q, k, v, None, mask, scale, causal, [True, False, True], **blocks
    )
    assert g_k is None and g_v is None and g_q is not None


@pytest.mark.parametrize("d_e", [(200, 130), (256, 256), (72, 40)], ids=str)
def test_head_dims_not_powers_of_two(d_e: tuple[int, int]) -> None:
    d, e = d_e
    q, k, v = (torch.randn(1, 24, x, dtype=F64, requires_grad=True) for x in (d, d, e))
    o, a = tanh_attention.attn(q, k, v, scale=d**-0.5, causal=True, backend="triton")
    o_ref, a_ref = reference(q, k, v, None, d**-0.5, "top_left")
    torch.testing.assert_close(o, o_ref, rtol=1e-12, atol=1e-12)
    got = torch.autograd.grad(o.sum() + a.sum(), (q, k, v))
    want = torch.autograd.grad(o_ref.sum() + a_ref.sum(), (q, k, v))
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-10)


def test_broadcast_batch_dims_sum_back() -> None:
    """Shared k/v heads (stride 0, not copied), v's own batch dims, a broadcast mask."""
    q = torch.randn(2, 3, 20, 16, dtype=F64, requires_grad=True)
    k = torch.randn(2, 1, 40, 16, dtype=F64, requires_grad=True)
    v = torch.randn(4, 1, 1, 40, 8, dtype=F64, requires_grad=True)
    mask = torch.rand(3, 1, 40) < 0.8
    o, a = tanh_attention.attn(q, k, v, attn_mask=mask, causal="bottom_right", backend="triton")
    o_ref, a_ref = reference(q, k, v, mask, 1.0, "bottom_right")
    assert o.shape == o_ref.shape and a.shape == a_ref.shape == (2, 3, 20, 40)
    torch.testing.assert_close(o, o_ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(a, a_ref, rtol=1e-12, atol=1e-12)
    cot = (torch.randn_like(o_ref), torch.randn_like(a_ref))
    got = torch.autograd.grad((o, a), (q, k, v), cot)
    want = torch.autograd.grad((o_ref, a_ref), (q, k, v), cot)
    for g, w, x in zip(got, want, (q, k, v), strict=True):
        assert g.shape == x.shape
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("causal", ["top_left", "bottom_right"])
@pytest.mark.parametrize("where", ["v", "k", "q"])
def test_non_finite_inputs_propagate_past_skipped_blocks(causal: str, where: str) -> None:
    """A NaN in a row that causal blocks would skip still reaches every output the dense
    composite gives NaN (0 * NaN), forward and backward."""
    n = m = 64
    q, k, v = (torch.randn(n, 16, dtype=F64) for _ in range(3))
    {"q": q, "k": k, "v": v}[where][m - 3, 2] = float("nan")  # in the last key/query block
    leaves = [x.clone().requires_grad_() for x in (q, k, v)]
    ours = [x.clone().requires_grad_() for x in (q, k, v)]
    o_ref, a_ref = reference(*leaves, None, 1.0, causal)
    o, a = triton_attn.forward(*ours, None, 1.0, causal, need_weights=True, block_m=16)
    torch.testing.assert_close(o, o_ref, equal_nan=True, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(a, a_ref, equal_nan=True, rtol=1e-12, atol=1e-12)
    g_o = torch.randn_like(o_ref)
    want = torch.autograd.grad(o_ref, leaves, g_o)
    got = triton_attn.backward(
        g_o, None, q, k, v, None, None, 1.0, causal, [True, True, True], block_m=16, block_n=16
    )
    for g, w in zip(got, want, strict=True):
        assert g is not None
        assert torch.equal(g.isnan(), w.isnan())
        torch.testing.assert_close(g, w, equal_nan=True, rtol=1e-10, atol=1e-10)


def test_bfloat16_is_upcast_under_the_interpreter() -> None:
    q, k, v = (torch.randn(2, 20, 16, dtype=torch.bfloat16) for _ in range(3))
    o, a = tanh_attention.attn(q, k, v, causal=True, backend="triton")
    o_ref, a_ref = reference(q.double(), k.double(), v.double(), None, 1.0, "top_left")
    assert o.dtype == a.dtype == torch.bfloat16
    torch.testing.assert_close(o.double(), o_ref, rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(a.double(), a_ref, rtol=1e-2, atol=1e-2)


# --------------------------------------------------------------------------------------------
# Registration: dispatch, opcheck, compile
# --------------------------------------------------------------------------------------------


def test_dispatcher_never_picks_the_interpreter_by_itself() -> None:
    backend = importlib.import_module("tanh_attention.backends").get("triton")
    assert backend.available and "cpu" in backend.device_types
    q, k, v = (torch.randn(3, 4) for _ in range(3))
    tanh_attention.attn(q, k, v)  # runs, on another backend
    from tanh_attention import dispatch
    from tanh_attention._checks import validate_attn_inputs
    from tanh_attention.backends import Inputs

    shapes = validate_attn_inputs(q, k, v, None, scale=1.0, causal="none")
    inputs = Inputs(q, k, v, None, 1.0, "none", True, shapes)
    assert dispatch.select(inputs).name != "triton"
    assert backend.not_supported_reasons(inputs) == []
    assert backend.dispatch_reasons(inputs) == [
        "CPU tensors run Triton's interpreter only when forced (backend='triton')"
    ]


# opcheck is slow under the interpreter (~4 s a call): one case per pair.
OPCHECK = {
    "triton_attn-plain": (True, None, 1.0, "none", 5),
    "triton_attn_lean-mask_bottom_right": (False, (5, 6), -0.7, "bottom_right", 5),
}


@pytest.mark.parametrize(("weights", "mask_shape", "scale", "causal", "n"), OPCHECK.values(),
                         ids=OPCHECK)  # fmt: skip
def test_opcheck(weights: bool, mask_shape: Any, scale: float, causal: str, n: int) -> None:
    pair = triton_backend.op_pairs()[0 if weights else 1]
    q = torch.randn(2, n, 4, dtype=F64, requires_grad=True)
    k = torch.randn(2, 6, 4, dtype=F64, requires_grad=True)
    v = torch.randn(2, 6, 3, dtype=F64, requires_grad=True)
    mask = None if mask_shape is None else torch.rand(mask_shape) < 0.6
    torch.library.opcheck(pair.forward, (q, k, v, mask, scale, causal))
    o, a = reference(q, k, v, mask, scale, causal)
    g_o, g_a = torch.randn_like(o), torch.randn_like(a)
    a = a.detach() if weights else None
    args = (g_o, g_a if weights else None, q, k, v, a, mask, scale, causal, [True, True, True])
    torch.library.opcheck(pair.backward, args)


@pytest.mark.parametrize("need_weights", [True, False])
def test_compile_aot_eager(need_weights: bool) -> None:
    triton_backend.op_pairs()  # registered before tracing (see op_pairs)

    def f(q: Any, k: Any, v: Any) -> Any:
        o, a = tanh_attention.attn(
            q, k, v, causal="bottom_right", need_weights=need_weights, backend="triton"
        )
        return o.sum() + (0 if a is None else a.square().sum())

    leaves = [torch.randn(2, 5 + i, 8, dtype=F64, requires_grad=True) for i in range(3)]
    leaves[1:] = [torch.randn(2, 9, 8, dtype=F64, requires_grad=True) for _ in range(2)]
    compiled = torch.compile(f, backend="aot_eager", fullgraph=True)
    got = torch.autograd.grad(compiled(*leaves), leaves)
    want = torch.autograd.grad(f(*leaves), leaves)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-12, atol=1e-12)


# --------------------------------------------------------------------------------------------
# The kernels' tanh
# --------------------------------------------------------------------------------------------


def _ulp32(got: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    exact = torch.tanh(x.double())
    mag = exact.abs().float()
    spacing = torch.nextafter(mag, torch.tensor(float("inf"))) - mag
    return (got.double() - exact).abs() / spacing.double()


def test_tanh_within_4_ulp_float32() -> None:
    """Every 401st float32 bit pattern in [0, 10] (tanh rounds to 1 past it; subnormals and
    tiny |x| included), both signs: 5.4 million values."""
    top = torch.tensor(10.0).view(torch.int32).item()
    x = torch.arange(0, top + 1, 401, dtype=torch.int32).view(torch.float32)
    x = torch.cat([x, -x])
    err = _ulp32(triton_attn.tanh(x, block=1 << 16), x)
    worst = int(err.argmax())
    assert err[worst] <= 4.0, f"{err[worst].item():.3g} ulp at x = {x[worst].item()!r}"


def test_tanh_within_4_ulp_float64() -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.cat(
        [torch.rand(1 << 18, generator=g, dtype=F64) * 0.6, torch.randn(1 << 18, generator=g) * 4]
    ).double()
    x = torch.cat([x, -x, torch.tensor([1e-300, 0.55, 0.5499999999999999], dtype=F64)])
    exact = torch.tanh(x)
    spacing = torch.nextafter(exact.abs(), torch.tensor(float("inf"), dtype=F64)) - exact.abs()
    err = (triton_attn.tanh(x, block=1 << 16) - exact).abs() / spacing
    assert float(err.max()) <= 4.0


def test_tanh_special_values() -> None:
    inf, nan = float("inf"), float("nan")
    x = torch.tensor([0.0, -0.0, inf, -inf, 1e30, -1e30, 88.0, -88.0, 1e-45, -1e-45, nan])
    got = triton_attn.tanh(x)
    torch.testing.assert_close(got, torch.tanh(x.double()).float(), rtol=0, atol=0, equal_nan=True)
    assert torch.equal(got[:2].signbit(), torch.tensor([False, True]))


def test_keep_mask_is_the_reference_one() -> None:
    # The block cases above lean on samples.keep_mask through reference(); a sanity check.
    assert keep_mask(2, 3, "bottom_right").tolist() == [[True, True, False], [True, True, True]]


@pytest.mark.parametrize("need_weights", [True, False])
def test_forward_ad_and_vmap(need_weights: bool) -> None:
    """The op pairs' transforms (declared by ops.declare_op_pair) on the triton ops."""
    from torch.autograd import forward_ad as fwAD

    q, k, v = (torch.randn(2, 5, 4, dtype=F64) for _ in range(3))
    mask = torch.rand(5, 5) < 0.7

    def f(q: Any, k: Any, v: Any) -> Any:
        return tanh_attention.attn(
            q, k, v, attn_mask=mask, causal="top_left", need_weights=need_weights,
            backend="triton",
        )[0]  # fmt: skip

    tangents = tuple(torch.randn_like(x) for x in (q, k, v))
    with fwAD.dual_level():
        out = f(*(fwAD.make_dual(x, t) for x, t in zip((q, k, v), tangents, strict=True)))
        got = fwAD.unpack_dual(out).tangent
    _, want = torch.func.jvp(
        lambda *xs: reference(*xs, mask, 1.0, "top_left")[0], (q, k, v), tangents
    )
    assert got is not None
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
    batched = torch.vmap(f, in_dims=(0, None, None))(q, k[0], v[0])
    looped = torch.stack([f(q[i], k[0], v[0]) for i in range(2)])
    torch.testing.assert_close(batched, looped, rtol=1e-12, atol=1e-12)
