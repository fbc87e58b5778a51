"""The coefficients of the compiled tanh (``src/tanh_attention/kernels/native.h``).

    python benchmarks/fit_tanh.py [--p 3] [--q 3] [--top 5]

Fits ``tanh(y) / y ~ A(y^2) / B(y^2)`` on ``0 < y <= top``, A of degree ``p`` and B of
degree ``q`` in ``y^2``, ``A(0) = B(0) = 1`` (so tanh(y) = y exactly where y is tiny), to the
relative error: a linearized least-squares fit (``A - f B = 0``, divided by the previous B),
reweighted by the error it leaves, so that it approaches the minimax fit (Lawson's method).
The kernel evaluates ``tanh(2y) = 2t / (1 + t^2)`` from ``t = y A / B``; ``top = 5`` covers
scores up to 10, past which float32 tanh is 1. Prints the largest relative error in exact
(float64) arithmetic and the coefficients in the kernel's order; the float32 error of the
kernel itself is what tests/test_tanh_accuracy.py measures.
"""

from __future__ import annotations

import argparse

import numpy as np


def fit(p: int, q: int, top: float, rounds: int = 300) -> tuple[np.ndarray, np.ndarray, float]:
    """``(a, b, error)``: A's and B's coefficients in powers of ``y^2`` and the largest
    relative error of ``y A / B`` against tanh on the sample."""
    y = np.unique(np.concatenate([np.linspace(0, top, 60001)[1:], np.geomspace(1e-4, 1, 4000)]))
    f = np.tanh(y) / y
    s = (y / top) ** 2  # a scaled variable keeps the least-squares problem well conditioned
    weights = np.full_like(y, 1.0 / len(y))
    denominator = np.ones_like(y)
    for _ in range(rounds):
        columns = [s**i for i in range(1, p + 1)] + [-f * s**j for j in range(1, q + 1)]
        matrix = np.stack(columns, 1)
        w = np.sqrt(weights) / (f * denominator)
        coef, *_ = np.linalg.lstsq(matrix * w[:, None], (f - 1) * w, rcond=None)
        a = np.concatenate([[1.0], coef[:p]])
        b = np.concatenate([[1.0], coef[p:]])
        numerator = sum(a[i] * s**i for i in range(p + 1))
        denominator = sum(b[j] * s**j for j in range(q + 1))
        error = np.abs(numerator / denominator / f - 1)
        weights = weights * error
        weights /= weights.sum()
    a = np.array([a[i] / top ** (2 * i) for i in range(p + 1)])
    b = np.array([b[j] / top ** (2 * j) for j in range(q + 1)])
    return a, b, float(error.max())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--p", type=int, default=3)
    parser.add_argument("--q", type=int, default=3)
    parser.add_argument("--top", type=float, default=5.0)
    args = parser.parse_args()
    a, b, error = fit(args.p, args.q, args.top)
    print(f"largest relative error of y A / B (float64): {error:.3g}")
    print("A (highest power first):", ", ".join(f"{c:.9e}f" for c in a[::-1]))
    print("B (highest power first):", ", ".join(f"{c:.9e}f" for c in b[::-1]))


if __name__ == "__main__":
    main()
