"""bfloat16 against float32 at one large shape, forward and forward+backward (issue 11, goal 4).

    .venv/bin/python benchmarks/bfloat16.py [--n 4096] [--d 64] [--threads 1] [--repeats 5]

Times ``tanh_attention.attn`` (with weights and o only) in bfloat16 and in float32, and the
eager composite ``(tanh(scale * q @ k^T)) @ v`` in bfloat16, at B = H = 1, n = m, taking turns
each round; prints the best time of each and the ratios the goal names (ours bf16 / ours fp32,
ours bf16 / composite bf16), and the error of each bfloat16 output against a float64
computation from the same (bfloat16-rounded) inputs.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import torch

import tanh_attention


def _inputs(n: int, d: int, dtype: torch.dtype) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return [torch.randn(1, 1, n, d, generator=gen).to(dtype).requires_grad_() for _ in range(3)]


def _composite(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> tuple:
    a = torch.tanh((q @ k.mT) * scale)
    return a @ v, a


def _runner(impl: str, path: str, dtype: torch.dtype, n: int, d: int) -> Callable[[], object]:
    q, k, v = _inputs(n, d, dtype)
    scale = d**-0.5
    g_o = torch.randn(1, 1, n, d).to(dtype)
    g_a = torch.randn(1, 1, n, n).to(dtype)

    def run() -> object:
        if impl == "ours":
            o, a = tanh_attention.attn(q, k, v, scale=scale, need_weights=path != "o-only")
        else:
            o, a = _composite(q, k, v, scale)
        if path == "forward":
            return o
        outputs, grads = ((o, a), (g_o, g_a)) if path == "weights" else ((o,), (g_o,))
        return torch.autograd.grad(outputs, (q, k, v), grads)

    return run


def _errors(n: int, d: int) -> dict[str, float]:
    """Max |o - o_64| of each bfloat16 forward, o_64 from the same rounded inputs."""
    q, k, v = (x.detach() for x in _inputs(n, d, torch.bfloat16))
    scale = d**-0.5
    exact = _composite(q.double(), k.double(), v.double(), scale)[0]
    with torch.no_grad():
        ours = tanh_attention.attn(q, k, v, scale=scale)[0]
        composite = _composite(q, k, v, scale)[0]
    return {
        "ours bf16": (ours.double() - exact).abs().max().item(),
        "composite bf16": (composite.double() - exact).abs().max().item(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=4096)
    parser.add_argument("--d", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    if args.n < 1 or args.d < 1 or args.threads < 1 or args.repeats < 1:
        parser.error("--n, --d, --threads and --repeats must be positive")
    torch.set_num_threads(args.threads)
    cases = {
        (impl, dtype): None
        for impl, dtype in (
            ("ours", torch.bfloat16),
            ("ours", torch.float32),
            ("composite", torch.bfloat16),
        )
    }
    for path in ("forward", "weights", "o-only"):
        runners = {key: _runner(*key[:1], path, key[1], args.n, args.d) for key in cases}
        best = dict.fromkeys(runners, float("inf"))
        for fn in runners.values():
            fn()  # warm up
        for _ in range(args.repeats):
            for key, fn in runners.items():
                start = time.perf_counter()
                fn()
                best[key] = min(best[key], time.perf_counter() - start)
        ours_bf16 = best[("ours", torch.bfloat16)]
        print(
            f"{path:8s} ours bf16 {ours_bf16 * 1e3:8.1f} ms | ours fp32 "
            f"{best[('ours', torch.float32)] * 1e3:8.1f} ms | composite bf16 "
            f"{best[('composite', torch.bfloat16)] * 1e3:8.1f} ms | bf16/fp32 "
            f"{ours_bf16 / best[('ours', torch.float32)]:.2f}x | bf16/composite bf16 "
            f"{ours_bf16 / best[('composite', torch.bfloat16)]:.2f}x",
            flush=True,
        )
    for name, err in _errors(args.n, args.d).items():
        print(f"max |o - o_float64|, {name}: {err:.3g}")


if __name__ == "__main__":
    main()
