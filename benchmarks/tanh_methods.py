"""Which way to compute tanh of the scores: speed and float32 accuracy of the candidates.

    .venv/bin/python benchmarks/tanh_methods.py [--threads 2] [--n 4096]

For each candidate: the time to produce ``tanh(q @ k^T)`` for ``n x n`` scores (q, k: n x 64,
float32, a fresh output), the cost of its tanh per element on a cache-sized 256 x 1024 block
(its time minus the bare ``q @ k^T`` of the block: the kernels work on such blocks), and
the worst error in float32 ulp over a dense sweep of float32 inputs (every 97th bit pattern
from 0 to 10, both signs; the exact value is float64 tanh). The kernels must stay within
4 ulp (tests/test_tanh_accuracy.py).

Candidates:
- ``torch.tanh``: the reference, MKL's vectorized tanh on x86 (slow on AMD CPUs).
- ``2*sigmoid(2x)-1``: fast, but relative accuracy is lost near 0 (the kernels' "sigmoid"
  method, ``kernels.cpu._tanh_from_sigmoid_``: sigmoid_ and one fused multiply-add).
- ``expm1``: ``e / (e + 2)`` with ``e = expm1(2x)`` (x clamped to +-9): accurate, 4 passes.
- ``rational``: Eigen's float tanh (a 13/6 rational function) as torch ops: ~20 passes.
- ``onednn``: oneDNN's matmul with tanh in its epilogue (the kernels' "onednn" method).
- ``compiled``: ``kernels/tanh.c`` (the kernels' "compiled" method, in place; it promises
  5 ulp, ``kernels/native.py``), where it builds here.
- ``inductor``: ``torch.compile`` of ``torch.tanh`` (needs a C++ compiler at run time).
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

import torch

from tanh_attention.kernels import native
from tanh_attention.kernels.cpu import _tanh_from_sigmoid_
from tanh_attention.tools.bench import median_ms

Method = Callable[[torch.Tensor], torch.Tensor]


def _expm1(x: torch.Tensor) -> torch.Tensor:
    e = torch.expm1(x.clamp(-9, 9).mul_(2))
    return e.div_(e + 2)


# Eigen's generic_fast_tanh_float (Eigen/src/Core/MathFunctionsImpl.h), as torch ops.
_ALPHA = [4.89352455891786e-03, 6.37261928875436e-04, 1.48572235717979e-05,
          5.12229709037114e-08, -8.60467152213735e-11, 2.00018790482477e-13,
          -2.76076847742355e-16]  # fmt: skip
_BETA = [4.89352518554385e-03, 2.26843463243900e-03, 1.18534705686654e-04,
         1.19825839466702e-06]  # fmt: skip


def _rational(x: torch.Tensor) -> torch.Tensor:
    x = x.clamp(-7.90531110763549805, 7.90531110763549805)
    x2 = x * x
    p = torch.full_like(x, _ALPHA[6])
    for c in reversed(_ALPHA[:6]):
        p.mul_(x2).add_(c)
    p.mul_(x)
    q = torch.full_like(x, _BETA[3])
    for c in reversed(_BETA[:3]):
        q.mul_(x2).add_(c)
    return p.div_(q)


def _onednn(x: torch.Tensor) -> torch.Tensor:
    one = torch.ones(1, 1, dtype=x.dtype)
    return torch.ops.mkldnn._linear_pointwise(x.reshape(-1, 1), one, None, "tanh", [], "").view(
        x.shape
    )


def _candidates() -> dict[str, Method]:
    methods: dict[str, Method] = {
        "torch.tanh": torch.tanh,
        "2*sigmoid(2x)-1": lambda x: _tanh_from_sigmoid_(2 * x),
        "expm1": _expm1,
        "rational": _rational,
        "onednn": _onednn,
    }
    if native.unavailable_reason() is None:
        methods["compiled"] = native.tanh_
    else:
        print(f"compiled: not available ({native.unavailable_reason()})")
    try:
        compiled = torch.compile(torch.tanh, fullgraph=True, dynamic=False)
        compiled(torch.ones(256, 1024))
        methods["inductor"] = compiled
    except (RuntimeError, OSError) as err:  # no C++ compiler, or inductor failed here
        print(f"inductor: not available ({type(err).__name__}: {err})")
    return methods


def _max_ulp(method: Method) -> float:
    bits = torch.arange(0, torch.tensor(10.0).view(torch.int32).item() + 1, 97, dtype=torch.int32)
    x = bits.view(torch.float32)
    x = torch.cat([x, -x])
    exact = torch.tanh(x.double())
    magnitude = exact.abs().float()
    spacing = torch.nextafter(magnitude, torch.tensor(float("inf"))) - magnitude
    worst = 0.0
    for xs, ex, sp in zip(
        x.split(1 << 22), exact.split(1 << 22), spacing.split(1 << 22), strict=True
    ):
        err = (method(xs.clone()).double() - ex).abs() / sp.double()  # (in place: a copy)
        worst = max(worst, err.max().item())
    return worst


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--n", type=int, default=4096)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    n = args.n
    q, k = torch.randn(n, 64) / 8, torch.randn(n, 64)
    q_block, k_block = q[:256], k[:1024]

    def scores_then(method: Method, q: torch.Tensor, k: torch.Tensor) -> Callable[[], object]:
        if method is _onednn:
            return lambda: torch.ops.mkldnn._linear_pointwise(q, k, None, "tanh", [], "")
        return lambda: method(torch.mm(q, k.T))

    bare = median_ms(lambda: torch.mm(q, k.T), 7)[0]
    bare_block = median_ms(lambda: torch.mm(q_block, k_block.T), 51)[0]
    print(f"threads {args.threads}; q @ k^T, d = 64: {n} x {n} {bare:.1f} ms (fresh output), ")
    print(f"256 x 1024 block {bare_block * 1e3:.0f} us")
    print(f"{'method':16s} {'n x n ms':>9s} {'block ns/elem':>14s} {'max error (ulp)':>16s}")
    for name, method in _candidates().items():
        total = median_ms(scores_then(method, q, k), 7)[0]
        block = median_ms(scores_then(method, q_block, k_block), 51)[0]
        per_elem = (block - bare_block) * 1e6 / (256 * 1024)
        print(f"{name:16s} {total:9.1f} {per_elem:14.2f} {_max_ulp(method):16.3g}")


if __name__ == "__main__":
    main()
