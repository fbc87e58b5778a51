"""The cost of a fresh 64 MiB output (the ``a`` of n = m = 4096, float32), cold and warm.

    .venv/bin/python benchmarks/hugepages.py [--mib 64] [--runs 20]

Allocates and writes a fresh buffer ``--runs`` times in a row, twice over: with 2 MiB pages
requested (``kernels.memory.empty``, what the with-weights forward uses for ``a``) and with
plain ``torch.empty``. Prints each run's milliseconds. On the benchmark machine the first few
huge-page buffers of a process wait while the kernel compacts memory; later ones reuse the
huge pages freed before. This is why ``tanh-attention bench`` faults huge pages in once
before it times anything, and what a program's first calls pay without that.
"""

from __future__ import annotations

import argparse
import time

import torch

from tanh_attention.kernels import memory


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mib", type=int, default=64, help="buffer size in MiB")
    parser.add_argument("--runs", type=int, default=20, help="buffers per round")
    args = parser.parse_args()
    numel = args.mib * 2**20 // 4
    cpu = torch.device("cpu")
    makers = {
        "huge pages": lambda: memory.empty((numel,), dtype=torch.float32, device=cpu),
        "plain pages": lambda: torch.empty(numel),
    }
    for round_ in (1, 2):
        for name, make in makers.items():
            times = []
            for _ in range(args.runs):
                start = time.perf_counter()
                make().fill_(1.0)
                times.append((time.perf_counter() - start) * 1e3)
            print(f"round {round_}, {name:11s} ms:", " ".join(f"{t:.0f}" for t in times))


if __name__ == "__main__":
    main()
