"""The blocked kernels (kernels/blockwise.py) and the memory-efficient op ``attn_lean``.

Kernels against the float64 reference of samples.py (written from the definition), with block
sizes small enough that every shape crosses block boundaries; causal block skipping; masks;
dtypes. Then the lean op's registration: opcheck, vmap, forward AD, torch.func, compile,
export, autocast. (test_opinfo.py runs both ops through the whole OpInfo-style suite.)
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
from torch.autograd import forward_ad as fwAD

import tanh_attention
from samples import reference
from tanh_attention.kernels import blockwise
from tanh_attention.kernels import cpu as cpu_kernels

F64 = torch.float64
LEAN = torch.ops.tanh_attention.attn_lean
LEAN_BACKWARD = torch.ops.tanh_attention.attn_lean_backward

# (q shape, k shape, v shape, mask shape or None): n and m are not multiples of the blocks
SHAPES = {
    "n_lt_m": ((7, 5), (13, 5), (13, 3), None),
    "n_gt_m": ((13, 5), (7, 5), (7, 3), None),
    "one_block_row": ((3, 4), (11, 4), (11, 2), None),
    "batch_broadcast": ((2, 3, 9, 4), (2, 1, 10, 4), (10, 3), (3, 1, 10)),
    "full_mask": ((2, 9, 4), (2, 10, 4), (2, 10, 3), (2, 9, 10)),
}
BLOCKS = [(3, 4), (4, 3), (1, 1), (100, 100)]  # (100, 100): one block per problem


def _inputs(shapes: Any, dtype: torch.dtype = F64) -> tuple[torch.Tensor, ...]:
    q_shape, k_shape, v_shape, mask_shape = shapes
    q, k, v = (torch.randn(s, dtype=dtype) for s in (q_shape, k_shape, v_shape))
    mask = None if mask_shape is None else torch.rand(mask_shape) < 0.7
    return q, k, v, mask


def _ref_grads(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *rest: Any, outputs: Any) -> Any:
    leaves = [x.detach().double().requires_grad_() for x in (q, k, v)]
    o, a = reference(*leaves, *rest)
    grads = [g.double() for g in outputs]
    return torch.autograd.grad((o, a)[: len(grads)], leaves, grads)


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("blocks", BLOCKS, ids=str)
@pytest.mark.parametrize("shapes", SHAPES.values(), ids=SHAPES.keys())
def test_kernels_match_reference(shapes: Any, blocks: tuple[int, int], causal: bool) -> None:
    """Forward (with and without a), backward (from a and recomputing it), JVP."""
    q, k, v, mask = _inputs(shapes)
    size = {"block_rows": blocks[0], "block_cols": blocks[1]}
    o_ref, a_ref = reference(q, k, v, mask, 0.7, causal)
    for need_weights in (True, False):
        o, a = blockwise.forward(q, k, v, mask, 0.7, causal, need_weights=need_weights, **size)
        torch.testing.assert_close(o, o_ref, rtol=1e-12, atol=1e-12)
        if need_weights:
            assert a is not None
            torch.testing.assert_close(a, a_ref, rtol=1e-12, atol=1e-12)
        else:
            assert a is None

    g_o, g_a = torch.randn_like(o_ref), torch.randn_like(a_ref)
    want = _ref_grads(q, k, v, mask, 0.7, causal, outputs=(g_o, g_a))
    got = blockwise.backward(g_o, g_a, q, k, v, a_ref, mask, 0.7, causal, **size)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    want = _ref_grads(q, k, v, mask, 0.7, causal, outputs=(g_o,))
    got = blockwise.backward(g_o, None, q, k, v, None, mask, 0.7, causal, **size)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)

    tangents = tuple(torch.randn_like(x) for x in (q, k, v))
    _, (want_t, _) = torch.func.jvp(
        lambda *x: reference(*x, mask, 0.7, causal), (q, k, v), tangents
    )
    got_t = blockwise.jvp(*tangents, q, k, v, mask, 0.7, causal, **size)
    torch.testing.assert_close(got_t, want_t, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize(
    "needs", [(True, False, False), (False, True, False), (False, False, True)]
)
def test_backward_computes_only_what_is_needed(needs: tuple[int, ...]) -> None:
    q, k, v, mask = _inputs(SHAPES["batch_broadcast"])
    g_o = torch.randn(2, 3, 9, 3, dtype=F64)
    needs_ = [bool(x) for x in needs]
    got = blockwise.backward(g_o, None, q, k, v, None, mask, 1.3, True, needs_, block_rows=4)
    want = _ref_grads(q, k, v, mask, 1.3, True, outputs=(g_o,))
    for g, w, need in zip(got, want, needs, strict=True):
        if need:
            torch.testing.assert_close(g, w, rtol=1e-12, atol=1e-12)
        else:
            assert g is None
    # grad_a alone has no v term; no grads at all is no work.
    a = reference(q, k, v, mask, 1.3, True)[1]
    assert blockwise.backward(None, torch.ones_like(a), q, k, v, a, mask, 1.3, True)[2] is None
    assert blockwise.backward(None, None, q, k, v, a) == (None, None, None)


def test_zero_sizes() -> None:
    """Empty dims: o of zeros (d = 0 gives a = tanh(0) = 0), gradients of zeros, no error."""
    for q_shape, k_shape, v_shape in [
        ((0, 3), (4, 3), (4, 2)),
        ((2, 3), (0, 3), (0, 2)),
        ((2, 0), (4, 0), (4, 2)),
        ((0, 2, 3), (4, 3), (4, 2)),
        ((2, 3), (4, 3), (4, 0)),
    ]:
        q, k, v, _ = _inputs((q_shape, k_shape, v_shape, None))
        o_ref, a_ref = reference(q, k, v)
        o, a = blockwise.forward(q, k, v, block_rows=2, block_cols=2)
        torch.testing.assert_close((o, a), (o_ref, a_ref))
        grads = blockwise.backward(torch.ones_like(o), torch.ones_like(a), q, k, v, a)
        want = _ref_grads(q, k, v, outputs=(torch.ones_like(o), torch.ones_like(a)))
        torch.testing.assert_close(grads, want)


def _count_blocks(monkeypatch: pytest.MonkeyPatch) -> list[tuple[int, int]]:
    """Record the (rows, cols) of every block whose tanh the kernels compute."""
    calls: list[tuple[int, int]] = []
    real = blockwise.scores_tanh

    def counting(q: torch.Tensor, k: torch.Tensor, scale: float) -> torch.Tensor:
        calls.append((q.shape[-2], k.shape[-2]))
        return real(q, k, scale)

    monkeypatch.setattr(blockwise, "scores_tanh", counting)
    return calls


def test_causal_skips_wholly_masked_blocks(monkeypatch: pytest.MonkeyPatch) -> None:
    """n = m = 8 blocks: causal computes the 36 blocks on or below the diagonal of 64."""
    calls = _count_blocks(monkeypatch)
    q, k, v, _ = _inputs(((32, 3), (32, 3), (32, 2), None))
    blockwise.forward(q, k, v, causal=False, need_weights=False, block_rows=4, block_cols=4)
    assert len(calls) == 64
    calls.clear()
    o, _ = blockwise.forward(q, k, v, causal=True, need_weights=False, block_rows=4, block_cols=4)
    assert len(calls) == 36
    calls.clear()
    blockwise.backward(
        torch.ones_like(o), None, q, k, v, None, causal=True, block_rows=4, block_cols=4
    )
    assert len(calls) == 36


def test_causal_weights_zero_in_skipped_blocks() -> None:
    q, k, v, _ = _inputs(((13, 3), (17, 3), (17, 2), None))
    a_ref = reference(q, k, v, None, 1.0, True)[1]
    # a starts uninitialized: the kernel must zero the skipped blocks itself.
    _, a = blockwise.forward(q, k, v, causal=True, block_rows=4, block_cols=4)
    assert a is not None
    assert torch.equal(a.triu(1), torch.zeros_like(a)) and torch.allclose(a, a_ref)


@pytest.mark.parametrize(
    ("dtype", "tol"),
    [(torch.float32, 1e-6), (torch.bfloat16, 1e-2), (torch.float16, 2e-3)],
    ids=["float32", "bfloat16", "float16"],
)
@pytest.mark.parametrize("need_weights", [True, False], ids=["o_a", "o_only"])
def test_low_precision(dtype: torch.dtype, tol: float, need_weights: bool) -> None:
    """Over 2000 keys, outputs and gradients in a low precision are at least as accurate as
    the composite's in that dtype (half types accumulate in float32), or within tol."""
    q, k, v, mask = _inputs(((2, 40, 16), (2000, 16), (2000, 8), (40, 2000)), dtype)
    leaves = [x.requires_grad_() for x in (q / 4, k, v)]
    o, a = blockwise.forward(*leaves, mask, 0.5, need_weights=need_weights, block_rows=16)
    o_comp, _ = torch.ops.tanh_attention.attn_composite(*leaves, mask, 0.5)
    exact = [x.detach().double().requires_grad_() for x in leaves]
    o_ref, _ = reference(*exact, mask, 0.5)
    g_o = torch.randn_like(o_ref)
    grads = blockwise.backward(g_o.to(dtype), None, *leaves, a, mask, 0.5, block_rows=16)
    grads_comp = torch.autograd.grad(o_comp, leaves, g_o.to(dtype))
    grads_ref = torch.autograd.grad(o_ref, exact, g_o)

    def error(got: torch.Tensor, want: torch.Tensor) -> float:
        return ((got.double() - want).abs() / (1 + want.abs())).max().item()

    assert o.dtype == dtype and all(g is not None and g.dtype == dtype for g in grads)
    for got, comp, want in zip(
        (o, *grads), (o_comp, *grads_comp), (o_ref, *grads_ref), strict=True
    ):
        assert got is not None
        assert error(got, want) <= max(tol, 1.5 * error(comp, want)), (
            error(got, want),
            error(comp, want),
        )


@pytest.mark.parametrize("dtype", [F64, torch.float32], ids=str)
def test_scores_tanh(dtype: torch.dtype) -> None:
    q, k = torch.randn(2, 33, 7, dtype=dtype), torch.randn(1, 65, 7, dtype=dtype)
    want = torch.tanh(0.3 * q.double() @ k.double().mT)
    torch.testing.assert_close(cpu_kernels.scores_tanh(q, k, 0.3), want.to(dtype))
    k2 = torch.randn(2, 65, 7, dtype=dtype)  # a block of problems with their own keys
    want = torch.tanh(0.3 * q.double() @ k2.double().mT)
    torch.testing.assert_close(cpu_kernels.scores_tanh(q, k2, 0.3), want.to(dtype))


@pytest.mark.parametrize("dtype", [F64, torch.float32], ids=str)
def test_matmul_t(dtype: torch.dtype) -> None:
    x, y = torch.randn(1, 33, 7, dtype=dtype), torch.randn(1, 65, 7, dtype=dtype)
    add = torch.randn(1, 80, 33, dtype=dtype).mT[:, :, 3:68]  # strided, like a block of g_a
    want = x.double() @ y.double().mT
    torch.testing.assert_close(cpu_kernels.matmul_t(x, y), want.to(dtype))
    torch.testing.assert_close(cpu_kernels.matmul_t(x, y, add), (want + add.double()).to(dtype))
    y2 = torch.randn(2, 65, 7, dtype=dtype)  # a block of problems with their own y
    want = x.double() @ y2.double().mT
    torch.testing.assert_close(cpu_kernels.matmul_t(x.expand(2, 33, 7), y2), want.to(dtype))


def test_tanh_method_is_inspectable() -> None:
    method, why = cpu_kernels.tanh_method(F64)
    assert method == "torch" and "float64" in why
    method, why = cpu_kernels.tanh_method(torch.float32)
    assert method in ("onednn", "torch") and why
    if torch.backends.mkldnn.is_available():
        assert method == "onednn", why


# --------------------------------------------------------------------------------------------
# The registered op attn_lean
# --------------------------------------------------------------------------------------------


def _lean_inputs() -> tuple[torch.Tensor, ...]:
    return (
        torch.randn(2, 3, 4, dtype=F64, requires_grad=True),
        torch.randn(5, 4, dtype=F64, requires_grad=True),
        torch.randn(5, 3, dtype=F64, requires_grad=True),
    )


@pytest.mark.parametrize("masked", [False, True], ids=["plain", "mask_scale_causal"])
def test_opcheck(masked: bool) -> None:
    q, k, v = _lean_inputs()
    extra = (torch.rand(3, 5) < 0.6, 0.5, True) if masked else ()
    torch.library.opcheck(LEAN, (q, k, v, *extra))
    g_o = torch.randn(2, 3, 3, dtype=F64)
    for needs in ([True, True, True], [False, True, False]):
        torch.library.opcheck(LEAN_BACKWARD, (g_o, q, k, v, None, 0.3, True, needs))


def test_saves_no_weights() -> None:
    q, k, v = _lean_inputs()
    saved: list[torch.Tensor] = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        LEAN(q, k, v, None, 0.5, True)
    assert {t.data_ptr() for t in saved} <= {t.data_ptr() for t in (q, k, v)}


@pytest.mark.parametrize("in_dims", [(0, None, None), (None, 0, 0), (1, 0, None)], ids=str)
def test_vmap_matches_loop(in_dims: tuple[int | None, ...]) -> None:
    size = 3
    base = [
        torch.randn(2, 4, dtype=F64),
        torch.randn(5, 4, dtype=F64),
        torch.randn(5, 3, dtype=F64),
    ]
    ins = [
        x if d is None else torch.stack([torch.randn_like(x) for _ in range(size)], dim=d)
        for x, d in zip(base, in_dims, strict=True)
    ]
    mask = torch.rand(2, 5) < 0.6
    g_o = torch.randn(size, 2, 3, dtype=F64)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the slow per-sample fallback warns

        def f(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor) -> Any:
            o = LEAN(q, k, v, mask, 0.5, True)
            grads = LEAN_BACKWARD(g, q, k, v, mask, 0.5, True, [True, True, True])
            return o, grads

        o, grads = torch.func.vmap(f, in_dims=(*in_dims, 0))(*ins, g_o)
    for i in range(size):
        args = [x if d is None else x.select(d, i) for x, d in zip(ins, in_dims, strict=True)]
        torch.testing.assert_close(o[i], reference(*args, mask, 0.5, True)[0])
        want = _ref_grads(*args, mask, 0.5, True, outputs=(g_o[i],))
        for g, w in zip(grads, want, strict=True):
            torch.testing.assert_close(g[i], w)


def test_forward_ad_is_blockwise_and_right() -> None:
    """Forward AD through attn_lean (no reverse mode recorded) uses blockwise.jvp."""
    q, k, v = (x.detach() for x in _lean_inputs())
    tangents = tuple(torch.randn_like(x) for x in (q, k, v))
    mask = torch.rand(3, 5) < 0.6
    _, (want, _) = torch.func.jvp(lambda *x: reference(*x, mask, 0.4, True), (q, k, v), tangents)
    with fwAD.dual_level():
        duals = [fwAD.make_dual(x, t) for x, t in zip((q, k, v), tangents, strict=True)]
        got = fwAD.unpack_dual(LEAN(*duals, mask, 0.4, True)).tangent
    torch.testing.assert_close(got, want)


@pytest.mark.parametrize("transform", ["grad", "jacrev", "hessian", "jacfwd"])
def test_torch_func(transform: str) -> None:
    q, k, v = (x.detach() for x in _lean_inputs())
    mask = torch.rand(3, 5) < 0.6

    def loss(f: Any) -> Any:
        return lambda q, k, v: f(q, k, v, mask, 0.6, True).sin().sum()

    transforms = {
        "grad": lambda f: torch.func.grad(f, argnums=(0, 1, 2)),
        "jacrev": lambda f: torch.func.jacrev(f, argnums=(0, 1, 2)),
        "hessian": lambda f: torch.func.hessian(f, argnums=(0, 1)),
        "jacfwd": lambda f: torch.func.jacfwd(f, argnums=(0, 2)),
    }
    got = transforms[transform](loss(LEAN))(q, k, v)
    want = transforms[transform](loss(lambda *x: reference(*x)[0]))(q, k, v)
    torch.testing.assert_close(got, want)


def test_third_order() -> None:
    """The backward's backward is plain torch code, so one more order works."""
    q, k, v = (x.detach()[..., :2, :].clone() for x in _lean_inputs())
    q.requires_grad_()

    def f(q: torch.Tensor) -> torch.Tensor:
        o = LEAN(q, k, v, None, 0.7, True)
        (g,) = torch.autograd.grad(o.sin().sum(), q, create_graph=True)
        return g

    assert torch.autograd.gradgradcheck(f, (q,))


def test_public_need_weights_false_uses_lean_op() -> None:
    q, k, v = _lean_inputs()
    o, a = tanh_attention.attn(q, k, v, need_weights=False)
    assert a is None and "attn_lean" in type(o.grad_fn).__name__


def test_autocast_runs_in_bfloat16() -> None:
    q, k, v = (x.detach().float() for x in _lean_inputs())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        o = LEAN(q, k, v, None, 1.0, True)
    assert o.dtype == torch.bfloat16
    o_ref, _ = reference(*(t.bfloat16().double() for t in (q, k, v)), None, 1.0, True)
    torch.testing.assert_close(o.double(), o_ref, atol=5e-2, rtol=2e-2)


def _public_lean(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    o, _ = tanh_attention.attn(q, k, v, scale=0.6, causal=True, need_weights=False)
    return o.sin().sum()


def test_compile_fullgraph_keeps_lean_op() -> None:
    from torch._dynamo.testing import EagerAndRecordGraphs

    q, k, v = _lean_inputs()
    backend = EagerAndRecordGraphs()
    torch._dynamo.reset()
    compiled = torch.compile(_public_lean, backend=backend, fullgraph=True)
    loss = compiled(q, k, v)
    assert "tanh_attention.attn_lean" in backend.graphs[0].code
    want = reference(q, k, v, None, 0.6, True)[0].sin().sum()
    torch.testing.assert_close(loss, want)
    torch.testing.assert_close(
        torch.autograd.grad(loss, (q, k, v)), torch.autograd.grad(want, (q, k, v))
    )


@pytest.mark.slow
def test_compile_inductor_and_export(tmp_path: Path) -> None:
    q, k, v = _lean_inputs()
    torch._dynamo.reset()
    compiled = torch.compile(_public_lean, backend="inductor", fullgraph=True)
    loss = compiled(q, k, v)
    want = reference(q, k, v, None, 0.6, True)[0].sin().sum()
    torch.testing.assert_close(loss, want)
    torch.testing.assert_close(
        torch.autograd.grad(loss, (q, k, v)), torch.autograd.grad(want, (q, k, v))
    )

    class Model(torch.nn.Module):
        def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            return tanh_attention.attn(q, k, v, scale=0.5, need_weights=False)[0]

    args = tuple(x.detach() for x in (q, k, v))
    ep = torch.export.export(Model(), args)
    assert LEAN.default in [n.target for n in ep.graph.nodes if n.op == "call_function"]
    torch.export.save(ep, tmp_path / "lean.pt2")
    fresh = tuple(torch.randn_like(x) for x in args)
    got = torch.export.load(tmp_path / "lean.pt2").module()(*fresh)
    torch.testing.assert_close(got, reference(*fresh, None, 0.5, False)[0])
