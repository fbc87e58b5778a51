"""Dropout on the weights: the mask's hash and statistics, and every path that drops.

The mask is a function of a seed and each weight's position (``tanh_attention.dropout``), so
the kernels make it again in the backward instead of storing it. These tests check:

- the hash bit for bit against plain Python integers (int32 products must wrap);
- its statistics: the kept fraction, no correlation between neighbours, seeds or batches;
- that the mask depends on nothing but the seed and the position (block sizes, causal
  skipping, the path, with or without weights);
- every path's output and gradients against a float64 reference written here, with the
  mask read off the output itself (``v = I`` makes ``o`` the dropped weights), so forward and
  backward must agree on it;
- compile (``dynamic=True``), export, opcheck, and the clear errors where dropout stops.
"""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch

from tanh_attention import attn, dropout, ops, scaled_dot_product_attention
from tanh_attention.dropout import Dropout
from tanh_attention.kernels import blockwise

F64 = torch.float64
CPU = torch.device("cpu")


def _lowbias32(x: int) -> int:
    """Chris Wellons' lowbias32 on Python integers (unsigned 32-bit)."""
    x &= 0xFFFFFFFF
    x ^= x >> 16
    x = (x * 0x7FEB352D) & 0xFFFFFFFF
    x ^= x >> 15
    x = (x * 0x846CA68B) & 0xFFFFFFFF
    return x ^ (x >> 16)


def _signed(x: int) -> int:
    return x - (1 << 32) if x >= 1 << 31 else x


def _kept_python(p: float, seed: int, w: int, i: int, j: int) -> bool:
    """The documented rule, from scratch: row key = h(h(h(seed) ^ w) ^ i), column key =
    h(j ^ 0x3C6EF372), weight hash = h(row ^ col) without its last xor-shift, kept iff the
    hash as a signed int32 is at least p * 2^32 - 2^31."""
    row = _lowbias32(_lowbias32(_lowbias32(seed) ^ w) ^ i)
    col = _lowbias32(j ^ 0x3C6EF372)
    x = row ^ col
    x ^= x >> 16
    x = (x * 0x7FEB352D) & 0xFFFFFFFF
    x ^= x >> 15
    x = (x * 0x846CA68B) & 0xFFFFFFFF
    return _signed(x) >= round(p * 2**32) - 2**31


def _reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    kept: torch.Tensor,
    p: float,
    *,
    scale: float = 1.0,
    keep: torch.Tensor | None = None,
) -> torch.Tensor:
    """float64 ``(keep * tanh(scale q k^T) * kept / (1 - p)) @ v``."""
    a = torch.tanh(scale * q.to(F64) @ k.to(F64).mT)
    if keep is not None:
        a = a * keep
    return (a * kept / (1 - p)) @ v.to(F64)


# --------------------------------------------------------------------------------------------
# The mask itself
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("size", [1, 15, 16, 17, 1000, 4099])
def test_hash_matches_python_integers(size: int) -> None:
    """Vectorized bodies and scalar tails alike wrap their int32 products."""
    x = torch.randint(-(2**31), 2**31 - 1, (size,), dtype=torch.int32)
    got = dropout._mix(x).tolist()
    assert got == [_signed(_lowbias32(int(v) & 0xFFFFFFFF)) for v in x]


def test_keep_follows_the_documented_rule() -> None:
    p, seed = 0.37, 123456789
    drop = Dropout(p, torch.tensor(seed))
    keep = drop.keep(range(3, 6), range(10, 17), range(1000, 1019), CPU)
    want = [
        [[_kept_python(p, seed, w, i, j) for j in range(1000, 1019)] for i in range(10, 17)]
        for w in range(3, 6)
    ]
    assert keep.tolist() == want
    transposed = drop.keep(range(3, 6), range(10, 17), range(1000, 1019), CPU, transposed=True)
    assert torch.equal(transposed, keep.mT)


@pytest.mark.parametrize("p", [0.05, 0.5, 0.9])
def test_kept_fraction_and_no_correlation(p: float) -> None:
    keep = dropout.keep_mask(p, torch.tensor(7), (4, 256, 300), CPU).double()
    count = keep.numel()
    sigma = math.sqrt(p * (1 - p) / count)
    assert abs(float(keep.mean()) - (1 - p)) < 6 * sigma
    other = dropout.keep_mask(p, torch.tensor(8), (4, 256, 300), CPU).double()
    pairs = {
        "next column": (keep[..., :-1], keep[..., 1:]),
        "next row": (keep[:, :-1], keep[:, 1:]),
        "next problem": (keep[:-1], keep[1:]),
        "next seed": (keep, other),
    }
    upper = torch.ones(256, 256, dtype=torch.bool).triu(1)  # (i, j) against (j, i), i < j
    pairs["transposed"] = (keep[:, :256, :256][:, upper], keep[:, :256, :256].mT[:, upper])
    for name, (x, y) in pairs.items():
        corr = torch.corrcoef(torch.stack([x.flatten(), y.flatten()]))[0, 1]
        assert abs(float(corr)) < 6 / math.sqrt(x.numel()), name
    # Every row and column is dropped at the same rate: no structure along either.
    for dim in (1, 2):
        rates = keep.mean(dim=(0, dim))
        spread = math.sqrt(p * (1 - p) / (4 * keep.shape[dim]))
        assert float((rates - (1 - p)).abs().max()) < 6 * spread


def test_p_one_drops_everything_and_p_near_zero_keeps_everything() -> None:
    assert not dropout.keep_mask(1.0, torch.tensor(3), (2, 5, 7), CPU).any()
    assert Dropout(1.0, torch.tensor(3)).scale == 0.0
    assert dropout.keep_mask(1e-12, torch.tensor(3), (2, 5, 7), CPU).all()


# --------------------------------------------------------------------------------------------
# Kernels: the mask does not depend on how the work is cut
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("causal", ["none", "top_left", "bottom_right"])
def test_blocks_and_skipping_change_no_mask(causal: str) -> None:
    q, k = torch.randn(3, 70, 8, dtype=F64), torch.randn(3, 90, 8, dtype=F64)
    v = torch.randn(3, 90, 5, dtype=F64)
    drop = Dropout(0.4, torch.tensor(11))
    outs = [
        blockwise.forward(q, k, v, None, 0.3, causal, dropout=drop, block_rows=r, block_cols=c)
        for r, c in ((None, None), (16, 32), (7, 13), (70, 90))
    ]
    for o, a in outs[1:]:
        torch.testing.assert_close(o, outs[0][0])
        torch.testing.assert_close(a, outs[0][1])
    g_o = torch.ones(3, 70, 5, dtype=F64)
    grads = [
        blockwise.backward(
            g_o, None, q, k, v, None, None, 0.3, causal, dropout=drop, block_rows=r, block_cols=c
        )
        for r, c in ((None, None), (16, 32), (7, 13))
    ]
    for g in grads[1:]:
        torch.testing.assert_close(g, grads[0])


def test_one_mask_on_every_cpu_path() -> None:
    """The same torch.manual_seed drops the same weights with weights or without, on the
    cpu backend and on the composite."""
    q, k, v = (torch.randn(2, 3, 20, 8, dtype=F64) for _ in range(3))
    outs = []
    for backend in ("cpu", "composite"):
        for need_weights in (True, False):
            torch.manual_seed(4)
            o, _ = attn(q, k, v, dropout_p=0.3, need_weights=need_weights, backend=backend)
            outs.append(o)
    for o in outs[1:]:
        torch.testing.assert_close(o, outs[0])


# --------------------------------------------------------------------------------------------
# Every path against a float64 reference, the mask read off the output
# --------------------------------------------------------------------------------------------

_CASES = [
    # q, k, v shapes; causal; a bool mask's shape (None: none)
    ((2, 3, 6, 4), (2, 3, 9, 4), "none", None),
    ((2, 3, 9, 4), (1, 1, 9, 4), "top_left", (9, 9)),  # k, v broadcast over batch and heads
    ((5, 4), (7, 4), "bottom_right", (1, 7)),
    ((300, 8, 8), (300, 8, 8), "none", None),  # many small problems: grouped blocks
    ((1, 40, 8), (1, 1100, 8), "bottom_right", None),  # more columns than a block
]


@pytest.mark.parametrize("need_weights", [False, True], ids=["o_only", "weights"])
@pytest.mark.parametrize("backend", ["cpu", "composite"])
@pytest.mark.parametrize(("q_shape", "k_shape", "causal", "mask_shape"), _CASES)
def test_matches_float64_reference(
    q_shape: tuple[int, ...],
    k_shape: tuple[int, ...],
    causal: str,
    mask_shape: tuple[int, ...] | None,
    backend: str,
    need_weights: bool,
) -> None:
    p, scale = 0.3, 0.5
    n, m = q_shape[-2], k_shape[-2]
    q = torch.randn(q_shape, dtype=F64, requires_grad=True)
    k = torch.randn(k_shape, dtype=F64, requires_grad=True)
    v = torch.randn(*k_shape[:-1], 3, dtype=F64, requires_grad=True)
    mask = None if mask_shape is None else torch.rand(mask_shape) < 0.8
    keep = torch.ones(n, m, dtype=torch.bool)
    if causal != "none":
        keep = keep.tril(0 if causal == "top_left" else m - n)
    if mask is not None:
        keep = keep & mask

    def run(values: torch.Tensor) -> torch.Tensor:
        torch.manual_seed(21)
        o, _ = attn(
            q, k, values, scale=scale, causal=causal, attn_mask=mask, dropout_p=p,
            need_weights=need_weights, backend=backend,
        )  # fmt: skip
        return o

    eye = torch.eye(m, dtype=F64).expand(*k_shape[:-2], m, m)
    kept = run(eye).detach() != 0  # same seed: the same mask, now visible
    o = run(v)
    want = _reference(q, k, v, kept, p, scale=scale, keep=keep)
    torch.testing.assert_close(o, want)
    g_o = torch.randn_like(o)
    got = torch.autograd.grad(o, (q, k, v), g_o)
    ref = torch.autograd.grad(want, (q, k, v), g_o)
    torch.testing.assert_close(got, ref)


def test_sdpa_gqa_dropout_matches_repeated_heads() -> None:
    """GQA keys each query head's mask by the query head: the same as repeating k and v."""
    q = torch.randn(2, 4, 6, 8, dtype=F64)
    k, v = torch.randn(2, 2, 7, 8, dtype=F64), torch.randn(2, 2, 7, 5, dtype=F64)
    torch.manual_seed(9)
    got = scaled_dot_product_attention(q, k, v, dropout_p=0.5, enable_gqa=True)
    torch.manual_seed(9)
    want = scaled_dot_product_attention(
        q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1), dropout_p=0.5
    )
    torch.testing.assert_close(got, want)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_low_precision_dropout_is_unbiased(dtype: torch.dtype) -> None:
    q, k, v = (torch.randn(1, 2, 64, 16, dtype=dtype) for _ in range(3))
    mean = (
        torch.stack(
            [attn(q, k, v, scale=0.25, dropout_p=0.5, need_weights=False)[0] for _ in range(300)]
        )
        .double()
        .mean(0)
    )
    want = torch.tanh(0.25 * q.double() @ k.double().mT) @ v.double()
    # 300 draws of p = 0.5: the mean's error is about 1/sqrt(300) of each term's spread.
    assert float((mean - want).abs().max()) < 0.25 * float(want.abs().max()) + 0.2


# --------------------------------------------------------------------------------------------
# Memory, compile, export, opcheck, errors
# --------------------------------------------------------------------------------------------


def test_o_only_saves_nothing_of_n_by_m() -> None:
    n = m = 600
    q, k, v = (torch.randn(1, n, 8, requires_grad=True) for _ in range(3))
    saved: list[int] = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        saved.append(t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        o, _ = attn(q, k, v, dropout_p=0.2, need_weights=False, causal=True)
    assert saved and max(saved) < n * m
    o.sum().backward()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):  # the check has teeth
        attn(q, k, v, dropout_p=0.2, need_weights=False, backend="composite")
    assert max(saved) >= n * m


def test_compile_dynamic_and_export() -> None:
    q, k, v = (torch.randn(2, 10, 8, requires_grad=True) for _ in range(3))

    def f(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return attn(q, k, v, dropout_p=0.5, need_weights=False)[0]

    compiled = torch.compile(f, dynamic=True, fullgraph=True)
    torch.manual_seed(1)
    a = compiled(q, k, v)
    torch.manual_seed(1)
    b = compiled(q, k, v)
    torch.testing.assert_close(a, b)  # reproducible under the compiled graph's own RNG
    eye = torch.eye(10).expand(2, 10, 10)
    torch.manual_seed(1)
    kept = compiled(q, k, eye).detach() != 0
    torch.manual_seed(1)
    o = compiled(q, k, v)
    want = _reference(q, k, v, kept, 0.5)
    torch.testing.assert_close(o, want.float(), atol=1e-5, rtol=1e-5)
    got = torch.autograd.grad(o.sum(), (q, k, v))
    ref = torch.autograd.grad(want.sum(), (q, k, v))
    torch.testing.assert_close(got, tuple(r.float() for r in ref), atol=1e-4, rtol=1e-4)

    class Layer(torch.nn.Module):
        def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            return f(q, k, v)

    x = (q.detach(), k.detach(), eye)  # the output is the weights after dropout
    exported = torch.export.export(Layer(), x)
    assert "tanh_attention.attn_lean" in str(exported.graph)
    out = exported.module()(*x)
    dropped = float((out == 0).float().mean())
    assert out.shape == (2, 10, 10) and 0.3 < dropped < 0.7  # p = 0.5 of 200 weights


@pytest.mark.parametrize("pair", [ops.attn, ops.attn_lean], ids=["attn", "attn_lean"])
def test_opcheck_with_dropout(pair: Any) -> None:
    q, k, v = (torch.randn(2, 6, 4, requires_grad=True) for _ in range(3))
    seed = torch.tensor(5)
    torch.library.opcheck(pair.forward, (q, k, v, None, 0.5, "top_left", 0.25, seed))


def test_dropout_without_seed_is_refused_by_the_op() -> None:
    q = torch.randn(4, 3)
    with pytest.raises(ValueError, match=r"dropout_p=0\.5 needs a 'dropout_seed'"):
        torch.ops.tanh_attention.attn_lean(q, q, q, None, 1.0, "none", 0.5)
    with pytest.raises(TypeError, match="'dropout_seed' must be a one-element int64"):
        torch.ops.tanh_attention.attn_lean(q, q, q, None, 1.0, "none", 0.5, torch.ones(2))


def test_double_backward_through_dropout_is_refused_clearly() -> None:
    q, k, v = (torch.randn(5, 4, dtype=F64, requires_grad=True) for _ in range(3))
    o, _ = attn(q, k, v, dropout_p=0.3, need_weights=False, backend="cpu")
    (g_q,) = torch.autograd.grad(o.sum(), (q,), create_graph=True)
    with pytest.raises(NotImplementedError, match="double backward through dropout"):
        g_q.sum().backward()
    # The composite has it: gradgradcheck with a fixed seed.
    seed = torch.tensor(3)

    def f(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return torch.ops.tanh_attention.attn_composite(q, k, v, None, 1.0, "none", None, 0.3, seed)[
            0
        ]

    assert torch.autograd.gradgradcheck(f, (q, k, v))


def test_forward_ad_and_vmap_with_dropout_go_to_the_composite() -> None:
    from torch.autograd import forward_ad as fwAD

    q, k, v = (torch.randn(5, 4, dtype=F64) for _ in range(3))
    t_q = torch.randn_like(q)
    torch.manual_seed(2)
    kept = attn(q, k, torch.eye(5, dtype=F64), dropout_p=0.3)[0] != 0
    with fwAD.dual_level():
        torch.manual_seed(2)
        o, _ = attn(fwAD.make_dual(q, t_q), k, v, dropout_p=0.3)
        tangent = fwAD.unpack_dual(o).tangent
    _, want = torch.func.jvp(lambda q: _reference(q, k, v, kept, 0.3), (q,), (t_q,))
    torch.testing.assert_close(tangent, want)
    batched = torch.func.vmap(
        lambda q: attn(q, k, v, dropout_p=0.3, need_weights=False)[0], randomness="different"
    )(torch.randn(3, 5, 4, dtype=F64))
    assert batched.shape == (3, 5, 4)
