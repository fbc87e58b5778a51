"""The public function under every context the contract lists.

Eager autograd is covered by test_opinfo.py (the "public" implementation); here: torch.func
transforms, torch.compile, torch.export, autocast, need_weights, broadcasting, and which
implementation each context picks.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from torch.autograd import forward_ad as fwAD

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
        assert tanh_attention.implementation() == "function"
        dq = fwAD.make_dual(q, tq)
        (g,) = torch.autograd.grad(ours(dq, k, v), dq, create_graph=True)
        got = fwAD.unpack_dual(g).tangent
    _close(got, want)


def test_implementation_choice() -> None:
    assert tanh_attention.implementation() == "op"
    seen: list[str] = []

    def f(x: torch.Tensor) -> torch.Tensor:
        seen.append(tanh_attention.implementation())
        return x

    torch.func.vmap(f)(torch.ones(2, 1))
    assert seen == ["function"]


def test_eager_uses_registered_op() -> None:
    q, k, v = (x.requires_grad_() for x in _inputs())
    o, _ = attn(q, k, v)
    assert "tanh_attention_attn" in type(o.grad_fn).__name__


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
        o_ref, a_ref = torch.ops.tanh_attention.attn_composite(q, k, v, None, 1.0, True)
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
