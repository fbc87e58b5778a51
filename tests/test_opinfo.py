"""The OpInfo-style suite: every implementation x every sample x every check.

Checks: forward against the float64 reference (written from the definition in samples.py);
gradcheck and gradgradcheck (finite differences); forward AD and forward-over-reverse; every
subset of inputs requiring grad; one output's gradient absent; float32/bfloat16/float16
against float64; inputs and their version counters unchanged by forward and backward.
"""

from __future__ import annotations

import itertools

import pytest
import torch
from torch.autograd import forward_ad as fwAD
from torch.autograd import gradcheck, gradgradcheck

from samples import (
    IMPL_IDS,
    IMPLEMENTATIONS,
    SAMPLE_IDS,
    SAMPLES,
    Implementation,
    Sample,
    as_fn,
    build,
    reference,
)

pytestmark = pytest.mark.parametrize("impl", IMPLEMENTATIONS, ids=IMPL_IDS)
all_samples = pytest.mark.parametrize("sample", SAMPLES, ids=SAMPLE_IDS)
MASKED = [s for s in SAMPLES if s.mask is not None or s.causal]
masked_samples = pytest.mark.parametrize("sample", MASKED, ids=[s.name for s in MASKED])

EXACT = {"rtol": 1e-10, "atol": 1e-10}


@all_samples
def test_forward_matches_reference(impl: Implementation, sample: Sample) -> None:
    leaves = build(sample, requires_grad=False)
    o, a = as_fn(impl.fn, sample)(*leaves)
    o_ref, a_ref = as_fn(reference, sample)(*leaves)
    assert o.shape == o_ref.shape and a.shape == a_ref.shape
    torch.testing.assert_close(o, o_ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(a, a_ref, rtol=1e-12, atol=1e-12)
    if sample in MASKED:
        # Masked entries are exactly zero, not merely small.
        assert torch.equal(a[a_ref == 0], torch.zeros_like(a[a_ref == 0]))


@all_samples
def test_gradcheck(impl: Implementation, sample: Sample) -> None:
    leaves = build(sample)
    assert gradcheck(
        as_fn(impl.fn, sample),
        tuple(leaves),
        check_undefined_grad=True,
        check_forward_ad=True,
        check_batched_grad=True,
    )


@all_samples
def test_gradgradcheck(impl: Implementation, sample: Sample) -> None:
    leaves = build(sample)
    assert gradgradcheck(
        as_fn(impl.fn, sample),
        tuple(leaves),
        check_fwd_over_rev=True,
        check_batched_grad=True,
        gen_non_contig_grad_outputs=True,
    )


@masked_samples
def test_masked_entries_get_zero_gradient(impl: Implementation, sample: Sample) -> None:
    """A loss that reads only masked entries of a has exactly zero gradient."""
    leaves = build(sample)
    _, a = as_fn(impl.fn, sample)(*leaves)
    _, a_ref = as_fn(reference, sample)(*[x.detach() for x in leaves])
    dropped = (a_ref == 0).to(a.dtype)  # also tanh(x) == 0 exactly, which has no gradient issue
    grads = torch.autograd.grad((a * dropped).sum(), leaves, allow_unused=True)
    want = torch.autograd.grad(
        (as_fn(reference, sample)(*leaves)[1] * dropped).sum(), leaves, allow_unused=True
    )
    for g, w in zip(grads, want, strict=True):
        if g is not None:
            torch.testing.assert_close(g, torch.zeros_like(g) if w is None else w, **EXACT)


@all_samples
def test_every_subset_requiring_grad(impl: Implementation, sample: Sample) -> None:
    """Gradients of (o, a) w.r.t. each subset of the leaves match the reference's."""
    base = build(sample, requires_grad=False)
    for wants in itertools.product((False, True), repeat=len(base)):
        if not any(wants):
            continue
        leaves = [x.clone().requires_grad_(w) for x, w in zip(base, wants, strict=True)]
        tracked = [x for x in leaves if x.requires_grad]
        o, a = as_fn(impl.fn, sample)(*leaves)
        o_ref, a_ref = as_fn(reference, sample)(*leaves)
        g_o, g_a = torch.randn_like(o), torch.randn_like(a)
        # autograd.Function-based implementations mark a as requiring grad even when only
        # v does (a does not depend on v); its gradient must then be zero, not wrong.
        outs = [(y, g) for y, g in ((o, g_o), (a, g_a)) if y.requires_grad]
        got = torch.autograd.grad(
            [y for y, _ in outs], tracked, [g for _, g in outs], allow_unused=True
        )
        outs_ref = [(y, g) for y, g in ((o_ref, g_o), (a_ref, g_a)) if y.requires_grad]
        want = torch.autograd.grad(
            [y for y, _ in outs_ref], tracked, [g for _, g in outs_ref], allow_unused=True
        )
        got = [torch.zeros_like(x) if g is None else g for g, x in zip(got, tracked, strict=True)]
        want = [torch.zeros_like(x) if w is None else w for w, x in zip(want, tracked, strict=True)]
        for g, w in zip(got, want, strict=True):
            torch.testing.assert_close(g, w, **EXACT)


@all_samples
def test_one_output_grad_absent(impl: Implementation, sample: Sample) -> None:
    """Only o or only a takes part in the loss: no error, the other's gradient counts as 0."""
    leaves = build(sample)
    for pick in (0, 1):
        got = torch.autograd.grad(
            as_fn(impl.fn, sample)(*leaves)[pick].square().sum(), leaves, allow_unused=True
        )
        want = torch.autograd.grad(
            as_fn(reference, sample)(*leaves)[pick].square().sum(), leaves, allow_unused=True
        )
        for g, w, x in zip(got, want, leaves, strict=True):
            torch.testing.assert_close(
                torch.zeros_like(x) if g is None else g,
                torch.zeros_like(x) if w is None else w,
                **EXACT,
            )


@all_samples
def test_forward_ad_matches_reference(impl: Implementation, sample: Sample) -> None:
    leaves = build(sample, requires_grad=False)
    tangents = tuple(torch.randn_like(x) for x in leaves)
    with fwAD.dual_level():
        duals = [fwAD.make_dual(x, t) for x, t in zip(leaves, tangents, strict=True)]
        got = [fwAD.unpack_dual(y).tangent for y in as_fn(impl.fn, sample)(*duals)]
    _, want = torch.func.jvp(as_fn(reference, sample), tuple(leaves), tangents)
    for g, w in zip(got, want, strict=True):
        assert g is not None, "forward AD dropped a tangent"
        torch.testing.assert_close(g, w, **EXACT)


@pytest.mark.parametrize(
    ("dtype", "tol"),
    [(torch.float32, 1e-6), (torch.bfloat16, 1e-2), (torch.float16, 2e-3)],
    ids=["float32", "bfloat16", "float16"],
)
@all_samples
def test_low_precision_against_float64(
    impl: Implementation, sample: Sample, dtype: torch.dtype, tol: float
) -> None:
    """Outputs and gradients in a low precision: |err| <= tol * width * (1 + |exact|).

    ``width`` is the longest sum in the op (d, m or n terms); tol is about 2-4 units of
    rounding of the dtype, so a formula computed in the wrong precision or dropping a term
    fails while ordinary rounding passes.
    """
    low = build(sample, dtype=dtype)
    exact = [x.detach().double().requires_grad_() for x in low]
    o, a = as_fn(impl.fn, sample)(*low)
    o_ref, a_ref = as_fn(reference, sample)(*exact)
    assert o.dtype == dtype and a.dtype == dtype
    g_o, g_a = torch.randn_like(o_ref), torch.randn_like(a_ref)
    grads = torch.autograd.grad((o, a), low, (g_o.to(dtype), g_a.to(dtype)))
    grads_ref = torch.autograd.grad((o_ref, a_ref), exact, (g_o, g_a))
    width = max(*a_ref.shape[-2:], low[0].shape[-1], 1)
    for got, want in [(o, o_ref), (a, a_ref), *zip(grads, grads_ref, strict=True)]:
        err = (got.double() - want).abs()
        assert bool((err <= tol * width * (1 + want.abs())).all()), (
            f"max error {err.max().item():.3g} above tolerance"
        )


@all_samples
def test_inputs_unchanged(impl: Implementation, sample: Sample) -> None:
    """Forward and backward neither write the inputs nor bump their version counters."""
    leaves = build(sample)
    mask = None if sample.mask is None else sample.mask()
    before = [(x.detach().clone(), x._version) for x in leaves]
    f = as_fn(impl.fn, sample)
    o, a = f(*leaves)
    torch.autograd.grad((o, a), leaves, (torch.randn_like(o), torch.randn_like(a)))
    for x, (value, version) in zip(leaves, before, strict=True):
        assert torch.equal(x.detach(), value) and x._version == version
    if mask is not None:
        assert torch.equal(mask, sample.mask())  # as_fn's own copy: check the op saw a fresh one
