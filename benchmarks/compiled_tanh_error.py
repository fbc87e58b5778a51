"""The compiled tanh's largest error over every float32 input (``kernels/tanh.c``).

    .venv/bin/python benchmarks/compiled_tanh_error.py [--threads 2]

Runs the kernel on every float32 bit pattern from 0 to 10 (about 1.09e9 values, in chunks;
the kernel is exactly odd, and past 10 it returns 1, which is tanh rounded), against float64
tanh, and prints the largest error in float32 ulp (the spacing at the exact value's
magnitude, as tests/test_tanh_accuracy.py measures it) and the largest absolute error. About
a minute on two cores.
"""

from __future__ import annotations

import argparse
import time

import torch

from tanh_attention.kernels import native


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    why = native.unavailable_reason()
    if why is not None:
        raise SystemExit(f"the compiled tanh is unavailable here: {why}")
    top = int(torch.tensor(10.0).view(torch.int32).item())
    worst_ulp, worst_x, worst_abs = 0.0, 0.0, 0.0
    start_time = time.perf_counter()
    chunk = 1 << 24
    for start in range(0, top + 1, chunk):
        x = torch.arange(start, min(top + 1, start + chunk), dtype=torch.int32).view(torch.float32)
        got = native.tanh_(x.clone()).double()
        exact = torch.tanh(x.double())
        magnitude = exact.abs().float()
        spacing = (torch.nextafter(magnitude, torch.tensor(float("inf"))) - magnitude).double()
        error = (got - exact).abs()
        ulp = error / spacing
        i = int(ulp.argmax())
        if ulp[i].item() > worst_ulp:
            worst_ulp, worst_x = ulp[i].item(), x[i].item()
        worst_abs = max(worst_abs, error.max().item())
    print(
        f"every float32 in [0, 10] ({top + 1} values, {time.perf_counter() - start_time:.0f} s): "
        f"largest error {worst_ulp:.3f} ulp (at x = {worst_x!r}; promised {native.MAX_ULP:g}), "
        f"largest absolute error {worst_abs:.3g} (promised {native.MAX_ERROR:.3g})"
    )


if __name__ == "__main__":
    main()
