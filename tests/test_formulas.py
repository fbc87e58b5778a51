"""Each formula of docs/derivation.md, checked against autograd of the float64 reference.

The oracle is always ``samples.reference`` (written from the definition, sharing no code with
the package) or autograd of it; no formula is checked against another formula.
"""

from __future__ import annotations

import dataclasses
import itertools

import pytest
import torch
from torch import Tensor

from samples import keep_mask, reference
from tanh_attention import formulas

F64 = torch.float64
VARIANTS = ("none", "top_left", "bottom_right")


@dataclasses.dataclass(frozen=True)
class Case:
    """Shapes of q, k, v (and the mask, None: no mask), scale and causal variant."""

    q: tuple[int, ...]
    k: tuple[int, ...]
    v: tuple[int, ...]
    mask: tuple[int, ...] | None = None
    scale: float = 1.0
    causal: str = "none"


CASES = {
    "plain": Case((2, 4, 3), (5, 3), (2, 5, 2)),
    "scaled_top_left": Case((2, 4, 3), (5, 3), (2, 5, 2), scale=-0.8, causal="top_left"),
    "masked_top_left": Case((2, 4, 3), (5, 3), (2, 5, 2), (4, 5), 0.5, "top_left"),
    "top_left_n_gt_m": Case((5, 3), (3, 3), (3, 2), scale=0.7, causal="top_left"),
    "bottom_right_n_lt_m": Case((2, 3, 2), (6, 2), (6, 3), scale=0.9, causal="bottom_right"),
    "bottom_right_n_gt_m": Case((5, 3), (3, 3), (3, 2), scale=-1.1, causal="bottom_right"),
    "bottom_right_decode": Case((2, 1, 3), (2, 7, 3), (2, 7, 2), causal="bottom_right"),
    "masked_bottom_right": Case((3, 2), (5, 2), (5, 3), (3, 5), 0.6, "bottom_right"),
    # v with batch dims that q and k lack: a has q's and k's batch, o that of all three
    "v_batch_only": Case((4, 3), (5, 3), (3, 5, 2), scale=0.8),
    "v_batch_only_bottom_right": Case((2, 1, 3, 2), (4, 2), (2, 3, 4, 2), causal="bottom_right"),
    # a mask with batch dims of its own: they join the batch of a and o
    "mask_batch_only": Case((4, 3), (5, 3), (5, 2), (2, 4, 5), 0.7),
    "mask_batch_only_top_left": Case((1, 4, 3), (4, 3), (3, 4, 2), (2, 1, 4, 4), -0.5, "top_left"),
    "mask_key_padding": Case((2, 3, 2), (2, 5, 2), (2, 5, 3), (2, 1, 5), 1.3),
}


def _setup(case: str, requires_grad: bool = True) -> tuple[Tensor, Tensor, Tensor]:
    c = CASES[case]
    return tuple(  # type: ignore[return-value]
        torch.randn(shape, dtype=F64, requires_grad=requires_grad) for shape in (c.q, c.k, c.v)
    )


def _extras(case: str) -> tuple[Tensor | None, float, str]:
    c = CASES[case]
    mask = None
    if c.mask is not None:
        mask = torch.rand(c.mask, generator=torch.Generator().manual_seed(3)) < 0.6
    return mask, c.scale, c.causal


# --------------------------------------------------------------------------------------------
# The mask
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("causal", VARIANTS)
@pytest.mark.parametrize(("n", "m"), [(3, 3), (2, 5), (5, 2), (1, 4), (0, 3), (3, 0)])
def test_causal_diagonal_and_keep(causal: str, n: int, m: int) -> None:
    """keep (from causal_diagonal) zeroes exactly what the definition's keep-mask drops."""
    s = torch.randn(2, n, m, dtype=F64)
    want = torch.where(keep_mask(n, m, causal), s, 0.0)
    torch.testing.assert_close(formulas.keep(s, causal=causal, attn_mask=None), want)
    diagonal = formulas.causal_diagonal(causal, n, m)
    assert diagonal == {"none": None, "top_left": 0, "bottom_right": m - n}[causal]


@pytest.mark.parametrize("causal", VARIANTS)
def test_keep_with_mask_intersects_and_broadcasts(causal: str) -> None:
    s = torch.randn(3, 4, dtype=F64)
    s[0, 0] = float("nan")  # masked entries become exactly 0 even where s is not finite
    s[1, 3] = float("inf")
    mask = torch.rand(2, 3, 4, generator=torch.Generator().manual_seed(5)) < 0.5
    mask[:, 0, 0] = False
    mask[:, 1, 3] = False
    got = formulas.keep(s, causal=causal, attn_mask=mask)
    want = torch.where(keep_mask(3, 4, causal) & mask, s, 0.0)
    assert got.shape == (2, 3, 4)
    torch.testing.assert_close(got, want)


# --------------------------------------------------------------------------------------------
# Forward, VJP, JVP
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", CASES)
def test_forward(case: str) -> None:
    q, k, v = _setup(case)
    mask, scale, causal = _extras(case)
    o, a = formulas.forward(q, k, v, mask, scale=scale, causal=causal)
    o_ref, a_ref = reference(q, k, v, mask, scale, causal)
    assert o.shape == o_ref.shape and a.shape == a_ref.shape  # a: batch of q, k, mask only
    torch.testing.assert_close((o, a), (o_ref, a_ref))


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize(
    "present", [(True, True), (True, False), (False, True)], ids=["both", "g_o", "g_a"]
)
def test_vjp(case: str, present: tuple[bool, bool]) -> None:
    q, k, v = _setup(case)
    mask, scale, causal = _extras(case)
    o, a = reference(q, k, v, mask, scale, causal)
    g_o = torch.randn_like(o) if present[0] else None
    g_a = torch.randn_like(a) if present[1] else None
    outs = [(y, g) for y, g in ((o, g_o), (a, g_a)) if g is not None]
    want = torch.autograd.grad(
        [y for y, _ in outs], (q, k, v), [g for _, g in outs], allow_unused=True
    )
    got = formulas.vjp(g_o, g_a, q, k, v, a.detach(), mask, scale=scale, causal=causal)
    for g, w, x in zip(got, want, (q, k, v), strict=True):
        if w is None:  # v when only g_a is present
            assert g is None
        else:
            assert g is not None and g.shape == x.shape
            torch.testing.assert_close(g, w)


def test_vjp_skips_unneeded() -> None:
    q, k, v = _setup("plain")
    o, a = reference(q, k, v)
    for needs in itertools.product((False, True), repeat=3):
        got = formulas.vjp(torch.ones_like(o), torch.ones_like(a), q, k, v, a, needs=needs)
        assert [g is not None for g in got] == list(needs)


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("which", [(1, 1, 1), (1, 0, 0), (0, 1, 0), (0, 0, 1)], ids=str)
def test_jvp(case: str, which: tuple[int, int, int]) -> None:
    q, k, v = _setup(case, requires_grad=False)
    mask, scale, causal = _extras(case)
    tangents = [torch.randn_like(x) if w else None for x, w in zip((q, k, v), which, strict=True)]
    dense = tuple(
        torch.zeros_like(x) if t is None else t for x, t in zip((q, k, v), tangents, strict=True)
    )
    (_, a), want = torch.func.jvp(lambda *x: reference(*x, mask, scale, causal), (q, k, v), dense)
    t_o, t_a = formulas.jvp(*tangents, q, k, v, a, mask, scale=scale, causal=causal)
    assert t_o is not None
    torch.testing.assert_close((t_o, t_a), want)


# --------------------------------------------------------------------------------------------
# Double backward, against double autograd of the reference
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize(
    "present", [(True, True), (True, False), (False, True)], ids=["both", "g_o", "g_a"]
)
@pytest.mark.parametrize("xis", [(1, 1, 1), (1, 0, 0), (0, 1, 0), (0, 0, 1)], ids=str)
def test_vjp_of_vjp(case: str, present: tuple[bool, bool], xis: tuple[int, int, int]) -> None:
    """vjp_of_vjp equals the second derivative of the reference, taken by autograd.

    Oracle: the reference's VJP ``R(g_o, g_a, q, k, v) = (g_q, g_k, g_v)`` by autograd with
    ``create_graph=True``, then the VJP of ``R`` with cotangents ``xi`` w.r.t.
    ``(g_o, g_a, q, k, v)``: total derivatives, where ``a`` moves with q and k.

    ``vjp_of_vjp`` returns ``d_a``, the cotangent of the saved ``a`` held fixed; it reaches q
    and k through ``a``'s own dependence on them, which the comparison adds with autograd of
    the reference's ``a`` (not with the package's formulas).
    """
    q, k, v = _setup(case)
    mask, scale, causal = _extras(case)
    o, a = reference(q, k, v, mask, scale, causal)
    g_o = torch.randn_like(o).requires_grad_() if present[0] else None
    g_a = torch.randn_like(a).requires_grad_() if present[1] else None
    outs = [(y, g) for y, g in ((o, g_o), (a, g_a)) if g is not None]
    grads = torch.autograd.grad(
        [y for y, _ in outs], (q, k, v), [g for _, g in outs], create_graph=True, allow_unused=True
    )
    # Cotangents of (g_q, g_k, g_v): those chosen by `xis`, where the gradient exists.
    xi = [
        torch.randn_like(x) if use and g is not None else None
        for g, x, use in zip(grads, (q, k, v), xis, strict=True)
    ]
    pairs = [(g, c) for g, c in zip(grads, xi, strict=True) if c is not None]
    wrt = [x for x in (g_o, g_a, q, k, v) if x is not None]
    if pairs:
        want = torch.autograd.grad(
            [g for g, _ in pairs], wrt, [c for _, c in pairs], allow_unused=True, retain_graph=True
        )
    else:
        want = (None,) * len(wrt)
    want = [torch.zeros_like(x) if w is None else w for w, x in zip(want, wrt, strict=True)]

    detached = [None if x is None else x.detach() for x in (g_o, g_a, q, k, v)]
    d_g_o, d_g_a, d_q, d_k, d_v, d_a = formulas.vjp_of_vjp(
        *xi, *detached, a.detach(), mask, scale=scale, causal=causal
    )
    if d_a is not None:
        assert d_a.shape == a.shape
        # d_a carried to q and k through the reference's a(q, k).
        via_q, via_k = torch.autograd.grad(a, (q, k), d_a, retain_graph=True)
        d_q = via_q if d_q is None else d_q + via_q
        d_k = via_k if d_k is None else d_k + via_k
    names = ("g_o", "g_a", "q", "k", "v")
    for d, x, name in zip((d_g_o, d_g_a, d_q, d_k, d_v), (g_o, g_a, q, k, v), names, strict=True):
        if x is None:
            continue
        w = want.pop(0)
        d = torch.zeros_like(x) if d is None else d
        assert d.shape == x.shape, name
        torch.testing.assert_close(d, w, msg=lambda m, name=name: f"d_{name}: {m}")
    assert not want


# --------------------------------------------------------------------------------------------
# Scores scaled after the product: large scales saturate, never NaN
# --------------------------------------------------------------------------------------------

# Integer-valued q and k: every product q @ k^T is exact in any dtype, some of them exactly 0
# with large entries (10 * 1 + 10 * -1), where (q * scale) @ k^T would meet inf - inf.
_Q = [[10.0, 10.0], [1.0, 0.0], [0.0, -3.0], [0.0, 0.0]]
_K = [[1.0, -1.0], [2.0, 1.0], [0.0, 1.0]]
LARGE_SCALES = [
    (torch.float16, 1e4),  # below float16's max (65504): x * scale overflows to +-inf
    (torch.float16, -1e4),
    (torch.float32, 1e38),  # below float32's max: (q * scale) would overflow, q @ k^T not
    (torch.float32, -1e38),
    (torch.bfloat16, 1e39),  # above float32's (and bfloat16's) max: 0 * scale must stay 0
    (torch.bfloat16, -1e39),
    (torch.float64, 1e308),  # x * scale overflows float64 itself
]


def _large_inputs(dtype: torch.dtype) -> tuple[Tensor, Tensor, Tensor]:
    q = torch.tensor(_Q, dtype=dtype)
    k = torch.tensor(_K, dtype=dtype)
    v = torch.tensor([[1.0, -2.0], [0.5, 1.0], [-1.0, 0.0]], dtype=dtype)
    return q, k, v


@pytest.mark.parametrize(("dtype", "scale"), LARGE_SCALES, ids=str)
def test_scaled_saturates_without_nan(dtype: torch.dtype, scale: float) -> None:
    q, k, _ = _large_inputs(dtype)
    x = q @ k.mT
    assert (x == 0).any() and (x != 0).any()
    got = formulas.scaled(x, scale)
    assert got.dtype == dtype
    assert not got.isnan().any()
    want = x.double() * scale  # exact signs; the magnitudes overflow the dtype
    assert torch.equal(torch.sign(got.double()), torch.sign(want))
    assert torch.equal(got == 0, x == 0)


@pytest.mark.parametrize(("dtype", "scale"), LARGE_SCALES, ids=str)
@pytest.mark.parametrize("causal", VARIANTS)
def test_forward_with_large_scale_matches_reference(
    dtype: torch.dtype, scale: float, causal: str
) -> None:
    """Finite weights, saturated to the float64 reference's +-1 and 0 exactly where q.k = 0."""
    q, k, v = _large_inputs(dtype)
    o, a = formulas.forward(q, k, v, scale=scale, causal=causal)
    o_ref, a_ref = reference(q.double(), k.double(), v.double(), None, scale, causal)
    assert a.dtype == o.dtype == dtype
    assert torch.isfinite(a).all() and torch.isfinite(o).all()
    assert set(a_ref.unique().tolist()) <= {-1.0, 0.0, 1.0}  # saturated or exactly 0
    torch.testing.assert_close(a.double(), a_ref, rtol=0, atol=0)
    torch.testing.assert_close(o.double(), o_ref, rtol=0, atol=0)  # small exact sums


@pytest.mark.parametrize(("dtype", "scale"), LARGE_SCALES, ids=str)
def test_forward_with_large_scale_random_inputs(dtype: torch.dtype, scale: float) -> None:
    """Random inputs: no NaN anywhere; the sign of every clearly nonzero score is the float64
    reference's."""
    g = torch.Generator().manual_seed(11)
    q = torch.randn(3, 6, 4, generator=g).to(dtype)
    k = torch.randn(3, 5, 4, generator=g).to(dtype)
    v = torch.randn(3, 5, 2, generator=g).to(dtype)
    q[:, 0] = 0  # a zero row: q.k = 0 for every key
    _, a = formulas.forward(q, k, v, scale=scale)
    _, a_ref = reference(q.double(), k.double(), v.double(), None, scale)
    assert torch.isfinite(a).all()
    assert (a[:, 0] == 0).all()
    clear = (q.double() @ k.double().mT).abs() > 0.1  # far above the dtype's rounding of q.k
    assert torch.equal(a.double()[clear], a_ref[clear])
