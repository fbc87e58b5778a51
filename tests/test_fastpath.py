"""The fast path of ``attn`` (fastpath.py): which calls take it, and that they get what the
full path (validation, dispatch, the op pair) gives.

Its results are compared bit for bit with the full path's (the fast path switched off) and
against the float64 reference of samples.py; every call it must decline is listed with the
reason, and a declined invalid call still gets the full path's error.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.autograd import forward_ad as fwAD
from torch.utils._python_dispatch import TorchDispatchMode

import tanh_attention
from samples import o_atol, reference
from tanh_attention import api, dispatch, fastpath
from tanh_attention._checks import normalize_causal, validate_attn_inputs
from tanh_attention.backends import Inputs

F64 = torch.float64
CAUSAL: list[bool | str] = [False, True, "none", "top_left", "bottom_right"]


@pytest.fixture
def taken(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[bool]]:
    """Whether each attn call took the fast path (recorded in call order)."""
    record: list[bool] = []
    real = fastpath.attn

    def recording(*args: Any) -> Any:
        out = real(*args)
        record.append(out is not None)
        return out

    monkeypatch.setattr(fastpath, "attn", recording)
    yield record


def _full_path(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(fastpath, "attn", lambda *args: None)


def _inputs(
    shape_q: tuple[int, ...], shape_k: tuple[int, ...], e: int, dtype: torch.dtype, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(shape_q, generator=gen, dtype=F64).to(dtype)
    k = torch.randn(shape_k, generator=gen, dtype=F64).to(dtype)
    v = torch.randn(*shape_k[:-1], e, generator=gen, dtype=F64).to(dtype)
    return q, k, v


SHAPES = [
    ((5, 3), (7, 3), 2),  # no batch
    ((2, 6, 4), (2, 6, 4), 3),
    ((2, 3, 9, 8), (2, 3, 11, 8), 5),  # n != m: the causal variants differ
    ((1, 2, 300, 16), (1, 2, 260, 16), 8),  # past the whole-tensor size: the blocked path
]


@pytest.mark.parametrize(("shape_q", "shape_k", "e"), SHAPES, ids=str)
@pytest.mark.parametrize("causal", CAUSAL, ids=str)
@pytest.mark.parametrize("need_weights", [True, False])
@pytest.mark.parametrize("dtype", [F64, torch.float32, torch.bfloat16], ids=str)
def test_fast_path_matches_the_full_path_and_the_reference(
    shape_q: tuple[int, ...],
    shape_k: tuple[int, ...],
    e: int,
    causal: bool | str,
    need_weights: bool,
    dtype: torch.dtype,
    monkeypatch: pytest.MonkeyPatch,
    taken: list[bool],
) -> None:
    q, k, v = (x.requires_grad_() for x in _inputs(shape_q, shape_k, e, dtype))
    scale = 0.7

    def run() -> tuple[torch.Tensor, torch.Tensor | None, tuple[torch.Tensor, ...]]:
        o, a = tanh_attention.attn(q, k, v, scale=scale, causal=causal, need_weights=need_weights)
        total = (o * torch.linspace(-1, 1, o.shape[-1], dtype=dtype)).sum()
        if a is not None:
            total = total + (a * a).sum()
        return o, a, torch.autograd.grad(total, (q, k, v))

    fast = run()
    assert taken == [True]
    with torch.no_grad():  # inference: the kernels without the autograd.Function
        fast_o, fast_a = tanh_attention.attn(
            q, k, v, scale=scale, causal=causal, need_weights=need_weights
        )
    assert taken == [True, True]
    _full_path(monkeypatch)
    full = run()
    with torch.no_grad():
        full_o, full_a = tanh_attention.attn(
            q, k, v, scale=scale, causal=causal, need_weights=need_weights
        )
    for got, want in zip((*fast[:2], *fast[2]), (*full[:2], *full[2]), strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    # (Inference may differ from a differentiable call in the last bits: the very smallest
    # of those run torch's tanh, see blockwise.graph; each is checked against float64 below.)
    torch.testing.assert_close(fast_o, full_o, rtol=0, atol=0)
    assert (fast_a is None) == (not need_weights) == (full_a is None)
    if fast_a is not None:
        torch.testing.assert_close(fast_a, full_a, rtol=0, atol=0)

    # And against the float64 reference, values and gradients.
    wide = [x.detach().double().requires_grad_() for x in (q, k, v)]
    o_ref, a_ref = reference(*wide, None, scale, normalize_causal(causal))
    total = (o_ref * torch.linspace(-1, 1, o_ref.shape[-1], dtype=F64)).sum()
    if need_weights:
        total = total + (a_ref * a_ref).sum()
    want_grads = torch.autograd.grad(total, wide)
    tol = {F64: 1e-10, torch.float32: 2e-4, torch.bfloat16: 8e-2}[dtype]
    atol = o_atol(dtype, tol, q, k, v, scale, normalize_causal(causal))
    torch.testing.assert_close(fast[0].double(), o_ref, rtol=tol, atol=atol)
    torch.testing.assert_close(fast_o.double(), o_ref, rtol=tol, atol=atol)
    if need_weights:
        assert fast[1] is not None and fast_a is not None
        torch.testing.assert_close(fast[1].double(), a_ref, rtol=tol, atol=tol)
        torch.testing.assert_close(fast_a.double(), a_ref, rtol=tol, atol=tol)
    for got, want in zip(fast[2], want_grads, strict=True):
        torch.testing.assert_close(got.double(), want, rtol=tol, atol=tol * 10)


def test_fast_path_partial_gradients_and_double_backward(taken: list[bool]) -> None:
    """Only k wants a gradient; then a gradient of a gradient (create_graph), which the
    fast path's autograd node hands to the differentiable backward op."""
    q, k, v = _inputs((2, 4, 3), (2, 5, 3), 2, F64)
    k.requires_grad_()
    o, _ = tanh_attention.attn(q, k, v, scale=0.5, causal=True, need_weights=False)
    (g_k,) = torch.autograd.grad(o.sin().sum(), k, create_graph=True)
    (gg_k,) = torch.autograd.grad(g_k.pow(2).sum(), k)
    assert taken == [True]
    wide = k.detach().clone().requires_grad_()
    o_ref, _ = reference(q, wide, v, None, 0.5, "top_left")
    (w_k,) = torch.autograd.grad(o_ref.sin().sum(), wide, create_graph=True)
    (ww_k,) = torch.autograd.grad(w_k.pow(2).sum(), wide)
    torch.testing.assert_close(g_k, w_k, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(gg_k, ww_k, rtol=1e-10, atol=1e-10)


class _Sub(torch.Tensor):
    pass


class _Mode(TorchDispatchMode):
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        return func(*args, **(kwargs or {}))


def _declined_calls() -> list[tuple[str, Callable[[], object]]]:
    """Valid calls the fast path must leave to the full path (each with why)."""
    q, k, v = _inputs((2, 4, 3), (2, 5, 3), 2, torch.float32)
    mask = torch.ones(4, 5, dtype=torch.bool)
    attn = tanh_attention.attn

    def under(context: Callable[[], Any], call: Callable[[], object]) -> Callable[[], object]:
        def run() -> object:
            with context():
                return call()

        return run

    def dual() -> object:
        with fwAD.dual_level():
            return attn(fwAD.make_dual(q, torch.ones_like(q)), k, v)

    return [
        ("a mask", lambda: attn(q, k, v, attn_mask=mask)),
        ("a bias", lambda: attn(q, k, v, bias=torch.zeros(4, 5))),
        ("dropout", lambda: attn(q, k, v, dropout_p=0.5)),
        ("an int dropout_p", lambda: attn(q, k, v, dropout_p=0)),
        ("a forced backend", lambda: attn(q, k, v, backend="cpu")),
        ("an int scale", lambda: attn(q, k, v, scale=1)),
        ("k and v shared by the batch", lambda: attn(q, k[0], v[0])),
        ("v broadcast", lambda: attn(q, k, v[:1])),
        ("k and v broadcast over a batch dim", lambda: attn(q, k[:1], v[:1])),
        ("a subclass", lambda: attn(q.as_subclass(_Sub), k, v)),
        ("vmap", lambda: torch.func.vmap(lambda x: attn(x, k, v)[0])(q.unsqueeze(0))),
        ("forward AD", dual),
        (
            "autocast",
            under(lambda: torch.autocast("cpu", dtype=torch.bfloat16), lambda: attn(q, k, v)),
        ),
        ("a dispatch mode", under(_Mode, lambda: attn(q, k, v))),
        ("torch.func.grad", lambda: torch.func.grad(lambda x: attn(x, k, v)[0].sum())(q)),
    ]


@pytest.mark.parametrize(
    ("why", "call"), _declined_calls(), ids=lambda x: x if isinstance(x, str) else ""
)
def test_fast_path_declines(why: str, call: Callable[[], object], taken: list[bool]) -> None:
    call()  # (the public function asks it only without extras: then nothing is recorded)
    assert not any(taken), why


@pytest.mark.parametrize(
    ("args", "kwargs", "error", "match"),
    [
        (((2, 3), (4, 3), 2), {"scale": float("nan")}, ValueError, "'scale' must be finite"),
        (((2, 3), (4, 3), 2), {"scale": float("inf")}, ValueError, "'scale' must be finite"),
        (((2, 3), (4, 3), 2), {"causal": 0}, TypeError, "'causal' must be a bool"),
        (((2, 3), (4, 3), 2), {"causal": "left"}, ValueError, "'causal' must be False"),
        (((2, 3), (4, 3), 2), {"need_weights": 1}, TypeError, "'need_weights' must be a bool"),
        (((2, 3), (4, 3), 2), {"dropout_p": False}, TypeError, "'dropout_p' must be a real"),
        (((2, 3), (4, 2), 2), {}, ValueError, "same feature size"),
    ],
)
def test_invalid_calls_get_the_full_paths_errors(
    args: tuple[Any, ...], kwargs: dict[str, Any], error: type[Exception], match: str,
    taken: list[bool],
) -> None:  # fmt: skip
    q, k, v = _inputs(*args, torch.float32)
    with pytest.raises(error, match=match):
        tanh_attention.attn(q, k, v, **kwargs)
    assert not any(taken)


def test_invalid_tensors_get_the_full_paths_errors(taken: list[bool]) -> None:
    q, k, v = _inputs((2, 3), (4, 3), 2, torch.float32)
    with pytest.raises(TypeError, match="same dtype"):
        tanh_attention.attn(q, k.double(), v)
    with pytest.raises(TypeError, match=r"must be a torch\.Tensor"):
        tanh_attention.attn(q.tolist(), k, v)  # type: ignore[call-overload]
    with pytest.raises(ValueError, match="at least 2 dimensions"):
        tanh_attention.attn(q[0], k, v)
    with pytest.raises(ValueError, match="same number of keys"):
        tanh_attention.attn(q, k, v[:3])
    with pytest.raises(TypeError, match="dense"):
        tanh_attention.attn(q.to_sparse(), k, v)
    with pytest.raises(TypeError, match="floating dtype"):
        tanh_attention.attn(q.int(), k.int(), v.int())
    assert not any(taken)


def test_fast_path_follows_the_registry(monkeypatch: pytest.MonkeyPatch, taken: list[bool]) -> None:
    """A backend registered before the CPU backend that takes CPU tensors gets the call:
    the fast path steps aside for the dispatcher."""
    registry = importlib.import_module("tanh_attention.backends")
    ran: list[str] = []

    class First(registry.Backend):
        name = "first"
        description = "takes every CPU call"
        device_types = frozenset({"cpu"})

        def __call__(self, inputs: Inputs) -> tuple[torch.Tensor, torch.Tensor | None]:
            ran.append(self.name)
            return registry.get("composite")(inputs)

    monkeypatch.setattr(registry, "_REGISTRY", [First(), *registry._REGISTRY])
    q, k, v = _inputs((2, 4, 3), (2, 5, 3), 2, torch.float32)
    tanh_attention.attn(q, k, v)
    assert ran == ["first"] and taken == [False]


@settings(max_examples=60, deadline=None)
@given(
    rank=st.integers(2, 4),
    n=st.integers(0, 5),
    m=st.integers(0, 5),
    d=st.integers(0, 3),
    e=st.integers(0, 3),
    dtype=st.sampled_from([F64, torch.float32, torch.bfloat16, torch.float16]),
    causal=st.sampled_from(CAUSAL),
    need_weights=st.booleans(),
    scale=st.floats(-1e3, 1e3),
)
def test_whatever_the_fast_path_takes_the_dispatcher_gives_to_the_cpu_backend(
    rank: int, n: int, m: int, d: int, e: int, dtype: torch.dtype, causal: bool | str,
    need_weights: bool, scale: float,
) -> None:  # fmt: skip
    """Every call the fast path takes is valid and the dispatcher would run it on the CPU
    backend (the one the fast path goes to), with the same results."""
    batch = (2, 1)[: rank - 2]
    q, k, v = _inputs((*batch, n, d), (*batch, m, d), e, dtype)
    args = (q, k, v, scale, causal, need_weights)
    with torch.no_grad():
        fast = fastpath.attn(*args)
    assert fast is not None
    shapes = validate_attn_inputs(q, k, v, scale=scale, causal=causal, need_weights=need_weights)
    inputs = Inputs(q, k, v, None, scale, normalize_causal(causal), need_weights, shapes)
    chosen = dispatch.select(inputs)
    assert chosen.name == "cpu"
    with torch.no_grad():
        o, a = chosen(inputs)
    torch.testing.assert_close(fast[0], o, rtol=0, atol=0, equal_nan=True)
    assert (fast[1] is None) == (a is None)
    if a is not None:
        torch.testing.assert_close(fast[1], a, rtol=0, atol=0, equal_nan=True)


def test_api_takes_the_fast_path_only_without_extras(monkeypatch: pytest.MonkeyPatch) -> None:
    """The public function asks the fast path only when no mask, bias, dropout or backend is
    given (those are checked by the full path); a float 0.0 dropout is no dropout."""
    asked: list[int] = []
    monkeypatch.setattr(fastpath, "attn", lambda *args: asked.append(1))
    q, k, v = _inputs((2, 3), (4, 3), 2, torch.float32)
    api.attn(q, k, v, dropout_p=0.0)
    api.attn(q, k, v, dropout_p=-0.0)
    api.attn(q, k, v, backend="cpu")
    assert len(asked) == 2
