"""Dropout on the weights: time and kept memory of forward+backward (issue 9).

    .venv/bin/python benchmarks/dropout.py [--shapes 4,8,256,64 1,8,1024,64] [--p 0.1]
                                           [--threads 1] [--repeats 5]

At each ``B,H,n,d`` (n = m, float32, scale 1/sqrt(d)) it times forward+backward of
``attn(..., need_weights=False, dropout_p=p)`` on the ``cpu`` backend (the mask made again
from the seed in backward), the same without dropout, and the eager composite with
``torch.nn.functional.dropout`` (what a hand-written adapter does), taking turns each round,
and prints the best time of each with the ratios. "saved" is the largest tensor autograd
keeps between forward and backward (``saved_tensors_hooks``), in elements of n x m: the
memory the memory-efficient path promises not to spend.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import torch

import tanh_attention


def _composite(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, p: float) -> torch.Tensor:
    a = torch.tanh((q @ k.mT) * q.shape[-1] ** -0.5)
    return torch.nn.functional.dropout(a, p) @ v


def _ours(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, p: float) -> torch.Tensor:
    scale = q.shape[-1] ** -0.5
    return tanh_attention.attn(q, k, v, scale=scale, need_weights=False, dropout_p=p)[0]


def _step(fn: Callable[..., torch.Tensor], shape: tuple[int, ...], p: float) -> Callable[[], int]:
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(shape, generator=gen).requires_grad_() for _ in range(3))
    g = torch.randn(shape, generator=gen)

    def run() -> int:
        saved: list[int] = []

        def pack(t: torch.Tensor) -> torch.Tensor:
            saved.append(t.numel())
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            o = fn(q, k, v, p)
        o.backward(g)
        return max(saved, default=0)

    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", nargs="+", default=["4,8,256,64", "1,8,1024,64"])
    parser.add_argument("--p", type=float, default=0.1)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} thread(s), p={args.p}, float32")
    print("| B,H,n,d | ours+dropout ms | ours no dropout ms | composite+F.dropout ms "
          "| ours+dropout / composite | saved (n x m units): ours / composite |")  # fmt: skip
    print("|---|---:|---:|---:|---:|---|")
    for text in args.shapes:
        b, h, n, d = (int(x) for x in text.split(","))
        shape = (b, h, n, d)
        runs = {
            "drop": _step(_ours, shape, args.p),
            "plain": _step(_ours, shape, 0.0),
            "composite": _step(_composite, shape, args.p),
        }
        best = dict.fromkeys(runs, float("inf"))
        saved = {}
        for _ in range(args.repeats):
            for name, run in runs.items():
                start = time.perf_counter()
                saved[name] = run()
                best[name] = min(best[name], time.perf_counter() - start)
        ms = {name: 1e3 * t for name, t in best.items()}
        units = {name: saved[name] / (b * h * n * n) for name in runs}
        print(
            f"| {text} | {ms['drop']:.2f} | {ms['plain']:.2f} | {ms['composite']:.2f} "
            f"| {ms['drop'] / ms['composite']:.2f} "
            f"| {units['drop']:.3f} / {units['composite']:.2f} |"
        )


if __name__ == "__main__":
    main()
