"""Spawned workers of ``test_distributed.py``: a launcher with a wall-clock timeout, and the
scenarios each rank runs (many checks per process group).

Every oracle here is an independent float64 computation on the full tensors
(``tanh(where(keep, scale q k^T, 0)) @ v`` and its autograd), never the package's code.
"""

from __future__ import annotations

import contextlib
import datetime
import itertools
import os
import queue
import tempfile
import time
import traceback
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

TOL = 1e-12


# --------------------------------------------------------------------------------------------
# Launcher
# --------------------------------------------------------------------------------------------


def _worker(rank: int, world: int, store: str, scenario: str, pg_timeout: float, q: Any) -> None:
    torch.set_num_threads(1)
    try:
        dist.init_process_group(
            "gloo",
            init_method=f"file://{store}",
            rank=rank,
            world_size=world,
            timeout=datetime.timedelta(seconds=pg_timeout),
        )
        result = {name: globals()[name](rank, world) for name in scenario.split("+")}
        q.put((rank, "ok", result))
    except BaseException:
        q.put((rank, "error", traceback.format_exc()))
    finally:
        if dist.is_initialized():
            with contextlib.suppress(Exception):
                dist.destroy_process_group()


def run(
    scenario: str, world: int, *, timeout: float = 120.0, pg_timeout: float = 60.0
) -> dict[int, tuple[str, Any]]:
    """Run ``scenario(rank, world)`` on ``world`` spawned gloo ranks (``"a+b"``: a, then b,
    in the same process group).

    Returns ``{rank: ("ok", {name: result}) | ("error", traceback)}``; a rank that reports nothing
    within ``timeout`` seconds is killed and reported as ``("timeout", None)``.
    """
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    fd, store = tempfile.mkstemp(prefix="tanh_dist_")
    os.close(fd)
    os.unlink(store)
    procs = [
        ctx.Process(target=_worker, args=(r, world, store, scenario, pg_timeout, q), daemon=True)
        for r in range(world)
    ]
    for p in procs:
        p.start()
    results: dict[int, tuple[str, Any]] = {}
    deadline = time.monotonic() + timeout
    while len(results) < world and time.monotonic() < deadline:
        try:
            rank, status, payload = q.get(timeout=max(0.1, deadline - time.monotonic()))
        except queue.Empty:
            break
        results[rank] = (status, payload)
    for p in procs:
        p.join(timeout=max(0.1, deadline - time.monotonic()) if len(results) == world else 0.1)
        if p.is_alive():
            p.kill()
            p.join(5)
    for r in range(world):
        results.setdefault(r, ("timeout", None))
    if os.path.exists(store):
        os.unlink(store)
    return results


# --------------------------------------------------------------------------------------------
# Independent oracles and layouts
# --------------------------------------------------------------------------------------------


def oracle(q, k, v, keep, scale):
    """``o = tanh(where(keep, scale q k^T, 0)) @ v`` (keep: None or bool, broadcastable)."""
    s = scale * (q @ k.transpose(-1, -2))
    a = torch.tanh(s) if keep is None else torch.where(keep, torch.tanh(s), torch.zeros(()))
    return a @ v


def keep_mask(n, m, causal, mask):
    keep = mask
    if causal:
        off = 0 if causal in (True, "top_left") else m - n
        c = torch.arange(m)[None, :] <= torch.arange(n)[:, None] + off
        keep = c if keep is None else keep & c
    return keep


def positions(rank, world, n_local, lb):
    """Global positions of rank's rows, written independently of the package."""
    if lb is None:
        return list(range(rank * n_local, (rank + 1) * n_local))
    c = n_local // 2
    head = list(range(rank * c, (rank + 1) * c))
    tail_chunk = 2 * world - 1 - rank
    return head + list(range(tail_chunk * c, (tail_chunk + 1) * c))


def _maxdiff(a, b):
    return float((a - b).detach().abs().max()) if a.numel() else 0.0


# --------------------------------------------------------------------------------------------
# Scenarios
# --------------------------------------------------------------------------------------------


def context_parallel_all(rank: int, world: int) -> dict[str, Any]:
    """Every method x layout x causal x mask x (N == M, M == 2N), forward and backward."""
    from tanh_attention.distributed import context_parallel_attn, shard_sequence

    B, H, nl, d, e = 2, 4, 4, 3, 5
    worst = 0.0
    cases = 0
    failures = []
    g = torch.Generator().manual_seed(1234)
    for method, lb, causal, mask_kind, ratio in itertools.product(
        ("allgather", "alltoall", "ring"),
        (None, "head_tail"),
        (False, True, "bottom_right"),
        (None, "full", "keys", "heads"),
        (1, 2),
    ):
        n, m = nl * world, nl * world * ratio
        q = torch.randn(B, H, n, d, generator=g, dtype=torch.float64)
        k = torch.randn(B, H, m, d, generator=g, dtype=torch.float64)
        v = torch.randn(B, H, m, e, generator=g, dtype=torch.float64)
        go = torch.randn(B, H, n, e, generator=g, dtype=torch.float64)
        mask = None
        if mask_kind == "full":
            mask = torch.rand(n, m, generator=g) > 0.3
        elif mask_kind == "keys":
            mask = torch.rand(B, 1, 1, m, generator=g) > 0.3
        elif mask_kind == "heads":
            mask = torch.rand(B, H, n, m, generator=g) > 0.3
        scale = 0.7
        # oracle on the full tensors
        qf, kf, vf = (t.clone().requires_grad_() for t in (q, k, v))
        of = oracle(qf, kf, vf, keep_mask(n, m, causal, mask), scale)
        of.backward(go)
        # shards, by the test's own positions
        pq = positions(rank, world, nl, lb)
        pk = positions(rank, world, nl * ratio, lb)
        ql = q[..., pq, :].clone().requires_grad_()
        kl = k[..., pk, :].clone().requires_grad_()
        vl = v[..., pk, :].clone().requires_grad_()
        assert torch.equal(shard_sequence(q, load_balance=lb), q[..., pq, :])
        o = context_parallel_attn(
            ql,
            kl,
            vl,
            scale=scale,
            causal=causal,
            attn_mask=mask,
            method=method,
            load_balance=lb,
        )
        o.backward(go[..., pq, :])
        errs = [
            _maxdiff(o, of[..., pq, :]),
            _maxdiff(ql.grad, qf.grad[..., pq, :]),
            _maxdiff(kl.grad, kf.grad[..., pk, :]),
            _maxdiff(vl.grad, vf.grad[..., pk, :]),
        ]
        cases += 1
        worst = max(worst, *errs)
        if max(errs) > TOL:
            failures.append((method, lb, causal, mask_kind, ratio, errs))
    return {"cases": cases, "worst": worst, "failures": failures}


def helpers_and_errors(rank: int, world: int) -> dict[str, Any]:
    """shard/unshard round trips, uneven shards (clear errors on every rank), bad args."""
    from tanh_attention.distributed import context_parallel_attn, shard_sequence, unshard_sequence

    out: dict[str, Any] = {}
    x = torch.arange(2 * 4 * world * 3, dtype=torch.float64).reshape(2, 4 * world, 3)
    for lb in (None, "head_tail"):
        s = shard_sequence(x, dim=1, load_balance=lb)
        assert torch.equal(s, x[:, positions(rank, world, 4, lb)]), lb
        assert torch.equal(unshard_sequence(s, dim=1, load_balance=lb), x), lb
        # unshard is differentiable: the gradient is the sum over ranks (reduce-scatter)
        sl = s.clone().requires_grad_()
        unshard_sequence(sl, dim=1, load_balance=lb).sum().backward()
        assert torch.equal(sl.grad, torch.full_like(sl, float(world))), lb
    errors = {}
    for name, fn in {
        "shard_uneven": lambda: shard_sequence(torch.zeros(4 * world + 1, 2)),
        "shard_head_tail_odd": lambda: shard_sequence(
            torch.zeros(3 * world, 2), load_balance="head_tail"
        ),
        "bad_load_balance": lambda: shard_sequence(x, load_balance="zigzag"),
    }.items():
        try:
            fn()
            errors[name] = None
        except (ValueError, TypeError) as e:
            errors[name] = type(e).__name__ + ": " + str(e)
    # uneven local shards: rank 0 holds one more row; every rank must get the same ValueError
    nl = 5 if rank == 0 else 4
    q = torch.randn(1, 2, nl, 3, dtype=torch.float64)
    for method in ("allgather", "ring"):
        try:
            context_parallel_attn(q, q, q, method=method)
            errors[f"uneven_{method}"] = None
        except ValueError as e:
            errors[f"uneven_{method}"] = "ValueError: " + str(e)
    # a bad argument on one rank only: that rank raises its error, the others a RuntimeError
    q = torch.randn(1, 2, 4, 3, dtype=torch.float64)
    try:
        context_parallel_attn(q, q, q, method="bogus" if rank == world - 1 else "allgather")
        errors["one_rank_bad"] = None
    except (ValueError, RuntimeError) as e:
        errors["one_rank_bad"] = type(e).__name__ + ": " + str(e)
    # alltoall with heads not divisible by world
    q = torch.randn(1, world + 1, 4, 3, dtype=torch.float64)
    try:
        context_parallel_attn(q, q, q, method="alltoall")
        errors["alltoall_heads"] = None
    except ValueError as e:
        errors["alltoall_heads"] = "ValueError: " + str(e)
    out["errors"] = errors
    return out


def rank_fails(rank: int, world: int) -> str:
    """The last rank dies before the collective; the others must error out, not hang."""
    from tanh_attention.distributed import context_parallel_attn

    if rank == world - 1:
        raise RuntimeError("rank failed on purpose")
    q = torch.randn(1, 2, 4, 3, dtype=torch.float64)
    context_parallel_attn(q, q, q)
    return "no error"


def rank_stalls(rank: int, world: int) -> str:
    """The last rank fails but keeps its process group open: the others must get an error
    within the process group's timeout."""
    from tanh_attention.distributed import context_parallel_attn

    if rank == world - 1:
        time.sleep(20)
        raise RuntimeError("rank failed on purpose, late")
    q = torch.randn(1, 2, 4, 3, dtype=torch.float64)
    context_parallel_attn(q, q, q)
    return "no error"


def dtensor_rules(rank: int, world: int) -> dict[str, Any]:
    """DTensor: batch, head, query-row and replicate shardings of each op, forward and
    backward, and the cache trap (causal after non-causal, one scale after another)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    import tanh_attention.distributed  # noqa: F401  (registers the rules)

    mesh = init_device_mesh("cpu", (world,))
    g = torch.Generator().manual_seed(7)
    B, H, n, m, d, e = 2 * world, 2 * world, 4 * world, 3 * world, 3, 5
    q = torch.randn(B, H, n, d, generator=g, dtype=torch.float64)
    k = torch.randn(B, H, m, d, generator=g, dtype=torch.float64)
    v = torch.randn(B, H, m, e, generator=g, dtype=torch.float64)
    go = torch.randn(B, H, n, e, generator=g, dtype=torch.float64)
    mask = torch.rand(n, m, generator=g) > 0.3
    bmask = torch.rand(B, 1, n, m, generator=g) > 0.3  # shards on its own batch dim
    ops = torch.ops.tanh_attention
    worst = 0.0
    failures = []
    rep = Replicate()
    layouts = {
        "batch": (Shard(0), Shard(0), Shard(0)),
        "heads": (Shard(1), Shard(1), Shard(1)),
        "rows": (Shard(2), rep, rep),
        "replicate": (rep, rep, rep),
    }
    # the order matters: a causal call right after a non-causal one on the same shapes
    sequence = [
        (lay, causal, scale, msk, op)
        for op in ("attn", "attn_lean")
        for lay in layouts
        for msk in (None, mask, bmask)
        for causal, scale in (
            ("none", 0.5),
            ("top_left", 0.5),
            ("bottom_right", 0.5),
            ("none", 2.0),
            ("none", 0.5),
        )
    ]
    for lay, causal, scale, msk, op in sequence:
        pq, pk, pv = layouts[lay]
        qd = distribute_tensor(q, mesh, [pq]).requires_grad_()
        kd = distribute_tensor(k, mesh, [pk]).requires_grad_()
        vd = distribute_tensor(v, mesh, [pv]).requires_grad_()
        md = None if msk is None else distribute_tensor(msk, mesh, [rep])
        out = getattr(ops, op)(qd, kd, vd, md, scale, causal)
        o = out[0] if op == "attn" else out
        god = (
            distribute_tensor(go, mesh, [o.placements[0]])
            if o.placements[0] != rep
            else (distribute_tensor(go, mesh, [rep]))
        )
        o.backward(god)
        qf, kf, vf = (t.clone().requires_grad_() for t in (q, k, v))
        c = {"none": False, "top_left": True, "bottom_right": "bottom_right"}[causal]
        of = oracle(qf, kf, vf, keep_mask(n, m, c, msk), scale)
        of.backward(go)
        errs = [
            _maxdiff(o.full_tensor(), of),
            _maxdiff(qd.grad.full_tensor(), qf.grad),
            _maxdiff(kd.grad.full_tensor(), kf.grad),
            _maxdiff(vd.grad.full_tensor(), vf.grad),
        ]
        if op == "attn":
            errs.append(
                _maxdiff(
                    out[1].full_tensor(),
                    torch.zeros(())
                    + torch.where(
                        keep_mask(n, m, c, msk)
                        if (c or msk is not None)
                        else torch.ones((), dtype=torch.bool),
                        torch.tanh(scale * q @ k.transpose(-1, -2)),
                        torch.zeros(()),
                    ),
                )
            )
        worst = max(worst, *errs)
        if max(errs) > TOL:
            failures.append((op, lay, causal, scale, msk is not None, errs))
    # the row plan is taken for non-causal calls and not for causal ones
    qd = distribute_tensor(q, mesh, [Shard(2)])
    kd, vd = distribute_tensor(k, mesh, [rep]), distribute_tensor(v, mesh, [rep])
    plans = {
        c: str(ops.attn_lean(qd, kd, vd, None, 1.0, c).placements) for c in ("none", "top_left")
    }
    return {"worst": worst, "failures": failures, "cases": len(sequence), "plans": plans}


# ------------------------------ training parity ---------------------------------------------


def _model(seed: int):
    from torch import nn

    from tanh_attention.nn import MultiheadTanhAttention

    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inp = nn.Linear(6, 8)
            self.attn = MultiheadTanhAttention(8, 4, batch_first=True)
            self.out = nn.Linear(8, 3)

        def forward(self, x):
            h = torch.tanh(self.inp(x))
            y, _ = self.attn(h, h, h, need_weights=False, is_causal=True)
            return self.out(h + y)

    torch.manual_seed(seed)
    return Block().double()


def _data(world: int):
    g = torch.Generator().manual_seed(99)
    x = torch.randn(2 * world, 4 * world, 6, generator=g, dtype=torch.float64)
    y = torch.randn(2 * world, 4 * world, 3, generator=g, dtype=torch.float64)
    return x, y


STEPS = 3
LR = 0.1


def _reference(world: int):
    model = _model(0)
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    x, y = _data(world)
    for _ in range(STEPS):
        opt.zero_grad()
        ((model(x) - y) ** 2).mean().backward()
        opt.step()
    return {k: p.detach() for k, p in model.named_parameters()}


def _compare(params, ref):
    return max(_maxdiff(p, ref[k]) for k, p in params.items())


def training_parity(rank: int, world: int) -> dict[str, float]:
    """DDP, FSDP2 and FSDP2 + context parallelism against one process (float64, SGD)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor.parallel import parallelize_module
    from torch.nn.parallel import DistributedDataParallel

    from tanh_attention.distributed import ContextParallel, shard_sequence

    ref = _reference(world)
    x, y = _data(world)
    rows = slice(2 * rank, 2 * rank + 2)
    out = {}

    model = DistributedDataParallel(_model(0))
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    for _ in range(STEPS):
        opt.zero_grad()
        ((model(x[rows]) - y[rows]) ** 2).mean().backward()
        opt.step()
    out["ddp"] = _compare({k: p.detach() for k, p in model.module.named_parameters()}, ref)

    mesh = init_device_mesh("cpu", (world,))
    model = _model(0)
    fully_shard(model.attn, mesh=mesh)
    fully_shard(model, mesh=mesh)
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    for _ in range(STEPS):
        opt.zero_grad()
        ((model(x[rows]) - y[rows]) ** 2).mean().backward()
        opt.step()
    out["fsdp2"] = _compare({k: p.full_tensor() for k, p in model.named_parameters()}, ref)

    for method, lb in (("allgather", "head_tail"), ("ring", None), ("alltoall", "head_tail")):
        model = _model(0)
        parallelize_module(model, mesh, {"attn": ContextParallel(method=method, load_balance=lb)})
        fully_shard(model, mesh=mesh)
        opt = torch.optim.SGD(model.parameters(), lr=LR)
        xs = shard_sequence(x, dim=1, load_balance=lb)
        ys = shard_sequence(y, dim=1, load_balance=lb)
        for _ in range(STEPS):
            opt.zero_grad()
            # the global mean: local sum / global count, times W (FSDP averages gradients)
            (((model(xs) - ys) ** 2).sum() * world / y.numel()).backward()
            opt.step()
        out[f"fsdp2_cp_{method}_{lb}"] = _compare(
            {k: p.full_tensor() for k, p in model.named_parameters()}, ref
        )
    return out


def compiled(rank: int, world: int) -> dict[str, float]:
    """torch.compile(backend="aot_eager") over context_parallel_attn equals eager."""
    from tanh_attention.distributed import context_parallel_attn

    g = torch.Generator().manual_seed(5)
    out = {}
    for method, lb in (("allgather", "head_tail"), ("alltoall", None), ("ring", "head_tail")):
        q, k, v, go = (
            torch.randn(1, world, 4, 3, generator=g, dtype=torch.float64) for _ in range(4)
        )

        def f(q, k, v, method=method, lb=lb):
            return context_parallel_attn(q, k, v, causal=True, method=method, load_balance=lb)

        res = []
        for fn in (f, torch.compile(f, backend="aot_eager", fullgraph=False)):
            qs, ks, vs = (t.clone().requires_grad_() for t in (q, k, v))
            o = fn(qs, ks, vs)
            o.backward(go)
            res.append((o.detach(), qs.grad, ks.grad, vs.grad))
        out[method] = max(_maxdiff(a, b) for a, b in zip(*res, strict=True))
    return out
