"""The OpInfo-style suite: every implementation x every sample x every check.

Implementations (samples.py): the composite op, AttnFunction, the explicit op, the public
function through the dispatcher with and without weights, and each backend forced by name,
with and without weights. Checks: forward against the float64 reference (written from the
definition in samples.py); gradcheck and gradgradcheck (finite differences); forward AD;
every subset of inputs requiring grad; one output's gradient absent; masked entries'
gradient exactly zero; float32/bfloat16/float16 against float64; inputs, the mask and their
version counters unchanged; outputs that are ordinary tensors (not views).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch.autograd import forward_ad as fwAD
from torch.autograd import gradcheck, gradgradcheck

from samples import (
    IMPL_IDS,
    IMPLEMENTATIONS,
    SAMPLES,
    WEIGHTS,
    Implementation,
    Sample,
    as_fn,
    build,
    reference,
)


def _cases(impls: list[Implementation], samples: list[Sample]) -> pytest.MarkDecorator:
    """(implementation, sample) pairs; the large samples only where blocks are crossed."""
    pairs = [(i, s) for i in impls for s in samples if i.blocked or not s.large]
    return pytest.mark.parametrize(
        ("impl", "sample"), pairs, ids=[f"{s.name}-{i.name}" for i, s in pairs]
    )


MASKED = [s for s in SAMPLES if s.masked]
every_impl = pytest.mark.parametrize("impl", IMPLEMENTATIONS, ids=IMPL_IDS)
all_cases = _cases(IMPLEMENTATIONS, SAMPLES)
weights_cases = _cases(WEIGHTS, SAMPLES)
masked_weights_cases = _cases(WEIGHTS, MASKED)

EXACT = {"rtol": 1e-10, "atol": 1e-10}


def _outputs(impl: Implementation, f: Callable[..., Any]) -> Callable[..., Any]:
    """``f`` returning only tensors: ``(o, a)``, or ``o`` for an implementation without a."""
    if impl.weights:
        return f
    return lambda *xs: f(*xs)[0]


def _pairs(impl: Implementation, got: Any, want: Any) -> list[tuple[Any, Any]]:
    """(ours, reference) output pairs: o and, where the implementation returns it, a."""
    return [(got[0], want[0])] + ([(got[1], want[1])] if impl.weights else [])


@all_cases
def test_forward_matches_reference(impl: Implementation, sample: Sample) -> None:
    leaves = build(sample, requires_grad=False)
    got = as_fn(impl.fn, sample)(*leaves)
    want = as_fn(reference, sample)(*leaves)
    if not impl.weights:
        assert got[1] is None
    for y, y_ref in _pairs(impl, got, want):
        assert y.shape == y_ref.shape, (y.shape, y_ref.shape)
        torch.testing.assert_close(y, y_ref, rtol=1e-12, atol=1e-12)
        assert y._base is None, "an output is a view of an internal buffer"
    if impl.weights and sample.masked:
        # Masked entries are exactly zero, not merely small.
        a, a_ref = got[1], want[1]
        assert torch.equal(a[a_ref == 0], torch.zeros_like(a[a_ref == 0]))


@all_cases
def test_gradcheck(impl: Implementation, sample: Sample) -> None:
    leaves = build(sample)
    assert gradcheck(
        _outputs(impl, as_fn(impl.fn, sample)),
        tuple(leaves),
        check_undefined_grad=True,
        check_forward_ad=True,
        check_batched_grad=not sample.large,
        fast_mode=sample.large,
    )


@all_cases
def test_gradgradcheck(impl: Implementation, sample: Sample) -> None:
    leaves = build(sample)
    assert gradgradcheck(
        _outputs(impl, as_fn(impl.fn, sample)),
        tuple(leaves),
        check_fwd_over_rev=not sample.large,  # the small samples cover it
        check_batched_grad=not sample.large,
        gen_non_contig_grad_outputs=True,
        fast_mode=sample.large,
    )


@masked_weights_cases
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


@all_cases
def test_every_subset_requiring_grad(impl: Implementation, sample: Sample) -> None:
    """Gradients of the outputs w.r.t. each subset of the leaves match the reference's."""
    base = build(sample, requires_grad=False)
    for wants in itertools.product((False, True), repeat=len(base)):
        if not any(wants):
            continue
        leaves = [x.clone().requires_grad_(w) for x, w in zip(base, wants, strict=True)]
        tracked = [x for x in leaves if x.requires_grad]
        pairs = _pairs(impl, as_fn(impl.fn, sample)(*leaves), as_fn(reference, sample)(*leaves))
        cotangents = [torch.randn_like(y_ref) for _, y_ref in pairs]
        # autograd.Function-based implementations mark a as requiring grad even when only
        # v does (a does not depend on v); its gradient must then be zero, not wrong.
        outs = [(y, g) for (y, _), g in zip(pairs, cotangents, strict=True) if y.requires_grad]
        got = torch.autograd.grad(
            [y for y, _ in outs], tracked, [g for _, g in outs], allow_unused=True
        )
        refs = [(y, g) for (_, y), g in zip(pairs, cotangents, strict=True) if y.requires_grad]
        want = torch.autograd.grad(
            [y for y, _ in refs], tracked, [g for _, g in refs], allow_unused=True
        )
        got = [torch.zeros_like(x) if g is None else g for g, x in zip(got, tracked, strict=True)]
        want = [torch.zeros_like(x) if w is None else w for w, x in zip(want, tracked, strict=True)]
        for g, w in zip(got, want, strict=True):
            torch.testing.assert_close(g, w, **EXACT)


@weights_cases
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


@all_cases
def test_forward_ad_matches_reference(impl: Implementation, sample: Sample) -> None:
    leaves = build(sample, requires_grad=False)
    tangents = tuple(torch.randn_like(x) for x in leaves)
    with fwAD.dual_level():
        duals = [fwAD.make_dual(x, t) for x, t in zip(leaves, tangents, strict=True)]
        outs = as_fn(impl.fn, sample)(*duals)
        got = [fwAD.unpack_dual(y).tangent for y in outs if y is not None]
    _, want = torch.func.jvp(as_fn(reference, sample), tuple(leaves), tangents)
    for g, w in zip(got, want, strict=False):  # o-only: o's tangent
        assert g is not None, "forward AD dropped a tangent"
        torch.testing.assert_close(g, w, **EXACT)


# Tolerances in units of each dtype's machine epsilon (see the test's docstring).
LOW = [(torch.float32, 4), (torch.bfloat16, 2), (torch.float16, 2)]


@pytest.mark.parametrize(("dtype", "units"), LOW, ids=["float32", "bfloat16", "float16"])
@all_cases
def test_low_precision_against_float64(
    impl: Implementation, sample: Sample, dtype: torch.dtype, units: int
) -> None:
    """Outputs and gradients in a low precision: |err| <= tol * width * (1 + |exact|).

    ``width`` is the longest sum in the op (d, m or n terms); ``tol`` is ``units`` machine
    epsilons of the dtype (4 for float32, 2 for the 16-bit types), so a formula computed in
    the wrong precision or dropping a term fails while ordinary rounding passes.
    """
    tol = units * torch.finfo(dtype).eps
    low = build(sample, dtype=dtype)
    exact = [x.detach().double().requires_grad_() for x in low]
    got = as_fn(impl.fn, sample)(*low)
    want = as_fn(reference, sample)(*exact)
    pairs = _pairs(impl, got, want)
    assert all(y.dtype == dtype for y, _ in pairs)
    cotangents = [torch.randn_like(y_ref) for _, y_ref in pairs]
    grads = torch.autograd.grad(
        [y for y, _ in pairs], low, [g.to(dtype) for g in cotangents], allow_unused=True
    )
    grads_ref = torch.autograd.grad([y for _, y in pairs], exact, cotangents, allow_unused=True)
    width = max(*want[1].shape[-2:], low[0].shape[-1], 1)
    checked = [(y, y_ref) for y, y_ref in pairs]
    checked += [(g, w) for g, w in zip(grads, grads_ref, strict=True) if w is not None]
    for y, y_ref in checked:
        err = (y.double() - y_ref).abs()
        assert bool((err <= tol * width * (1 + y_ref.abs())).all()), (
            f"max error {err.max().item():.3g} above tolerance"
        )


@all_cases
def test_inputs_unchanged(impl: Implementation, sample: Sample) -> None:
    """Forward and backward write neither the inputs nor the mask the op received, nor bump
    their version counters."""
    leaves = build(sample)
    f = as_fn(impl.fn, sample)
    given = [*leaves, *([] if f.mask is None else [f.mask])]
    before = [(x.detach().clone(), x._version) for x in given]
    outs = [y for y in f(*leaves) if y is not None]
    torch.autograd.grad(outs, leaves, [torch.randn_like(y) for y in outs], allow_unused=True)
    for x, (value, version) in zip(given, before, strict=True):
        assert torch.equal(x.detach(), value) and x._version == version


@every_impl
def test_outputs_are_not_views(impl: Implementation) -> None:
    """In-place use of ``o`` works as on the composite's: ``o.relu_()`` before backward."""
    for dtype in (torch.float64, torch.float32, torch.bfloat16):
        q, k, v = (torch.randn(2, 3, 4, dtype=dtype, requires_grad=True) for _ in range(3))
        o, a = impl.fn(q, k, v, None, 0.5, "top_left")
        o.relu_()
        (o.sum() + (0 if a is None else a.sum())).backward()
