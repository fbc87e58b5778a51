"""The compiled attention kernels (``kernels/attn.c``) against the aten path they replace,
or their 16-float build (``attn_wide.c``) against their 8-float one.

    .venv/bin/python benchmarks/compiled_vs_aten.py [--threads 1] [--pass fwd|fwd+bwd]
        [--n 64,256,1024] [--bh 1x1,4x4,64x4] [--against aten|vec8] [--json PATH]

For each model shape of ``tanh-attention bench --models`` (B x H, n = m, d in 16, 64, 128,
causal and not, with weights and o-only) it times ``tanh_attention.attn`` as it routes now,
then with the compiled kernel of that pass switched off (``blockwise.try_attn`` for the
forward, ``blockwise.try_attn_backward`` for the backward: the forward stays compiled there,
so ``fwd+bwd`` compares backwards), the eager composite taking turns with both
(``bench_models._model_row``). With ``--against vec8`` both runs are compiled: the 16-float
build against the 8-float one, each forced on every call (``native._use_wide``; on a CPU
without AVX-512 the 16-float build runs as narrower machine vectors, so only a CPU with it
says anything). It prints each ratio and the median and worst; the limits in
``kernels/native.py`` are set from such runs. Run it with nothing else on the machine.
"""

from __future__ import annotations

import argparse
import json
import statistics
from typing import Any

import torch

from tanh_attention.kernels import blockwise, native
from tanh_attention.tools import bench_models

KERNEL = {"fwd": "try_attn", "fwd+bwd": "try_attn_backward"}
# Each comparison's two runs: (ours, baseline).
RUNS = {"aten": ("compiled", "aten"), "vec8": ("vec16", "vec8")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--pass", dest="pass_", choices=sorted(KERNEL), default="fwd")
    parser.add_argument("--n", default="64,256,1024", help="comma-separated n = m")
    parser.add_argument("--bh", default="1x1,4x4,64x4", help="comma-separated B x H")
    parser.add_argument("--against", choices=sorted(RUNS), default="aten")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", help="write the rows here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    name = KERNEL[args.pass_]
    compiled, use_wide = getattr(blockwise, name), native._use_wide
    ours, baseline = RUNS[args.against]
    if args.against == "vec8" and native.vector_floats() != 16:
        print("this CPU takes the 8-float build: the 16-float one runs at less than its width")
    rows: list[dict[str, Any]] = []
    for bh in args.bh.split(","):
        b, h = map(int, bh.split("x"))
        for n in map(int, args.n.split(",")):
            for d in (16, 64, 128):
                for causal in (False, True):
                    shape = bench_models.ModelShape(b, h, n, d, causal)
                    if shape.a_bytes() > bench_models.MAX_A_BYTES:
                        continue
                    for path in bench_models.PATHS:
                        timed = {}
                        for kernel in (ours, baseline):
                            setattr(blockwise, name, _off if kernel == "aten" else compiled)
                            if args.against == "vec8":
                                native._use_wide = _always if kernel == "vec16" else _never
                            row = bench_models._model_row(
                                shape, path, args.pass_, args.threads,
                                ["ours", "composite"], args.repeats, 50.0,
                            )  # fmt: skip
                            timed[kernel] = row["ms"]["ours"]
                            timed[f"composite ({kernel} run)"] = row["ms"]["composite"]
                        setattr(blockwise, name, compiled)
                        native._use_wide = use_wide
                        ratio = timed[ours] / timed[baseline]
                        rows.append(
                            {"shape": shape.name, "causal": causal, "path": path}
                            | {"ms": timed, "ratio": ratio}
                        )
                        print(
                            f"{shape.name:18s} {'causal' if causal else '      '} {path:8s}"
                            f" {ours}/{baseline} {ratio:.2f}  {ours} {timed[ours]:.3f} ms"
                            f"  {baseline} {timed[baseline]:.3f} ms",
                            flush=True,
                        )
    ratios = [r["ratio"] for r in rows]
    worst = max(rows, key=lambda r: r["ratio"])
    print(
        f"{args.pass_}, {args.threads} thread(s): {ours}/{baseline} median"
        f" {statistics.median(ratios):.2f}, best {min(ratios):.2f}, worst {worst['ratio']:.2f}"
        f" ({worst['shape']}{' causal' if worst['causal'] else ''} {worst['path']})"
    )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


def _always(*args: Any) -> bool:
    return True


def _never(*args: Any) -> bool:
    return False


def _off(*args: Any) -> None:
    """The compiled kernel declining every call: the aten path runs."""
    return None


if __name__ == "__main__":
    main()
