"""Stage 4 specifics: the two op pairs ``attn`` / ``attn_backward`` (with weights) and
``attn_lean`` / ``attn_lean_backward`` (o only), both declared by ``ops.declare_op_pair``.

opcheck (schema, autograd registration, fake tensors, AOT dispatch) on both pairs, forward and
backward, plain and with a mask and each causal variant; what the backward saves and skips;
its outputs own their memory; no work before an error; vmap rules against a per-sample loop;
legacy batched gradients; forward AD, forward-over-reverse and torch.func reverse mode
through the registered op itself; third order; autocast. The lean pair's own transforms are
in test_kernels.py. Every oracle is the float64 ``reference`` of samples.py.
"""

from __future__ import annotations

import warnings
from typing import Any

import pytest
import torch
from torch import Tensor
from torch.autograd import forward_ad as fwAD
from torch.utils._python_dispatch import TorchDispatchMode

import tanh_attention
from samples import reference
from tanh_attention import ops
from tanh_attention.kernels import memory

OP = torch.ops.tanh_attention.attn
BACKWARD = torch.ops.tanh_attention.attn_backward
LEAN = torch.ops.tanh_attention.attn_lean
LEAN_BACKWARD = torch.ops.tanh_attention.attn_lean_backward
F64 = torch.float64
PAIRS = {"attn": ops.attn, "attn_lean": ops.attn_lean}
pairs = pytest.mark.parametrize("pair", PAIRS.values(), ids=PAIRS.keys())


def _inputs(batched: bool = True, n: int = 3) -> tuple[Tensor, Tensor, Tensor]:
    q = torch.randn((2, n, 4) if batched else (n, 4), dtype=F64, requires_grad=True)
    k = torch.randn(5, 4, dtype=F64, requires_grad=True)
    v = torch.randn(5, 3, dtype=F64, requires_grad=True)
    return q, k, v


# The Python bodies of the ops' CPU kernels: a TorchDispatchMode sees a custom op as one call,
# and runs it below itself; running the body with the mode active shows the ops it runs.
_BODIES = {
    op._opoverload: op._backend_fns["cpu"]
    for pair in PAIRS.values()
    for op in (pair.forward, pair.backward)
}


class _Calls(TorchDispatchMode):
    """Records every op called, with its arguments and result, also inside our ops' bodies."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[Any, tuple[Any, ...], Any]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        kwargs = kwargs or {}
        if func in _BODIES:
            self.calls.append((func, args, None))
            with self:
                return _BODIES[func](*args, **kwargs)
        out = func(*args, **kwargs)
        self.calls.append((func, args, out))
        return out

    def aten(self) -> list[Any]:
        return [func for func, _, _ in self.calls if func not in _BODIES]


# (mask shape or None, scale, causal, rows n): with n = 7 > m = 5, bottom_right leaves rows
# 0 and 1 with no key.
OPCHECK_CASES = {
    "plain": (None, 1.0, "none", 3),
    "mask_top_left": ((3, 5), 0.5, "top_left", 3),
    "mask_bottom_right_n_gt_m": ((2, 7, 5), -0.7, "bottom_right", 7),
}
opcheck_cases = pytest.mark.parametrize(
    ("mask_shape", "scale", "causal", "n"), OPCHECK_CASES.values(), ids=OPCHECK_CASES.keys()
)


def _mask(shape: tuple[int, ...] | None) -> Tensor | None:
    return None if shape is None else torch.rand(shape) < 0.6


@opcheck_cases
@pairs
def test_opcheck_forward(
    pair: ops.OpPair, mask_shape: Any, scale: float, causal: str, n: int
) -> None:
    q, k, v = _inputs(n=n)
    extra = () if mask_shape is None else (_mask(mask_shape), scale, causal)
    torch.library.opcheck(pair.forward, (q, k, v, *extra))


@pytest.mark.parametrize("needs", [[True, True, True], [True, False, False], [False, False, True]])
@opcheck_cases
@pairs
def test_opcheck_backward(
    pair: ops.OpPair, mask_shape: Any, scale: float, causal: str, n: int, needs: list[bool]
) -> None:
    q, k, v = _inputs(n=n)
    mask = _mask(mask_shape)
    o, a = OP(q, k, v, mask, scale, causal)
    g_o, g_a = torch.randn_like(o), torch.randn_like(a)
    if pair.weights:
        a = a.detach()
        torch.library.opcheck(pair.backward, (g_o, g_a, q, k, v, a, mask, scale, causal, needs))
        torch.library.opcheck(pair.backward, (g_o, None, q, k, v, a, mask, scale, causal, needs))
    else:  # no weights saved: a is None, recomputed block by block
        torch.library.opcheck(pair.backward, (g_o, None, q, k, v, None, mask, scale, causal, needs))


@pytest.mark.parametrize("masked", [False, True], ids=["plain", "mask_causal"])
def test_saves_inputs_and_a_never_x(masked: bool) -> None:
    q, k, v = _inputs()
    mask = torch.rand(3, 5) < 0.6 if masked else None
    saved: list[Tensor] = []

    def pack(t: Tensor) -> Tensor:
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        _, a = OP(q, k, v, mask, 0.5, "bottom_right" if masked else "none")
    given = (q, k, v, a) if mask is None else (q, k, v, mask, a)
    assert len(saved) == len(given)
    assert {t.data_ptr() for t in saved} == {t.data_ptr() for t in given}
    # The only saved tensor of a's size is a itself: never x = scale * q @ k^T.
    assert [t.data_ptr() for t in saved if t.shape == a.shape] == [a.data_ptr()]


def test_backward_gets_none_for_unused_output_and_skips_unneeded_inputs() -> None:
    q, k, v = _inputs()
    k.requires_grad_(False)
    o, _ = OP(q, k, v)
    with _Calls() as mode:
        o.sum().backward()
    bwd = [args for func, args, _ in mode.calls if func is BACKWARD.default]
    assert len(bwd) == 1
    g_o, g_a, *_, needs = bwd[0]
    assert g_o is not None and g_a is None  # no zeros built for the unused a
    assert list(needs) == [True, False, True]
    assert k.grad is None

    def k_shaped_products(calls: list[Any]) -> list[Any]:
        """Matrix products (as the kernels run them) with a result of k's (m, d) shape."""
        products = {
            "bmm", "mm", "matmul", "baddbmm", "baddbmm_", "addmm", "addmm_", "_linear_pointwise"
        }  # fmt: skip
        return [
            func
            for func, args, out in calls
            if func.__name__.split(".")[0] in products
            and tuple((out if out is not None else args[0]).shape[-2:]) == (5, 4)
        ]

    # Nothing of k's gradient was computed: no product made an (m, d) result ...
    assert len(mode.aten()) > 5  # the mode saw the kernel's ops
    assert k_shaped_products(mode.calls) == []
    # ... which the check would have seen.
    k.requires_grad_()
    o, _ = OP(q, k, v)
    with _Calls() as mode:
        o.sum().backward()
    assert k_shaped_products(mode.calls) != []


@pairs
def test_backward_with_both_grads_absent_returns_none(pair: ops.OpPair) -> None:
    """The registered autograd formula returns no gradient, and does no work, without any
    output gradient (``set_materialize_grads(False)`` passes None, not zeros)."""

    class Ctx:
        needs_input_grad = (True, True, True, False, False, False)

    grads = (None, None) if pair.weights else (None,)
    with _Calls() as mode:
        inputs = len(pair.forward._opoverload._schema.arguments)  # q, k, v, ..., dropout_seed
        assert pair.forward._backward_fn(Ctx(), *grads) == (None,) * inputs
    assert mode.calls == []


@pairs
def test_backward_placeholder_for_unneeded(pair: ops.OpPair) -> None:
    q, k, v = _inputs()
    o, a = OP(q, k, v)
    saved = a if pair.weights else None
    g_q, g_k, g_v = pair.backward(
        torch.ones_like(o), None, q, k, v, saved, None, 1.0, "none", [True, False, False]
    )
    assert g_q.shape == q.shape and g_k.shape == (0,) and g_v.shape == (0,)
    want = torch.autograd.grad(reference(q, k, v)[0], q, torch.ones_like(o))[0]
    torch.testing.assert_close(g_q, want)


def test_lean_backward_refuses_grad_a_without_weights() -> None:
    q, k, v = (t.detach() for t in _inputs())
    g_o, g_a = torch.ones(2, 3, 3, dtype=F64), torch.ones(2, 3, 5, dtype=F64)
    with pytest.raises(ValueError, match="grad_a needs the saved weights"):
        LEAN_BACKWARD(g_o, g_a, q, k, v, None, None, 1.0, "none", [True, True, True])


# (q, k, v) shapes; "batch": a keeps one copy along v's own batch dims
OWN_MEMORY = {
    "same_batch": ((2, 3, 4), (2, 5, 4), (2, 5, 2)),
    "shared_kv": ((2, 3, 4), (5, 4), (5, 2)),
    "v_batch": ((2, 1, 3, 4), (5, 4), (3, 5, 2)),
    "v_leading_one": ((3, 4), (5, 4), (1, 5, 2)),
}
SUMMED = {name: s for name, s in OWN_MEMORY.items() if name != "same_batch"}
own_memory_cases = pytest.mark.parametrize("shapes", OWN_MEMORY.values(), ids=OWN_MEMORY.keys())


def _op_outputs(pair: ops.OpPair, shapes: Any, causal: str, dtype: torch.dtype) -> Any:
    """``(o, a or None)`` of the forward op and the backward op's ``(g_q, g_k, g_v)``."""
    q, k, v = (torch.randn(s, dtype=dtype) for s in shapes)
    mask = torch.rand(3, 5) < 0.7
    out = pair.forward(q, k, v, mask, 0.5, causal)
    o, a = out if pair.weights else (out, None)
    g_a = None if a is None else torch.randn_like(a)
    grads = pair.backward(
        torch.randn_like(o), g_a, q, k, v, a, mask, 0.5, causal, [True, True, True]
    )
    return (o, a), grads


@own_memory_cases
@pytest.mark.parametrize("causal", ["none", "top_left", "bottom_right"])
@pairs
def test_outputs_own_their_memory(pair: ops.OpPair, causal: str, shapes: Any) -> None:
    """No output of a forward op is a view of an internal buffer, in float64 and in float16
    (computed in float32); nor of a backward op where no gradient is summed over batch dims."""
    for dtype in (F64, torch.float16):
        outputs, grads = _op_outputs(pair, shapes, causal, dtype)
        for name, t in zip(("o", "a"), outputs, strict=True):
            assert t is None or t._base is None, (name, dtype)
        if shapes == OWN_MEMORY["same_batch"]:
            assert all(g._base is None for g in grads), dtype


@pytest.mark.parametrize("shapes", SUMMED.values(), ids=SUMMED.keys())
@pairs
def test_backward_outputs_own_their_memory_when_summed(pair: ops.OpPair, shapes: Any) -> None:
    """The backward ops' gradients are no views either where one is summed over batch dims
    (shared k: g_k summed over q's heads; v's leading 1: g_q and g_k)."""
    _, grads = _op_outputs(pair, shapes, "top_left", F64)
    views = [
        name for name, g in zip(("g_q", "g_k", "g_v"), grads, strict=True) if g._base is not None
    ]
    assert views == []


@pairs
def test_no_work_before_an_error(pair: ops.OpPair) -> None:
    """A bad call of a forward op raises ValueError/TypeError before any aten op runs. The
    recording sees every aten op, also inside the op's real body (the blockwise kernels),
    wherever the validation happens (the Autograd kernel, the body)."""
    q, k, v = (t.detach() for t in _inputs())
    bad = {
        "feature sizes": ((q, torch.randn(5, 3, dtype=F64), v, None, 1.0, "none"), ValueError),
        "causal": ((q, k, v, None, 1.0, "diagonal"), ValueError),
        "scale": ((q, k, v, None, float("inf"), "none"), ValueError),
        "float mask": ((q, k, v, torch.zeros(3, 5), 1.0, "none"), TypeError),
        "mask shape": ((q, k, v, torch.ones(4, 5, dtype=torch.bool), 1.0, "none"), ValueError),
        "dtype": ((q, k, v.float(), None, 1.0, "none"), TypeError),
    }
    for name, (args, error) in bad.items():
        with _Calls() as mode, pytest.raises(error):
            pair.forward(*args)
        assert mode.aten() == [], (name, mode.aten())
    with _Calls() as mode:  # the recording has teeth: a good call shows the kernel's ops
        pair.forward(q, k, v, None, 1.0, "top_left")
    assert any(func == pair.forward._opoverload for func, _, _ in mode.calls)
    assert len(mode.aten()) >= 3  # two products and a tanh at the least


@pairs
def test_backward_op_no_work_before_an_error(pair: ops.OpPair) -> None:
    """The same for a backward op, in a process whose kernels have not run yet."""
    q, v = (t.detach() for t in _inputs()[::2])
    bad_k = torch.randn(5, 3, dtype=F64)  # feature size 3, q's is 4
    g_o = torch.ones(2, 3, 3, dtype=F64)
    memory.warm_heap.cache_clear()
    try:
        with _Calls() as mode, pytest.raises(ValueError):
            pair.backward(g_o, None, q, bad_k, v, None, None, 1.0, "none", [True, True, True])
    finally:
        memory.warm_heap()
    assert mode.aten() == [], mode.aten()


def test_third_order() -> None:
    """The backward of the backward is plain torch code, so one more order works."""
    q, k, v = (t.detach()[..., :2, :].clone().requires_grad_() for t in _inputs(batched=False))
    q = q.detach().requires_grad_()

    def f(q: Tensor) -> Tensor:
        o, a = OP(q, k, v, None, 0.7, "top_left")
        (g,) = torch.autograd.grad((o.sin().sum() + a.square().sum()), q, create_graph=True)
        return g

    assert torch.autograd.gradgradcheck(f, (q,))


@pytest.mark.parametrize("causal", ["top_left", "bottom_right"])
@pytest.mark.parametrize(
    "in_dims", [(0, None, None), (None, 0, 0), (1, 0, None), (0, 0, 0)], ids=str
)
def test_vmap_matches_loop(in_dims: tuple[int | None, ...], causal: str) -> None:
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
        o, a = torch.func.vmap(lambda q, k, v: OP(q, k, v, mask, 0.5, causal), in_dims=in_dims)(
            *ins
        )
    for i in range(size):
        args = [x if d is None else x.select(d, i) for x, d in zip(ins, in_dims, strict=True)]
        o_i, a_i = reference(*args, mask, 0.5, causal)
        torch.testing.assert_close(o[i], o_i)
        torch.testing.assert_close(a[i], a_i)


@pairs
def test_vmap_of_backward_op_gives_per_sample_gradients(pair: ops.OpPair) -> None:
    """vmap over grad_o with q, k, v shared: each sample gets its own gradients."""
    q, k, v = (t.detach() for t in _inputs(batched=False))
    _, a = OP(q, k, v, None, 1.0, "bottom_right")
    saved = a if pair.weights else None
    g_os = torch.randn(4, 3, 3, dtype=F64)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        grads = torch.func.vmap(
            lambda g: pair.backward(
                g, None, q, k, v, saved, None, 1.0, "bottom_right", [True, True, True]
            )
        )(g_os)
    for i in range(4):
        qi, ki, vi = (t.clone().requires_grad_() for t in (q, k, v))
        o_i = reference(qi, ki, vi, None, 1.0, "bottom_right")[0]
        want = torch.autograd.grad(o_i, (qi, ki, vi), g_os[i])
        for g, w in zip(grads, want, strict=True):
            torch.testing.assert_close(g[i], w)


@pairs
def test_batched_grad_through_legacy_vmap(pair: ops.OpPair) -> None:
    """autograd.grad(is_grads_batched=True) (used by jacobian(vectorize=True)) works."""
    q, k, v = _inputs()
    mask = torch.rand(3, 5) < 0.6
    out = pair.forward(q, k, v, mask, 0.8, "top_left")
    o = out[0] if pair.weights else out
    g_os = torch.randn(3, *o.shape, dtype=F64)
    (g,) = torch.autograd.grad(o, q, g_os, is_grads_batched=True)
    for i in range(3):
        (w,) = torch.autograd.grad(reference(q, k, v, mask, 0.8, "top_left")[0], q, g_os[i])
        torch.testing.assert_close(g[i], w)


def test_forward_ad_gives_right_tangents() -> None:
    q, k, v = (t.detach() for t in _inputs())
    tq, tk, tv = torch.randn_like(q), torch.randn_like(k), torch.randn_like(v)
    mask = torch.rand(3, 5) < 0.6
    for causal in ("top_left", "bottom_right"):
        _, want = torch.func.jvp(
            lambda *x, c=causal: reference(*x, mask, 0.4, c), (q, k, v), (tq, tk, tv)
        )
        _, got = torch.func.jvp(lambda *x, c=causal: OP(*x, mask, 0.4, c), (q, k, v), (tq, tk, tv))
        for g, w in zip(got, want, strict=True):
            assert g.abs().sum() > 0
            torch.testing.assert_close(g, w)
        _, (want_o, want_a) = torch.func.jvp(
            lambda x, c=causal: reference(x, k, v, mask, 0.4, c), (q,), (tq,)
        )
        with fwAD.dual_level():
            o, a = OP(fwAD.make_dual(q, tq), k, v, mask, 0.4, causal)
            torch.testing.assert_close(fwAD.unpack_dual(o).tangent, want_o)
            torch.testing.assert_close(fwAD.unpack_dual(a).tangent, want_a)


@pairs
def test_forward_over_reverse(pair: ops.OpPair) -> None:
    q, k, v = _inputs()
    t = torch.randn_like(q)

    def o_of(*args: Any) -> Tensor:
        out = pair.forward(*args)
        return out[0] if pair.weights else out

    _, want = torch.func.jvp(
        lambda x: torch.func.grad(
            lambda y: reference(y, k, v, None, 0.9, "top_left")[0].sin().sum()
        )(x),
        (q.detach(),),
        (t,),
    )
    with fwAD.dual_level():
        dual = fwAD.make_dual(q, t)
        loss = o_of(dual, k, v, None, 0.9, "top_left").sin().sum()
        (g,) = torch.autograd.grad(loss, dual, create_graph=True)
        got = fwAD.unpack_dual(g).tangent
    torch.testing.assert_close(got, want)


@pytest.mark.parametrize("transform", ["grad", "jacrev", "hessian", "jvp_of_grad"])
def test_functorch_reverse_mode(transform: str) -> None:
    q, k, v = (t.detach() for t in _inputs())
    mask = torch.rand(3, 5) < 0.6

    def loss(f: Any) -> Any:
        return lambda q, k, v: (lambda o, a: o.sin().sum() + a.square().sum())(
            *f(q, k, v, mask, 0.6, "bottom_right")
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


# The registered ops each backend runs; a new backend must add its ops here (the test below
# fails for an available backend that has no entry).
BACKEND_OPS = {
    "cpu": ("attn", "attn_lean"),
    "composite": ("attn_composite",),
}


@pytest.mark.parametrize("causal", ["none", "top_left", "bottom_right"])
def test_opcheck_every_backends_ops(causal: str) -> None:
    q = torch.randn(2, 3, 4, dtype=F64, requires_grad=True)
    k = torch.randn(5, 4, dtype=F64, requires_grad=True)
    v = torch.randn(5, 2, dtype=F64, requires_grad=True)
    mask = torch.rand(3, 5, generator=torch.Generator().manual_seed(1)) < 0.7
    for backend in tanh_attention.backends():
        if not backend.available:
            continue
        assert backend.name in BACKEND_OPS, f"no opcheck entry for backend {backend.name!r}"
        for name in BACKEND_OPS[backend.name]:
            op = getattr(torch.ops.tanh_attention, name).default
            torch.library.opcheck(op, (q, k, v, mask, 0.5, causal))
