"""bfloat16 calls with and without AVX512-BF16's pairs (``kernels/pairs.c``), same process.

    .venv/bin/python benchmarks/pairs.py [--threads 1] [--repeats 5] [--shapes B,H,n,d ...]

For each shape (default: n = m = 4096 at B = H = 1, d = 64, then the model shapes of
``tanh-attention bench --models --quick``), times ``tanh_attention.attn`` in bfloat16 with
``native.block_pairs(True)`` and ``(False)`` taking turns each round: the forward with
weights, the forward o only, forward+backward with weights and o only; prints the best time
of each and the ratio pairs / without. Needs a CPU with AVX512-BF16 (``native.block_pairs()``
True); elsewhere both columns would time the same path, so it stops and says so.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import torch

import tanh_attention
from tanh_attention.kernels import native

DEFAULT_SHAPES = ["1,1,4096,64", "64,4,32,16", "8,8,64,64", "8,8,128,64", "4,8,256,64"]
DEFAULT_SHAPES.append("1,8,1024,64")


def _passes(shape: tuple[int, ...], causal: bool) -> dict[str, Callable[[], object]]:
    b, h, n, d = shape
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(b, h, n, d, generator=gen).bfloat16().requires_grad_() for _ in "qkv")
    g_o = torch.randn(b, h, n, d, generator=gen).bfloat16()
    g_a = torch.randn(b, h, n, n, generator=gen).bfloat16()
    scale = d**-0.5

    def call(weights: bool) -> tuple:
        return tanh_attention.attn(q, k, v, scale=scale, causal=causal, need_weights=weights)

    def forward(weights: bool) -> Callable[[], object]:
        def run() -> object:
            with torch.no_grad():
                return call(weights)

        return run

    def backward(weights: bool) -> Callable[[], object]:
        def run() -> object:
            o, a = call(weights)
            outputs, grads = ((o, a), (g_o, g_a)) if weights else ((o,), (g_o,))
            return torch.autograd.grad(outputs, (q, k, v), grads)

        return run

    return {
        "forward, weights": forward(True),
        "forward, o only": forward(False),
        "fwd+bwd, weights": backward(True),
        "fwd+bwd, o only": backward(False),
    }


def _best_ms(run: Callable[[], object], budget_s: float = 0.05) -> float:
    """Mean ms per call over about budget_s of calls."""
    start = time.perf_counter()
    run()
    one = time.perf_counter() - start
    calls = max(1, int(budget_s / max(one, 1e-6)))
    start = time.perf_counter()
    for _ in range(calls):
        run()
    return (time.perf_counter() - start) * 1e3 / calls


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--shapes", nargs="+", default=DEFAULT_SHAPES, help="B,H,n,d each")
    args = parser.parse_args()
    if args.threads < 1 or args.repeats < 1:
        parser.error("--threads and --repeats must be positive")
    if not native.block_pairs():
        raise SystemExit(f"no pairs here: AVX512-BF16 missing, or {native.unavailable_reason()}")
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} thread(s), best of {args.repeats}, ms")
    for text in args.shapes:
        shape = tuple(int(x) for x in text.split(","))
        if len(shape) != 4 or min(shape) < 1:
            parser.error(f"--shapes: expected B,H,n,d of positive sizes, got {text!r}")
        for causal in (False, True):
            best: dict[tuple[str, bool], float] = {}
            passes = _passes(shape, causal)
            for _ in range(args.repeats):
                for on in (True, False):
                    native.block_pairs(on)
                    for name, run in passes.items():
                        ms = _best_ms(run)
                        best[name, on] = min(best.get((name, on), ms), ms)
            native.block_pairs(True)
            cells = [
                f"{name} {best[name, True]:.2f} / {best[name, False]:.2f} "
                f"({best[name, True] / best[name, False]:.2f}x)"
                for name in passes
            ]
            print(f"{text} {'causal' if causal else 'full'}: " + " | ".join(cells))


if __name__ == "__main__":
    main()
