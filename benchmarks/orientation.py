"""Block orientation of the recomputing (o-only) backward, timed three ways.

    .venv/bin/python benchmarks/orientation.py [--n 4096] [--repeats 7]

The backward visits the blocks of ``a`` one at a time, recomputing each from q and k, and
accumulates ``g_q``, ``g_k``, ``g_v`` with ``kernels.blocks.vjp_block_`` (float32, d = e = 64,
``kernels.blockwise``'s block size). Three ways, taking turns each round:

- ``rows x cols, g_k/g_v row-major``: the block as ``tanh(q_I k_J^T)``, every accumulator
  row-major (two of the three products read the block transposed);
- ``rows x cols, g_k/g_v column-major``: the same, with ``g_k`` and ``g_v`` column-major;
- ``cols x rows (transposed)``: the block as ``tanh(k_J q_I^T)`` (what ``kernels.blockwise``
  does), so only ``g_q``'s product reads it transposed.

Prints each way's median milliseconds and its ratio to the first.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch

from tanh_attention.kernels.blocks import vjp_block_
from tanh_attention.kernels.blockwise import BLOCK_COLS, BLOCK_ROWS
from tanh_attention.kernels.cpu import matmul_t, scores_tanh


def _backward(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g_o: torch.Tensor, layout: str
) -> Callable[[], object]:
    n, d = q.shape[1:]
    scale = d**-0.5
    transposed = layout == "transposed"

    def run() -> object:
        g_q = torch.zeros(1, n, d)
        if layout == "column-major":
            g_k, g_v = torch.zeros(1, d, n).mT, torch.zeros(1, d, n).mT
        else:
            g_k, g_v = torch.zeros(1, n, d), torch.zeros(1, n, d)
        for i in range(0, n, BLOCK_ROWS):
            rows = slice(i, i + BLOCK_ROWS)
            for j in range(0, n, BLOCK_COLS):
                cols = slice(j, j + BLOCK_COLS)
                if transposed:
                    a = scores_tanh(k[:, cols], q[:, rows], scale)
                else:
                    a = scores_tanh(q[:, rows], k[:, cols], scale)
                vjp_block_(
                    g_q[:, rows], g_k[:, cols], g_v[:, cols], g_o[:, rows], None,
                    q[:, rows], k[:, cols], v[:, cols], a,
                    scale=scale, matmul_t=matmul_t, transposed=transposed,
                )  # fmt: skip
        return g_q, g_k, g_v

    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=4096, help="n = m")
    parser.add_argument("--repeats", type=int, default=7, help="rounds")
    args = parser.parse_args()
    q, k, v, g_o = (torch.randn(1, args.n, 64) for _ in range(4))
    ways = {
        "rows x cols, g_k/g_v row-major": _backward(q, k, v, g_o, "row-major"),
        "rows x cols, g_k/g_v column-major": _backward(q, k, v, g_o, "column-major"),
        "cols x rows (transposed)": _backward(q, k, v, g_o, "transposed"),
    }
    results = [way() for way in ways.values()]  # warm-up, and the ways must agree
    for got in results[1:]:
        for x, y in zip(got, results[0], strict=True):  # type: ignore[call-overload]
            torch.testing.assert_close(x, y, rtol=1e-4, atol=1e-3)
    times: dict[str, list[float]] = {name: [] for name in ways}
    with torch.no_grad():
        for _ in range(args.repeats):
            for name, way in ways.items():
                start = time.perf_counter()
                way()
                times[name].append((time.perf_counter() - start) * 1e3)
    first = statistics.median(next(iter(times.values())))
    print(f"n = m = {args.n}, d = e = 64, float32, {torch.get_num_threads()} threads")
    for name, samples in times.items():
        median = statistics.median(samples)
        print(f"{name:36s} {median:7.1f} ms  {median / first:.2f}x")


if __name__ == "__main__":
    main()
