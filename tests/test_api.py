"""The public function under every context the contract lists.

Eager autograd is covered by test_opinfo.py (the "public" implementation); here: torch.func
transforms, torch.compile (with symbolic scales too), torch.export, autocast, need_weights,
broadcasting, the dispatcher (which backend runs, forcing one, the errors), and that the path
a call takes depends on its own inputs, not on what other threads do.
"""

from __future__ import annotations

import importlib
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from torch.autograd import forward_ad as fwAD
from torch.utils._python_dispatch import TorchDispatchMode

import tanh_attention
from samples import reference
from tanh_attention import attn

F64 = torch.float64
MASK = torch.tensor([[True, False, True, True, False]] * 3)


def _inputs() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    # q (2, 3, 4) shares k (5, 4) and v (1, 5, 2) across its batch
    return (
        torch.randn(2, 3, 4, dtype=F64),
        torch.randn(5, 4, dtype=F64),
        torch.randn(1, 5, 2, dtype=F64),
    )


def ours(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    o, a = attn(q, k, v, scale=0.6, causal=True, attn_mask=MASK)
    return o.sin().sum() + (a * a.cos()).sum()


def theirs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    o, a = reference(q, k, v, MASK, 0.6, True)
    return o.sin().sum() + (a * a.cos()).sum()


def _close(got: object, want: object) -> None:
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


TRANSFORMS: dict[str, Callable[[Callable[..., torch.Tensor]], Callable[..., object]]] = {
    "grad": lambda f: torch.func.grad(f, argnums=(0, 1, 2)),
    "jacrev": lambda f: torch.func.jacrev(f, argnums=(0, 1, 2)),
    "jacfwd": lambda f: torch.func.jacfwd(f, argnums=(0, 1, 2)),
    "hessian_q": lambda f: torch.func.hessian(f, argnums=0),
    "hessian_kv": lambda f: torch.func.hessian(f, argnums=(1, 2)),
    "jacrev_of_jacfwd": lambda f: torch.func.jacrev(torch.func.jacfwd(f, argnums=1), argnums=2),
    "vmap_grad": lambda f: torch.func.vmap(torch.func.grad(f), in_dims=(0, None, None)),
}


@pytest.mark.parametrize("name", TRANSFORMS, ids=str)
def test_torch_func_transforms(name: str) -> None:
    q, k, v = _inputs()
    _close(TRANSFORMS[name](ours)(q, k, v), TRANSFORMS[name](theirs)(q, k, v))


def test_vjp_and_jvp() -> None:
    q, k, v = _inputs()
    t = tuple(torch.randn_like(x) for x in (q, k, v))
    f = lambda *x: attn(*x, scale=0.6, causal=True)  # noqa: E731
    g = lambda *x: reference(*x, None, 0.6, True)  # noqa: E731
    out, fn = torch.func.vjp(f, q, k, v)
    out_ref, fn_ref = torch.func.vjp(g, q, k, v)
    cot = tuple(torch.randn_like(y) for y in out_ref)
    _close(out, out_ref)
    _close(fn(cot), fn_ref(cot))
    _close(torch.func.jvp(f, (q, k, v), t), torch.func.jvp(g, (q, k, v), t))


def test_vmap_matches_loop() -> None:
    q, k, v = _inputs()
    qs = torch.randn(4, *q.shape, dtype=F64)
    o, a = torch.func.vmap(lambda x: attn(x, k, v, causal=True))(qs)
    for i in range(4):
        _close((o[i], a[i]), reference(qs[i], k, v, None, 1.0, True))


def test_forward_ad_and_forward_over_reverse() -> None:
    q, k, v = (x.requires_grad_() for x in _inputs())
    tq = torch.randn_like(q)
    _, want = torch.func.jvp(
        lambda x: torch.func.grad(theirs)(x, k.detach(), v.detach()), (q.detach(),), (tq,)
    )
    with fwAD.dual_level():
        dq = fwAD.make_dual(q, tq)
        (g,) = torch.autograd.grad(ours(dq, k, v), dq, create_graph=True)
        got = fwAD.unpack_dual(g).tangent
    _close(got, want)


def test_forward_ad_without_weights_uses_the_memory_efficient_op() -> None:
    q, k, v = _inputs()
    t = tuple(torch.randn_like(x) for x in (q, k, v))
    with fwAD.dual_level():
        duals = [fwAD.make_dual(x, tx) for x, tx in zip((q, k, v), t, strict=True)]
        with _RecordOps() as seen:
            o, a = attn(*duals, causal=True, need_weights=False)
        got = fwAD.unpack_dual(o).tangent
    assert a is None and "tanh_attention.attn_lean.default" in seen.names
    assert "tanh_attention.attn.default" not in seen.names
    _, want = torch.func.jvp(lambda *x: reference(*x, None, 1.0, True)[0], (q, k, v), t)
    _close(got, want)


def test_plain_eager_runs_the_kernels_without_op_dispatch() -> None:
    """Plain eager calls skip the op's dispatch (ops._Eager); anything that traces or
    transforms (here a dispatch mode, as fake tensors and export use) gets the op."""
    q, k, v = (x.requires_grad_() for x in _inputs())
    o, _ = attn(q, k, v)
    assert type(o.grad_fn).__name__ == "_EagerBackward"
    with _RecordOps() as recorded:
        o_op, _ = attn(q, k, v)
    assert "tanh_attention.attn.default" in recorded.names
    assert "tanh_attention_attn" in type(o_op.grad_fn).__name__
    torch.testing.assert_close(o, o_op, rtol=0, atol=0)


class _RecordOps(TorchDispatchMode):
    """Records the name of every op dispatched below it (custom ops included)."""

    def __init__(self) -> None:
        super().__init__()
        self.names: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        self.names.append(str(func))
        return func(*args, **(kwargs or {}))


def test_path_does_not_follow_other_threads_forward_ad_level() -> None:
    """While one thread sits in a dual level, another thread's o-only call stays on the
    memory-efficient op (it used to read the process-wide level and build the n x m weights)."""
    inside, leave = threading.Event(), threading.Event()

    def hold_a_dual_level() -> None:
        with fwAD.dual_level():
            fwAD.make_dual(torch.ones(2), torch.ones(2))
            inside.set()
            leave.wait(timeout=30)

    holder = threading.Thread(target=hold_a_dual_level)
    holder.start()
    try:
        assert inside.wait(timeout=30)
        q, k, v = (x.requires_grad_() for x in _inputs())
        with _RecordOps() as seen:
            o, a = attn(q, k, v, causal=True, need_weights=False)
            o.sum().backward()
    finally:
        leave.set()
        holder.join(timeout=30)
    assert a is None
    assert "tanh_attention.attn_lean.default" in seen.names
    assert not any(name.startswith("tanh_attention.attn.") for name in seen.names)
    assert not any(name.removeprefix("aten.") == "tanh.default" for name in seen.names)
    _close(q.grad, torch.autograd.grad(reference(q, k, v, None, 1.0, True)[0].sum(), q)[0])


def test_threads_agree() -> None:
    """Calls from several threads at once, one inside a forward-AD level (torch allows one
    level at a time), some under vmap, give the answers each gives alone."""
    q, k, v = _inputs()
    v = v[0]
    want = reference(q, k, v, MASK, 0.6, True)
    errors: list[BaseException] = []

    def work(i: int) -> None:
        try:
            for _ in range(5):
                if i == 0:
                    with fwAD.dual_level():
                        dq = fwAD.make_dual(q, torch.ones_like(q))
                        o, a = attn(dq, k, v, scale=0.6, causal=True, attn_mask=MASK)
                        o, a = fwAD.unpack_dual(o).primal, fwAD.unpack_dual(a).primal
                elif i % 3 == 1:
                    o, a = torch.func.vmap(
                        lambda x: attn(x, k, v, scale=0.6, causal=True, attn_mask=MASK)
                    )(q)
                else:
                    o, a = attn(q, k, v, scale=0.6, causal=True, attn_mask=MASK)
                _close((o, a), want)
        except BaseException as err:  # reported in the main thread
            errors.append(err)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not errors, errors[0]


def test_dispatcher_picks_the_first_backend_that_fits() -> None:
    q, k, v = _inputs()
    names = [b.name for b in tanh_attention.backends()]
    assert names.index("cpu") < names.index("composite")
    with _RecordOps() as seen:
        attn(q, k, v)
    assert "tanh_attention.attn.default" in seen.names
    with _RecordOps() as seen:
        attn(q, k, v, backend="composite")
    assert not any(name.startswith("tanh_attention.attn.") for name in seen.names)


def test_forced_backend_that_cannot_run_lists_why() -> None:
    q, k, v = _inputs()
    with pytest.raises(ValueError, match=r"backend='triton' cannot run this call .*") as err:
        attn(q, k, v, backend="triton")
    assert "takes cuda tensors, got cpu" in str(err.value)
    with pytest.raises(ValueError, match="unknown backend 'nope'"):
        attn(q, k, v, backend="nope")
    with pytest.raises(TypeError, match="argument 'backend'"):
        attn(q, k, v, backend=3)  # type: ignore[call-overload]


def test_no_backend_fits_lists_every_reason(monkeypatch: pytest.MonkeyPatch) -> None:
    # The subpackage, not the function tanh_attention.backends that shares its name.
    registry = importlib.import_module("tanh_attention.backends")

    class Picky(registry.Backend):
        name = "picky"
        description = "takes nothing"
        device_types = frozenset({"cpu"})

        def not_supported_reasons(self, inputs: registry.Inputs) -> list[str]:
            return ["never"]

    monkeypatch.setattr(registry, "_REGISTRY", [Picky(), registry.get("triton")])
    q, k, v = _inputs()
    with pytest.raises(ValueError, match="no backend can run this call") as err:
        attn(q, k, v)
    assert "picky: never" in str(err.value) and "triton:" in str(err.value)


def test_backends_declare_what_they_support() -> None:
    q, k, v = _inputs()
    for b in tanh_attention.backends():
        assert b.name and b.description and b.device_types
        assert isinstance(b.not_supported_reasons(_call(q, k, v)), list)
    cpu = tanh_attention.backends()[[b.name for b in tanh_attention.backends()].index("cpu")]
    assert cpu.not_supported_reasons(_call(q, k, v)) == []
    assert cpu.not_supported_reasons(_call(q.to("meta"), k.to("meta"), v.to("meta"))) == [
        "takes cpu tensors, got meta"
    ]


def _call(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> object:
    from tanh_attention._checks import validate_attn_inputs
    from tanh_attention.backends import Inputs

    return Inputs(q, k, v, None, 1.0, "none", True, validate_attn_inputs(q, k, v))


def test_broadcast_gradients_summed_to_input_shapes() -> None:
    q, k, v = (x.requires_grad_() for x in _inputs())
    o, a = attn(q, k, v)
    assert o.shape == (2, 3, 2) and a.shape == (2, 3, 5)
    g = torch.autograd.grad((o.sum(), a.sum()), (q, k, v))
    want = torch.autograd.grad(sum(y.sum() for y in reference(q, k, v)), (q, k, v))
    assert [x.shape for x in g] == [q.shape, k.shape, v.shape]
    _close(g, want)


def test_need_weights_false() -> None:
    q, k, v = (x.requires_grad_() for x in _inputs())
    o, a = attn(q, k, v, need_weights=False, causal=True)
    assert a is None
    o_ref, _ = reference(q, k, v, None, 1.0, True)
    _close(o, o_ref)
    _close(
        torch.autograd.grad(o.square().sum(), (q, k, v)),
        torch.autograd.grad(o_ref.square().sum(), (q, k, v)),
    )


def test_autocast_bfloat16_matches_composite() -> None:
    q, k, v = (x.float() for x in _inputs())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        o, a = attn(q, k, v, causal=True)
        o_ref, a_ref = torch.ops.tanh_attention.attn_composite(q, k, v, None, 1.0, "top_left")
    assert o.dtype == o_ref.dtype == torch.bfloat16
    torch.testing.assert_close(o, o_ref, rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(a, a_ref, rtol=2e-2, atol=2e-2)


def _compiled_grads(backend: str) -> None:
    q, k, v = (x.requires_grad_() for x in _inputs())
    torch._dynamo.reset()
    compiled = torch.compile(ours, backend=backend, fullgraph=True)
    loss = compiled(q, k, v)
    _close(loss, theirs(q, k, v))
    _close(torch.autograd.grad(loss, (q, k, v)), torch.autograd.grad(theirs(q, k, v), (q, k, v)))


def test_compile_aot_eager() -> None:
    _compiled_grads("aot_eager")


@pytest.mark.slow
def test_compile_inductor() -> None:
    _compiled_grads("inductor")


def test_compile_keeps_op_in_graph() -> None:
    from torch._dynamo.testing import EagerAndRecordGraphs

    backend = EagerAndRecordGraphs()
    torch._dynamo.reset()
    torch.compile(lambda *x: attn(*x, causal=True), backend=backend, fullgraph=True)(*_inputs())
    code = backend.graphs[0].code
    assert "tanh_attention.attn" in code


class _Model(torch.nn.Module):
    def forward(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        return attn(q, k, v, scale=0.5, causal=True)


@pytest.mark.slow
def test_export_round_trip(tmp_path: Path) -> None:
    args = _inputs()
    ep = torch.export.export(_Model(), args)
    targets = [n.target for n in ep.graph.nodes if n.op == "call_function"]
    assert torch.ops.tanh_attention.attn.default in targets
    torch.export.save(ep, tmp_path / "attn.pt2")
    loaded = torch.export.load(tmp_path / "attn.pt2")
    fresh = tuple(torch.randn_like(x) for x in args)
    _close(loaded.module()(*fresh), reference(*fresh, None, 0.5, True))


@pytest.mark.parametrize("need_weights", [True, False])
def test_compiled_backward_with_noncontiguous_inputs(need_weights: bool) -> None:
    """Fake kernels must describe the real gradients' strides (transposed heads, as in a layer)."""
    x = torch.randn(2, 5, 8, dtype=F64, requires_grad=True)

    def f(x: torch.Tensor) -> torch.Tensor:
        q = x.view(2, 5, 2, 4).transpose(1, 2)  # (2, 2, 5, 4), not contiguous
        return attn(q, q, q, causal=True, need_weights=need_weights)[0].sin().sum()

    torch._dynamo.reset()
    loss = torch.compile(f, fullgraph=True, backend="aot_eager")(x)
    (got,) = torch.autograd.grad(loss, x)
    (want,) = torch.autograd.grad(
        reference(*(x.view(2, 5, 2, 4).transpose(1, 2),) * 3, None, 1.0, True)[0].sin().sum(), x
    )
    _close(got, want)


@pytest.mark.parametrize("need_weights", [True, False])
def test_compile_dynamic_symbolic_scale(need_weights: bool) -> None:
    """scale = d ** -0.5 with dynamic shapes, and a float scale that becomes dynamic on the
    second call: validation must trace (it raised "Unsupported ... isfinite")."""

    def f(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        o, _ = attn(q, k, v, scale=q.shape[-1] ** -0.5, causal=True, need_weights=need_weights)
        return o

    def g(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
        return attn(q, k, v, scale=scale, need_weights=need_weights)[0]

    torch._dynamo.reset()
    compiled = torch.compile(f, dynamic=True, fullgraph=True, backend="aot_eager")
    for d in (4, 6):
        q, k, v = (torch.randn(2, 3, d, dtype=F64) for _ in range(3))
        _close(compiled(q, k, v), reference(q, k, v, None, d**-0.5, True)[0])
    compiled_g = torch.compile(g, fullgraph=True, backend="aot_eager")
    q, k, v = _inputs()
    for scale in (0.5, 0.25, 3.0):
        _close(compiled_g(q, k, v, scale), reference(q, k, v, None, scale, False)[0])


def test_compiled_layer_dynamic() -> None:
    from tanh_attention.nn import MultiheadTanhAttention

    layer = MultiheadTanhAttention(8, 2, batch_first=True, dtype=F64)
    torch._dynamo.reset()
    compiled = torch.compile(layer, dynamic=True, fullgraph=True, backend="aot_eager")
    for length in (3, 5):
        x = torch.randn(2, length, 8, dtype=F64)
        got, _ = compiled(x, x, x, need_weights=False)
        want, _ = layer(x, x, x, need_weights=False)
        _close(got, want)


def test_bias_and_dropout_on_every_backend_or_a_reason() -> None:
    q, k, v = (x.requires_grad_() for x in _inputs())
    bias = torch.randn(3, 5, dtype=F64, requires_grad=True)
    for b in tanh_attention.backends():
        if not b.available:
            continue
        if not b.supports_bias:
            with pytest.raises(ValueError, match="does not take an additive bias"):
                attn(q, k, v, bias=bias, backend=b.name)
            continue
        o, a = attn(q, k, v, bias=bias, causal="bottom_right", backend=b.name)
        keep = torch.ones(3, 5, dtype=torch.bool).tril(2)
        a_ref = torch.tanh(torch.where(keep, q @ k.mT + bias, torch.zeros((), dtype=F64)))
        _close((o, a), (a_ref @ v, a_ref))

        def f(*x: torch.Tensor, name: str = b.name) -> torch.Tensor:
            return attn(*x[:3], bias=x[3], backend=name)[0]

        assert torch.autograd.gradcheck(f, (q, k, v, bias))
        assert torch.autograd.gradgradcheck(f, (q, k, v, bias))
    identity = torch.eye(5, dtype=F64)  # o = the weights after dropout: the mask shows
    for b in tanh_attention.backends():
        if not b.available:
            continue
        if not b.supports_dropout:
            with pytest.raises(ValueError, match="does not do dropout"):
                attn(q, k, v, dropout_p=0.5, backend=b.name)
            continue
        dropped, _ = attn(q, k, identity, dropout_p=0.5, backend=b.name)
        kept = dropped != 0
        assert 0 < kept.sum() < kept.numel()
        a_ref = torch.tanh(q @ k.mT) * kept / 0.5
        torch.testing.assert_close(dropped, a_ref.expand_as(dropped))
    o, _ = attn(q, k, v, bias=bias)  # the dispatcher finds the backend that takes it
    torch.testing.assert_close(o, torch.tanh(q @ k.mT + bias) @ v)


class _Biased(torch.nn.Module):
    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, b: torch.Tensor) -> Any:
        return tanh_attention.scaled_dot_product_attention(q, k, v, b)


@pytest.mark.slow
def test_export_with_bias(tmp_path: Path) -> None:
    q, k, v = (torch.randn(2, 3, 4, dtype=F64) for _ in range(3))
    bias = torch.randn(3, 3, dtype=F64).masked_fill(torch.ones(3, 3).triu(1).bool(), -torch.inf)
    ep = torch.export.export(_Biased(), (q, k, v, bias))
    torch.export.save(ep, tmp_path / "sdpa.pt2")
    got = torch.export.load(tmp_path / "sdpa.pt2").module()(q, k, v, bias)
    keep = bias > -torch.inf
    want = torch.tanh(torch.where(keep, q @ k.mT / 2 + bias, torch.zeros((), dtype=F64))) @ v
    _close(got, want)
