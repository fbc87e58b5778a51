"""Two rules for many small problems, each timed both ways in one process, taking turns.

    .venv/bin/python benchmarks/small_problems.py [--threads 1]

- Grouping (``kernels/blockwise._SMALL``): problems of at most that many ``n * m`` entries
  are computed several to a block. Times ``attn`` with the limit just below and at n * m for
  B x H x n x n x d problems: forward, (o, a) forward+backward and o-only forward+backward.
- Keeping ``a`` (``ops._Eager``): the o-only pair keeps ``a`` for the backward of short
  sequences instead of recomputing it. Times o-only forward+backward (recomputing where the
  rule says so), the with-weights call differentiated through ``o`` alone (which keeps
  ``a``), and the eager composite.

Prints the best of 10 runs of each (after 3 warm-ups), in ms.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import torch

import tanh_attention
from tanh_attention.kernels import blockwise


def _best_ms(cases: dict[str, Callable[[], object]], runs: int = 10) -> dict[str, float]:
    best = dict.fromkeys(cases, float("inf"))
    for _ in range(3):
        for case in cases.values():
            case()
    for _ in range(runs):
        for name, case in cases.items():
            start = time.perf_counter()
            case()
            best[name] = min(best[name], (time.perf_counter() - start) * 1e3)
    return best


def _grouping(b: int, h: int, n: int, d: int) -> None:
    q, k, v = (torch.randn(b, h, n, d, requires_grad=True) for _ in range(3))
    g_o, g_a = torch.randn(b, h, n, d), torch.randn(b, h, n, n)
    default = blockwise._SMALL

    def with_limit(limit: int, run: Callable[[], object]) -> Callable[[], object]:
        def case() -> object:
            blockwise._SMALL = limit
            try:
                return run()
            finally:
                blockwise._SMALL = default

        return case

    def forward() -> object:
        with torch.no_grad():
            return tanh_attention.attn(q, k, v)

    def weights() -> object:
        o, a = tanh_attention.attn(q, k, v)
        return torch.autograd.grad((o, a), (q, k, v), (g_o, g_a))

    def o_only() -> object:
        o, _ = tanh_attention.attn(q, k, v, need_weights=False)
        return torch.autograd.grad(o, (q, k, v), g_o)

    for label, run in (("forward", forward), ("(o, a) fwd+bwd", weights), ("o-only", o_only)):
        cases = {
            "one per block": with_limit(n * n - 1, run),
            "grouped": with_limit(n * n, run),
        }
        figures = ", ".join(f"{name} {ms:.2f}" for name, ms in _best_ms(cases).items())
        print(f"grouping {b}x{h}x{n}x{n} d={d}, {label}: {figures} ms")


def _keeping(b: int, h: int, n: int, d: int) -> None:
    q, k, v = (torch.randn(b, h, n, d, requires_grad=True) for _ in range(3))
    g_o = torch.randn(b, h, n, d)
    scale = d**-0.5

    def o_only() -> object:
        o, _ = tanh_attention.attn(q, k, v, need_weights=False)
        return torch.autograd.grad(o, (q, k, v), g_o)

    def keeping() -> object:
        o, _ = tanh_attention.attn(q, k, v)
        return torch.autograd.grad(o, (q, k, v), g_o)

    def composite() -> object:
        o = torch.tanh((q * scale) @ k.mT) @ v
        return torch.autograd.grad(o, (q, k, v), g_o)

    cases = {"o-only": o_only, "keeping a": keeping, "composite": composite}
    figures = ", ".join(f"{name} {ms:.2f}" for name, ms in _best_ms(cases).items())
    print(f"keeping a {b}x{h}x{n}x{n} d={d}, fwd+bwd through o: {figures} ms")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"threads {args.threads}; {tanh_attention.kernels.cpu.tanh_method(torch.float32)}")
    _grouping(4, 8, 256, 64)
    _grouping(2, 8, 512, 64)
    _keeping(4, 8, 256, 64)
    _keeping(2, 8, 512, 64)


if __name__ == "__main__":
    main()
