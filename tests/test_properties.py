"""Property-based tests: random shapes, broadcasts, scales and masks against the reference."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import tanh_attention
from samples import reference

dims = st.integers(min_value=0, max_value=4)
batch_dim = st.sampled_from([1, 2, 3])


@st.composite
def problems(draw: st.DrawFn) -> dict[str, object]:
    n, m, d, e = draw(dims), draw(dims), draw(dims), draw(dims)
    rank = draw(st.integers(0, 2))
    batch = [draw(batch_dim) for _ in range(rank)]

    def shrink(shape: list[int]) -> list[int]:
        # each input keeps a suffix of the batch dims, some of them broadcast as 1
        keep = draw(st.integers(0, len(shape)))
        return [s if draw(st.booleans()) else 1 for s in shape[len(shape) - keep :]]

    seed = draw(st.integers(0, 2**16))
    gen = torch.Generator().manual_seed(seed)

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(shape, generator=gen, dtype=torch.float64)

    use_mask = draw(st.booleans())
    return {
        "q": randn(*batch, n, d),
        "k": randn(*shrink(batch), m, d),
        "v": randn(*shrink(batch), m, e),
        "attn_mask": torch.rand(n, m, generator=gen) < 0.6 if use_mask else None,
        "scale": draw(st.floats(-2.0, 2.0, allow_nan=False)),
        "causal": draw(st.booleans()),
    }


@settings(max_examples=60, deadline=None)
@given(problems())
def test_public_attn_matches_reference(p: dict[str, object]) -> None:
    q, k, v = (p[x].clone().requires_grad_() for x in "qkv")  # type: ignore[union-attr]
    mask, scale, causal = p["attn_mask"], p["scale"], p["causal"]
    o, a = tanh_attention.attn(q, k, v, scale=scale, causal=causal, attn_mask=mask)  # type: ignore[arg-type]
    o_ref, a_ref = reference(q, k, v, mask, scale, causal)  # type: ignore[arg-type]
    torch.testing.assert_close((o, a), (o_ref, a_ref))
    g_o, g_a = torch.randn_like(o), torch.randn_like(a)
    got = torch.autograd.grad((o, a), (q, k, v), (g_o, g_a), allow_unused=True)
    want = torch.autograd.grad((o_ref, a_ref), (q, k, v), (g_o, g_a), allow_unused=True)
    for g, w, x in zip(got, want, (q, k, v), strict=True):
        g = torch.zeros_like(x) if g is None else g
        w = torch.zeros_like(x) if w is None else w
        assert g.shape == x.shape
        torch.testing.assert_close(g, w)
