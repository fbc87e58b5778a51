"""torch's float32 matrix products (MKL) against oneDNN's, on the kernels' and the layer's shapes.

    .venv/bin/python benchmarks/products.py [--threads 1]

Why the CPU kernels and ``tanh_attention.linear`` probe which library multiplies faster
(``kernels.cpu.product_method``): on AMD CPUs MKL takes its AVX2 path, on Intel it is the
fast one. For each shape: the best of 20 timings of each, taking turns, in microseconds,
and GFLOP/s. Rows:

- ``mm``: ``x @ w^T`` of a square product (the machine's peak, roughly);
- ``block acc``: ``acc += x @ y`` on a kernel block (``torch.baddbmm_`` against oneDNN's
  product read with y's strides, then ``add_``), the shape of ``o += a @ v`` and of the
  backward's gradient products;
- ``decode acc``: the same for 16 queries against 8192 cached keys, d = 128;
- ``linear``: the layer's projections (the demo's and E = 256), forward ``x @ w^T`` and the
  two backward products ``g @ w`` and ``g^T @ x``.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import torch

from tanh_attention._torch_private import linear_pointwise
from tanh_attention.kernels import cpu


def _best_us(fns: dict[str, Callable[[], object]], runs: int = 20) -> dict[str, float]:
    best = dict.fromkeys(fns, float("inf"))
    for fn in fns.values():
        fn(), fn()
    for _ in range(runs):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            best[name] = min(best[name], time.perf_counter() - start)
    return {name: t * 1e6 for name, t in best.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    op = linear_pointwise()
    if op is None:
        raise SystemExit("this PyTorch build has no oneDNN matmul (mkldnn)")

    def dnn(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        return op(x, w, None, "none", [], "")

    print(f"threads {args.threads}; the kernels' choice here: {cpu.product_method(torch.float32)}")
    print(
        f"{'case':34s} {'torch us':>9s} {'oneDNN us':>9s} {'torch GF/s':>10s} {'oneDNN GF/s':>11s}"
    )
    rows: list[tuple[str, int, dict[str, Callable[[], object]]]] = []
    x, w = torch.randn(1024, 1024), torch.randn(1024, 1024)
    rows.append(("mm 1024^3", 2 * 1024**3, {"torch": lambda: x @ w.T, "dnn": lambda: dnn(x, w)}))
    for name, (r, c, e) in {"block acc 512x1024 @ 1024x64": (512, 1024, 64),
                            "decode acc 16x8192 @ 8192x128": (16, 8192, 128)}.items():  # fmt: skip
        a, y, acc = torch.randn(1, r, c), torch.randn(1, c, e), torch.zeros(1, r, e)
        rows.append(
            (
                name,
                2 * r * c * e,
                {
                    "torch": lambda a=a, y=y, acc=acc: acc.baddbmm_(a, y),
                    "dnn": lambda a=a, y=y, acc=acc: acc[0].add_(dnn(a[0], y[0].mT)),
                },
            )
        )
    for n, i, o in ((2048, 64, 192), (1024, 256, 768)):
        xs, ws, gs = torch.randn(n, i), torch.randn(o, i), torch.randn(n, o)
        flops = 2 * n * i * o
        # (name, torch's way, oneDNN's operands as x @ w^T)
        products = (
            (f"linear fwd {n}x{i} -> {o}", (xs, ws.T), (xs, ws)),
            (f"linear g @ w {n}x{o} -> {i}", (gs, ws), (gs, ws.mT)),
            (f"linear g^T @ x -> {o}x{i}", (gs.T, xs), (gs.mT, xs.mT)),
        )
        for name, (left, right), (x_dnn, w_dnn) in products:
            fns = {
                "torch": lambda left=left, right=right: left @ right,
                "dnn": lambda x_dnn=x_dnn, w_dnn=w_dnn: dnn(x_dnn, w_dnn),
            }
            rows.append((name, flops, fns))
    for name, flops, fns in rows:
        t = _best_us(fns)
        print(
            f"{name:34s} {t['torch']:9.0f} {t['dnn']:9.0f} "
            f"{flops / t['torch'] / 1e3:10.0f} {flops / t['dnn'] / 1e3:11.0f}"
        )


if __name__ == "__main__":
    main()
