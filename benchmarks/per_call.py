"""Per-call cost at small shapes: ``tanh_attention.attn`` against the eager composite.

    .venv/bin/python benchmarks/per_call.py [--threads 1] [--rounds 15] [--causal]
    PYTHONPATH=/path/to/other/checkout/src .venv/bin/python benchmarks/per_call.py

At n <= 64 a call of either takes tens to hundreds of microseconds, so what ours adds per
call (validation, dispatch, the autograd node, the kernels' choices) decides the ratio. For
each shape ``(B, H, n, d)`` (float32, n = m, scale ``1/sqrt(d)``, o only) it times forward
alone (no grad) and forward+backward (``o.backward``), ours and the composite
``tanh(q @ k^T * scale) @ v`` (with ``--causal``, the scores above the diagonal set to 0
first) taking turns, and prints the best of ``--rounds`` samples of
each (a sample is the mean of enough calls to last a few milliseconds). ``--decode M [M
...]`` times float32 decoding steps instead: one query against M keys of 32 heads, d = 128,
``causal="bottom_right"``, forward alone, with the best and the median. Run it from two
checkouts in alternating processes (``PYTHONPATH``) to compare code versions on a noisy
machine: the ratios to the composite, taken in the same process, are what to compare.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch

import tanh_attention

SHAPES = [
    (1, 1, 16, 64),
    (1, 1, 64, 64),
    (4, 4, 16, 64),
    (16, 4, 16, 16),  # 16384 score entries: the largest calls blockwise.graph records
    (8, 4, 32, 32),  # 32768: the autograd.Function's
    (64, 4, 16, 16),
    (64, 4, 32, 16),
    (8, 8, 64, 64),
]


def _best_us(functions: list[Callable[[], object]], rounds: int, calls: int) -> list[float]:
    """The best per-call time of each function in microseconds, taking turns each round."""
    for f in functions:
        f()
        f()
    best = [float("inf")] * len(functions)
    for _ in range(rounds):
        for i, f in enumerate(functions):
            start = time.perf_counter()
            for _ in range(calls):
                f()
            best[i] = min(best[i], (time.perf_counter() - start) / calls * 1e6)
    return best


def _row(b: int, h: int, n: int, d: int, rounds: int, causal: bool) -> str:
    q, k, v = (torch.randn(b, h, n, d, requires_grad=True) for _ in range(3))
    g_o = torch.randn(b, h, n, d)
    scale = d**-0.5
    dropped = torch.ones(n, n, dtype=torch.bool).triu(1) if causal else None

    def composite() -> torch.Tensor:
        x = q @ k.mT * scale
        if dropped is not None:
            x = x.masked_fill(dropped, 0.0)
        return torch.tanh(x) @ v

    def ours_forward() -> None:
        with torch.no_grad():
            tanh_attention.attn(q, k, v, scale=scale, causal=causal, need_weights=False)

    def composite_forward() -> None:
        with torch.no_grad():
            composite()

    def ours_both() -> None:
        o, _ = tanh_attention.attn(q, k, v, scale=scale, causal=causal, need_weights=False)
        o.backward(g_o)

    def composite_both() -> None:
        composite().backward(g_o)

    calls = max(5, 300 * 16384 // (b * h * n * n * d + 16384))
    f, cf, fb, cfb = _best_us(
        [ours_forward, composite_forward, ours_both, composite_both], rounds, calls
    )
    return (
        f"{b}x{h} n={n} d={d}: forward {f:.0f} / {cf:.0f} us = {f / cf:.2f}x, "
        f"fwd+bwd {fb:.0f} / {cfb:.0f} us = {fb / cfb:.2f}x"
    )


def _decode_row(m: int, rounds: int) -> str:
    k, v = (torch.randn(32, 1, m, 128) for _ in range(2))
    q = torch.randn(32, 1, 1, 128)
    scale = 128**-0.5

    def ours() -> None:
        with torch.no_grad():
            tanh_attention.attn(q, k, v, scale=scale, causal="bottom_right", need_weights=False)

    def composite() -> None:
        with torch.no_grad():
            torch.tanh(q @ k.mT * scale) @ v

    times: list[list[float]] = [[], []]
    for f in (ours, composite):
        f()
        f()
    for _ in range(rounds):
        for i, f in enumerate((ours, composite)):
            start = time.perf_counter()
            f()
            times[i].append((time.perf_counter() - start) * 1e6)
    (o_best, o_median), (c_best, c_median) = ((min(t), statistics.median(t)) for t in times)
    return (
        f"decode n=1 m={m}: best {o_best:.0f} / {c_best:.0f} us = {o_best / c_best:.2f}x, "
        f"median {o_median:.0f} / {c_median:.0f} us = {o_median / c_median:.2f}x"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--causal", action="store_true", help="top-left causal (not decode)")
    parser.add_argument("--decode", type=int, nargs="+", metavar="M", help="keys per step")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    kind = ", causal" if args.causal else ""
    print(f"threads {args.threads}{kind}; ours / composite, {args.rounds} rounds taking turns")
    if args.decode:
        for m in args.decode:
            print(_decode_row(m, args.rounds), flush=True)
        return
    for shape in SHAPES:
        print(_row(*shape, args.rounds, args.causal), flush=True)


if __name__ == "__main__":
    main()
