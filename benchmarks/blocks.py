"""Block sizes of the blocked kernels: time at n = m = 4096, d = 64, float32, per choice.

    .venv/bin/python benchmarks/blocks.py [--threads 2] [--n 4096]

Times (median of 5 after a warm-up) the o-only forward and forward+backward, the (o, a)
forward+backward and the causal o-only forward+backward for each (rows, cols) block shape,
by calling ``kernels.blockwise`` with explicit block sizes. The defaults
(``BLOCK_ROWS`` x ``BLOCK_COLS``, causal too) were chosen from this table.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

import torch

from tanh_attention.kernels import blockwise
from tanh_attention.tools.bench import median_ms

SHAPES = [(64, 4096), (128, 1024), (128, 2048), (256, 512), (256, 1024), (256, 2048),
          (512, 512), (512, 1024), (1024, 1024)]  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--n", type=int, default=4096)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    n, d = args.n, 64
    q, k, v, g_o = (torch.randn(n, d) / 4 for _ in range(4))
    g_a = torch.randn(n, n)
    print(f"threads {args.threads}, n = m = {n}, d = e = {d}, float32; milliseconds")
    print("rows x cols     o fwd    o f+b  (o,a) f+b  causal o f+b")
    for rows, cols in SHAPES:
        times = [median_ms(run)[0] for run in _runs(q, k, v, g_o, g_a, rows, cols)]
        print(f"{rows:5d} x {cols:<5d}" + "".join(f" {t:9.1f}" for t in times))


def _runs(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g_o: torch.Tensor,
    g_a: torch.Tensor,
    rows: int,
    cols: int,
) -> list[Callable[[], object]]:
    size = {"block_rows": rows, "block_cols": cols}

    def lean_forward() -> object:
        return blockwise.forward(q, k, v, need_weights=False, **size)

    def lean_both(causal: str = "none") -> object:
        blockwise.forward(q, k, v, None, 1.0, causal, need_weights=False, **size)
        return blockwise.backward(g_o, None, q, k, v, None, None, 1.0, causal, **size)

    def weights_both() -> object:
        _, a = blockwise.forward(q, k, v, **size)
        return blockwise.backward(g_o, g_a, q, k, v, a, **size)

    return [lean_forward, lean_both, weights_both, lambda: lean_both(causal="top_left")]


if __name__ == "__main__":
    main()
