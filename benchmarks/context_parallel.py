"""Context parallelism on CPU: W gloo processes (one thread each) against one process with W
threads, on the same total work: causal tanh attention, o only, forward + backward.

    .venv/bin/python benchmarks/context_parallel.py            # N = 8192, d = 64, W = 2
    .venv/bin/python benchmarks/context_parallel.py --n 2048 --reps 2   # quick

Prints, per method and layout, the step time (the slowest rank's, median over reps), the
speed-up over the single process, and each rank's peak memory above its baseline (peak RSS
minus RSS after import; each configuration runs in fresh processes).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import sys
import tempfile
import time
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _peak() -> int:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _inputs(args: Any) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(0)
    shape = (args.batch, args.heads, args.n, args.d)
    return tuple(torch.randn(shape, generator=g) * 0.5 for _ in range(4))  # q, k, v, grad_o


def _step(fn: Any, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, go: torch.Tensor) -> None:
    q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
    fn(q, k, v).backward(go)


def _single(args: Any, threads: int, out: Any) -> None:
    import tanh_attention

    torch.set_num_threads(threads)
    base = _rss()
    q, k, v, go = _inputs(args)

    def fn(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        o, _ = tanh_attention.attn(q, k, v, scale=args.d**-0.5, causal=True, need_weights=False)
        return o

    _step(fn, q, k, v, go)
    times = []
    for _ in range(args.reps):
        t = time.perf_counter()
        _step(fn, q, k, v, go)
        times.append(time.perf_counter() - t)
    out.put({"seconds": statistics.median(times), "peak": _peak() - base})


def _rank(rank: int, args: Any, store: str, method: str, lb: str | None, out: Any) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"file://{store}",
        rank=rank,
        world_size=args.world,
        timeout=datetime.timedelta(seconds=600),
    )
    from tanh_attention.distributed import context_parallel_attn, shard_sequence

    base = _rss()
    q, k, v, go = (shard_sequence(t, load_balance=lb).contiguous() for t in _inputs(args))

    def fn(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return context_parallel_attn(
            q, k, v, scale=args.d**-0.5, causal=True, method=method, load_balance=lb
        )

    _step(fn, q, k, v, go)
    times = []
    for _ in range(args.reps):
        dist.barrier()
        t = time.perf_counter()
        _step(fn, q, k, v, go)
        dist.barrier()
        times.append(time.perf_counter() - t)
    out.put({"rank": rank, "seconds": statistics.median(times), "peak": _peak() - base})
    dist.destroy_process_group()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--n", type=int, default=8192, help="sequence length N")
    p.add_argument("--d", type=int, default=64, help="head dim")
    p.add_argument("--heads", type=int, default=2, help="heads (alltoall needs W | heads)")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--world", type=int, default=2)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--methods", default="allgather,alltoall,ring")
    p.add_argument("--json", action="store_true")
    args = p.parse_args()
    ctx = mp.get_context("spawn")

    rows: list[dict[str, Any]] = []
    for threads in (args.world, 1):
        q = ctx.Queue()
        proc = ctx.Process(target=_single, args=(args, threads, q))
        proc.start()
        res = q.get()
        proc.join()
        rows.append({"config": f"1 process, {threads} thread(s)", **res, "peaks": []})
    single = rows[0]
    rows[1]["speedup"] = single["seconds"] / rows[1]["seconds"]
    rows[0]["speedup"] = 1.0
    for method in args.methods.split(","):
        for lb in (None, "head_tail"):
            fd, store = tempfile.mkstemp(prefix="tanh_cp_bench_")
            os.close(fd)
            os.unlink(store)
            q = ctx.Queue()
            procs = [
                ctx.Process(target=_rank, args=(r, args, store, method, lb, q))
                for r in range(args.world)
            ]
            for pr in procs:
                pr.start()
            res = sorted((q.get() for _ in procs), key=lambda r: r["rank"])
            for pr in procs:
                pr.join()
            seconds = max(r["seconds"] for r in res)
            rows.append(
                {
                    "config": f"W={args.world} {method} {lb or 'contiguous'}",
                    "seconds": seconds,
                    "speedup": single["seconds"] / seconds,
                    "peaks": [r["peak"] for r in res],
                }
            )
    if args.json:
        print(json.dumps({"args": vars(args), "rows": rows}))
        return
    print(
        f"causal tanh attention, o only, fwd+bwd, float32, B={args.batch} H={args.heads} "
        f"N={args.n} d={args.d}, torch {torch.__version__}, {os.cpu_count()} CPUs"
    )
    print(f"{'configuration':34} {'time':>9} {'speed-up':>9}  peak memory per rank (MiB)")
    for r in rows:
        peaks = r["peaks"] or [r["peak"]]
        mib = ", ".join(f"{x / 2**20:.0f}" for x in peaks)
        print(f"{r['config']:34} {r['seconds']:8.3f}s {r['speedup']:8.2f}x  {mib}")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
