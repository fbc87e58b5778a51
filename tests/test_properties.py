"""Property-based tests: random shapes, broadcasts, scales, causal variants and masks against
the float64 reference of ``samples.py``.

Each of q, k, v and the mask takes its own suffix of one batch shape (some dims broadcast as
1), so v or the mask may carry batch dims that q and k lack: ``a`` then has the batch of q, k
and the mask, ``o`` that of all four.
"""

from __future__ import annotations

from typing import Any

import torch
from hypothesis import example, given, note, settings
from hypothesis import strategies as st

import tanh_attention
from samples import reference

dims = st.integers(min_value=0, max_value=4)
batch_dim = st.sampled_from([1, 2, 3])
# The public function's spellings of the causal variants, and the one the reference takes.
CAUSAL = {False: "none", "top_left": "top_left", True: "top_left", "bottom_right": "bottom_right"}


@st.composite
def problems(draw: st.DrawFn) -> dict[str, Any]:
    n, m, d, e = draw(dims), draw(dims), draw(dims), draw(dims)
    rank = draw(st.integers(0, 3))
    batch = [draw(batch_dim) for _ in range(rank)]

    def suffix() -> list[int]:
        # a suffix of the batch dims, some of them broadcast as 1
        keep = draw(st.integers(0, len(batch)))
        return [s if draw(st.booleans()) else 1 for s in batch[len(batch) - keep :]]

    q_batch, k_batch, v_batch = suffix(), suffix(), suffix()
    seed = draw(st.integers(0, 2**16))
    gen = torch.Generator().manual_seed(seed)

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(shape, generator=gen, dtype=torch.float64)

    mask = None
    if draw(st.booleans()):
        # its own batch dims; rows and columns each full or broadcast (key padding: (1, m))
        rows = n if draw(st.booleans()) else 1
        cols = m if draw(st.booleans()) else 1
        mask = torch.rand(*suffix(), rows, cols, generator=gen) < 0.6
    causal = draw(st.sampled_from(list(CAUSAL)))
    scale = draw(st.floats(-2.0, 2.0, allow_nan=False))
    note(f"q {q_batch} k {k_batch} v {v_batch} n={n} m={m} d={d} e={e} causal={causal!r}")
    return {
        "q": randn(*q_batch, n, d),
        "k": randn(*k_batch, m, d),
        "v": randn(*v_batch, m, e),
        "attn_mask": mask,
        "scale": scale,
        "causal": causal,
        "seed": seed,
    }


def _fixed(
    q: tuple[int, ...],
    k: tuple[int, ...],
    v: tuple[int, ...],
    mask: tuple[int, ...] | None,
    causal: bool | str,
    scale: float,
) -> dict[str, Any]:
    """A problem pinned with @example, so every run covers it whatever Hypothesis draws."""
    gen = torch.Generator().manual_seed(1)
    t = [torch.randn(s, generator=gen, dtype=torch.float64) for s in (q, k, v)]
    m = None if mask is None else torch.rand(mask, generator=gen) < 0.6
    return {"q": t[0], "k": t[1], "v": t[2], "attn_mask": m, "scale": scale, "causal": causal,
            "seed": 1}  # fmt: skip


# v with batch dims that q, k and the mask lack; a mask with batch dims of its own.
V_ONLY_BATCH = _fixed((3, 2), (4, 2), (2, 4, 3), None, "bottom_right", 0.9)
MASK_ONLY_BATCH = _fixed((3, 2), (4, 2), (4, 3), (2, 3, 4), True, -1.2)
BOTH = _fixed((1, 3, 2), (4, 2), (3, 1, 4, 3), (2, 1, 4), "bottom_right", 0.7)


def _leaves(p: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return tuple(p[x].clone().requires_grad_() for x in "qkv")  # type: ignore[return-value]


def _assert_grads(got: tuple[Any, ...], want: tuple[Any, ...], inputs: tuple[Any, ...]) -> None:
    for g, w, x in zip(got, want, inputs, strict=True):
        g = torch.zeros_like(x) if g is None else g
        w = torch.zeros_like(x) if w is None else w
        assert g.shape == x.shape
        torch.testing.assert_close(g, w)


@settings(max_examples=60, deadline=None)
@given(problems())
@example(V_ONLY_BATCH)
@example(MASK_ONLY_BATCH)
@example(BOTH)
def test_public_attn_matches_reference(p: dict[str, Any]) -> None:
    q, k, v = _leaves(p)
    mask, scale, causal = p["attn_mask"], p["scale"], p["causal"]
    o, a = tanh_attention.attn(q, k, v, scale=scale, causal=causal, attn_mask=mask)
    o_ref, a_ref = reference(q, k, v, mask, scale, CAUSAL[causal])
    assert o.shape == o_ref.shape and a.shape == a_ref.shape
    torch.testing.assert_close((o, a), (o_ref, a_ref))
    gen = torch.Generator().manual_seed(p["seed"] + 1)
    g_o = torch.randn(o.shape, generator=gen, dtype=o.dtype)
    g_a = torch.randn(a.shape, generator=gen, dtype=a.dtype)
    got = torch.autograd.grad((o, a), (q, k, v), (g_o, g_a), allow_unused=True)
    want = torch.autograd.grad((o_ref, a_ref), (q, k, v), (g_o, g_a), allow_unused=True)
    _assert_grads(got, want, (q, k, v))


@settings(max_examples=60, deadline=None)
@given(problems())
@example(V_ONLY_BATCH)
@example(MASK_ONLY_BATCH)
@example(BOTH)
def test_cpu_backend_o_only_matches_reference(p: dict[str, Any]) -> None:
    """The forced CPU backend without weights (the blocked kernels that never build a)."""
    q, k, v = _leaves(p)
    mask, scale, causal = p["attn_mask"], p["scale"], p["causal"]
    o, none = tanh_attention.attn(
        q, k, v, scale=scale, causal=causal, attn_mask=mask, need_weights=False, backend="cpu"
    )
    assert none is None
    o_ref, _ = reference(q, k, v, mask, scale, CAUSAL[causal])
    assert o.shape == o_ref.shape
    torch.testing.assert_close(o, o_ref)
    g_o = torch.randn(o.shape, generator=torch.Generator().manual_seed(p["seed"]), dtype=o.dtype)
    got = torch.autograd.grad(o, (q, k, v), g_o, allow_unused=True)
    want = torch.autograd.grad(o_ref, (q, k, v), g_o, allow_unused=True)
    _assert_grads(got, want, (q, k, v))


@settings(max_examples=40, deadline=None)
@given(problems())
@example(V_ONLY_BATCH)
@example(MASK_ONLY_BATCH)
@example(BOTH)
def test_public_attn_double_backward_matches_reference(p: dict[str, Any]) -> None:
    """Second order: the VJP of the VJP, with cotangents on all of (g_q, g_k, g_v) at once
    (gradgradcheck's one-hot cotangents never combine them)."""
    q, k, v = _leaves(p)
    mask, scale, causal = p["attn_mask"], p["scale"], p["causal"]
    gen = torch.Generator().manual_seed(p["seed"] + 2)

    def second(o: torch.Tensor, a: torch.Tensor) -> tuple[tuple[Any, ...], tuple[Any, ...]]:
        g_o = torch.randn(o.shape, generator=gen, dtype=o.dtype).requires_grad_()
        grads = torch.autograd.grad(o, (q, k, v), g_o, create_graph=True)
        xi = [torch.randn(x.shape, generator=gen, dtype=x.dtype) for x in (q, k, v)]
        wrt = (g_o, q, k, v)
        return torch.autograd.grad(grads, wrt, xi, allow_unused=True), wrt

    got, wrt = second(*tanh_attention.attn(q, k, v, scale=scale, causal=causal, attn_mask=mask))
    gen.manual_seed(p["seed"] + 2)
    want, _ = second(*reference(q, k, v, mask, scale, CAUSAL[causal]))
    _assert_grads(got, want, wrt)
