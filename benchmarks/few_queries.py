"""Decoding steps with a few queries against the eager composite (``attn.c``'s few_keys).

    .venv/bin/python benchmarks/few_queries.py [--threads 1] [--m 1024] [--queries 1 2 3 4 5]

32 heads x n queries x m cached keys x 128, bottom-right causal, inference, float32 and
bfloat16: ``tanh_attention.attn`` (need_weights=False) and the composite ``(tanh(scale q k^T)
* M) @ v`` taking turns, best of 7 samples of 100 calls each, ms. (Between fresh processes
both move by up to 30% on the AMD EPYC of RESULTS.md: compare within a run.)
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import torch

import tanh_attention


def _best_ms(run: Callable[[], object], calls: int = 100, samples: int = 7) -> float:
    for _ in range(20):
        run()
    best = float("inf")
    for _ in range(samples):
        start = time.perf_counter()
        for _ in range(calls):
            run()
        best = min(best, (time.perf_counter() - start) / calls)
    return best * 1e3


def _case(dtype: torch.dtype, n: int, m: int) -> tuple[float, float]:
    """(ours, composite) ms for n queries against m keys."""
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(1, 32, n, 128, generator=gen).to(dtype)
    k, v = (torch.randn(1, 32, m, 128, generator=gen).to(dtype) for _ in "kv")
    keep = torch.ones(n, m, dtype=torch.bool).tril(m - n)
    scale = 128**-0.5

    def ours() -> object:
        with torch.no_grad():
            return tanh_attention.attn(
                q, k, v, scale=scale, causal="bottom_right", need_weights=False
            )[0]

    def composite() -> object:
        with torch.no_grad():
            return (torch.tanh(scale * (q @ k.mT)) * keep) @ v

    return _best_ms(ours), _best_ms(composite)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--m", type=int, default=1024)
    parser.add_argument("--queries", type=int, nargs="+", default=[1, 2, 3, 4, 5])
    args = parser.parse_args()
    if args.threads < 1 or args.m < 1 or min(args.queries) < 1 or max(args.queries) > args.m:
        parser.error("--threads, --m and --queries must be positive, queries at most m")
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} thread(s), m = {args.m}, ms ours / composite")
    for dtype in (torch.float32, torch.bfloat16):
        for n in args.queries:
            mine, theirs = _case(dtype, n, args.m)
            print(f"{dtype} n={n}: {mine:.3f} / {theirs:.3f} ({mine / theirs:.2f}x)")


if __name__ == "__main__":
    main()
