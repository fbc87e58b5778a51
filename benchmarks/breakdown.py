"""Where the time goes: a per-operator profile of ours at n = m = 4096, d = 64, float32.

    .venv/bin/python benchmarks/breakdown.py [--threads 2] [--n 4096]

For the o-only forward, the o-only forward+backward and the (o, a) forward+backward, prints
the wall time (median of 5 after a warm-up), the matmul limit (the same FLOP counts as
``tanh-attention bench``) and the self time of the top operators under ``torch.profiler``:
oneDNN's fused matmul+tanh (``mkldnn::_linear_pointwise``), the other products
(``aten::baddbmm_``/``addmm_``), the elementwise work (``tanh_backward``, masks, copies).
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

import torch
from torch.profiler import ProfilerActivity, profile

import tanh_attention
from tanh_attention.tools.bench import matmul_rate, median_ms


def _cases(n: int, d: int) -> dict[str, tuple[Callable[[], object], float]]:
    q, k, v = (torch.randn(n, d).requires_grad_() for _ in range(3))
    g_o, g_a = torch.randn(n, d), torch.randn(n, n)
    scale = d**-0.5

    def o_forward() -> object:
        with torch.no_grad():
            return tanh_attention.attn(q, k, v, scale=scale, need_weights=False)

    def o_both() -> object:
        o, _ = tanh_attention.attn(q, k, v, scale=scale, need_weights=False)
        return torch.autograd.grad(o, (q, k, v), g_o)

    def oa_both() -> object:
        o, a = tanh_attention.attn(q, k, v, scale=scale)
        return torch.autograd.grad((o, a), (q, k, v), (g_o, g_a))

    flops = 2 * n * n * d
    return {
        "o-only fwd": (o_forward, 2 * flops),
        "o-only fwd+bwd": (o_both, 7 * flops),
        "(o, a) fwd+bwd": (oa_both, 6 * flops),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--n", type=int, default=4096)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rate = matmul_rate("float32")
    print(f"threads {args.threads}; torch.mm 2048^3: {rate / 1e9:.0f} GFLOP/s")
    for name, (fn, flops) in _cases(args.n, 64).items():
        wall, _ = median_ms(fn)
        limit = flops / rate * 1e3
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            fn()
        print(f"\n{name}: {wall:.1f} ms, matmul limit {limit:.1f} ms ({wall / limit:.2f}x)")
        events = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)
        total = sum(e.self_cpu_time_total for e in events)
        for e in events[:6]:
            share = e.self_cpu_time_total / total
            print(f"  {e.key:40s} {e.self_cpu_time_total / 1e3:8.1f} ms {share:6.1%} x{e.count}")


if __name__ == "__main__":
    main()
