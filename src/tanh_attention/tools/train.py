"""``tanh-attention train``: the same small Transformer trained with tanh and softmax attention.

The task is multi-query associative recall
(:class:`tanh_attention.tools.models.RecallTask`), generated on the fly from a fixed seed.
Each model trains in a fresh subprocess (so its peak memory is its own) with the same sizes,
seed, data stream and step budget; the command then reports, side by side, the final
training loss, the loss and accuracy on held-out sequences, the wall time and the peak
memory, and plots both loss curves.

The model uses a token shift, the trick tanh attention needs on this task; ``--no-token-shift``
reproduces the failure without it (``docs/training.md`` has the measurements).

This module keeps its heavy imports (torch, matplotlib, rich, the model) inside functions, so
building the command-line parser stays cheap.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

__all__ = ["KINDS", "TrainConfig", "add_arguments", "run", "train_one"]

KINDS = ("tanh", "softmax")
_PLOT_NAME = "train_loss.png"
_JSON_NAME = "train_results.json"


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Everything one training run depends on (both models share it).

    Attributes:
        steps: optimiser steps.
        seq_len: tokens per sequence; the task has ``seq_len // 4`` pairs unless ``pairs``.
        pairs: key-value pairs per sequence (0: ``seq_len // 4``).
        num_keys, num_values: alphabet sizes of the task.
        batch_size: sequences per step.
        d_model, num_heads, num_layers: model sizes.
        lr: peak learning rate of AdamW (linear warm-up, then cosine decay to 0).
        warmup: warm-up steps.
        seed: seeds the initialisation, the training stream and (offset) the held-out set.
        eval_size: held-out sequences.
        device: torch device string.
        compile: wrap the model in ``torch.compile`` (inductor).
        token_shift: use the model's token shift (the trick; see the module docstring).
        tanh_scale: score scale of tanh attention; None for ``1 / sqrt(head_dim)``.
        threads: torch intra-op threads in each worker (0: torch's default, all cores). One
            is the default: these small models gain little from a second thread, and on a
            busy machine torch's default runs them much slower, its threads waiting on each
            other (``docs/training.md`` has the measurements).
        nproc: processes per model (gloo on CPU, NCCL on CUDA with one GPU per process). With
            more than one, the batch is split across them (DDP), or, with
            ``context_parallel``, the tanh model's sequence is (each process holds
            ``seq_len / nproc`` positions; the softmax model stays data parallel). The loss
            curve equals one process's up to floating-point rounding.
        context_parallel: shard the tanh model's sequence across the ``nproc`` processes
            (``tanh_attention.distributed.ContextParallel``).
    """

    steps: int = 1500
    seq_len: int = 32
    pairs: int = 0
    num_keys: int = 32
    num_values: int = 32
    batch_size: int = 64
    d_model: int = 64
    num_heads: int = 4
    num_layers: int = 2
    lr: float = 2e-3
    warmup: int = 100
    seed: int = 0
    eval_size: int = 1000
    device: str = "cpu"
    compile: bool = False
    token_shift: bool = True
    tanh_scale: float | None = None
    threads: int = 1
    nproc: int = 1
    context_parallel: bool = False


# --------------------------------------------------------------------------------------------
# One model (runs in the worker process, or in-process for tests)
# --------------------------------------------------------------------------------------------


def _current_rss_bytes() -> int | None:
    """Resident set size now (Linux /proc), or None where unavailable."""
    try:
        with open("/proc/self/statm") as f:
            pages = int(f.read().split()[1])
        return pages * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError, AttributeError):
        return None


def _peak_rss_bytes() -> int | None:
    """Peak resident set size of this process so far, or None where unavailable."""
    try:
        import resource
    except ImportError:  # Windows
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # macOS: bytes, Linux: KiB


def _cp_logits(model: Any, tokens: Any, world: int) -> Any:
    """``RecallTransformer.forward`` with the sequence sharded after the embeddings and the
    token shift (computed on the full sequence, which every rank has): this rank's rows of
    the logits. The blocks' attention layers are context parallel."""
    import torch.nn.functional as F

    from ..distributed import shard_sequence

    n = tokens.shape[1]
    x = model.tok(tokens) + model.pos.weight[:n]
    if model.shift is not None:
        x = x + model.shift(F.pad(x, (0, 0, 1, 0))[:, :-1])
    mask = model.causal_mask[:n, :n]  # the global mask: the layers take global masks
    x = shard_sequence(x, dim=1)
    for block in model.blocks:
        x = block(x, mask)
    return model.head(model.ln(x))


def train_one(
    config: TrainConfig,
    kind: str,
    progress: Any = None,
) -> dict[str, Any]:
    """Train one model from scratch and evaluate it on held-out sequences.

    With ``config.nproc > 1`` this runs on every rank of an initialised default process
    group of that size (``_worker_main`` sets it up); every rank returns the same result.

    Args:
        config: sizes, budget, seed, device.
        kind: ``"tanh"`` or ``"softmax"``.
        progress: optional ``callable(step, loss)`` called about 100 times during training.

    Returns:
        A dict: ``kind``, ``losses`` (training loss of every step), ``final_loss`` (mean of
        the last 5% of steps), ``eval_loss`` and ``eval_accuracy`` (held-out, query positions
        only), ``train_seconds``, ``peak_memory_bytes`` (peak RSS of the process on CPU,
        ``torch.cuda.max_memory_allocated`` on CUDA; None if unknown),
        ``baseline_memory_bytes`` (RSS before the model was built, CPU only) and
        ``parameters``.
    """
    import torch
    import torch.nn.functional as F

    from .models import IGNORE, RecallTask, RecallTransformer, attention_factory

    if config.threads:
        torch.set_num_threads(config.threads)
    baseline = _current_rss_bytes()
    device = torch.device(config.device)
    task = RecallTask(config.seq_len, config.pairs, config.num_keys, config.num_values)
    torch.manual_seed(config.seed)
    scale = config.tanh_scale if kind == "tanh" else None
    model: torch.nn.Module = RecallTransformer(
        task.vocab_size,
        task.seq_len,
        attention_factory(kind, scale=scale),
        d_model=config.d_model,
        num_heads=config.num_heads,
        num_layers=config.num_layers,
        token_shift=config.token_shift,
    ).to(device)
    n_params = sum(p.numel() for p in model.parameters())
    step_model: Any = torch.compile(model) if config.compile else model
    world, rank = 1, 0
    if config.nproc > 1:
        import torch.distributed as dist

        world, rank = dist.get_world_size(), dist.get_rank()
    cp = world > 1 and config.context_parallel and kind == "tanh"
    dp = world > 1 and not cp
    if dp:
        from torch.nn.parallel import DistributedDataParallel

        step_model = DistributedDataParallel(step_model)
    if cp:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.tensor.parallel import parallelize_module

        from ..distributed import ContextParallel

        mesh = init_device_mesh(device.type, (world,))
        plan: dict[str, Any] = {
            f"blocks.{i}.attn": ContextParallel() for i in range(config.num_layers)
        }
        parallelize_module(model, mesh, plan)

    def local_loss(tokens: Any, targets: Any) -> tuple[Any, Any]:
        """``(loss to differentiate, the global loss as a detached scalar)``."""
        if cp:
            cols = slice(rank * tokens.shape[1] // world, (rank + 1) * tokens.shape[1] // world)
            logits = _cp_logits(model, tokens, world)
            count = int((targets != IGNORE).sum())
            loss = (
                F.cross_entropy(
                    logits.flatten(0, 1),
                    targets[:, cols].flatten(),
                    ignore_index=IGNORE,
                    reduction="sum",
                )
                / count
            )
            total = loss.detach().clone()
            dist.all_reduce(total)
            return loss, total
        if dp:
            rows = slice(rank * tokens.shape[0] // world, (rank + 1) * tokens.shape[0] // world)
            tokens, targets = tokens[rows], targets[rows]
        logits = step_model(tokens)
        loss = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=IGNORE)
        total = loss.detach().clone()
        if dp:
            dist.all_reduce(total)
            total /= world
        return loss, total

    opt = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=0.0)

    def lr_factor(step: int) -> float:
        warm = min(1.0, (step + 1) / max(1, config.warmup))
        return warm * 0.5 * (1.0 + math.cos(math.pi * min(step, config.steps) / config.steps))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_factor)
    train_gen = torch.Generator().manual_seed(config.seed)
    eval_gen = torch.Generator().manual_seed(config.seed + 1_000_003)  # a separate stream
    eval_tokens, eval_targets = task.sample(config.eval_size, eval_gen, device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    losses: list[float] = []
    every = max(1, config.steps // 100)
    start = time.perf_counter()
    model.train()
    for step in range(config.steps):
        tokens, targets = task.sample(config.batch_size, train_gen, device)
        loss, reported = local_loss(tokens, targets)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if cp:  # each rank has its rows' share of the gradient: sum them
            for p in model.parameters():
                if p.grad is not None:
                    dist.all_reduce(p.grad)
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        losses.append(float(reported))
        if progress is not None and ((step + 1) % every == 0 or step + 1 == config.steps):
            progress(step + 1, losses[-1])
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    train_seconds = time.perf_counter() - start

    model.eval()
    correct = total = 0
    loss_sum = 0.0
    with torch.no_grad():
        for i in range(0, config.eval_size, 250):
            tokens, targets = eval_tokens[i : i + 250], eval_targets[i : i + 250]
            if cp:
                cols = slice(rank * config.seq_len // world, (rank + 1) * config.seq_len // world)
                logits, targets = _cp_logits(model, tokens, world), targets[:, cols]
            else:
                logits = model(tokens)
            asked = targets != IGNORE
            loss_sum += float(
                F.cross_entropy(logits[asked], targets[asked], reduction="sum").detach()
            )
            correct += int((logits.argmax(-1)[asked] == targets[asked]).sum())
            total += int(asked.sum())
    if cp:
        sums = torch.tensor([loss_sum, correct, total], dtype=torch.float64)
        dist.all_reduce(sums)
        loss_sum, correct, total = float(sums[0]), int(sums[1]), int(sums[2])

    if device.type == "cuda":
        peak: int | None = int(torch.cuda.max_memory_allocated(device))
        baseline = None
    else:
        peak = _peak_rss_bytes()
    tail = max(1, len(losses) // 20)
    return {
        "kind": kind,
        "losses": losses,
        "final_loss": sum(losses[-tail:]) / tail,
        "eval_loss": loss_sum / total,
        "eval_accuracy": correct / total,
        "train_seconds": train_seconds,
        "peak_memory_bytes": peak,
        "baseline_memory_bytes": baseline,
        "parameters": n_params,
    }


_MARK = "@@tanh-attention-train "  # prefixes the worker's protocol lines on its stdout


def _worker_main() -> None:
    """Worker process entry point: read ``{"config", "kind"}`` as JSON on stdin, train, and
    write progress, then the result (or the traceback), as marked JSON lines on stdout."""

    def emit(obj: dict[str, Any]) -> None:
        sys.stdout.write(_MARK + json.dumps(obj) + "\n")
        sys.stdout.flush()

    try:
        job = json.loads(sys.stdin.readline())
        config = TrainConfig(**job["config"])
        if config.nproc > 1:
            config = _init_rank(config, job["rank"], job["store"])
        result = train_one(config, job["kind"], lambda step, loss: emit({"step": [step, loss]}))
    except Exception:
        emit({"error": traceback.format_exc()})
        sys.exit(1)
    emit({"result": result})
    if config.nproc > 1:
        import torch.distributed as dist

        dist.destroy_process_group()


def _init_rank(config: TrainConfig, rank: int, store: str) -> TrainConfig:
    """Join the process group of a ``--nproc`` run (gloo on CPU, NCCL on CUDA)."""
    import datetime

    import torch
    import torch.distributed as dist

    cuda = torch.device(config.device).type == "cuda"
    if cuda:
        config = dataclasses.replace(config, device=f"cuda:{rank}")
        torch.cuda.set_device(rank)
    dist.init_process_group(
        "nccl" if cuda else "gloo",
        init_method=f"file://{store}",
        rank=rank,
        world_size=config.nproc,
        timeout=datetime.timedelta(seconds=120),
    )
    return config


def _train_in_subprocess(config: TrainConfig, kind: str, on_step: Any) -> dict[str, Any]:
    """Train one model in a fresh Python process (its peak RSS is this model's alone).

    A plain subprocess rather than multiprocessing, so that calling :func:`run` from a
    script without an ``if __name__ == "__main__"`` guard works too.
    """
    import subprocess
    import tempfile

    env = dict(os.environ)
    src = str(Path(__file__).resolve().parents[2])  # the tanh_attention package's parent
    env["PYTHONPATH"] = os.pathsep.join(p for p in (src, env.get("PYTHONPATH")) if p)
    code = "from tanh_attention.tools.train import _worker_main; _worker_main()"
    job: dict[str, Any] = {"config": dataclasses.asdict(config), "kind": kind}
    others: list[subprocess.Popen[str]] = []
    store_dir = tempfile.TemporaryDirectory(prefix="tanh_train_")
    if config.nproc > 1:  # ranks 1.. report nothing; rank 0 below reports for all
        job["store"] = os.path.join(store_dir.name, "store")
        for rank in range(1, config.nproc):
            p = subprocess.Popen(
                [sys.executable, "-c", code],
                stdin=subprocess.PIPE,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                text=True,
                env=env,
            )
            assert p.stdin is not None
            p.stdin.write(json.dumps({**job, "rank": rank}) + "\n")
            p.stdin.close()
            others.append(p)
        job["rank"] = 0
    with store_dir, tempfile.TemporaryFile("w+") as stderr:
        proc = subprocess.Popen(
            [sys.executable, "-c", code],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=stderr,
            text=True,
            env=env,
        )
        assert proc.stdin is not None and proc.stdout is not None
        result: dict[str, Any] | None = None
        error = ""
        try:
            proc.stdin.write(json.dumps(job))
            proc.stdin.write("\n")
            proc.stdin.close()
            for line in proc.stdout:
                if not line.startswith(_MARK):
                    continue
                msg = json.loads(line[len(_MARK) :])
                if "step" in msg:
                    on_step(*msg["step"])
                elif "result" in msg:
                    result = msg["result"]
                else:
                    error = msg.get("error", "")
        finally:
            code_ = proc.wait()
            for p in others:  # they finish with rank 0, or fail within the group's timeout
                try:
                    p.wait(timeout=150)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait()
        if result is None:
            stderr.seek(0)
            detail = error or stderr.read()[-4000:]
            raise RuntimeError(
                f"the {kind} training process exited with code {code_} without a result:\n{detail}"
            )
        return result


def _train_both(config: TrainConfig, console: Any) -> dict[str, dict[str, Any]]:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    results: dict[str, dict[str, Any]] = {}
    with Progress(
        TextColumn("{task.description:>8}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("loss {task.fields[loss]}"),
        TimeElapsedColumn(),
        console=console,
    ) as bar:
        tasks = {k: bar.add_task(k, total=config.steps, loss="-") for k in KINDS}
        for kind in KINDS:
            task_id = tasks[kind]

            def on_step(step: int, loss: float, task_id: Any = task_id) -> None:
                bar.update(task_id, completed=step, loss=f"{loss:.4f}")

            results[kind] = _train_in_subprocess(config, kind, on_step)
    return results


# --------------------------------------------------------------------------------------------
# Report: table, plot, JSON
# --------------------------------------------------------------------------------------------


def _mib(n: int | None) -> str:
    return "n/a" if n is None else f"{n / 2**20:.0f} MiB"


def _table(results: dict[str, dict[str, Any]], config: TrainConfig) -> Any:
    from rich.table import Table

    table = Table(
        title=f"associative recall, seq_len={config.seq_len}, {config.steps} steps, "
        f"device={config.device}"
    )
    table.add_column("")
    for kind in KINDS:
        table.add_column(f"{kind} attention", justify="right")
    rows = [
        ("final train loss", lambda r: f"{r['final_loss']:.4f}"),
        ("held-out loss", lambda r: f"{r['eval_loss']:.4f}"),
        ("held-out accuracy", lambda r: f"{100 * r['eval_accuracy']:.2f}%"),
        ("wall time (training)", lambda r: f"{r['train_seconds']:.1f} s"),
        ("peak memory", lambda r: _mib(r["peak_memory_bytes"])),
        ("  of which before model", lambda r: _mib(r["baseline_memory_bytes"])),
        ("parameters", lambda r: f"{r['parameters']:,}"),
    ]
    for name, fmt in rows:
        table.add_row(name, *(fmt(results[k]) for k in KINDS))
    return table


def _smooth(values: list[float], window: int) -> list[float]:
    out, acc = [], 0.0
    for i, v in enumerate(values):
        acc += v
        if i >= window:
            acc -= values[i - window]
        out.append(acc / min(i + 1, window))
    return out


def _plot(results: dict[str, dict[str, Any]], config: TrainConfig, path: Path) -> str | None:
    """Write the loss curves as a PNG; return None (with the reason) if matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed (pip install matplotlib): no plot written"
    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    window = max(1, config.steps // 50)
    for kind, color in zip(KINDS, ("tab:red", "tab:blue"), strict=True):
        losses = results[kind]["losses"]
        steps = range(1, len(losses) + 1)
        ax.plot(steps, losses, color=color, alpha=0.2, linewidth=0.8)
        acc = 100 * results[kind]["eval_accuracy"]
        ax.plot(
            steps,
            _smooth(losses, window),
            color=color,
            label=f"{kind} attention (held-out accuracy {acc:.2f}%)",
        )
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("training loss (cross-entropy)")
    ax.set_title(f"Associative recall, seq_len={config.seq_len}: tanh vs softmax attention")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return None


# --------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------


def _int_at_least(minimum: int) -> Callable[[str], int]:
    """An argparse type: an integer >= ``minimum``, with a message naming what it got."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"expected an integer >= {minimum}, got {text!r}"
            ) from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"expected an integer >= {minimum}, got {value}")
        return value

    return parse


_positive_int = _int_at_least(1)
_non_negative_int = _int_at_least(0)


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}") from None
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"expected a positive finite number, got {value}")
    return value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the ``train`` subcommand's options to ``parser``."""
    d = TrainConfig()
    parser.add_argument("--steps", type=_positive_int, default=d.steps, help="optimiser steps")
    parser.add_argument(
        "--seq-len", type=_positive_int, default=d.seq_len, help="tokens per sequence (>= 3)"
    )
    parser.add_argument(
        "--pairs",
        type=_positive_int,
        default=None,
        help="key-value pairs per sequence, the task's difficulty (default: seq_len // 4)",
    )
    parser.add_argument("--batch-size", type=_positive_int, default=d.batch_size)
    parser.add_argument("--d-model", type=_positive_int, default=d.d_model)
    parser.add_argument("--heads", type=_positive_int, default=d.num_heads)
    parser.add_argument("--layers", type=_positive_int, default=d.num_layers)
    parser.add_argument("--lr", type=_positive_float, default=d.lr, help="peak learning rate")
    parser.add_argument("--seed", type=int, default=d.seed)
    parser.add_argument("--device", default=d.device, help="torch device, e.g. cpu or cuda")
    parser.add_argument(
        "--compile", action="store_true", help="train torch.compile'd models (inductor)"
    )
    parser.add_argument(
        "--no-token-shift",
        dest="token_shift",
        action="store_false",
        help="drop the model's token shift (tanh attention then fails to learn the task)",
    )
    parser.add_argument(
        "--tanh-scale",
        type=_positive_float,
        default=None,
        help="score scale of tanh attention (default 1/sqrt(head_dim))",
    )
    parser.add_argument(
        "--threads",
        type=_non_negative_int,
        default=d.threads,
        help="torch threads per training process (default 1; 0: torch's default, all cores)",
    )
    parser.add_argument(
        "--nproc",
        type=_positive_int,
        default=d.nproc,
        help="processes per model (gloo on CPU): the batch is split across them (DDP)",
    )
    parser.add_argument(
        "--context-parallel",
        action="store_true",
        help="with --nproc > 1: shard the tanh model's sequence instead of its batch",
    )
    parser.add_argument("--json", action="store_true", help="print the results as JSON on stdout")
    parser.add_argument(
        "--out",
        type=Path,
        default=Path("out"),
        help=f"directory for {_PLOT_NAME} and {_JSON_NAME} (default: ./out)",
    )


def _config_from_args(args: argparse.Namespace) -> TrainConfig:
    """Build and check the config; raises ValueError naming the option at fault."""
    import torch

    from .models import RecallTask

    config = TrainConfig(
        steps=args.steps,
        seq_len=args.seq_len,
        pairs=args.pairs or 0,
        batch_size=args.batch_size,
        d_model=args.d_model,
        num_heads=args.heads,
        num_layers=args.layers,
        lr=args.lr,
        seed=args.seed,
        device=args.device,
        compile=args.compile,
        token_shift=args.token_shift,
        tanh_scale=args.tanh_scale,
        threads=args.threads,
        nproc=args.nproc,
        context_parallel=args.context_parallel,
    )
    try:
        RecallTask(config.seq_len, config.pairs, config.num_keys, config.num_values)
    except ValueError as e:
        raise ValueError(f"--seq-len/--pairs: {e}") from None
    if config.d_model % config.num_heads:
        raise ValueError(
            f"--d-model must be divisible by --heads, got {config.d_model} and {config.num_heads}"
        )
    if config.nproc > 1 and config.batch_size % config.nproc:
        raise ValueError(
            f"--batch-size must be divisible by --nproc, got {config.batch_size} and {config.nproc}"
        )
    if config.context_parallel:
        if config.nproc < 2:
            raise ValueError("--context-parallel needs --nproc of 2 or more")
        if config.seq_len % config.nproc:
            raise ValueError(
                f"--seq-len must be divisible by --nproc with --context-parallel, got "
                f"{config.seq_len} and {config.nproc}"
            )
        if config.compile:
            raise ValueError("--compile does not combine with --context-parallel")
    try:
        device = torch.device(config.device)
    except RuntimeError as e:
        raise ValueError(f"--device: {e}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {config.device}: CUDA is not available on this machine")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"--device {config.device}: MPS is not available on this machine")
    return config


def run(args: argparse.Namespace) -> int:
    """Run ``tanh-attention train``; return the exit status (0 ok, 1 failed, 2 bad option)."""
    from rich.console import Console

    err = Console(stderr=True)
    try:
        config = _config_from_args(args)
    except ValueError as e:
        err.print(f"tanh-attention train: error: {e}", markup=False)
        return 2
    out_dir: Path = args.out
    out_dir.mkdir(parents=True, exist_ok=True)

    started = time.perf_counter()
    try:
        results = _train_both(config, err)
    except RuntimeError as e:
        err.print(f"tanh-attention train: error: {e}", markup=False)
        return 1
    total_seconds = time.perf_counter() - started

    plot_path = out_dir / _PLOT_NAME
    plot_problem = _plot(results, config, plot_path)
    if plot_problem:
        err.print(f"tanh-attention train: {plot_problem}", markup=False)

    import torch

    report = {
        "config": dataclasses.asdict(config),
        "models": results,
        "total_seconds": total_seconds,
        "plot": None if plot_problem else str(plot_path),
        "torch": torch.__version__,
        "cpu_count": os.cpu_count(),
    }
    (out_dir / _JSON_NAME).write_text(json.dumps(report, indent=1))
    if args.json:
        print(json.dumps(report))
    else:
        Console().print(_table(results, config))
        where = "" if plot_problem else f"plot: {plot_path}, "
        Console().print(f"{where}results: {out_dir / _JSON_NAME} (total {total_seconds:.0f} s)")
    return 0
