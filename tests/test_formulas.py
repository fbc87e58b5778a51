"""Each formula of docs/derivation.md, checked against autograd of the float64 reference."""

from __future__ import annotations

import itertools

import pytest
import torch

from samples import reference
from tanh_attention import formulas

F64 = torch.float64
CASES = {
    "plain": (None, 1.0, False),
    "scaled_causal": (None, -0.8, True),
    "masked_causal": ("mask", 0.5, True),
}


def _setup(case: str) -> tuple[torch.Tensor, ...]:
    q = torch.randn(2, 4, 3, dtype=F64, requires_grad=True)
    k = torch.randn(5, 3, dtype=F64, requires_grad=True)
    v = torch.randn(2, 5, 2, dtype=F64, requires_grad=True)
    return q, k, v


def _extras(case: str) -> tuple[torch.Tensor | None, float, bool]:
    mask, scale, causal = CASES[case]
    return (
        (torch.rand(4, 5, generator=torch.Generator().manual_seed(3)) < 0.6 if mask else None),
        scale,
        causal,
    )


@pytest.mark.parametrize("case", CASES)
def test_forward(case: str) -> None:
    q, k, v = _setup(case)
    mask, scale, causal = _extras(case)
    torch.testing.assert_close(
        formulas.forward(q, k, v, mask, scale=scale, causal=causal),
        reference(q, k, v, mask, scale, causal),
    )


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
    q, k, v = (x.detach() for x in _setup(case))
    mask, scale, causal = _extras(case)
    tangents = [torch.randn_like(x) if w else None for x, w in zip((q, k, v), which, strict=True)]
    dense = tuple(
        torch.zeros_like(x) if t is None else t for x, t in zip((q, k, v), tangents, strict=True)
    )
    (_, a), want = torch.func.jvp(lambda *x: reference(*x, mask, scale, causal), (q, k, v), dense)
    got = formulas.jvp(*tangents, q, k, v, a, mask, scale=scale, causal=causal)
    torch.testing.assert_close(got, want)


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize(
    "present", [(True, True), (True, False), (False, True)], ids=["both", "g_o", "g_a"]
)
def test_vjp_of_vjp(case: str, present: tuple[bool, bool]) -> None:
    """The double-backward formula equals autograd through the (reference's) backward."""
    q, k, v = _setup(case)
    mask, scale, causal = _extras(case)
    o, a_ref = reference(q.detach(), k.detach(), v.detach(), mask, scale, causal)
    g_o = torch.randn_like(o).requires_grad_() if present[0] else None
    g_a = torch.randn_like(a_ref).requires_grad_() if present[1] else None
    a = a_ref.clone().requires_grad_()
    # The backward as a function of (g_o, g_a, q, k, v, a), differentiated by autograd.
    g_q, g_k, g_v = formulas.vjp(g_o, g_a, q, k, v, a, mask, scale=scale, causal=causal)
    outs = [(g, torch.randn_like(g)) for g in (g_q, g_k, g_v) if g is not None]
    xis = {id(g): xi for g, xi in outs}
    inputs = [x for x in (g_o, g_a, q, k, v, a) if x is not None]
    want = torch.autograd.grad(
        [g for g, _ in outs], inputs, [xi for _, xi in outs], allow_unused=True
    )
    got = formulas.vjp_of_vjp(
        *(xis.get(id(g)) if g is not None else None for g in (g_q, g_k, g_v)),
        *(x.detach() if x is not None else None for x in (g_o, g_a, q, k, v, a)),
        mask,
        scale=scale,
        causal=causal,
    )
    got_present = [g for g, x in zip(got, (g_o, g_a, q, k, v, a), strict=True) if x is not None]
    for g, w, x in zip(got_present, want, inputs, strict=True):
        w = torch.zeros_like(x) if w is None else w
        g = torch.zeros_like(x) if g is None else g
        torch.testing.assert_close(g, w)
