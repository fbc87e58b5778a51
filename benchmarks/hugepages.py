"""Why the with-weights forward allocates ``a`` with plain pages, not huge pages.

    .venv/bin/python benchmarks/hugepages.py [--n 8192] [--runs 10]

The forward's ``a`` is a fresh ``n x n`` tensor, written once; what its allocation costs is
the cost of getting fresh pages. This times allocating and writing an ``n x n`` float32
buffer two ways, taking turns: plain ``torch.empty`` (what the package does) and
``torch.empty`` plus ``madvise(MADV_HUGEPAGE)`` (2 MiB pages, fewer page faults). Once alone,
and once with the composite (``attn_composite``, which allocates and frees its own ``n x n``
tensors) run between calls, as other code in a program would. Prints the median and every
run's milliseconds. Linux only (``madvise``).
"""

from __future__ import annotations

import argparse
import ctypes
import os
import statistics
import time

import torch

import tanh_attention  # noqa: F401  (registers torch.ops.tanh_attention)

_MADV_HUGEPAGE = 14  # from <sys/mman.h> on Linux


def _huge_empty(*shape: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """``torch.empty`` with 2 MiB pages requested for the whole buffer."""
    out = torch.empty(*shape, dtype=dtype, device=device)
    page = os.sysconf("SC_PAGE_SIZE")
    start = -(-out.data_ptr() // page) * page
    stop = (out.data_ptr() + out.numel() * out.element_size()) // page * page
    madvise = ctypes.CDLL(None, use_errno=True).madvise
    madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    madvise(start, stop - start, _MADV_HUGEPAGE)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=8192, help="n = m")
    parser.add_argument("--runs", type=int, default=10, help="runs per way")
    args = parser.parse_args()
    n, cpu = args.n, torch.device("cpu")
    q, k, v = (torch.randn(n, 64) for _ in range(3))
    allocators = {
        "plain pages": lambda: torch.empty(n, n),
        "huge pages": lambda: _huge_empty(n, n, dtype=torch.float32, device=cpu),
    }
    torch.set_grad_enabled(False)
    for interleaved in (False, True):
        times: dict[str, list[float]] = {name: [] for name in allocators}
        for _ in range(args.runs):
            for name, empty in allocators.items():
                start = time.perf_counter()
                empty().fill_(1.0)
                times[name].append((time.perf_counter() - start) * 1e3)
                if interleaved:
                    torch.ops.tanh_attention.attn_composite(q, k, v, None, 0.125, "none")
        label = "composite in between" if interleaved else "alone"
        for name, samples in times.items():
            runs = " ".join(f"{t:.0f}" for t in samples)
            median = statistics.median(samples)
            print(f"n={n} {label:20s} {name:11s} median {median:5.0f} ms:", runs)


if __name__ == "__main__":
    main()
