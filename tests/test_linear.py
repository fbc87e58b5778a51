"""tanh_attention.linear: F.linear's results and gradients, by oneDNN or by torch.

Both ways are forced (the probe picks one per machine; each must be right wherever it runs)
and checked against float64 products written here."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from tanh_attention import linear as linear_module
from tanh_attention.linear import linear
from tanh_attention.nn import MultiheadTanhAttention

F64 = torch.float64
TOL = {"rtol": 1e-4, "atol": 1e-4}


@pytest.fixture(params=["onednn", "torch"])
def way(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> tuple[str, list[int]]:
    """Force the method; returns it and a list that grows by one per oneDNN product."""
    monkeypatch.setattr(linear_module, "product_method", lambda dtype: (request.param, "test"))
    monkeypatch.setattr(linear_module, "_MIN_ENTRIES", 0)
    calls: list[int] = []
    product = linear_module._mm
    monkeypatch.setattr(linear_module, "_mm", lambda x, w: calls.append(1) or product(x, w))
    return request.param, calls


def _reference(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    out = x.double() @ w.double().T
    return out if b is None else out + b.double()


@pytest.mark.parametrize("x_shape", [(7,), (5, 7), (2, 3, 7), (3, 1, 4, 7)], ids=str)
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no_bias"])
@pytest.mark.parametrize("layout", ["contiguous", "transposed"])
def test_forward_and_gradients(
    x_shape: Any, bias: bool, layout: str, way: tuple[str, list[int]]
) -> None:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(x_shape, generator=gen)
    if layout == "transposed" and x.dim() >= 2:
        x = x.mT.contiguous().mT  # the same values, strided
    w = torch.randn(6, 7, generator=gen)
    b = torch.randn(6, generator=gen) if bias else None
    leaves = [t.clone().requires_grad_() for t in (x, w) + ((b,) if b is not None else ())]
    out = linear(*leaves) if bias else linear(leaves[0], leaves[1])
    assert out.shape == (*x_shape[:-1], 6) and out.dtype == torch.float32
    wide = [t.detach().double().requires_grad_() for t in leaves]
    want = _reference(wide[0], wide[1], wide[2] if bias else None)
    torch.testing.assert_close(out.double(), want, **TOL)
    g = torch.randn(out.shape, generator=gen)
    got = torch.autograd.grad(out, leaves, g)
    expected = torch.autograd.grad(want, wide, g.double())
    for a, e in zip(got, expected, strict=True):
        torch.testing.assert_close(a.double(), e, **TOL)
    with torch.no_grad():
        torch.testing.assert_close(linear(x, w, b).double(), want.detach(), **TOL)
    method, calls = way
    assert bool(calls) == (method == "onednn"), f"{len(calls)} oneDNN products, {method} chosen"


def test_double_backward(way: tuple[str, list[int]]) -> None:
    """create_graph: the backward's products are differentiable (a gradient penalty)."""
    gen = torch.Generator().manual_seed(1)
    x, w, b = torch.randn(4, 5, generator=gen), torch.randn(3, 5, generator=gen), torch.randn(3)
    leaves = [t.clone().requires_grad_() for t in (x, w, b)]
    wide = [t.detach().double().requires_grad_() for t in leaves]
    for inputs, fn in ((leaves, linear), (wide, _reference)):
        out = fn(*inputs)
        g_x, g_w = torch.autograd.grad(out.pow(2).sum(), inputs[:2], create_graph=True)
        penalty = g_x.pow(2).sum() + g_w.pow(2).sum()
        inputs.append(torch.autograd.grad(penalty, inputs[:3]))
    for a, e in zip(leaves[3], wide[3], strict=True):
        torch.testing.assert_close(a.double(), e, **TOL)


def test_other_dtypes_and_empty_take_f_linear(way: tuple[str, list[int]]) -> None:
    for dtype in (F64, torch.bfloat16):
        x, w = torch.randn(4, 5, dtype=dtype), torch.randn(3, 5, dtype=dtype)
        torch.testing.assert_close(linear(x, w), torch.nn.functional.linear(x, w))
    empty = linear(torch.randn(0, 5), torch.randn(3, 5))
    assert empty.shape == (0, 3)
    assert linear(torch.randn(4, 0), torch.randn(3, 0)).eq(0).all()
    assert not way[1], "one of these went to oneDNN"


def test_layer_training_step_float32(monkeypatch: pytest.MonkeyPatch) -> None:
    """The layer's float32 step with oneDNN's projections: output and every parameter's
    gradient as with F.linear's."""
    monkeypatch.setattr(linear_module, "product_method", lambda dtype: ("onednn", "test"))
    monkeypatch.setattr(linear_module, "_MIN_ENTRIES", 0)
    calls: list[int] = []
    product = linear_module._mm
    monkeypatch.setattr(linear_module, "_mm", lambda x, w: calls.append(1) or product(x, w))
    torch.manual_seed(0)
    mha = MultiheadTanhAttention(16, 2, batch_first=True)
    x = torch.randn(3, 10, 16, requires_grad=True)
    out, _ = mha(x, x, x, is_causal=True, need_weights=False)
    got = torch.autograd.grad(out.sum(), [x, *mha.parameters()])
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(linear_module, "_by_onednn", lambda *args: False)
        ref, _ = mha(x, x, x, is_causal=True, need_weights=False)
        want = torch.autograd.grad(ref.sum(), [x, *mha.parameters()])
    assert calls, "the layer's projections did not go to oneDNN"
    torch.testing.assert_close(out, ref, **TOL)
    for a, e in zip(got, want, strict=True):
        torch.testing.assert_close(a, e, **TOL)


def test_compiled_layer_matches_eager() -> None:
    """The layer compiles whole (fullgraph: the projections break no graph) to the eager
    result."""
    mha = MultiheadTanhAttention(16, 2, batch_first=True)
    x = torch.randn(2, 6, 16)
    compiled = torch.compile(mha, fullgraph=True, backend="eager")
    torch.testing.assert_close(compiled(x, x, x)[0], mha(x, x, x)[0], **TOL)
