"""The Triton backend (issue 12).

- ``test_interpreter_suite`` runs ``tests/triton_cases.py`` (the OpInfo-style checks,
  opcheck, compile, tanh accuracy) in a subprocess with ``TRITON_INTERPRET=1``, which
  Triton reads when its kernels are defined and the backend reads at import: it cannot be
  switched on in this process, where ``tanh_attention`` is already imported.
- Here, without the interpreter: importing the package does not import Triton; without a GPU
  the backend says why it cannot run and a forced call lists that reason.
- GPU-only checks (bfloat16, the fast ``tanh.approx.f32``, TF32) run where CUDA is, else they
  are skipped with the reason.
"""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

import tanh_attention
from samples import reference

ROOT = Path(__file__).resolve().parents[1]
HAS_TRITON = importlib.util.find_spec("triton") is not None
HAS_CUDA = torch.cuda.is_available()
needs_triton = pytest.mark.skipif(not HAS_TRITON, reason="Triton is not installed")


def _has_marker(name: str) -> bool:
    text = (ROOT / "pyproject.toml").read_text()
    return re.search(rf'^\s*"{name}:', text, re.M) is not None


# GPU-only tests carry the `cuda` marker once pyproject.toml registers it (--strict-markers).
_CUDA_MARKS = [pytest.mark.cuda] if _has_marker("cuda") else []
_ON_CUDA = [
    *_CUDA_MARKS,
    pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU (bf16 and tanh.approx.f32)"),
    needs_triton,
]


def on_cuda(f: Callable[..., None]) -> Callable[..., None]:
    """Mark a GPU-only test: skipped with its reason where there is no CUDA device."""
    for mark in _ON_CUDA:
        f = mark(f)
    return f


def _env(**extra: str) -> dict[str, str]:
    # Not this process's interpreter switch nor its pytest-xdist worker identity.
    env = {
        k: v
        for k, v in os.environ.items()
        if k != "TRITON_INTERPRET" and not k.startswith("PYTEST_XDIST")
    }
    env["PYTHONPATH"] = os.pathsep.join(
        [str(ROOT / "tests"), str(ROOT / "src"), env.get("PYTHONPATH", "")]
    )
    return {**env, **extra}


def test_import_does_not_import_the_kernels() -> None:
    """The kernel module (which imports Triton) loads only when the backend runs. (torch's
    own ``torch._dynamo`` imports Triton where it is installed; that is not ours.)"""
    code = (
        "import sys, tanh_attention\n"
        "assert 'tanh_attention.kernels.triton_attn' not in sys.modules\n"
        "print([b.name for b in tanh_attention.backends()])\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], env=_env(), capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr
    assert "triton" in out.stdout


def test_works_without_triton_installed() -> None:
    """With Triton unimportable, the package imports, runs, and the backend says why not."""
    code = (
        "import sys\n"
        "sys.modules['triton'] = None  # import triton raises; find_spec says None\n"
        "import torch, tanh_attention\n"
        "(b,) = [b for b in tanh_attention.backends() if b.name == 'triton']\n"
        "print(b.unavailable_reason())\n"
        "q = torch.randn(3, 4)\n"
        "print(tanh_attention.attn(q, q, q)[0].shape)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        env=_env(TRITON_INTERPRET="1"),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    assert "Triton is not installed" in out.stdout and "torch.Size([3, 4])" in out.stdout


@needs_triton
def test_interpreter_suite() -> None:
    """tests/triton_cases.py under TRITON_INTERPRET=1 (about 90 s on 2 cores)."""
    cmd = [
        sys.executable,
        "-m",
        "pytest",
        str(ROOT / "tests" / "triton_cases.py"),
        "-q",
        "-p",
        "no:cacheprovider",
        "-p",
        "no:randomly",
    ]
    out = subprocess.run(
        cmd, cwd=ROOT, env=_env(TRITON_INTERPRET="1"), capture_output=True, text=True, timeout=540
    )
    tail = (out.stdout + out.stderr)[-6000:]
    assert out.returncode == 0, tail
    assert re.search(r"\d+ passed", out.stdout) and "skipped" not in out.stdout, tail


@pytest.mark.skipif(HAS_CUDA, reason="checks the no-GPU reasons")
def test_without_gpu_or_interpreter_the_backend_says_why() -> None:
    triton = tanh_attention.backends()[0]
    assert triton.name == "triton" and not triton.available
    why = triton.unavailable_reason()
    assert why is not None
    assert ("Triton is not installed" in why) or ("TRITON_INTERPRET=1" in why), why
    q, k, v = (torch.randn(3, 4) for _ in range(3))
    with pytest.raises(ValueError, match=re.escape(why)):
        tanh_attention.attn(q, k, v, backend="triton")
    o, _ = tanh_attention.attn(q, k, v)  # the dispatcher picks another backend
    torch.testing.assert_close(o, reference(q, k, v)[0])


# --------------------------------------------------------------------------------------------
# On a GPU
# --------------------------------------------------------------------------------------------

GPU_CASES = [
    # (batch, n, m, d, e, causal, mask)
    ((2, 3), 200, 200, 64, 64, "none", False),
    ((2, 3), 200, 333, 128, 128, "bottom_right", False),
    ((1, 2), 257, 129, 80, 96, "top_left", True),
    ((2, 1), 100, 100, 256, 256, "top_left", False),
]


def _gpu_inputs(case: tuple[Any, ...], dtype: torch.dtype) -> tuple[Any, ...]:
    batch, n, m, d, e, causal, masked = case
    g = torch.Generator(device="cuda").manual_seed(0)
    q = torch.randn(*batch, n, d, device="cuda", generator=g)
    k = torch.randn(*batch, m, d, device="cuda", generator=g)
    v = torch.randn(*batch, m, e, device="cuda", generator=g)
    mask = (torch.rand(n, m, device="cuda", generator=g) < 0.8) if masked else None
    return q.to(dtype), k.to(dtype), v.to(dtype), mask, causal, d**-0.5


def _err(y: torch.Tensor, ref: torch.Tensor) -> float:
    return float((y.double() - ref).abs().max())


@on_cuda
@pytest.mark.parametrize("need_weights", [True, False], ids=["weights", "o_only"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", GPU_CASES, ids=lambda c: f"n{c[1]}m{c[2]}d{c[3]}{c[5]}")
def test_gpu_matches_reference(
    case: tuple[Any, ...], dtype: torch.dtype, need_weights: bool
) -> None:
    q, k, v, mask, causal, scale = _gpu_inputs(case, dtype)
    leaves = [x.clone().requires_grad_() for x in (q, k, v)]
    exact = [x.detach().double().requires_grad_() for x in (q, k, v)]
    comp = [x.detach().clone().requires_grad_() for x in (q, k, v)]
    o, a = tanh_attention.attn(
        *leaves, scale=scale, causal=causal, attn_mask=mask, need_weights=need_weights,
        backend="triton",
    )  # fmt: skip
    got = [o] if a is None else [o, a]
    ref = list(reference(*exact, mask, scale, causal))[: len(got)]
    base = list(reference(*comp, mask, scale, causal))[: len(got)]
    cot = [torch.randn_like(r) for r in ref]
    g = torch.autograd.grad(got, leaves, [c.to(dtype) for c in cot])
    g_ref = torch.autograd.grad(ref, exact, cot)
    g_base = torch.autograd.grad(base, comp, [c.to(dtype) for c in cot])
    eps = torch.finfo(dtype).eps
    for y, r, b in [*zip(got, ref, base, strict=True), *zip(g, g_ref, g_base, strict=True)]:
        floor = eps * (1 + float(r.detach().abs().max()))
        assert _err(y, r) <= 3 * max(_err(b, r), floor), (_err(y, r), _err(b, r))


def _gpu_tanh_error(fast: bool) -> float:
    from tanh_attention.kernels import triton_attn

    top = torch.tensor(10.0).view(torch.int32).item()
    x = torch.arange(0, top + 1, 37, dtype=torch.int32).view(torch.float32)
    x = torch.cat([x, -x]).cuda()
    exact = torch.tanh(x.double())
    mag = exact.abs().float()
    spacing = (torch.nextafter(mag, torch.tensor(float("inf"), device="cuda")) - mag).double()
    ulp = (triton_attn.tanh(x, fast=fast, block=4096).double() - exact).abs() / spacing
    return float(ulp.max())


@on_cuda
def test_gpu_accurate_tanh_within_4_ulp() -> None:
    assert _gpu_tanh_error(fast=False) <= 4.0


@on_cuda
def test_gpu_fast_tanh_error_is_bounded() -> None:
    """tanh.approx.f32: absolute error about 2^-10.7 (PTX ISA); relative, near 0, larger."""
    from tanh_attention.kernels import triton_attn

    x = torch.linspace(-10, 10, 1 << 20, device="cuda")
    err = (triton_attn.tanh(x, fast=True).double() - torch.tanh(x.double())).abs().max()
    assert float(err) < 2**-10
    assert _gpu_tanh_error(fast=True) > 4.0  # it is the approximation, not the accurate form


@on_cuda
def test_gpu_causal_skip_is_cheaper() -> None:
    """Causal skips about half the blocks: its forward takes well under the full one's time."""
    q, k, v = (torch.randn(4, 8, 4096, 64, device="cuda", dtype=torch.bfloat16) for _ in "qkv")

    def time(causal: bool) -> float:
        tanh_attention.attn(q, k, v, causal=causal, need_weights=False, backend="triton")
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(5):
            tanh_attention.attn(q, k, v, causal=causal, need_weights=False, backend="triton")
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end)

    assert time(True) < 0.75 * time(False)
