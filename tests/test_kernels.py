"""The blocked kernels (kernels/blockwise.py on kernels/blocks.py and kernels/cpu.py) and the
memory-efficient op ``attn_lean``.

Every oracle is independent of the package: the float64 ``reference`` and ``keep_mask`` of
samples.py (written from the definition), autograd and ``torch.func.jvp`` of that reference,
and, where a NaN sits in q or k, the VJP written out from the definition here
(:func:`_vjp_from_definition`).

Kernels: block sizes small enough that every shape crosses block boundaries; both causal
variants with n < m, n = m, n > m, masks, rows that keep no key; the blocks causal skips and
the zeros of ``a`` there; non-finite inputs where blocks would be skipped; scales that would
overflow a pre-scaled product; batch dims that only v or only the mask brings; dtypes. Then
the lean op's registration: saved tensors, vmap, forward AD, torch.func, third order,
compile, export, autocast. (test_ops.py runs opcheck on both op pairs; test_opinfo.py runs
both through the whole OpInfo-style suite.)
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import Tensor
from torch.autograd import forward_ad as fwAD

import tanh_attention
from samples import keep_mask, reference
from tanh_attention import ops
from tanh_attention.kernels import blocks, blockwise, native
from tanh_attention.kernels import cpu as cpu_kernels

F64 = torch.float64
NAN, INF = float("nan"), float("inf")
OP = torch.ops.tanh_attention.attn
LEAN = torch.ops.tanh_attention.attn_lean
LEAN_BACKWARD = torch.ops.tanh_attention.attn_lean_backward
CAUSAL = ["none", "top_left", "bottom_right"]
EXACT = {"rtol": 1e-12, "atol": 1e-12}
SMALL_BLOCKS = {"block_rows": 3, "block_cols": 4}

# (q shape, k shape, v shape, mask shape or None): n and m are not multiples of the blocks.
SHAPES = {
    "n_lt_m": ((7, 5), (13, 5), (13, 3), None),
    "n_lt_m_mask": ((2, 7, 5), (13, 5), (13, 3), (2, 7, 13)),
    "n_eq_m": ((10, 5), (10, 5), (10, 3), None),
    "n_eq_m_mask": ((2, 10, 4), (2, 10, 4), (2, 10, 3), (10, 10)),
    "n_gt_m": ((13, 5), (7, 5), (7, 3), None),  # bottom_right: rows 0..5 keep no key
    "n_gt_m_mask": ((2, 13, 5), (7, 5), (2, 7, 3), (13, 7)),
    "one_block_row": ((3, 4), (11, 4), (11, 2), None),
    "batch_broadcast": ((2, 3, 9, 4), (2, 1, 10, 4), (10, 3), (3, 1, 10)),
    "full_mask": ((2, 9, 4), (2, 10, 4), (2, 10, 3), (2, 9, 10)),
}
BLOCKS = [(3, 4), (4, 3), (1, 1), (100, 100)]  # (100, 100): one block per problem, grouped


def _inputs(shapes: Any, dtype: torch.dtype = F64) -> tuple[Any, ...]:
    q_shape, k_shape, v_shape, mask_shape = shapes
    q, k, v = (torch.randn(s, dtype=dtype) for s in (q_shape, k_shape, v_shape))
    mask = None if mask_shape is None else torch.rand(mask_shape) < 0.7
    return q, k, v, mask


def _keep(n: int, m: int, mask: Tensor | None, causal: str) -> Tensor:
    """The keep-mask M: samples.keep_mask and the mask (with the mask's batch dims)."""
    keep = keep_mask(n, m, causal)
    return keep if mask is None else keep & mask


def _ref_grads(q: Tensor, k: Tensor, v: Tensor, *rest: Any, outputs: Any) -> Any:
    """Autograd of the float64 reference: gradients of <outputs, (o, a)[: len(outputs)]>."""
    leaves = [x.detach().double().requires_grad_() for x in (q, k, v)]
    o, a = reference(*leaves, *rest)
    grads = [g.double() for g in outputs]
    return torch.autograd.grad((o, a)[: len(grads)], leaves, grads)


def _ref_jvp(tangents: Any, q: Tensor, k: Tensor, v: Tensor, *rest: Any) -> Tensor:
    """``t_o`` by ``torch.func.jvp`` of the float64 reference."""
    _, (t_o, _) = torch.func.jvp(lambda *x: reference(*x, *rest), (q, k, v), tuple(tangents))
    return t_o


def _vjp_from_definition(
    g_o: Tensor | None,
    g_a: Tensor | None,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    mask: Tensor | None = None,
    scale: float = 1.0,
    causal: str = "none",
) -> tuple[Tensor, Tensor, Tensor]:
    """The VJP written from the definition, in float64::

        g_x = M * (g_o @ v^T + g_a) * (1 - a^2)      (exactly 0 where M drops an entry)
        g_q = scale * g_x @ k    g_k = scale * g_x^T @ q    g_v = a^T @ g_o

    summed back over broadcast batch dims. A dropped entry of ``a`` is the constant 0, so its
    g_x is 0 whatever q and k hold. Autograd of ``reference`` differs there when q or k
    holds a NaN: its ``where(keep, tanh(x), 0)`` sends ``0 * tanh'(NaN) = NaN`` back through
    dropped entries, so every feature of g_q (g_k) turns NaN, not only the NaN's own.
    """
    q, k, v = (x.detach().double() for x in (q, k, v))
    _, a = reference(q, k, v, mask, scale, causal)
    big = torch.zeros((), dtype=F64)
    if g_o is not None:
        big = torch.matmul(g_o.double(), v.mT).sum_to_size(a.shape)  # a is constant along v's dims
    if g_a is not None:
        big = big + g_a.double()
    g_x = torch.where(_keep(a.shape[-2], a.shape[-1], mask, causal), big * (1 - a * a), 0.0)
    g_q = (scale * torch.matmul(g_x, k)).sum_to_size(q.shape)
    g_k = (scale * torch.matmul(g_x.mT, q)).sum_to_size(k.shape)
    g_v = torch.zeros_like(v)
    if g_o is not None:
        g_v = torch.matmul(a.mT, g_o.double()).sum_to_size(v.shape)
    return g_q, g_k, g_v


def _blocks_with_kept_entries(n: int, m: int, causal: str, rows: int, cols: int) -> tuple[int, int]:
    """(blocks of the rows x cols grid holding a kept entry, all blocks), from keep_mask."""
    keep = keep_mask(n, m, causal)
    blocks = [
        bool(keep[i0 : i0 + rows, j0 : j0 + cols].any())
        for i0 in range(0, n, rows)
        for j0 in range(0, m, cols)
    ]
    return sum(blocks), len(blocks)


# --------------------------------------------------------------------------------------------
# The kernels against the reference
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("causal", CAUSAL)
@pytest.mark.parametrize("blocks", BLOCKS, ids=str)
@pytest.mark.parametrize("shapes", SHAPES.values(), ids=SHAPES.keys())
def test_kernels_match_reference(shapes: Any, blocks: tuple[int, int], causal: str) -> None:
    """Forward (with and without a), backward (from a and recomputing it), JVP."""
    q, k, v, mask = _inputs(shapes)
    n, m = q.shape[-2], k.shape[-2]
    size = {"block_rows": blocks[0], "block_cols": blocks[1]}
    o_ref, a_ref = reference(q, k, v, mask, 0.7, causal)
    for need_weights in (True, False):
        o, a = blockwise.forward(q, k, v, mask, 0.7, causal, need_weights=need_weights, **size)
        assert o.shape == o_ref.shape
        torch.testing.assert_close(o, o_ref, **EXACT)
        if need_weights:
            assert a is not None and a.shape == a_ref.shape
            torch.testing.assert_close(a, a_ref, **EXACT)
            assert torch.equal(a[a_ref == 0], a_ref[a_ref == 0])  # dropped entries exactly 0
        else:
            assert a is None
        # Rows that keep no key (bottom_right with n > m, masked rows) give exactly 0.
        empty = ~_keep(n, m, mask, causal).any(-1)
        assert ((o == 0).all(-1) | ~empty).all()
    if causal == "bottom_right" and n > m:
        assert (~keep_mask(n, m, causal).any(-1)).sum() == n - m

    g_o, g_a = torch.randn_like(o_ref), torch.randn_like(a_ref)
    want = _ref_grads(q, k, v, mask, 0.7, causal, outputs=(g_o, g_a))
    got = blockwise.backward(g_o, g_a, q, k, v, a_ref, mask, 0.7, causal, **size)
    torch.testing.assert_close(got, want, **EXACT)
    want = _ref_grads(q, k, v, mask, 0.7, causal, outputs=(g_o,))
    got = blockwise.backward(g_o, None, q, k, v, None, mask, 0.7, causal, **size)
    torch.testing.assert_close(got, want, **EXACT)
    got = blockwise.backward(g_o, None, q, k, v, a_ref, mask, 0.7, causal, **size)
    torch.testing.assert_close(got, want, **EXACT)

    tangents = tuple(torch.randn_like(x) for x in (q, k, v))
    want_t = _ref_jvp(tangents, q, k, v, mask, 0.7, causal)
    got_t = blockwise.jvp(*tangents, q, k, v, mask, 0.7, causal, **size)
    torch.testing.assert_close(got_t, want_t, **EXACT)
    for one in range(3):  # each tangent alone (the others None)
        alone = [t if i == one else None for i, t in enumerate(tangents)]
        zeros = [t if i == one else torch.zeros_like(t) for i, t in enumerate(tangents)]
        want_t = _ref_jvp(zeros, q, k, v, mask, 0.7, causal)
        got_t = blockwise.jvp(*alone, q, k, v, mask, 0.7, causal, **size)
        torch.testing.assert_close(got_t, want_t, **EXACT)


@pytest.mark.parametrize("causal", ["top_left", "bottom_right"])
@pytest.mark.parametrize(
    "needs", [(True, False, False), (False, True, False), (False, False, True)]
)
def test_backward_computes_only_what_is_needed(needs: tuple[bool, ...], causal: str) -> None:
    q, k, v, mask = _inputs(SHAPES["batch_broadcast"])
    g_o = torch.randn(2, 3, 9, 3, dtype=F64)
    got = blockwise.backward(g_o, None, q, k, v, None, mask, 1.3, causal, list(needs), block_rows=4)
    want = _ref_grads(q, k, v, mask, 1.3, causal, outputs=(g_o,))
    for g, w, need in zip(got, want, needs, strict=True):
        if need:
            torch.testing.assert_close(g, w, **EXACT)
        else:
            assert g is None
    # grad_a alone has no v term; no grads at all is no work.
    a = reference(q, k, v, mask, 1.3, causal)[1]
    assert blockwise.backward(None, torch.ones_like(a), q, k, v, a, mask, 1.3, causal)[2] is None
    assert blockwise.backward(None, None, q, k, v, a) == (None, None, None)
    with pytest.raises(ValueError, match="grad_a needs the saved weights"):
        blockwise.backward(None, torch.ones_like(a), q, k, v, None, mask, 1.3, causal)


@pytest.mark.parametrize("causal", CAUSAL)
def test_zero_sizes(causal: str) -> None:
    """Empty dims: o of zeros (d = 0 gives a = tanh(0) = 0), gradients of zeros, no error."""
    for q_shape, k_shape, v_shape in [
        ((0, 3), (4, 3), (4, 2)),
        ((2, 3), (0, 3), (0, 2)),
        ((2, 0), (4, 0), (4, 2)),
        ((0, 2, 3), (4, 3), (4, 2)),
        ((2, 3), (4, 3), (4, 0)),
    ]:
        q, k, v, _ = _inputs((q_shape, k_shape, v_shape, None))
        o_ref, a_ref = reference(q, k, v, None, 1.0, causal)
        o, a = blockwise.forward(q, k, v, None, 1.0, causal, block_rows=2, block_cols=2)
        torch.testing.assert_close((o, a), (o_ref, a_ref))
        grads = blockwise.backward(
            torch.ones_like(o), torch.ones_like(a), q, k, v, a, None, 1.0, causal
        )
        want = _ref_grads(
            q, k, v, None, 1.0, causal, outputs=(torch.ones_like(o), torch.ones_like(a))
        )
        torch.testing.assert_close(grads, want)


# --------------------------------------------------------------------------------------------
# The blocks causal skips, and the zeros of a there
# --------------------------------------------------------------------------------------------


def _without_small_kernels(monkeypatch: pytest.MonkeyPatch) -> None:
    """Turn the compiled small-call kernels off, for tests of the paths they would take over
    (they have tests of their own in test_native_attn.py)."""
    monkeypatch.setattr(blockwise, "try_attn", lambda *args: None)
    monkeypatch.setattr(blockwise, "try_attn_backward", lambda *args: None)
    monkeypatch.setattr(blockwise, "serves", lambda *args: False)


def _record(
    monkeypatch: pytest.MonkeyPatch, name: str, module: Any = blockwise
) -> list[tuple[Any, ...]]:
    """Record the arguments of every call the kernels make to ``module.<name>``."""
    calls: list[tuple[Any, ...]] = []
    real = getattr(module, name)

    def recording(*args: Any, **kwargs: Any) -> Any:
        calls.append(args)
        return real(*args, **kwargs)

    monkeypatch.setattr(module, name, recording)
    return calls


# (n, m, causal), in blocks of 4 x 4: each skips some blocks (checked below)
SKIP_CASES = {
    "top_left_n_eq_m": (32, 32, "top_left"),  # 36 of 64 blocks
    "top_left_n_lt_m": (12, 32, "top_left"),
    "top_left_n_gt_m": (32, 12, "top_left"),
    "bottom_right_n_lt_m": (12, 32, "bottom_right"),
    "bottom_right_n_gt_m": (32, 12, "bottom_right"),  # rows 0..19 keep no key
}


@pytest.mark.parametrize(("n", "m", "causal"), SKIP_CASES.values(), ids=SKIP_CASES.keys())
def test_causal_skips_wholly_masked_blocks(
    monkeypatch: pytest.MonkeyPatch, n: int, m: int, causal: str
) -> None:
    """Causal visits exactly the blocks that hold a kept entry, in forward, backward (from a
    and recomputing it) and JVP; "none" visits them all."""
    tanh_calls = _record(monkeypatch, "scores_tanh")
    vjp_calls = _record(monkeypatch, "vjp_block_")
    blocks = {"block_rows": 4, "block_cols": 4}
    q, k, v, _ = _inputs(((n, 3), (m, 3), (m, 2), None))
    visited, total = _blocks_with_kept_entries(n, m, causal, 4, 4)
    assert visited < total
    if (n, m, causal) == (32, 32, "top_left"):
        assert (visited, total) == (36, 64)

    blockwise.forward(q, k, v, None, 1.0, "none", need_weights=False, **blocks)
    assert len(tanh_calls) == total
    for need_weights in (True, False):
        tanh_calls.clear()
        blockwise.forward(q, k, v, None, 1.0, causal, need_weights=need_weights, **blocks)
        assert len(tanh_calls) == visited
    o_ref, a_ref = reference(q, k, v, None, 1.0, causal)
    g_o = torch.randn_like(o_ref)
    want = _ref_grads(q, k, v, None, 1.0, causal, outputs=(g_o,))

    tanh_calls.clear()
    vjp_calls.clear()
    got = blockwise.backward(g_o, None, q, k, v, None, None, 1.0, causal, **blocks)
    assert len(tanh_calls) == visited and len(vjp_calls) == visited
    torch.testing.assert_close(got, want, **EXACT)
    tanh_calls.clear()
    vjp_calls.clear()
    got = blockwise.backward(g_o, None, q, k, v, a_ref, None, 1.0, causal, **blocks)
    assert len(tanh_calls) == 0 and len(vjp_calls) == visited
    torch.testing.assert_close(got, want, **EXACT)

    tanh_calls.clear()
    tangents = tuple(torch.randn_like(x) for x in (q, k, v))
    got_t = blockwise.jvp(*tangents, q, k, v, None, 1.0, causal, **blocks)
    assert len(tanh_calls) == visited
    torch.testing.assert_close(got_t, _ref_jvp(tangents, q, k, v, None, 1.0, causal), **EXACT)


# Those of SKIP_CASES, with a mask; and a batch of tiny problems in one grouped default block.
ZERO_CASES = {
    **{name: ((n, 3), (m, 3), (m, 2), (n, m), 4) for name, (n, m, _) in SKIP_CASES.items()},
    "grouped_tiny_problems": ((6, 5, 3), (6, 9, 3), (6, 9, 2), None, None),
}
ZERO_CAUSAL = [c for _, _, c in SKIP_CASES.values()] + ["top_left"]


@pytest.mark.parametrize(
    ("shapes", "causal"),
    list(zip(ZERO_CASES.values(), ZERO_CAUSAL, strict=True)),
    ids=ZERO_CASES.keys(),
)
def test_causal_weights_zero_in_skipped_blocks(
    monkeypatch: pytest.MonkeyPatch, shapes: Any, causal: str
) -> None:
    """a is allocated uninitialized: the kernel zero-fills the blocks it skips itself. Here
    ``torch.empty`` returns NaN, so a skipped block that was not zeroed shows."""
    real_empty = torch.empty

    def poisoned(*args: Any, **kwargs: Any) -> Tensor:
        t = real_empty(*args, **kwargs)
        return t.fill_(NAN) if t.is_floating_point() else t

    monkeypatch.setattr(torch, "empty", poisoned)
    assert torch.empty(3).isnan().all()
    *qkv_shapes, mask_shape, block = shapes
    q, k, v, mask = _inputs((*qkv_shapes, mask_shape))
    n, m = q.shape[-2], k.shape[-2]
    a_ref = reference(q, k, v, mask, 1.0, causal)[1]
    _, a = blockwise.forward(q, k, v, mask, 1.0, causal, block_rows=block, block_cols=block)
    assert a is not None
    dropped = ~keep_mask(n, m, causal)
    assert dropped.any()
    assert torch.equal(a[..., dropped], torch.zeros_like(a[..., dropped]))
    torch.testing.assert_close(a, a_ref, **EXACT)


# --------------------------------------------------------------------------------------------
# Non-finite inputs: no block is skipped, so NaN and inf propagate as in the reference
# --------------------------------------------------------------------------------------------

# (n, m, causal): in blocks of 3 x 4 each skips blocks; key m - 1 is kept by few rows (none
# for top_left with n < m) and row 0 keeps the fewest keys (none for bottom_right, n > m).
NONFINITE_CASES = {
    "top_left_n_lt_m": (6, 11, "top_left"),
    "top_left_n_eq_m": (11, 11, "top_left"),
    "bottom_right_n_lt_m": (6, 11, "bottom_right"),
    "bottom_right_n_gt_m": (11, 6, "bottom_right"),
}
VALUES = pytest.mark.parametrize("value", [NAN, INF, -INF], ids=["nan", "inf", "-inf"])
nonfinite_cases = pytest.mark.parametrize(
    ("n", "m", "causal"), NONFINITE_CASES.values(), ids=NONFINITE_CASES.keys()
)


def _nonfinite_inputs(n: int, m: int) -> tuple[Tensor, Tensor, Tensor]:
    return torch.randn(n, 3, dtype=F64), torch.randn(m, 3, dtype=F64), torch.randn(m, 2, dtype=F64)


def _assert_same(got: Any, want: Any) -> None:
    """Equal values and the same NaN and inf pattern."""
    torch.testing.assert_close(got, want, equal_nan=True, **EXACT)


@VALUES
@nonfinite_cases
def test_nonfinite_v_reaches_every_row(n: int, m: int, causal: str, value: float) -> None:
    """A non-finite v[j] reaches every row of o through 0 * inf, also the rows whose blocks
    for key j a finite v would skip; likewise in the JVP for v and for t_v."""
    visited, total = _blocks_with_kept_entries(n, m, causal, 3, 4)
    assert visited < total  # finite inputs would skip blocks
    q, k, v = _nonfinite_inputs(n, m)
    v[m - 1, 0] = value
    o_ref, a_ref = reference(q, k, v, None, 0.7, causal)
    assert o_ref[:, 0].isnan().any() and torch.isfinite(o_ref[:, 1]).all()
    for need_weights in (True, False):
        o, a = blockwise.forward(
            q, k, v, None, 0.7, causal, need_weights=need_weights, **SMALL_BLOCKS
        )
        _assert_same(o, o_ref)
        if a is not None:
            _assert_same(a, a_ref)
    tangents = tuple(torch.randn_like(x) for x in (q, k, v))
    got = blockwise.jvp(*tangents, q, k, v, None, 0.7, causal, **SMALL_BLOCKS)
    _assert_same(got, _ref_jvp(tangents, q, k, v, None, 0.7, causal))
    # A non-finite tangent of v, with v finite.
    v[m - 1, 0] = 0.5
    t_v = torch.randn_like(v)
    t_v[m - 1, 1] = value
    want = _ref_jvp((torch.zeros_like(q), torch.zeros_like(k), t_v), q, k, v, None, 0.7, causal)
    assert want[:, 1].isnan().any()
    _assert_same(blockwise.jvp(None, None, t_v, q, k, v, None, 0.7, causal, **SMALL_BLOCKS), want)
    # A non-finite k changes no dropped entry of t_a: the JVP may skip, and still agrees.
    k[m - 1, 0] = value
    got = blockwise.jvp(*tangents, q, k, v, None, 0.7, causal, **SMALL_BLOCKS)
    _assert_same(got, _ref_jvp(tangents, q, k, v, None, 0.7, causal))


@pytest.mark.parametrize("where", ["q", "k", "v", "grad_o"])
@VALUES
@nonfinite_cases
def test_nonfinite_backward(n: int, m: int, causal: str, value: float, where: str) -> None:
    """Gradients with a non-finite q (row 0), k or v (key m - 1) or grad_o (row 0): the same
    values and NaN pattern as the VJP from the definition (and as autograd of the reference,
    except for a NaN in q or k: see _vjp_from_definition)."""
    q, k, v = _nonfinite_inputs(n, m)
    g_o = torch.randn(n, 2, dtype=F64)
    {"q": q[0], "k": k[m - 1], "v": v[m - 1], "grad_o": g_o[0]}[where][1] = value
    a_ref = reference(q, k, v, None, 0.7, causal)[1]
    want = _vjp_from_definition(g_o, None, q, k, v, None, 0.7, causal)
    if where != "v":
        # Somewhere a row or key that never meets the value gets a NaN through 0 * inf. (A
        # non-finite v meets only the g_x of the rows that keep its key.)
        assert any(w.isnan().any() for w in want)
    if where in ("v", "grad_o") or not math.isnan(value):
        _assert_same(want, _ref_grads(q, k, v, None, 0.7, causal, outputs=(g_o,)))
    got = blockwise.backward(g_o, None, q, k, v, None, None, 0.7, causal, **SMALL_BLOCKS)
    _assert_same(got, want)
    got = blockwise.backward(g_o, None, q, k, v, a_ref, None, 0.7, causal, **SMALL_BLOCKS)
    _assert_same(got, want)
    g_a = torch.randn_like(a_ref)
    want = _vjp_from_definition(g_o, g_a, q, k, v, None, 0.7, causal)
    got = blockwise.backward(g_o, g_a, q, k, v, a_ref, None, 0.7, causal, **SMALL_BLOCKS)
    _assert_same(got, want)


def _public(need_weights: bool) -> Callable[..., Any]:
    def f(q: Tensor, k: Tensor, v: Tensor, mask: Any, scale: float, causal: str) -> Any:
        o, a = tanh_attention.attn(
            q, k, v, attn_mask=mask, scale=scale, causal=causal, need_weights=need_weights
        )
        return o, a

    return f


# Each returns (o, a or None).
ENTRY_POINTS = {
    "attn_op": OP,
    "attn_lean_op": lambda *args: (LEAN(*args), None),
    "public": _public(True),
    "public_o_only": _public(False),
}
entry_points = pytest.mark.parametrize("entry", ENTRY_POINTS.values(), ids=ENTRY_POINTS.keys())


@pytest.mark.parametrize("where", ["q", "k", "v", "grad_o"])
@pytest.mark.parametrize("value", [NAN, INF], ids=["nan", "inf"])
@entry_points
def test_nonfinite_through_ops(
    monkeypatch: pytest.MonkeyPatch, entry: Any, value: float, where: str
) -> None:
    """Through the ops and the public function with their default blocks: top_left with
    n = 3 < m = 10 computes only the 3 x 3 kept columns when all is finite. (The blocked
    drivers, which small calls skip for the whole-tensor formulas: forced here.)"""
    monkeypatch.setattr(blockwise, "_PLAIN_MAX_ENTRIES", 0)
    q, k, v = (torch.randn(s, dtype=F64) for s in ((2, 3, 4), (10, 4), (10, 2)))
    tanh_calls = _record(monkeypatch, "scores_tanh")
    entry(q, k, v, None, 0.6, "top_left")
    assert {(c[0].shape[-2], c[1].shape[-2]) for c in tanh_calls} == {(3, 3)}  # skipping
    g_o = torch.randn(2, 3, 2, dtype=F64)
    {"q": q[0, 0], "k": k[9], "v": v[9], "grad_o": g_o[0, 0]}[where][1] = value
    o_ref, a_ref = reference(q, k, v, None, 0.6, "top_left")
    want = _vjp_from_definition(g_o, None, q, k, v, None, 0.6, "top_left")
    assert any(w.isnan().any() for w in (o_ref, *want))
    leaves = [x.clone().requires_grad_() for x in (q, k, v)]
    o, a = entry(*leaves, None, 0.6, "top_left")
    _assert_same(o, o_ref)
    if a is not None:
        _assert_same(a, a_ref)
    _assert_same(torch.autograd.grad(o, leaves, g_o), want)


# --------------------------------------------------------------------------------------------
# Scales that overflow a pre-scaled product: finite, saturated weights
# --------------------------------------------------------------------------------------------

OVERFLOW = {
    "float16_1e4": (torch.float16, 1e4),
    "bfloat16_1e38": (torch.bfloat16, 1e38),
    "float32_1e38": (torch.float32, 1e38),
    "float32_-1e38": (torch.float32, -1e38),
    "float32_1e300": (torch.float32, 1e300),  # beyond float32: computed in float64
}


def _saturating(dtype: torch.dtype) -> tuple[Tensor, Tensor, Tensor]:
    """|q_i . k_j| in [0.2, 1.1], from entries 8 times as large: q_i = (8 s, 8 s, e, e),
    k_j = (t, -0.875 t, e, e) with |s|, |t| in [0.5, 1], |e| <= 0.1. ``(scale * q) @ k^T``
    would overflow (inf - inf = NaN) where ``scale * (q @ k^T)`` saturates tanh to +-1."""
    g = torch.Generator().manual_seed(5)

    def factor(rows: int) -> Tensor:
        sign = torch.where(torch.rand(rows, 1, generator=g) < 0.5, -1.0, 1.0)
        return sign * (1 + torch.rand(rows, 1, generator=g)) / 2

    def small(rows: int) -> Tensor:
        return (torch.rand(rows, 2, generator=g) - 0.5) / 5

    s, t = factor(5), factor(7)
    q = torch.cat([8 * s, 8 * s, small(5)], -1)
    k = torch.cat([t, -0.875 * t, small(7)], -1)
    v = torch.randn(7, 3, generator=g)
    return q.to(dtype), k.to(dtype), v.to(dtype)


def _blockwise_entry(need_weights: bool) -> Callable[..., Any]:
    def f(q: Tensor, k: Tensor, v: Tensor, *rest: Any) -> Any:
        o, a = blockwise.forward(q, k, v, *rest, need_weights=need_weights, block_rows=2)
        return o, a

    return f


@pytest.mark.parametrize("causal", ["none", "bottom_right"])
@pytest.mark.parametrize(("dtype", "scale"), OVERFLOW.values(), ids=OVERFLOW.keys())
def test_huge_scale_saturates(dtype: torch.dtype, scale: float, causal: str) -> None:
    """Weights finite and equal to the float64 reference's saturated +-1 (computed from the
    low-precision values); o and every gradient finite and equal to the reference's."""
    q, k, v = _saturating(dtype)
    exact = [x.double() for x in (q, k, v)]
    keep = keep_mask(5, 7, causal)
    o_ref, a_ref = reference(*exact, None, scale, causal)
    assert torch.equal(a_ref.abs(), keep.double())  # saturated: +-1 where kept, else 0
    assert (q * scale).isinf().any()  # pre-scaling in q's dtype would overflow
    g_o = torch.randn(o_ref.shape, dtype=F64).to(dtype)
    want = _ref_grads(*exact, None, scale, causal, outputs=(g_o,))
    entries = {
        **ENTRY_POINTS,
        "blockwise": _blockwise_entry(True),
        "blockwise_o_only": _blockwise_entry(False),
    }
    for name, entry in entries.items():
        leaves = [x.clone().requires_grad_() for x in (q, k, v)]
        o, a = entry(*leaves, None, scale, causal)
        assert torch.isfinite(o).all(), name
        torch.testing.assert_close(o, o_ref.to(dtype), msg=name)
        if a is not None:
            assert torch.equal(a, a_ref.to(dtype)), name
        if name.startswith("blockwise"):
            grads = blockwise.backward(g_o, None, q, k, v, a, None, scale, causal, block_rows=2)
        else:
            grads = torch.autograd.grad(o, leaves, g_o)
        for g, w in zip(grads, want, strict=True):
            assert g is not None and torch.isfinite(g).all(), name
            torch.testing.assert_close(g, w.to(dtype), msg=name)


# --------------------------------------------------------------------------------------------
# Batch dims that only v, or only the mask, brings
# --------------------------------------------------------------------------------------------

# (q, k, v, mask): a has the batch of q, k and the mask; o that of all four.
OWN_BATCH = {
    "v_leading": ((2, 1, 5, 3), (7, 3), (4, 1, 1, 7, 2), (3, 5, 7)),  # a (2,3,5,7), o (4,2,3,5,2)
    "v_inner": ((2, 1, 5, 3), (7, 3), (3, 7, 2), None),  # a (2,1,5,7), o (2,3,5,2)
    "mask_only": ((5, 3), (7, 3), (7, 2), (2, 5, 7)),  # a (2,5,7), o (2,5,2)
    "v_and_mask": ((5, 3), (2, 7, 3), (3, 1, 7, 2), (2, 5, 7)),  # a (2,5,7), o (3,2,5,2)
}


@pytest.mark.parametrize("causal", ["none", "bottom_right"])
@pytest.mark.parametrize("shapes", OWN_BATCH.values(), ids=OWN_BATCH.keys())
def test_own_batch_dims_of_v_and_mask(shapes: Any, causal: str) -> None:
    """Shapes of a and o as the reference's; gradients, with grad_a given too, as autograd
    of the reference: grad_a (a's batch) must not be spread along v's own batch dims."""
    q, k, v, mask = _inputs(shapes)
    o_ref, a_ref = reference(q, k, v, mask, 0.8, causal)
    g_o, g_a = torch.randn_like(o_ref), torch.randn_like(a_ref)
    want = _ref_grads(q, k, v, mask, 0.8, causal, outputs=(g_o, g_a))
    want_o = _ref_grads(q, k, v, mask, 0.8, causal, outputs=(g_o,))

    o, a = blockwise.forward(q, k, v, mask, 0.8, causal, **SMALL_BLOCKS)
    assert a is not None and o.shape == o_ref.shape and a.shape == a_ref.shape
    torch.testing.assert_close((o, a), (o_ref, a_ref), **EXACT)
    got = blockwise.backward(g_o, g_a, q, k, v, a, mask, 0.8, causal, **SMALL_BLOCKS)
    torch.testing.assert_close(got, want, **EXACT)
    got = blockwise.backward(g_o, None, q, k, v, None, mask, 0.8, causal, **SMALL_BLOCKS)
    torch.testing.assert_close(got, want_o, **EXACT)
    t = tuple(torch.randn_like(x) for x in (q, k, v))
    got_t = blockwise.jvp(*t, q, k, v, mask, 0.8, causal, **SMALL_BLOCKS)
    torch.testing.assert_close(got_t, _ref_jvp(t, q, k, v, mask, 0.8, causal), **EXACT)

    for name, entry in ENTRY_POINTS.items():
        leaves = [x.clone().requires_grad_() for x in (q, k, v)]
        o, a = entry(*leaves, mask, 0.8, causal)
        assert o.shape == o_ref.shape, name
        torch.testing.assert_close(o, o_ref, **EXACT)
        if a is None:
            torch.testing.assert_close(torch.autograd.grad(o, leaves, g_o), want_o, **EXACT)
        else:
            assert a.shape == a_ref.shape, name
            torch.testing.assert_close(a, a_ref, **EXACT)
            got = torch.autograd.grad((o, a), leaves, (g_o, g_a))
            torch.testing.assert_close(got, want, **EXACT)


# --------------------------------------------------------------------------------------------
# Dtypes and the block primitives
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("dtype", "tol", "pairs"),
    [
        (torch.float32, 1e-6, True),
        (torch.bfloat16, 1e-2, True),
        (torch.bfloat16, 1e-2, False),
        (torch.float16, 2e-3, True),
    ],
    ids=["float32", "bfloat16", "bfloat16_no_pairs", "float16"],
)
@pytest.mark.parametrize("need_weights", [True, False], ids=["o_a", "o_only"])
@pytest.mark.parametrize("causal", ["none", "top_left"])
def test_low_precision(
    dtype: torch.dtype,
    tol: float,
    need_weights: bool,
    causal: str,
    pairs: bool,
    method: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Over 2000 keys, outputs and gradients in a low precision are at least as accurate as
    the composite's in that dtype (half types accumulate in float32), or within tol, with
    every block method. In float32 "as accurate" means within 4 times the composite's error:
    that error is the products' rounding over 2000 keys, which differs with the kernel's
    order of summation (MKL's, oneDNN's), and the "sigmoid" tanh adds an absolute error of
    up to 2**-22 a weight where tanh's rounding is at most 2**-25 (kernels/cpu.py). A wrong
    formula, mask or block is off by far more. bfloat16 blocks run with and without
    AVX512-BF16's pairs (``native.try_pairs_block``), where this CPU has them."""
    monkeypatch.setattr(native, "_pairs_wanted", pairs)
    factor = 4.0 if dtype == torch.float32 else 1.5
    # (causal: blocks above the diagonal skipped, no mask, each problem its own k and v, so
    # that g_v is summed block by block for each)
    shapes = (
        ((2, 40, 16), (2000, 16), (2000, 8), (40, 2000))
        if causal == "none"
        else ((2, 40, 16), (2, 2000, 16), (2, 2000, 8), None)
    )
    q, k, v, mask = _inputs(shapes, dtype)
    leaves = [x.requires_grad_() for x in (q / 4, k, v)]
    o, a = blockwise.forward(
        *leaves, mask, 0.5, causal, need_weights=need_weights, block_rows=16, block_cols=500
    )
    o_comp, a_comp = torch.ops.tanh_attention.attn_composite(*leaves, mask, 0.5, causal)
    exact = [x.detach().double().requires_grad_() for x in leaves]
    o_ref, a_ref = reference(*exact, mask, 0.5, causal)
    g_o = torch.randn_like(o_ref)
    # (with the weights, a gradient for them too: (g_o v^T + g_a) (1 - a^2) in one pass)
    g_a = torch.randn_like(a_ref) if need_weights else None
    g_a_low = None if g_a is None else g_a.to(dtype)
    grads = blockwise.backward(
        g_o.to(dtype), g_a_low, *leaves, a, mask, 0.5, causal, block_rows=16, block_cols=500
    )
    if need_weights:
        grads_comp = torch.autograd.grad((o_comp, a_comp), leaves, (g_o.to(dtype), g_a_low))
        grads_ref = torch.autograd.grad((o_ref, a_ref), exact, (g_o, g_a))
    else:
        grads_comp = torch.autograd.grad(o_comp, leaves, g_o.to(dtype))
        grads_ref = torch.autograd.grad(o_ref, exact, g_o)
    assert all(g is not None and g.is_contiguous() for g in grads)

    def error(got: Tensor, want: Tensor) -> float:
        return ((got.double() - want).abs() / (1 + want.abs())).max().item()

    assert o.dtype == dtype and all(g is not None and g.dtype == dtype for g in grads)
    for got, comp, want in zip(
        (o, *grads), (o_comp, *grads_comp), (o_ref, *grads_ref), strict=True
    ):
        assert got is not None
        assert error(got, want) <= max(tol, factor * error(comp, want)), (
            error(got, want),
            error(comp, want),
        )


@pytest.fixture(params=["native", "float32"])
def few_rows(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Each way a half-precision call with few queries reads its keys and values, whichever
    the timing probe would pick on this machine."""
    choice = str(request.param)
    monkeypatch.setattr(
        cpu_kernels, "_half_products_speed", lambda dtype: (choice == "native", "forced")
    )
    return choice


@pytest.mark.parametrize(
    ("dtype", "tol"), [(torch.bfloat16, 1e-2), (torch.float16, 2e-3)], ids=["bf16", "f16"]
)
@pytest.mark.parametrize("need_weights", [True, False], ids=["o_a", "o_only"])
@pytest.mark.parametrize("causal", CAUSAL)
@pytest.mark.parametrize("n", [1, 5, 16])
# (m, converted entries): 3 column blocks of 50 keys; whole rows, 4 problems to a block.
@pytest.mark.parametrize(("m", "limit"), [(130, 600), (40, 2000)], ids=["cols", "groups"])
def test_half_decoding_step(
    dtype: torch.dtype,
    tol: float,
    need_weights: bool,
    causal: str,
    n: int,
    m: int,
    limit: int,
    few_rows: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A bfloat16 or float16 call with a few queries against more keys (a decoding step),
    either way of reading the keys and values (converted block by block or not), blocks
    smaller than the keys, heads sharing k and v, a padding mask: as accurate as the
    composite in that dtype (or within tol) against float64, masked weights exactly 0."""
    monkeypatch.setattr(blockwise, "_CONVERTED_ENTRIES", limit)
    assert cpu_kernels.few_rows_method(dtype)[0] == few_rows
    q = torch.randn(2, 3, n, 8, dtype=dtype)
    k, v = torch.randn(2, 1, m, 8, dtype=dtype), torch.randn(2, 1, m, 4, dtype=dtype)
    mask = torch.rand(2, 1, 1, m) < 0.8
    o, a = blockwise.forward(q, k, v, mask, 0.5, causal, need_weights=need_weights)
    o_ref, a_ref = reference(*(x.double() for x in (q, k, v)), mask, 0.5, causal)
    o_comp, a_comp = reference(q, k, v, mask, 0.5, causal)

    def error(got: Tensor, want: Tensor) -> float:
        return ((got.double() - want).abs() / (1 + want.abs())).max().item()

    assert o.dtype == dtype and o.shape == o_ref.shape
    assert error(o, o_ref) <= max(tol, 1.5 * error(o_comp, o_ref))
    if need_weights:
        assert a is not None and a.dtype == dtype and a.shape == a_ref.shape
        assert error(a, a_ref) <= max(tol, 1.5 * error(a_comp, a_ref))
        assert bool((a[~_keep(n, m, mask, causal).expand_as(a)] == 0).all())
    else:
        assert a is None


@pytest.fixture(params=["onednn", "compiled", "sigmoid", "torch"])
def method(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Each block method, whichever the timing probe would pick on this machine (all must
    be right wherever they run; the probe only picks the faster)."""
    faster = request.param == "onednn"
    choice = str(request.param)
    monkeypatch.setattr(cpu_kernels, "_timed_choice", lambda dtype: (choice, "forced by a test"))
    monkeypatch.setattr(cpu_kernels, "_grouped_speed", lambda dtype: faster)
    monkeypatch.setattr(cpu_kernels, "_product_speed", lambda dtype: (faster, "forced by a test"))
    if faster:  # every one-problem block's product by oneDNN, however small
        monkeypatch.setattr(cpu_kernels, "PRODUCT_MIN_ENTRIES", 0)
        monkeypatch.setattr(cpu_kernels, "PRODUCT_MIN_COLS", 0)
    return str(request.param)


@pytest.mark.parametrize("prescale", [True, False], ids=["prescale", "scale_after"])
@pytest.mark.parametrize("dtype", [F64, torch.float32], ids=str)
def test_scores_tanh(dtype: torch.dtype, prescale: bool, method: str) -> None:
    q, k = torch.randn(2, 33, 7, dtype=dtype), torch.randn(1, 65, 7, dtype=dtype)
    want = torch.tanh(0.3 * q.double() @ k.double().mT)
    torch.testing.assert_close(cpu_kernels.scores_tanh(q, k, 0.3, prescale), want.to(dtype))
    k2 = torch.randn(2, 65, 7, dtype=dtype)  # a block of problems with their own keys
    want = torch.tanh(0.3 * q.double() @ k2.double().mT)
    torch.testing.assert_close(cpu_kernels.scores_tanh(q, k2, 0.3, prescale), want.to(dtype))


def test_scores_tanh_scaled_after_the_product_saturates() -> None:
    q, k, _ = _saturating(torch.float32)
    want = torch.tanh(q.double() @ k.double().mT * 1e38).float()
    got = cpu_kernels.scores_tanh(q.unsqueeze(0), k.unsqueeze(0), 1e38, prescale=False)
    assert torch.equal(got[0], want) and want.abs().eq(1).all()


@pytest.mark.parametrize("dtype", [F64, torch.float32], ids=str)
def test_matmul_t(dtype: torch.dtype, method: str) -> None:
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
    assert method in ("onednn", "compiled", "sigmoid", "torch") and why
    # The timing probe decided, and says so with its figures.
    assert "us by torch" in why, why
    if cpu_kernels._onednn_reason(torch.float32) is None:
        assert "us fused" in why, why
    assert cpu_kernels.tanh_method(torch.bfloat16)[0] != "sigmoid"  # float32 only


@pytest.mark.parametrize("value", ["onednn", "compiled", "sigmoid", "torch", "bogus"])
def test_tanh_method_can_be_forced(value: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TANH_ATTENTION_CPU_TANH", value)
    cpu_kernels._timed_choice.cache_clear()
    try:
        if value == "bogus":
            with pytest.raises(ValueError, match="TANH_ATTENTION_CPU_TANH must be"):
                cpu_kernels.tanh_method(torch.float32)
            return
        method, why = cpu_kernels.tanh_method(torch.float32)
        reason = {
            "onednn": cpu_kernels._onednn_reason(torch.float32),
            "sigmoid": cpu_kernels._sigmoid_reason(torch.float32),
            "compiled": cpu_kernels._compiled_reason(torch.float32),
            "torch": None,
        }[value]
        if reason is None:
            assert method == value and "TANH_ATTENTION_CPU_TANH" in why
        else:  # accuracy still decides: no forcing an inaccurate kernel
            assert method == "torch" and reason in why
        # Never for float64, forced or not.
        assert cpu_kernels.tanh_method(F64)[0] == "torch"
    finally:
        monkeypatch.delenv("TANH_ATTENTION_CPU_TANH")
        cpu_kernels._timed_choice.cache_clear()


# --------------------------------------------------------------------------------------------
# The registered op attn_lean (opcheck of both op pairs: test_ops.py)
# --------------------------------------------------------------------------------------------


def _lean_inputs() -> tuple[Tensor, ...]:
    return (
        torch.randn(2, 3, 4, dtype=F64, requires_grad=True),
        torch.randn(5, 4, dtype=F64, requires_grad=True),
        torch.randn(5, 3, dtype=F64, requires_grad=True),
    )


@pytest.mark.parametrize("causal", CAUSAL)
def test_saves_no_weights(causal: str) -> None:
    q, k, v = _lean_inputs()
    mask = torch.rand(3, 5) < 0.6
    saved: list[Tensor] = []

    def pack(t: Tensor) -> Tensor:
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        LEAN(q, k, v, mask, 0.5, causal)
    assert saved  # the hook saw the saved inputs
    assert {t.data_ptr() for t in saved} <= {t.data_ptr() for t in (q, k, v, mask)}


@pytest.mark.parametrize("causal", ["top_left", "bottom_right"])
@pytest.mark.parametrize("in_dims", [(0, None, None), (None, 0, 0), (1, 0, None)], ids=str)
def test_vmap_matches_loop(in_dims: tuple[int | None, ...], causal: str) -> None:
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

        def f(q: Tensor, k: Tensor, v: Tensor, g: Tensor) -> Any:
            o = LEAN(q, k, v, mask, 0.5, causal)
            grads = LEAN_BACKWARD(g, None, q, k, v, None, mask, 0.5, causal, [True, True, True])
            return o, grads

        o, grads = torch.func.vmap(f, in_dims=(*in_dims, 0))(*ins, g_o)
    for i in range(size):
        args = [x if d is None else x.select(d, i) for x, d in zip(ins, in_dims, strict=True)]
        torch.testing.assert_close(o[i], reference(*args, mask, 0.5, causal)[0])
        want = _ref_grads(*args, mask, 0.5, causal, outputs=(g_o[i],))
        for g, w in zip(grads, want, strict=True):
            torch.testing.assert_close(g[i], w)


def test_forward_ad_is_blockwise_and_right(monkeypatch: pytest.MonkeyPatch) -> None:
    """Forward AD through attn_lean (no reverse mode recorded) runs the blocked JVP."""
    jvp_calls = _record(monkeypatch, "jvp_block_")
    q, k, v = (x.detach() for x in _lean_inputs())
    tangents = tuple(torch.randn_like(x) for x in (q, k, v))
    mask = torch.rand(3, 5) < 0.6
    for causal in ("top_left", "bottom_right"):
        want = _ref_jvp(tangents, q, k, v, mask, 0.4, causal)
        jvp_calls.clear()
        with fwAD.dual_level():
            duals = [fwAD.make_dual(x, t) for x, t in zip((q, k, v), tangents, strict=True)]
            got = fwAD.unpack_dual(LEAN(*duals, mask, 0.4, causal)).tangent
        assert jvp_calls, "the blocked JVP did not run"
        torch.testing.assert_close(got, want)


@pytest.mark.parametrize("transform", ["grad", "jacrev", "hessian", "jacfwd"])
def test_torch_func(transform: str) -> None:
    q, k, v = (x.detach() for x in _lean_inputs())
    mask = torch.rand(3, 5) < 0.6

    def loss(f: Any) -> Any:
        return lambda q, k, v: f(q, k, v, mask, 0.6, "bottom_right").sin().sum()

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

    def f(q: Tensor) -> Tensor:
        o = LEAN(q, k, v, None, 0.7, "top_left")
        (g,) = torch.autograd.grad(o.sin().sum(), q, create_graph=True)
        return g

    assert torch.autograd.gradgradcheck(f, (q,))


def test_public_need_weights_false_uses_lean_op() -> None:
    q, k, v = _lean_inputs()
    o, a = tanh_attention.attn(q, k, v, need_weights=False)
    # Plain eager: the lean pair's kernels under ops._Eager. It keeps a (n x m) only where a
    # is at most twice the size of q, k and v together (here 3 x 5 against 2 * (12 + 35)),
    # or has at most 65536 entries in all.
    assert a is None and o.grad_fn.pair is ops.attn_lean
    saved_a = 4  # saved: q, k, v, attn_mask, a, dropout_seed
    assert o.grad_fn.saved_tensors[saved_a].shape == (2, 3, 5)
    # 2 x 128 x 128 entries: not short, but small (and past the aten-op graph, see below).
    small = [torch.randn(2, 128, 4, dtype=F64, requires_grad=True) for _ in range(3)]
    o_small, _ = tanh_attention.attn(*small, need_weights=False)
    assert o_small.grad_fn.saved_tensors[saved_a].shape == (2, 128, 128)
    long = [torch.randn(2, 200, 4, dtype=F64, requires_grad=True) for _ in range(3)]
    o_long, _ = tanh_attention.attn(*long, need_weights=False)
    assert o_long.grad_fn.saved_tensors[saved_a] is None  # 2 x 200 x 200 > 65536
    with torch.device("cpu"):  # a torch function mode: through the registered op
        o, a = tanh_attention.attn(q, k, v, need_weights=False)
    assert a is None and "attn_lean" in type(o.grad_fn).__name__


def test_autocast_runs_in_bfloat16() -> None:
    q, k, v = (x.detach().float() for x in _lean_inputs())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        o = LEAN(q, k, v, None, 1.0, "top_left")
    assert o.dtype == torch.bfloat16
    o_ref, _ = reference(*(t.bfloat16().double() for t in (q, k, v)), None, 1.0, "top_left")
    torch.testing.assert_close(o.double(), o_ref, atol=5e-2, rtol=2e-2)


def _public_lean(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
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
    want = reference(q, k, v, None, 0.6, "top_left")[0].sin().sum()
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
    want = reference(q, k, v, None, 0.6, "top_left")[0].sin().sum()
    torch.testing.assert_close(loss, want)
    torch.testing.assert_close(
        torch.autograd.grad(loss, (q, k, v)), torch.autograd.grad(want, (q, k, v))
    )

    class Model(torch.nn.Module):
        def forward(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
            return tanh_attention.attn(
                q, k, v, scale=0.5, causal="bottom_right", need_weights=False
            )[0]

    args = tuple(x.detach() for x in (q, k, v))
    ep = torch.export.export(Model(), args)
    assert LEAN.default in [n.target for n in ep.graph.nodes if n.op == "call_function"]
    torch.export.save(ep, tmp_path / "lean.pt2")
    fresh = tuple(torch.randn_like(x) for x in args)
    got = torch.export.load(tmp_path / "lean.pt2").module()(*fresh)
    torch.testing.assert_close(got, reference(*fresh, None, 0.5, "bottom_right")[0])


@pytest.mark.parametrize("causal", CAUSAL)
@pytest.mark.parametrize("mask_shape", [None, (32, 24), (4, 1, 32, 24), (4, 16, 32, 24)], ids=str)
def test_many_small_problems_float32(
    causal: str, mask_shape: tuple[int, ...] | None, monkeypatch: pytest.MonkeyPatch, method: str
) -> None:
    """A batch of short sequences runs as grouped blocks (one oneDNN grouped convolution per
    block where this CPU has it): forward, backward from a and recomputing, against the
    float64 reference, at float32 accuracy; masks shared by all problems, by some, or own."""
    _without_small_kernels(monkeypatch)
    calls = []
    grouped = cpu_kernels._onednn_grouped
    monkeypatch.setattr(cpu_kernels, "_onednn_grouped", lambda *a: calls.append(1) or grouped(*a))
    gen = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(4, 16, 32 if i == 0 else 24, 16, generator=gen) for i in range(3))
    mask = None if mask_shape is None else torch.rand(mask_shape, generator=gen) < 0.7
    scale = 0.25
    o_ref, a_ref = reference(q.double(), k.double(), v.double(), mask, scale, causal)
    o, a = blockwise.forward(q, k, v, mask, scale, causal)
    tol = {"rtol": 1e-4, "atol": 1e-5}
    torch.testing.assert_close(o.double(), o_ref, **tol)
    assert a is not None and a.is_contiguous()
    torch.testing.assert_close(a.double(), a_ref, **tol)
    assert torch.equal(a[a_ref == 0], torch.zeros_like(a[a_ref == 0]))
    g_o, g_a = torch.randn_like(o), torch.randn_like(a)
    want = _ref_grads(q, k, v, mask, scale, causal, outputs=(g_o, g_a))
    got = blockwise.backward(g_o, g_a, q, k, v, a, mask, scale, causal)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g.double(), w, rtol=1e-4, atol=1e-4)
    want = _ref_grads(q, k, v, mask, scale, causal, outputs=(g_o,))
    got = blockwise.backward(g_o, None, q, k, v, None, mask, scale, causal)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g.double(), w, rtol=1e-4, atol=1e-4)
    if method == "onednn" and cpu_kernels._grouped_reason(torch.float32) is None:
        assert calls, "the grouped convolution was not used"
    if method == "torch":
        assert not calls, "the grouped convolution was used although slower"


@pytest.mark.parametrize("causal", CAUSAL)
@pytest.mark.parametrize("layout", ["contiguous", "strided"])
def test_one_problem_blocks_float32(
    causal: str, layout: str, monkeypatch: pytest.MonkeyPatch, method: str
) -> None:
    """One problem per block (blocks of part of the rows and columns): every accumulating
    product (``o += a @ v``, the three gradient products, the JVP's) by oneDNN or by torch,
    forward, backward from a and recomputing, and the JVP against the float64 reference at
    float32 accuracy; inputs contiguous or strided views (a sequence-first layout)."""
    calls = []
    product = cpu_kernels._onednn
    monkeypatch.setattr(cpu_kernels, "_onednn", lambda *a: calls.append(a[2]) or product(*a))
    gen = torch.Generator().manual_seed(5)
    shapes = ((2, 3, 40, 8), (2, 3, 56, 8), (2, 3, 56, 12))
    if layout == "contiguous":
        q, k, v = (torch.randn(s, generator=gen) for s in shapes)
    else:  # (n, B, H, d) memory seen as (B, H, n, d)
        q, k, v = (
            torch.randn(s[2], s[0], s[1], s[3], generator=gen).permute(1, 2, 0, 3) for s in shapes
        )
    mask = torch.rand(40, 56, generator=gen) < 0.7
    scale, size, tol = 0.3, {"block_rows": 16, "block_cols": 24}, {"rtol": 1e-4, "atol": 1e-4}
    o_ref, a_ref = reference(q.double(), k.double(), v.double(), mask, scale, causal)
    o, a = blockwise.forward(q, k, v, mask, scale, causal, **size)
    torch.testing.assert_close(o.double(), o_ref, **tol)
    assert a is not None
    torch.testing.assert_close(a.double(), a_ref, **tol)
    o_lean, _ = blockwise.forward(q, k, v, mask, scale, causal, need_weights=False, **size)
    torch.testing.assert_close(o_lean.double(), o_ref, **tol)
    g_o, g_a = torch.randn_like(o), torch.randn_like(a)
    for outputs, saved in (((g_o, g_a), a), ((g_o,), None), ((g_o,), a)):
        want = _ref_grads(q, k, v, mask, scale, causal, outputs=outputs)
        g_a_in = g_a if len(outputs) == 2 else None
        got = blockwise.backward(g_o, g_a_in, q, k, v, saved, mask, scale, causal, **size)
        for g, w in zip(got, want, strict=True):
            torch.testing.assert_close(g.double(), w, **tol)
    tangents = tuple(torch.randn_like(x) for x in (q, k, v))
    wide = [x.double() for x in (*tangents, q, k, v)]
    want_t = _ref_jvp(wide[:3], *wide[3:], mask, scale, causal)
    got_t = blockwise.jvp(*tangents, q, k, v, mask, scale, causal, **size)
    torch.testing.assert_close(got_t.double(), want_t, **tol)
    if method == "onednn" and cpu_kernels.product_method(torch.float32)[0] == "onednn":
        assert "none" in calls, "no product went to oneDNN"
    if method == "torch":
        assert not calls, "oneDNN ran although torch was chosen"


@pytest.mark.parametrize("causal", CAUSAL)
@pytest.mark.parametrize(
    ("q_shape", "k_shape", "mask_shape"),
    [
        ((3, 5, 4), (3, 7, 4), None),
        ((2, 3, 6, 4), (1, 3, 6, 4), (6, 6)),  # k, v broadcast over the batch
        ((5, 4), (9, 4), (1, 9)),
        ((4, 2, 8, 8), (4, 1, 8, 8), (4, 2, 8, 8)),  # keys shared by heads, own masks
    ],
    ids=str,
)
@pytest.mark.parametrize("dtype", [F64, torch.float32], ids=str)
def test_small_calls_take_the_whole_tensor_formulas(
    q_shape: tuple[int, ...],
    k_shape: tuple[int, ...],
    mask_shape: tuple[int, ...] | None,
    causal: str,
    dtype: torch.dtype,
    monkeypatch: pytest.MonkeyPatch,
    method: str,
) -> None:
    """Calls this small run on whole tensors instead of the blocked drivers: as one block
    of all their problems where q, k and v share a batch shape, else by formulas.py. The
    same results (against the float64 reference), from each path, with and without a
    saved a, with each tanh method (the whole-tensor paths take the kernels' tanh, here at
    every size)."""
    monkeypatch.setattr(cpu_kernels, "_SIGMOID_MIN_ENTRIES", 0)
    _without_small_kernels(monkeypatch)
    sigmoid_calls = _record(monkeypatch, "_tanh_from_sigmoid_", module=cpu_kernels)
    compiled_calls = _record(monkeypatch, "try_tanh_", module=cpu_kernels.native)
    one_block = q_shape[:-2] == k_shape[:-2]  # (v shares k's batch here)
    whole_calls = _record(monkeypatch, "forward", module=blockwise._Whole)
    compiled = cpu_kernels.tanh_method(torch.float32)[0] == "compiled"
    gen = torch.Generator().manual_seed(1)
    q, k = torch.randn(q_shape, generator=gen), torch.randn(k_shape, generator=gen)
    v = torch.randn(*k_shape[:-1], 3, generator=gen)
    q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
    mask = None if mask_shape is None else torch.rand(mask_shape, generator=gen) < 0.7
    scale = 0.4
    o_ref, a_ref = reference(q.double(), k.double(), v.double(), mask, scale, causal)
    g_o = torch.randn(o_ref.shape, generator=gen).to(dtype)
    g_a = torch.randn(a_ref.shape, generator=gen).to(dtype)
    want_both = _ref_grads(q, k, v, mask, scale, causal, outputs=(g_o, g_a))
    want_o = _ref_grads(q, k, v, mask, scale, causal, outputs=(g_o,))
    tol = {"rtol": 1e-4, "atol": 1e-5} if dtype == torch.float32 else {}
    calls = []
    forward_formulas = blockwise.formulas.forward
    monkeypatch.setattr(
        blockwise.formulas,
        "forward",
        lambda *a, **kw: calls.append(1) or forward_formulas(*a, **kw),
    )
    for limit, plain in ((blockwise._PLAIN_MAX_ENTRIES, True), (0, False)):
        monkeypatch.setattr(blockwise, "_PLAIN_MAX_ENTRIES", limit)
        calls.clear()
        sigmoid_calls.clear()
        compiled_calls.clear()
        whole_calls.clear()
        o, a = blockwise.forward(q, k, v, mask, scale, causal)
        assert bool(whole_calls) == (plain and one_block)
        assert bool(calls) == (plain and not one_block)
        assert bool(sigmoid_calls) == (method == "sigmoid" and dtype == torch.float32)
        assert bool(compiled_calls) == (compiled and dtype == torch.float32)
        assert a is not None and a._base is None and o._base is None
        torch.testing.assert_close(o.double(), o_ref, **tol)
        torch.testing.assert_close(a.double(), a_ref, **tol)
        got = blockwise.backward(g_o, g_a, q, k, v, a, mask, scale, causal)
        for g, w in zip(got, want_both, strict=True):
            assert g is not None and g.shape == w.shape and g._base is None
            torch.testing.assert_close(g.double(), w, **tol)
        got = blockwise.backward(g_o, None, q, k, v, None, mask, scale, causal)
        for g, w in zip(got, want_o, strict=True):
            assert g is not None
            torch.testing.assert_close(g.double(), w, **tol)


def test_lean_keeps_short_weights_only_for_a_backward(monkeypatch: pytest.MonkeyPatch) -> None:
    """The o-only path asks its kernel for a (to keep for the backward) only for a short
    sequence with an input that wants a gradient; inference builds none."""
    asked: list[bool] = []
    kernels = ops.attn_lean.kernels["cpu"]

    def forward(*args: Any, need_weights: bool) -> Any:
        asked.append(need_weights)
        return kernels.forward(*args, need_weights=need_weights)

    monkeypatch.setitem(
        ops.attn_lean.kernels, "cpu", ops.Kernels(forward, kernels.backward, kernels.jvp)
    )
    q, k, v = (x.detach() for x in _lean_inputs())
    tanh_attention.attn(q, k, v, need_weights=False)
    with torch.no_grad():
        tanh_attention.attn(q.requires_grad_(), k, v, need_weights=False)
    tanh_attention.attn(q, k, v, need_weights=False)
    assert asked == [False, False, True]


# --------------------------------------------------------------------------------------------
# The very smallest differentiable calls: aten ops that autograd records (blockwise.graph)
# --------------------------------------------------------------------------------------------


def _graph_inputs(
    batch: tuple[int, ...], n: int, m: int, dtype: torch.dtype, grads: tuple[bool, ...]
) -> tuple[Tensor, Tensor, Tensor]:
    gen = torch.Generator().manual_seed(5)
    shapes = ((*batch, n, 4), (*batch, m, 4), (*batch, m, 3))
    return tuple(  # type: ignore[return-value]
        torch.randn(shape, generator=gen, dtype=F64).to(dtype).requires_grad_(need)
        for shape, need in zip(shapes, grads, strict=True)
    )


@pytest.mark.parametrize("causal", CAUSAL)
@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("need_weights", [True, False])
@pytest.mark.parametrize("dtype", [F64, torch.float32], ids=str)
@pytest.mark.parametrize("grads", [(True, True, True), (False, True, False)], ids=str)
def test_smallest_differentiable_calls_record_aten_ops(
    causal: str,
    masked: bool,
    need_weights: bool,
    dtype: torch.dtype,
    grads: tuple[bool, ...],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A call with a backward ahead and at most _GRAPH_MAX_ENTRIES score entries, one batch
    shape, is recorded as aten ops (no ops._Eager node, no kernels): values and gradients of
    both outputs against the float64 reference, with a mask, each causal variant, and only
    some inputs requiring grad. (The compiled small-call kernels, which take such float32
    calls without a mask where they are available, are off here.)"""
    _without_small_kernels(monkeypatch)
    forward_calls = _record(monkeypatch, "forward", module=blockwise._Whole)
    q, k, v = _graph_inputs((2, 3), 5, 7, dtype, grads)
    mask = torch.rand(2, 3, 5, 7, generator=torch.Generator().manual_seed(2)) < 0.6
    mask_arg = mask if masked else None
    pair = ops.attn if need_weights else ops.attn_lean
    out = pair(q, k, v, mask_arg, 0.6, causal)
    o, a = out if need_weights else (out, None)
    assert not forward_calls, "the kernels ran: not the aten-op graph"
    assert "_Eager" not in type(o.grad_fn).__name__
    o_ref, a_ref = reference(q.double(), k.double(), v.double(), mask_arg, 0.6, causal)
    tol = {"rtol": 1e-4, "atol": 1e-5} if dtype == torch.float32 else {}
    torch.testing.assert_close(o.double(), o_ref, **tol)
    g_o = torch.randn(o.shape, dtype=F64)
    g_a = torch.randn(a_ref.shape, dtype=F64)
    outputs = (g_o, g_a) if need_weights else (g_o,)
    if a is not None:
        torch.testing.assert_close(a.double(), a_ref, **tol)
    leaves = [t for t in (q, k, v) if t.requires_grad]
    got = torch.autograd.grad((o, a)[: len(outputs)], leaves, [g.to(dtype) for g in outputs])
    want = _ref_grads(q, k, v, mask_arg, 0.6, causal, outputs=outputs)
    want = [w for w, t in zip(want, (q, k, v), strict=True) if t.requires_grad]
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g.double(), w, **tol)


@pytest.mark.parametrize("causal", CAUSAL)
def test_smallest_calls_twice_differentiable(causal: str) -> None:
    q, k, v = _graph_inputs((2,), 4, 6, F64, (True, True, True))
    mask = torch.rand(2, 4, 6, generator=torch.Generator().manual_seed(3)) < 0.7

    def f(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        o, a = ops.attn(q, k, v, mask, 0.8, causal)
        assert "_Eager" not in type(o.grad_fn).__name__
        return o.sin().sum() + (a * a).sum()

    assert torch.autograd.gradcheck(f, (q, k, v))
    assert torch.autograd.gradgradcheck(f, (q, k, v))


@pytest.mark.parametrize(
    ("case", "graph"),
    [
        ("at the limit", True),
        ("one entry past it", False),
        ("no batch dims", True),
        ("k, v broadcast over the batch", False),
        ("bfloat16", False),
        ("scale beyond float32", False),
        ("dropout", False),
        ("no grad", False),
    ],
)
@pytest.mark.parametrize("small_kernels", [True, False], ids=["compiled", "no_compiled"])
def test_which_calls_record_aten_ops(
    case: str, graph: bool, small_kernels: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Only differentiable calls of one batch shape, at most _GRAPH_MAX_ENTRIES score
    entries, float32 or float64 with the scale in range and no dropout take the aten ops,
    unless the compiled small-call kernels serve them (these float32 ones, where the kernels
    are available); the others the kernels (ops._Eager). Each gives the float64 reference's
    gradients."""
    if small_kernels:
        graph = graph and native.unavailable_reason() is not None
    else:
        _without_small_kernels(monkeypatch)
    limit = blockwise._GRAPH_MAX_ENTRIES
    n = 8
    batch: tuple[int, ...] = (2, limit // (2 * n * n))
    m = n + (1 if case == "one entry past it" else 0)
    dtype = torch.bfloat16 if case == "bfloat16" else torch.float32
    scale = 1e39 if case == "scale beyond float32" else 0.5
    if case == "no batch dims":
        batch = ()
    q, k, v = _graph_inputs(batch, n, m, dtype, (True, True, True))
    assert math.prod(batch) * n * m == limit or case != "at the limit"
    if case == "k, v broadcast over the batch":
        k, v = (t.detach()[:1].requires_grad_() for t in (k, v))
    dropout = 0.5 if case == "dropout" else 0.0
    seed = torch.tensor(7) if dropout else None
    with torch.set_grad_enabled(case != "no grad"):
        out = ops.attn_lean(q, k, v, None, scale, "top_left", dropout, seed)
    if case == "no grad":  # inference: the kernels, no node at all
        assert out.grad_fn is None
        o_ref, _ = reference(q.double(), k.double(), v.double(), None, scale, "top_left")
        torch.testing.assert_close(out.double(), o_ref, rtol=1e-4, atol=1e-4)
        return
    assert ("_Eager" not in type(out.grad_fn).__name__) == graph
    if case == "dropout":
        return  # (its gradients are test_dropout.py's)
    want = _ref_grads(q, k, v, None, scale, "top_left", outputs=(torch.ones(out.shape),))
    got = torch.autograd.grad(out, (q, k, v), torch.ones_like(out))
    tol = {"rtol": 5e-2, "atol": 5e-2} if dtype == torch.bfloat16 else {"rtol": 1e-4, "atol": 1e-4}
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g.double(), w, **tol)


@pytest.mark.parametrize("causal", CAUSAL)
@pytest.mark.parametrize("pair", ["attn", "attn_lean"])
def test_small_calls_past_the_graph_limit_take_the_function(
    causal: str, pair: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With the aten-op graph off, the same small calls run the kernels under ops._Eager
    (one block, _Whole): gradcheck and gradgradcheck with a mask, as the graph's test."""
    monkeypatch.setattr(blockwise, "_GRAPH_MAX_ENTRIES", 0)
    q, k, v = _graph_inputs((2,), 4, 6, F64, (True, True, True))
    mask = torch.rand(2, 4, 6, generator=torch.Generator().manual_seed(4)) < 0.7
    op = getattr(ops, pair)

    def f(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        out = op(q, k, v, mask, 0.8, causal)
        o = out[0] if op.weights else out
        assert type(o.grad_fn).__name__ == "_EagerBackward"
        return out

    assert torch.autograd.gradcheck(f, (q, k, v))
    assert torch.autograd.gradgradcheck(f, (q, k, v))


@pytest.mark.parametrize("first", [False, True])
@pytest.mark.parametrize("layout", ["rows", "transposed", "transposed slice"])
def test_add_product_of_half_blocks_sums_in_float32(layout: str, first: bool) -> None:
    """blocks.add_product_ with a float32 accumulator and bfloat16 blocks, the left operand
    held as rows, transposed, or as a transposed block of a larger matrix (how the backward
    reads the saved weights: g_v += a^T @ g_o), against float64 of the same values: off by
    at most the rounding of the block's product to bfloat16."""
    gen = torch.Generator().manual_seed(3)
    big = torch.randn(2, 40, 50, generator=gen).to(torch.bfloat16)
    x = {
        "rows": big[:, :13, :7],
        "transposed": big[:, :7, :13].contiguous().mT,
        "transposed slice": big[:, 5:12, 9:22].mT,
    }[layout]
    y = torch.randn(2, 7, 5, generator=gen).to(torch.bfloat16)
    acc = torch.randn(2, 13, 5, generator=gen)
    product = 0.5 * (x.double() @ y.double())
    want = (0.0 if first else acc.double()) + product
    got = blocks.add_product_(acc, x, y, 0.5, first=first)
    assert got is acc
    # (each block's product is rounded to bfloat16 once, then added in float32)
    error = (acc.double() - want).abs()
    assert (error <= 2**-8 * product.abs() + 1e-6).all(), error.max()
