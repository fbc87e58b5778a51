"""``tanh_attention.scaled_dot_product_attention``: SDPA's contract with tanh in place of
softmax, against a float64 reference written here from the definition."""

from __future__ import annotations

import inspect

import pytest
import torch
import torch.nn.functional as F
from torch.autograd import gradcheck, gradgradcheck
from torch.nn.attention.bias import causal_lower_right, causal_upper_left

from tanh_attention import scaled_dot_product_attention as sdpa

F64 = torch.float64


def reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    keep: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    scale: float | None = None,
) -> torch.Tensor:
    """tanh(where(keep, q k^T * scale + bias, 0)) @ v, heads already matched."""
    s = q @ k.mT * (q.shape[-1] ** -0.5 if scale is None else scale)
    if bias is not None:
        s = s + bias
    if keep is not None:
        s = torch.where(keep, s, torch.zeros((), dtype=s.dtype))
    return torch.tanh(s) @ v


def _qkv(hq: int = 4, hkv: int = 4, n: int = 3, m: int = 5, dtype: torch.dtype = F64) -> tuple:
    return (
        torch.randn(2, hq, n, 8, dtype=dtype),
        torch.randn(2, hkv, m, 8, dtype=dtype),
        torch.randn(2, hkv, m, 6, dtype=dtype),
    )


def test_signature_and_defaults_match_sdpa() -> None:
    # SDPA is a builtin without __text_signature__: its docstring states the signature.
    doc = F.scaled_dot_product_attention.__doc__ or ""
    start = doc.index("scaled_dot_product_attention(")
    text = " ".join(doc[start : doc.index(")", start) + 1].split())
    theirs = inspect.signature(eval(f"lambda {text[text.index('(') + 1 : -1]}: None")).parameters
    ours = inspect.signature(sdpa).parameters
    assert list(ours) == list(theirs)
    for name, p in theirs.items():
        assert ours[name].default == p.default, name


def test_default_scale_and_bool_mask() -> None:
    q, k, v = _qkv()
    keep = torch.rand(3, 5) < 0.6
    torch.testing.assert_close(sdpa(q, k, v), reference(q, k, v))
    torch.testing.assert_close(sdpa(q, k, v, keep), reference(q, k, v, keep))
    torch.testing.assert_close(sdpa(q, k, v, scale=0.3), reference(q, k, v, scale=0.3))


@pytest.mark.parametrize("low", ["-inf", "finfo.min"])
def test_float_mask_is_a_bias_whose_masked_entries_take_no_part(low: str) -> None:
    q, k, v = (x.requires_grad_() for x in _qkv())
    value = float("-inf") if low == "-inf" else torch.finfo(F64).min
    bias = torch.randn(4, 3, 5, dtype=F64)
    dropped = torch.rand(4, 3, 5) < 0.3
    mask = bias.masked_fill(dropped, value).requires_grad_()
    got = sdpa(q, k, v, mask)
    want = reference(q, k, v, dropped.logical_not(), bias.masked_fill(dropped, 0))
    torch.testing.assert_close(got, want)
    (g_mask,) = torch.autograd.grad(got.square().sum(), mask)
    assert torch.equal(g_mask[dropped], torch.zeros_like(g_mask[dropped]))  # exactly 0
    b = bias.masked_fill(dropped, 0).requires_grad_()
    (g_bias,) = torch.autograd.grad(reference(q, k, v, dropped.logical_not(), b).square().sum(), b)
    torch.testing.assert_close(g_mask, g_bias)


def test_causal_objects_and_is_causal() -> None:
    q, k, v = _qkv(n=3, m=5)
    top = torch.ones(3, 5, dtype=torch.bool).tril()
    bottom = torch.ones(3, 5, dtype=torch.bool).tril(2)
    torch.testing.assert_close(sdpa(q, k, v, is_causal=True), reference(q, k, v, top))
    torch.testing.assert_close(sdpa(q, k, v, causal_upper_left(3, 5)), reference(q, k, v, top))
    torch.testing.assert_close(sdpa(q, k, v, causal_lower_right(3, 5)), reference(q, k, v, bottom))


def test_mask_with_is_causal_is_refused_as_sdpa_does() -> None:
    q, k, v = _qkv()
    with pytest.raises(RuntimeError):
        F.scaled_dot_product_attention(q, k, v, torch.ones(3, 5, dtype=torch.bool), is_causal=True)
    with pytest.raises(ValueError, match="either attn_mask or is_causal"):
        sdpa(q, k, v, torch.ones(3, 5, dtype=torch.bool), is_causal=True)


@pytest.mark.parametrize("hkv", [1, 2], ids=["mqa", "gqa"])
def test_gqa_groups_heads_as_sdpa(hkv: int) -> None:
    q, k, v = (x.requires_grad_() for x in _qkv(hq=4, hkv=hkv))
    keep = torch.rand(2, 4, 3, 5) < 0.7
    got = sdpa(q, k, v, keep, enable_gqa=True)
    r = 4 // hkv
    want = reference(q, k.repeat_interleave(r, 1), v.repeat_interleave(r, 1), keep)
    torch.testing.assert_close(got, want)
    g = torch.autograd.grad(got.sum(), (q, k, v))
    w = torch.autograd.grad(want.sum(), (q, k, v))
    torch.testing.assert_close(g, w)  # gradients of k, v summed per group
    with pytest.raises(ValueError, match="multiple of the key/value heads"):
        sdpa(*_qkv(hq=4, hkv=3), enable_gqa=True)


def test_dropout_unbiased_and_reproducible() -> None:
    q, k, v = _qkv(n=4, m=6)
    torch.manual_seed(5)
    a = sdpa(q, k, v, dropout_p=0.4)
    torch.manual_seed(5)
    b = sdpa(q, k, v, dropout_p=0.4)
    assert torch.equal(a, b) and not torch.equal(a, sdpa(q, k, v, dropout_p=0.4))
    mean = torch.stack([sdpa(q, k, v, dropout_p=0.4) for _ in range(4000)]).mean(0)
    torch.testing.assert_close(mean, reference(q, k, v), rtol=0, atol=0.08)


@pytest.mark.parametrize(
    ("dtype", "tol"), [(torch.float32, 1e-5), (torch.bfloat16, 5e-2), (torch.float16, 5e-3)]
)
def test_dtypes(dtype: torch.dtype, tol: float) -> None:
    q, k, v = _qkv(dtype=dtype)
    bias = torch.randn(3, 5, dtype=dtype)
    got = sdpa(q, k, v, bias)
    assert got.dtype == dtype
    want = reference(q.double(), k.double(), v.double(), None, bias.double())
    torch.testing.assert_close(got.double(), want, rtol=tol, atol=tol * 8)


def test_gradcheck_and_gradgradcheck() -> None:
    q, k, v = (x.requires_grad_() for x in _qkv(hq=2, hkv=1, n=3, m=4))
    bias = torch.randn(2, 3, 4, dtype=F64).requires_grad_()
    keep = torch.rand(3, 4) < 0.7

    def f(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return sdpa(q, k, v, b.masked_fill(keep.logical_not(), float("-inf")), enable_gqa=True)

    assert gradcheck(f, (q, k, v, bias))
    assert gradgradcheck(f, (q, k, v, bias))
    assert gradcheck(lambda *x: sdpa(*x, is_causal=True), (q, k, v))


def test_compile_dynamic_fullgraph() -> None:
    def f(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return sdpa(q, k, v, mask, enable_gqa=True)

    torch._dynamo.reset()
    compiled = torch.compile(f, fullgraph=True, dynamic=True, backend="aot_eager")
    for n in (3, 5):
        q, k, v = _qkv(hq=4, hkv=2, n=n, m=6)
        mask = torch.randn(n, 6, dtype=F64).masked_fill(torch.rand(n, 6) < 0.3, float("-inf"))
        dropped = mask == float("-inf")
        want = reference(
            q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1), ~dropped,
            mask.masked_fill(dropped, 0),
        )  # fmt: skip
        torch.testing.assert_close(compiled(q, k, v, mask), want)


def test_bad_arguments() -> None:
    q, k, v = _qkv()
    with pytest.raises(TypeError, match="is_causal"):
        sdpa(q, k, v, is_causal=1)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="attn_mask"):
        sdpa(q, k, v, torch.ones(3, 5, dtype=torch.long))
    with pytest.raises(ValueError, match="dropout_p"):
        sdpa(q, k, v, dropout_p=1.5)
    with pytest.raises(TypeError, match="'q'"):
        sdpa([1.0], k, v)  # type: ignore[arg-type]
