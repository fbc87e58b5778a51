"""Stage 4 specifics: the explicit op and its backward op.

opcheck (schema, autograd registration, fake tensors, AOT dispatch) on both ops; what the
backward saves and skips; vmap rules against a per-sample loop; forward AD, forward-over-reverse
and torch.func reverse mode through the registered op itself.
"""

from __future__ import annotations

import warnings
from typing import Any

import pytest
import torch
from torch.autograd import forward_ad as fwAD
from torch.utils._python_dispatch import TorchDispatchMode

from samples import reference

OP = torch.ops.tanh_attention.attn
BACKWARD = torch.ops.tanh_attention.attn_backward
F64 = torch.float64


def _inputs(batched: bool = True) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    q = torch.randn((2, 3, 4) if batched else (3, 4), dtype=F64, requires_grad=True)
    k = torch.randn(5, 4, dtype=F64, requires_grad=True)
    v = torch.randn(5, 3, dtype=F64, requires_grad=True)
    return q, k, v


class _Calls(TorchDispatchMode):
    """Records every op called, with its arguments."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[Any, tuple[Any, ...]]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        self.calls.append((func, args))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("masked", [False, True], ids=["plain", "mask_scale_causal"])
def test_opcheck_forward(masked: bool) -> None:
    q, k, v = _inputs()
    extra = (torch.rand(3, 5) < 0.6, 0.5, True) if masked else ()
    torch.library.opcheck(OP, (q, k, v, *extra))


@pytest.mark.parametrize("needs", [[True, True, True], [True, False, False], [False, False, True]])
def test_opcheck_backward(needs: list[bool]) -> None:
    q, k, v = _inputs()
    o, a = OP(q, k, v)
    g_o, g_a = torch.randn_like(o), torch.randn_like(a)
    torch.library.opcheck(BACKWARD, (g_o, g_a, q, k, v, a.detach(), None, 1.0, False, needs))
    torch.library.opcheck(BACKWARD, (g_o, None, q, k, v, a.detach(), None, 0.3, True, needs))


def test_saves_inputs_and_a_never_x() -> None:
    q, k, v = _inputs()
    saved: list[torch.Tensor] = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        _, a = OP(q, k, v, None, 0.5, False)
    ptrs = {t.data_ptr() for t in (q, k, v, a)}
    assert len(saved) == 4
    assert all(t.data_ptr() in ptrs for t in saved)


def test_backward_gets_none_for_unused_output_and_skips_unneeded_inputs() -> None:
    q, k, v = _inputs()
    k.requires_grad_(False)
    o, _ = OP(q, k, v)
    with _Calls() as mode:
        o.sum().backward()
    bwd = [args for func, args in mode.calls if func is BACKWARD.default]
    assert len(bwd) == 1
    g_o, g_a, *_, needs = bwd[0]
    assert g_o is not None and g_a is None  # no zeros built for the unused a
    assert list(needs) == [True, False, True]
    # Nothing of k's gradient was computed: no matmul produced a (.., m, d) result.
    assert k.grad is None
    shapes = [
        tuple(r.shape)
        for func, args in mode.calls
        if func is torch.ops.aten.bmm.default or func is torch.ops.aten.mm.default
        for r in [func(*args)]
    ]
    assert (5, 4) not in shapes and (2, 5, 4) not in shapes


def test_backward_with_both_grads_absent_returns_none() -> None:
    from tanh_attention.ops import _attn_backward_rule

    class Ctx:
        needs_input_grad = (True, True, True, False)

    assert _attn_backward_rule(Ctx(), None, None) == (None,) * 6


def test_backward_placeholder_for_unneeded() -> None:
    q, k, v = _inputs()
    o, a = OP(q, k, v)
    g_q, g_k, g_v = BACKWARD(
        torch.ones_like(o), None, q, k, v, a, None, 1.0, False, [True, False, False]
    )
    assert g_q.shape == q.shape and g_k.numel() == 0 and g_v.numel() == 0


def test_third_order() -> None:
    """The backward of the backward is plain torch code, so one more order works."""
    q, k, v = (t.detach()[..., :2, :].clone().requires_grad_() for t in _inputs(batched=False))
    q = q.detach().requires_grad_()

    def f(q: torch.Tensor) -> torch.Tensor:
        o, a = OP(q, k, v, None, 0.7, True)
        (g,) = torch.autograd.grad((o.sin().sum() + a.square().sum()), q, create_graph=True)
        return g

    assert torch.autograd.gradgradcheck(f, (q,))


@pytest.mark.parametrize(
    "in_dims", [(0, None, None), (None, 0, 0), (1, 0, None), (0, 0, 0)], ids=str
)
def test_vmap_matches_loop(in_dims: tuple[int | None, ...]) -> None:
    size = 3
    base = [
        torch.randn(2, 4, dtype=F64),
        torch.randn(5, 4, dtype=F64),
        torch.randn(5, 3, dtype=F64),
    ]
    ins = [
        x
        if d is None
        else x.unsqueeze(d).expand(*x.shape[:d], size, *x.shape[d:]).contiguous()
        + torch.randn(*x.shape[:d], size, *x.shape[d:], dtype=F64)
        for x, d in zip(base, in_dims, strict=True)
    ]
    mask = torch.rand(2, 5) < 0.6
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the slow per-sample fallback warns
        o, a = torch.func.vmap(lambda q, k, v: OP(q, k, v, mask, 0.5, True), in_dims=in_dims)(*ins)
    for i in range(size):
        args = [x if d is None else x.select(d, i) for x, d in zip(ins, in_dims, strict=True)]
        o_i, a_i = reference(*args, mask, 0.5, True)
        torch.testing.assert_close(o[i], o_i)
        torch.testing.assert_close(a[i], a_i)


def test_vmap_of_backward_op_gives_per_sample_gradients() -> None:
    """vmap over grad_o with q, k, v shared: each sample gets its own gradients."""
    q, k, v = (t.detach() for t in _inputs(batched=False))
    _, a = OP(q, k, v)
    g_os = torch.randn(4, 3, 3, dtype=F64)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        grads = torch.func.vmap(
            lambda g: BACKWARD(g, None, q, k, v, a, None, 1.0, False, [True, True, True])
        )(g_os)
    for i in range(4):
        qi, ki, vi = (t.clone().requires_grad_() for t in (q, k, v))
        want = torch.autograd.grad(reference(qi, ki, vi)[0], (qi, ki, vi), g_os[i])
        for g, w in zip(grads, want, strict=True):
            torch.testing.assert_close(g[i], w)


def test_batched_grad_through_legacy_vmap() -> None:
    """autograd.grad(is_grads_batched=True) (used by jacobian(vectorize=True)) works."""
    q, k, v = _inputs()
    o, _ = OP(q, k, v)
    g_os = torch.randn(3, *o.shape, dtype=F64)
    (g,) = torch.autograd.grad(o, q, g_os, is_grads_batched=True)
    for i in range(3):
        (w,) = torch.autograd.grad(reference(q, k, v)[0], q, g_os[i])
        torch.testing.assert_close(g[i], w)


def test_forward_ad_gives_right_tangents() -> None:
    q, k, v = (t.detach() for t in _inputs())
    tq, tk, tv = torch.randn_like(q), torch.randn_like(k), torch.randn_like(v)
    mask = torch.rand(3, 5) < 0.6
    _, want = torch.func.jvp(lambda *x: reference(*x, mask, 0.4, True), (q, k, v), (tq, tk, tv))
    _, got = torch.func.jvp(lambda *x: OP(*x, mask, 0.4, True), (q, k, v), (tq, tk, tv))
    for g, w in zip(got, want, strict=True):
        assert g.abs().sum() > 0
        torch.testing.assert_close(g, w)
    _, (want_o, want_a) = torch.func.jvp(lambda x: reference(x, k, v, mask, 0.4, True), (q,), (tq,))
    with fwAD.dual_level():
        o, a = OP(fwAD.make_dual(q, tq), k, v, mask, 0.4, True)
        torch.testing.assert_close(fwAD.unpack_dual(o).tangent, want_o)
        torch.testing.assert_close(fwAD.unpack_dual(a).tangent, want_a)


def test_forward_over_reverse() -> None:
    q, k, v = _inputs()
    t = torch.randn_like(q)
    _, want = torch.func.jvp(
        lambda x: torch.func.grad(lambda y: reference(y, k, v)[0].sin().sum())(x),
        (q.detach(),),
        (t,),
    )
    with fwAD.dual_level():
        dual = fwAD.make_dual(q, t)
        (g,) = torch.autograd.grad(OP(dual, k, v)[0].sin().sum(), dual, create_graph=True)
        got = fwAD.unpack_dual(g).tangent
    torch.testing.assert_close(got, want)


@pytest.mark.parametrize("transform", ["grad", "jacrev", "hessian", "jvp_of_grad"])
def test_functorch_reverse_mode(transform: str) -> None:
    q, k, v = (t.detach() for t in _inputs())
    mask = torch.rand(3, 5) < 0.6

    def loss(f: Any) -> Any:
        return lambda q, k, v: (lambda o, a: o.sin().sum() + a.square().sum())(
            *f(q, k, v, mask, 0.6, True)
        )

    transforms = {
        "grad": lambda f: torch.func.grad(f, argnums=(0, 1, 2)),
        "jacrev": lambda f: torch.func.jacrev(f, argnums=(0, 1, 2)),
        "hessian": lambda f: torch.func.hessian(f, argnums=(0, 1)),
        "jvp_of_grad": lambda f: lambda *x: torch.func.jvp(
            torch.func.grad(f), x, tuple(torch.ones_like(y) for y in x)
        )[1],
    }
    got = transforms[transform](loss(OP))(q, k, v)
    want = transforms[transform](loss(reference))(q, k, v)
    torch.testing.assert_close(got, want)


def test_autocast_runs_in_bfloat16() -> None:
    q, k, v = (t.detach().float() for t in _inputs())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        o, a = OP(q, k, v)
    assert o.dtype == a.dtype == torch.bfloat16
    o_ref, _ = reference(*(t.bfloat16().double() for t in (q, k, v)))
    torch.testing.assert_close(o.double(), o_ref, atol=5e-2, rtol=2e-2)
