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


def test_module_available_is_a_constant_under_compile() -> None:
    """torch 2.11's Dynamo refuses to trace importlib.util.find_spec (2.13's folds it)."""
    import torch

    from tanh_attention import _torch_private

    assert _torch_private.module_available("torch")
    assert not _torch_private.module_available("no_such_module_tanh_attention")

    @torch.compile(backend="eager", fullgraph=True)
    def f(x: torch.Tensor) -> torch.Tensor:
        if _torch_private.module_available("torch"):
            return x + 1
        return x

    assert f(torch.zeros(2)).tolist() == [1.0, 1.0]


_GATHER = """
import os, sys, torch, torch.distributed as dist
from torch.distributed import _functional_collectives as funcol
from tanh_attention import _torch_private
# "fallback": the path of torch < 2.13 (no all_gather_single_autograd), taken here whatever
# this torch has
gather = {
    "native": _torch_private.all_gather_autograd,
    "fallback": _torch_private._all_gather_tensor_autograd,
}[sys.argv[1]]
dist.init_process_group("gloo", rank=0, world_size=1, store=dist.HashStore())
try:
    x = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    g = funcol.wait_tensor(gather(x, dist.group.WORLD))
    torch.testing.assert_close(g, x)
    grad = torch.randn(4, 3, dtype=torch.float64).mT  # not contiguous
    (got,) = torch.autograd.grad(g, x, grad)
    torch.testing.assert_close(got, grad)
finally:
    dist.destroy_process_group()
"""


@pytest.mark.parametrize("path", ["native", "fallback"])
def test_all_gather_autograd(path: str) -> None:
    """One rank: the gather is the identity, its backward takes a non-contiguous gradient."""
    import torch.distributed as dist

    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("needs torch.distributed with gloo")
    cmd = [sys.executable, "-c", _GATHER, path]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
