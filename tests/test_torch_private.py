"""Without the private torch API it uses, the package still imports and answers right.

Each case runs in a fresh interpreter in which the private names are removed before
``import tanh_attention``.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

_PRELUDE = """
import sys, types
import torch, torch._library.autograd as real
# torch keeps its own reference to the module; only a fresh import (ours) sees the stand-in
# without make_autograd_impl, so the op's Autograd kernel cannot be replaced.
sys.modules["torch._library.autograd"] = types.ModuleType("torch._library.autograd")
torch.backends.mkldnn.is_available = lambda: False  # no oneDNN fused tanh
import tanh_attention
sys.modules["torch._library.autograd"] = real
from tanh_attention import _torch_private
assert _torch_private.AUTOGRAD_KERNEL_REASON is not None
assert _torch_private.linear_pointwise() is None
from torch.autograd import forward_ad as fwAD
F = torch.float64
q, k, v = (torch.randn(2, 4, 3, dtype=F) for _ in range(3))
def reference(q, k, v):
    keep = torch.ones(4, 4, dtype=torch.bool).tril()
    a = torch.tanh(torch.where(keep, q @ k.mT * 0.5, torch.zeros((), dtype=F)))
    return a @ v, a
"""

CASES = {
    "eager": """
        o, a = tanh_attention.attn(q, k, v, scale=0.5, causal=True)
        torch.testing.assert_close((o, a), reference(q, k, v))
        why = tanh_attention.backends()[1].unavailable_reason()
        assert why is None, why
    """,
    "forward_ad_goes_to_the_composite": """
        t = torch.randn_like(q)
        with fwAD.dual_level():
            o, _ = tanh_attention.attn(fwAD.make_dual(q, t), k, v, scale=0.5, causal=True)
            got = fwAD.unpack_dual(o).tangent
        want = torch.func.jvp(lambda x: reference(x, k, v)[0], (q,), (t,))[1]
        torch.testing.assert_close(got, want)
        with fwAD.dual_level():
            try:
                tanh_attention.attn(fwAD.make_dual(q, t), k, v, backend="cpu")
            except ValueError as err:
                assert "private torch API" in str(err)
            else:
                raise AssertionError("backend='cpu' took forward AD without its kernel")
    """,
    "torch_func": """
        f = lambda x: tanh_attention.attn(x, k, v, scale=0.5, causal=True)[0].sum()
        g = torch.func.grad(f)(q)
        want = torch.func.grad(lambda x: reference(x, k, v)[0].sum())(q)
        torch.testing.assert_close(g, want)
    """,
    "backward": """
        x = q.clone().requires_grad_()
        o, _ = tanh_attention.attn(x, k, v, scale=0.5, causal=True, need_weights=False)
        (g,) = torch.autograd.grad(o.sum(), x)
        y = q.clone().requires_grad_()
        torch.testing.assert_close(g, torch.autograd.grad(reference(y, k, v)[0].sum(), y)[0])
    """,
}


@pytest.mark.parametrize("case", CASES)
def test_without_private_api(case: str) -> None:
    code = _PRELUDE + textwrap.dedent(CASES[case])
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
