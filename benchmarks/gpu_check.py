"""Issue 12's GPU table: the Triton kernels against SDPA (flash, cuDNN), the eager composite
and torch.compile of it, in one run on one machine.

    python benchmarks/gpu_check.py              # on a CUDA machine (benchmarks/gpu_check.sh)
    python benchmarks/gpu_check.py --dry-run    # CPU, Triton's interpreter, tiny sizes

Shapes: B=4, H=16, n = m in {1024, 4096, 16384}, d = e in {64, 128}, bfloat16; forward and
forward+backward; causal (top-left) or not; o only or with weights (SDPA has no weights).
Each cell: median of 5 timed runs after a warm-up. TFLOP/s counts 4nmd per batch-head for
the forward and 2.5x that for forward+backward; causal counts half. Peak memory is the
largest allocation above the inputs during the call. Then the fast tanh's error
(``tanh.approx.f32``) and what it does to o. A cell that cannot run says why (out of memory,
not supported, over the time budget); nothing else is caught.
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

if "--dry-run" in sys.argv:
    os.environ["TRITON_INTERPRET"] = "1"  # before Triton's kernels are defined

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

import tanh_attention
from tanh_attention.kernels import triton_attn

BUDGET_S = 7 * 60  # the whole table; rows past it are marked, not run


def _composite(q: Any, k: Any, v: Any, causal: bool, weights: bool) -> Any:
    x = (q @ k.transpose(-1, -2)) * (q.shape[-1] ** -0.5)
    if causal:
        keep = torch.ones(x.shape[-2:], dtype=torch.bool, device=x.device).tril()
        x = torch.where(keep, x, 0.0)
    a = torch.tanh(x)
    return (a @ v, a) if weights else a @ v


_COMPILED = torch.compile(_composite, dynamic=True)


def _ours(q: Any, k: Any, v: Any, causal: bool, weights: bool) -> Any:
    o, a = tanh_attention.attn(
        q, k, v, scale=q.shape[-1] ** -0.5, causal=causal, need_weights=weights, backend="triton"
    )
    return (o, a) if weights else o


def _ours_fast(q: Any, k: Any, v: Any, causal: bool, weights: bool) -> Any:
    o, a = triton_attn.forward(
        q, k, v, None, q.shape[-1] ** -0.5, "top_left" if causal else "none",
        need_weights=weights, fast_tanh=True,
    )  # fmt: skip
    return (o, a) if weights else o


def _sdpa(backend: SDPBackend) -> Callable[..., Any]:
    def f(q: Any, k: Any, v: Any, causal: bool, weights: bool) -> Any:
        with sdpa_kernel(backend):
            return F.scaled_dot_product_attention(q, k, v, is_causal=causal)

    return f


METHODS: dict[str, Callable[..., Any]] = {
    "ours": _ours,
    "ours fast tanh": _ours_fast,  # forward only: the op's backward uses the accurate tanh
    "sdpa flash": _sdpa(SDPBackend.FLASH_ATTENTION),
    "sdpa cudnn": _sdpa(SDPBackend.CUDNN_ATTENTION),
    "composite": _composite,
    "compile(composite)": _COMPILED,
}


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _measure(
    f: Callable[..., Any], args: tuple[Any, ...], backward: bool, device: str, reps: int
) -> tuple[float, float]:
    """(median seconds, peak bytes above the inputs) of ``f`` (and its backward)."""

    def once() -> None:
        out = f(*args)
        if backward:
            outs = out if isinstance(out, tuple) else (out,)
            torch.autograd.backward(outs, [torch.ones_like(y) for y in outs])
        for x in args[:3]:
            x.grad = None

    once()  # warm-up: compiles
    _sync(device)
    if device == "cuda":
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(reps):
        _sync(device)
        start = time.perf_counter()
        once()
        _sync(device)
        times.append(time.perf_counter() - start)
    peak = torch.cuda.max_memory_allocated() - base if device == "cuda" else float("nan")
    return statistics.median(times), peak


def _cell(
    name: str, shape: tuple[int, int, int, int], causal: bool, backward: bool, weights: bool,
    device: str, dtype: torch.dtype, reps: int, started: float,
) -> str:  # fmt: skip
    b, h, n, d = shape
    if name.startswith("sdpa") and weights:
        return "no weights"
    if name == "ours fast tanh" and backward:
        return "fwd only"
    if name.startswith("sdpa") and device != "cuda":
        return "cuda only"
    if name == "ours fast tanh" and device != "cuda":
        return "cuda only"
    dense = b * h * n * n * torch.finfo(dtype).bits // 8
    if name in ("composite", "compile(composite)") and dense * (4 if backward else 2) > 60e9:
        return "n x m too large"
    if time.perf_counter() - started > BUDGET_S:
        return "over budget"
    g = torch.Generator(device=device).manual_seed(0)
    q, k, v = (
        torch.randn(b, h, n, d, device=device, dtype=dtype, generator=g).requires_grad_(backward)
        for _ in range(3)
    )
    try:
        seconds, peak = _measure(
            lambda *a: METHODS[name](*a, causal, weights), (q, k, v), backward, device, reps
        )
    except torch.OutOfMemoryError:
        return "OOM"
    except RuntimeError as err:  # e.g. an SDPA backend that does not take these inputs
        if "No available kernel" in str(err) or "not supported" in str(err).lower():
            return "not supported"
        raise
    finally:
        del q, k, v
        if device == "cuda":
            torch.cuda.empty_cache()
    flops = 4 * n * n * d * b * h * (2.5 if backward else 1.0) * (0.5 if causal else 1.0)
    mem = "" if math.isnan(peak) else f" {peak / 2**30:.1f}G"
    return f"{flops / seconds / 1e12:.1f}T {seconds * 1e3:.2f}ms{mem}"


def _fast_tanh_error(device: str) -> str:
    if device != "cuda":
        return "fast tanh: cuda only (the interpreter has no inline asm)"
    x = torch.linspace(-10, 10, 1 << 22, device=device)
    exact = torch.tanh(x.double())
    fast = triton_attn.tanh(x, fast=True).double()
    accurate = triton_attn.tanh(x).double()
    mag = exact.abs().float()
    spacing = (torch.nextafter(mag, torch.tensor(float("inf"), device=device)) - mag).double()
    lines = [
        f"tanh.approx.f32: max abs error {float((fast - exact).abs().max()):.3g}, "
        f"max ulp {float(((fast - exact).abs() / spacing).max()):.3g}",
        f"accurate form:   max abs error {float((accurate - exact).abs().max()):.3g}, "
        f"max ulp {float(((accurate - exact).abs() / spacing).max()):.3g}",
    ]
    q, k, v = (torch.randn(4, 16, 1024, 64, device=device, dtype=torch.bfloat16) for _ in "qkv")
    ref = tanh_attention.attn(q.double(), k.double(), v.double(), scale=0.125, backend="composite")
    for fast_tanh in (False, True):
        o, _ = triton_attn.forward(q, k, v, None, 0.125, "none", need_weights=False,
                                   fast_tanh=fast_tanh)  # fmt: skip
        err = float((o.double() - ref[0]).abs().max())
        lines.append(f"o (bf16, n=1024, d=64), fast_tanh={fast_tanh}: max abs error {err:.3g}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dry-run", action="store_true", help="CPU, interpreter, tiny sizes")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    if args.dry_run:
        device, dtype, reps = "cpu", torch.float32, 1
        shapes = [(1, 2, 64, 16)]
        names = ["ours", "ours fast tanh", "sdpa flash", "composite"]
    else:
        if not torch.cuda.is_available():
            print("no CUDA device: run with --dry-run on CPU", file=sys.stderr)
            return 2
        device, dtype, reps = "cuda", torch.bfloat16, 5
        shapes = [(4, 16, n, d) for n in (1024, 4096, 16384) for d in (64, 128)]
        names = list(METHODS)
        print(torch.cuda.get_device_name(), "torch", torch.__version__, end=" ")
    import triton

    print("triton", triton.__version__, dtype)
    print(
        "cells: TFLOP/s (4nmd fwd, 2.5x for fwd+bwd, causal half), median time, peak memory "
        "above inputs"
    )
    header = ["B,H,n,d", "mode", "causal", "out", *names]
    print(" | ".join(header))
    for shape in shapes:
        for backward in (False, True):
            for causal in (False, True):
                for weights in (False, True):
                    row = [
                        ",".join(map(str, shape)),
                        "fwd+bwd" if backward else "fwd",
                        "causal" if causal else "full",
                        "o,a" if weights else "o",
                    ]
                    cell = (shape, causal, backward, weights, device, dtype, reps, started)
                    row += [_cell(name, *cell) for name in names]
                    print(" | ".join(row), flush=True)
    print(_fast_tanh_error(device))
    print(f"total {time.perf_counter() - started:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
