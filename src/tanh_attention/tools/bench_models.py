"""``tanh-attention bench --models`` / ``--layer``: the small and medium shapes of models.

**Model-shape sweep** (``--models``). For each case ``q, k, v (B, H, n, d)`` (n = m,
float32, scale ``1 / sqrt(d)``), causal or not, it times forward+backward and forward alone,
on two paths:

- ``weights``: ``tanh_attention.attn`` returns ``(o, a)``; the backward runs through both,
  with random cotangents for both;
- ``o-only``: ``need_weights=False``; the backward runs through ``o`` only;

of four implementations, in the same run:

- ``ours``: ``tanh_attention.attn``;
- ``composite``: the eager composite written here, ``a = tanh((q @ k.mT) * scale)``,
  ``a.tril()`` when causal (top-left), ``o = a @ v`` (it returns ``(o, a)`` or ``o``);
- ``compile``: ``torch.compile`` (inductor, ``fullgraph``) of that composite, skipped with
  the reason when compiling fails;
- ``jax``: ``jax.jit`` of the same composite (``bench``'s JAX runner) when JAX is installed,
  with XLA limited to one thread (set before JAX is first imported, so only when this
  process has not imported it yet; the report says which flags were in force) and, since
  XLA's CPU client keeps a thread pool whatever the flags say, every thread of the process
  pinned to one CPU while JAX runs (Linux; ``jax_pinned`` in the report). The JAX column is
  measured for the 1-thread rows only: XLA's thread count is fixed at start-up.

Shapes: ``(B, H)`` in ``(1, 1), (4, 4), (64, 4)``, n in {16, 64, 256, 1024}, d in
{16, 64, 128}, causal and not, without the cases whose ``a`` (``B H n m`` float32) exceeds
512 MiB. ``--quick``: five shapes (``(64, 4, 32, 16)`` to ``(1, 8, 1024, 64)``), causal and
not. ``--threads 1,2`` repeats every case at each ``torch.set_num_threads`` value.

**Layer step** (``--layer``, and part of ``--models``): a training step (forward and
``out.sum().backward()``, gradients reset each step, no optimizer) of
``tanh_attention.nn.MultiheadTanhAttention(E, H, batch_first=True)`` against
``torch.nn.MultiheadAttention(E, H, batch_first=True)`` on self-attention ``x (batch, L, E)``
(``x`` requires grad, as a layer's input does inside a model), called as the demo model
(``tools/models.py``) calls it: ``m(x, x, x, attn_mask=mask, is_causal=True,
need_weights=False)`` with ``mask = torch.triu(torch.ones(L, L, dtype=torch.bool), 1)``
(True = masked); and with ``need_weights=True``, the same mask and no ``is_causal``.

**Timing.** Each implementation is warmed up (at least three runs and 0.2 s; the first run
compiles), then the number of inner iterations that makes a sample last about 50 ms is
chosen from a few timed runs; a sample is the mean over those iterations, and the reported
time is the best of ``--repeats`` samples. The torch implementations take turns, one sample
each per round, so that a slow spell of a shared machine hits them alike; JAX runs after
them, on its own, as in ``bench`` (its thread pool keeps spinning after a call and slows
down whatever torch runs next). Every number reported is measured in this run.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import os
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from .bench import (
    Config,
    _jax_runner,
    _time_ms,
    _torch_inputs,
    _warm_up,
    machine_info,
    partial_writer,
    step_progress,
    torch_runner,
)

__all__ = [
    "IMPLEMENTATIONS",
    "LayerShape",
    "ModelShape",
    "add_arguments",
    "goals",
    "layer_shapes",
    "markdown",
    "model_sweep",
    "parse_threads",
    "plot",
    "run_cli",
    "run_models",
]

IMPLEMENTATIONS = ("ours", "composite", "compile", "jax")
BASELINES = ("composite", "compile", "jax")
PATHS = ("weights", "o-only")
PASSES = ("fwd+bwd", "fwd")
LAYER_VARIANTS = ("causal o-only", "weights")
MAX_A_BYTES = 512 * 2**20
XLA_SINGLE_THREAD = "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"
_TARGET_MS = 50.0  # length of one timing sample
_WARM_UP_S = 0.2


# --------------------------------------------------------------------------------------------
# Shapes
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ModelShape:
    """One case of the sweep: ``q, k, v (B, H, n, d)``, n = m, float32."""

    B: int
    H: int
    n: int
    d: int
    causal: bool = False

    @property
    def name(self) -> str:
        """E.g. ``64x4 n=32 d=16`` (``B x H``, n = m, head dim)."""
        return f"{self.B}x{self.H} n={self.n} d={self.d}"

    def a_bytes(self) -> int:
        """Bytes of the float32 attention weights ``a (B, H, n, m)``."""
        return self.B * self.H * self.n * self.n * 4

    def config(self, path: str, backward: bool) -> Config:
        """The ``bench.Config`` of this case on ``path`` (for ``bench``'s input and JAX code)."""
        return Config(
            self.n,
            d=self.d,
            batch=(self.B, self.H),
            causal=self.causal,
            backward=backward,
            weights=path == "weights",
        )


@dataclasses.dataclass(frozen=True)
class LayerShape:
    """One case of the layer step: ``x (batch, L, E)``, ``H`` heads."""

    batch: int
    L: int
    E: int
    H: int

    @property
    def name(self) -> str:
        """E.g. ``batch=64 L=32 E=64 H=4``."""
        return f"batch={self.batch} L={self.L} E={self.E} H={self.H}"


def model_sweep(quick: bool = False) -> tuple[list[ModelShape], list[ModelShape]]:
    """The cases of ``--models`` (``--quick``: the small subset) and those skipped because
    their ``a`` exceeds 512 MiB; each shape non-causal, then causal."""
    if quick:
        base = [(64, 4, 32, 16), (8, 8, 64, 64), (8, 8, 128, 64), (4, 8, 256, 64)]
        base.append((1, 8, 1024, 64))
    else:
        base = [
            (b, h, n, d)
            for b, h in ((1, 1), (4, 4), (64, 4))
            for n in (16, 64, 256, 1024)
            for d in (16, 64, 128)
        ]
    kept: list[ModelShape] = []
    skipped: list[ModelShape] = []
    for b, h, n, d in base:
        for causal in (False, True):
            shape = ModelShape(b, h, n, d, causal)
            (kept if shape.a_bytes() <= MAX_A_BYTES else skipped).append(shape)
    return kept, skipped


def layer_shapes() -> list[LayerShape]:
    """The layer-step cases: ``(batch, L, E, H)`` = (64, 32, 64, 4) and (8, 128, 256, 8)."""
    return [LayerShape(64, 32, 64, 4), LayerShape(8, 128, 256, 8)]


# --------------------------------------------------------------------------------------------
# Runners: one call = one iteration, finished
# --------------------------------------------------------------------------------------------


def _torch_runner(impl: str, config: Config, x: dict[str, Any]) -> Callable[[], Any]:
    import torch

    scale, causal, weights = x["scale"], config.causal, config.weights

    def composite(q: Any, k: Any, v: Any) -> Any:
        # The eager composite as a user writes it (the baseline), not the op.
        a = torch.tanh((q @ k.mT) * scale)
        if causal:
            a = a.tril()
        o = a @ v
        return (o, a) if weights else (o,)

    return torch_runner(impl, config, x, composite)


def _runner(impl: str, config: Config, x: dict[str, Any]) -> Callable[[], Any]:
    return _jax_runner(config, x) if impl == "jax" else _torch_runner(impl, config, x)


def _layer_runners(shape: LayerShape, variant: str) -> dict[str, Callable[[], Any]]:
    """One training step of each module: forward, ``out.sum().backward()``."""
    import torch

    from ..nn import MultiheadTanhAttention

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(shape.batch, shape.L, shape.E, generator=gen).requires_grad_()
    mask = torch.triu(torch.ones(shape.L, shape.L, dtype=torch.bool), 1)  # True = masked
    torch.manual_seed(0)
    modules = {
        "ours": MultiheadTanhAttention(shape.E, shape.H, batch_first=True),
        "softmax": torch.nn.MultiheadAttention(shape.E, shape.H, batch_first=True),
    }
    if variant == "causal o-only":
        kwargs: dict[str, Any] = {"attn_mask": mask, "is_causal": True, "need_weights": False}
    else:
        kwargs = {"attn_mask": mask, "need_weights": True}

    def step(module: torch.nn.Module) -> Callable[[], Any]:
        module.train()

        def run() -> Any:
            module.zero_grad(set_to_none=True)
            x.grad = None
            out, _ = module(x, x, x, **kwargs)
            out.sum().backward()
            return out

        return run

    return {name: step(module) for name, module in modules.items()}


# --------------------------------------------------------------------------------------------
# Timing
# --------------------------------------------------------------------------------------------


def _inner_iterations(fn: Callable[[], Any], target_ms: float) -> int:
    """Iterations that make one sample last about ``target_ms`` (from three timed runs)."""
    one = sorted(_time_ms(fn) for _ in range(3))[1]
    return max(1, min(100_000, math.ceil(target_ms / max(one, 1e-4))))


def _sample_ms(fn: Callable[[], Any], iterations: int) -> float:
    """Mean milliseconds per call over ``iterations`` calls."""
    start = time.perf_counter()
    for _ in range(iterations):
        fn()
    return (time.perf_counter() - start) * 1e3 / iterations


def _take_turns(
    runners: dict[str, Callable[[], Any]], repeats: int, target_ms: float
) -> dict[str, dict[str, Any]]:
    """Warm each runner up, size its samples, then ``repeats`` rounds of one sample each;
    ``{name: {"ms": best, "samples_ms": [...], "iterations": k}}``."""
    iterations = {}
    for name, fn in runners.items():
        _warm_up(fn, seconds=_WARM_UP_S)
        iterations[name] = _inner_iterations(fn, target_ms)
    samples: dict[str, list[float]] = {name: [] for name in runners}
    for _ in range(repeats):
        for name, fn in runners.items():
            samples[name].append(_sample_ms(fn, iterations[name]))
    return {
        name: {"ms": min(s), "samples_ms": s, "iterations": iterations[name]}
        for name, s in samples.items()
    }


# --------------------------------------------------------------------------------------------
# Running
# --------------------------------------------------------------------------------------------


def _check_positive_ints(name: str, values: Sequence[Any]) -> None:
    if not values or any(isinstance(t, bool) or not isinstance(t, int) or t < 1 for t in values):
        raise ValueError(
            f"bench --models: {name!r} must be one or more positive integers, got {values!r}"
        )


def _jax_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("jax") is not None


@contextlib.contextmanager
def _one_cpu() -> Iterator[None]:
    """Every thread of this process on one CPU for the duration (Linux; elsewhere nothing).

    XLA's CPU client runs work on a thread pool whatever ``XLA_SINGLE_THREAD`` asks: on the
    AVX2 AMD EPYC of benchmarks/RESULTS.md, JAX 0.10.2 with those flags spent 1.8 CPU-seconds
    per second of jit of the 1 x 8 x 1024 x 64 composite. Pinned, a one-thread baseline is
    one core. Each thread's own set is restored afterwards; threads started meanwhile (by
    XLA) keep the one CPU."""
    if not hasattr(os, "sched_setaffinity"):
        yield
        return
    cpu = min(os.sched_getaffinity(0))
    saved: dict[int, set[int]] = {}
    for tid in (int(name) for name in os.listdir("/proc/self/task")):
        try:
            saved[tid] = os.sched_getaffinity(tid)
            os.sched_setaffinity(tid, {cpu})
        except OSError:  # (a thread that has just exited)
            saved.pop(tid, None)
    try:
        yield
    finally:
        for tid, cpus in saved.items():
            with contextlib.suppress(OSError):
                os.sched_setaffinity(tid, cpus)


def _limit_xla_threads() -> str | None:
    """Ask XLA for one thread, if JAX is not imported yet; returns the XLA_FLAGS in force."""
    if "jax" not in sys.modules:
        flags = os.environ.get("XLA_FLAGS", "")
        if "intra_op_parallelism_threads" not in flags:
            os.environ["XLA_FLAGS"] = f"{flags} {XLA_SINGLE_THREAD}".strip()
    return os.environ.get("XLA_FLAGS")


def _model_row(
    shape: ModelShape,
    path: str,
    pass_: str,
    threads: int,
    impls: Sequence[str],
    repeats: int,
    target_ms: float,
) -> dict[str, Any]:
    config = shape.config(path, backward=pass_ == "fwd+bwd")
    inputs = _torch_inputs(config)
    skipped: dict[str, str] = {}
    torch_runners: dict[str, Callable[[], Any]] = {}
    for impl in (i for i in impls if i != "jax"):
        fn = _runner(impl, config, inputs)
        if impl == "compile":
            try:
                fn()  # compiles
            except Exception as error:  # any failure of inductor: report it, time the rest
                skipped[impl] = f"torch.compile failed: {type(error).__name__}: {error}"[:300]
                continue
        torch_runners[impl] = fn
    timed = _take_turns(torch_runners, repeats, target_ms)
    if "jax" in impls:
        if not _jax_available():
            skipped["jax"] = "JAX is not installed (pip install jax)"
        elif threads != 1:
            skipped["jax"] = "XLA runs single-threaded here (its thread count is fixed)"
        else:
            with _one_cpu():
                jax_runner = {"jax": _runner("jax", config, inputs)}
                timed.update(_take_turns(jax_runner, repeats, target_ms))
    ms = {impl: timed[impl]["ms"] for impl in impls if impl in timed}
    ours = ms.get("ours")
    return {
        "shape": dataclasses.asdict(shape) | {"m": shape.n},
        "name": shape.name,
        "causal": shape.causal,
        "path": path,
        "pass": pass_,
        "threads": threads,
        "ms": ms,
        "ratios": {
            b: ours / ms[b] for b in BASELINES if ours is not None and ms.get(b) is not None
        },
        "samples_ms": {impl: t["samples_ms"] for impl, t in timed.items()},
        "iterations": {impl: t["iterations"] for impl, t in timed.items()},
        "skipped": skipped,
    }


def _layer_row(
    shape: LayerShape, variant: str, threads: int, repeats: int, target_ms: float
) -> dict[str, Any]:
    timed = _take_turns(_layer_runners(shape, variant), repeats, target_ms)
    ours, softmax = timed["ours"]["ms"], timed["softmax"]["ms"]
    return {
        "shape": dataclasses.asdict(shape),
        "name": shape.name,
        "variant": variant,
        "threads": threads,
        "ms": {"ours": ours, "softmax": softmax},
        "ratio": ours / softmax,
        "samples_ms": {name: t["samples_ms"] for name, t in timed.items()},
        "iterations": {name: t["iterations"] for name, t in timed.items()},
    }


def run_models(
    shapes: Sequence[ModelShape] | None = None,
    *,
    quick: bool = False,
    models: bool = True,
    layer: bool = True,
    impls: Sequence[str] = IMPLEMENTATIONS,
    threads: Sequence[int] = (1,),
    repeats: int = 5,
    target_ms: float | None = None,
    layers: Sequence[LayerShape] | None = None,
    progress: Callable[[str], None] | None = None,
    partial: Callable[[dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """Time the model-shape sweep and/or the layer step.

    Args:
        shapes: the cases (default :func:`model_sweep`, ``quick`` or not).
        quick: the small subset of the sweep.
        models: run the model-shape sweep.
        layer: run the layer step.
        impls: a subset of :data:`IMPLEMENTATIONS` (ratios need ``"ours"``).
        threads: ``torch.set_num_threads`` values; every case runs at each.
        repeats: samples per implementation (the best is reported).
        target_ms: length of one sample (default 50 ms).
        layers: the layer-step cases (default :func:`layer_shapes`).
        progress: called with a label before each case.
        partial: called with the report so far after each case.

    Returns:
        A JSON-ready dict: ``machine``, ``xla_flags``, ``jax_pinned``, ``rows`` (one per
        case, path, pass and thread count: ``ms`` and ``ratios`` ours / baseline, ``skipped``
        with reasons), ``layer`` (``ms`` of ours and softmax, ``ratio``), ``skipped_shapes``
        and ``goals``.

    Raises:
        ValueError: bad ``threads``, ``repeats``, ``target_ms`` or ``impls``.
    """
    import torch

    _check_positive_ints("threads", list(threads))
    _check_positive_ints("repeats", [repeats])
    target = _TARGET_MS if target_ms is None else target_ms
    if not target > 0:
        raise ValueError(f"bench --models: 'target_ms' must be positive, got {target_ms!r}")
    unknown = sorted(set(impls) - set(IMPLEMENTATIONS))
    if unknown:
        raise ValueError(
            f"bench --models: unknown implementation(s) {unknown}; "
            f"choose from {list(IMPLEMENTATIONS)}"
        )
    skipped_shapes: list[ModelShape] = []
    if shapes is None:
        shapes, skipped_shapes = model_sweep(quick) if models else ([], [])
    cases = list(shapes) if models else []
    layer_cases = (layer_shapes() if layers is None else list(layers)) if layer else []
    xla_flags = _limit_xla_threads() if "jax" in impls and _jax_available() else None
    say = progress or (lambda _: None)
    rows: list[dict[str, Any]] = []
    layer_rows: list[dict[str, Any]] = []

    def report() -> dict[str, Any]:
        return {
            "machine": machine_info(),
            "xla_flags": xla_flags,
            "jax_pinned": hasattr(os, "sched_setaffinity"),
            "repeats": repeats,
            "target_ms": target,
            "threads": list(threads),
            "impls": list(impls),
            "rows": rows,
            "layer": layer_rows,
            "skipped_shapes": [
                {**dataclasses.asdict(s), "a_mib": s.a_bytes() / 2**20} for s in skipped_shapes
            ],
            "goals": goals(rows, layer_rows),
        }

    before = torch.get_num_threads()
    try:
        for count in threads:
            torch.set_num_threads(count)
            for shape in cases:
                for path in PATHS:
                    for pass_ in PASSES:
                        causal = " causal" if shape.causal else ""
                        say(f"{shape.name}{causal} {path} {pass_} threads={count}")
                        rows.append(_model_row(shape, path, pass_, count, impls, repeats, target))
                if partial is not None:
                    partial(report())
            for lshape in layer_cases:
                for variant in LAYER_VARIANTS:
                    say(f"layer {lshape.name} {variant} threads={count}")
                    layer_rows.append(_layer_row(lshape, variant, count, repeats, target))
    finally:
        torch.set_num_threads(before)
    return report()


# --------------------------------------------------------------------------------------------
# Goals
# --------------------------------------------------------------------------------------------


def _row_label(row: dict[str, Any]) -> str:
    if "variant" in row:
        return f"layer {row['name']} {row['variant']} threads={row['threads']}"
    causal = " causal" if row["causal"] else ""
    return f"{row['name']}{causal} {row['path']} {row['pass']} threads={row['threads']}"


def goals(rows: Sequence[dict[str, Any]], layer: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """The goals, each with ``met`` (None when none of its rows was measured), the number of
    rows it covers, and the worst ratio (ours / baseline) with its row."""
    specs: list[tuple[str, float, str, Callable[[dict[str, Any]], bool]]] = [
        (
            "weights fwd+bwd <= 1.0x composite",
            1.0,
            "composite",
            lambda r: r["path"] == "weights" and r["pass"] == "fwd+bwd",
        ),
        (
            "weights fwd+bwd <= 1.0x compile",
            1.0,
            "compile",
            lambda r: r["path"] == "weights" and r["pass"] == "fwd+bwd",
        ),
        (
            "o-only fwd+bwd <= 1.0x composite",
            1.0,
            "composite",
            lambda r: r["path"] == "o-only" and r["pass"] == "fwd+bwd",
        ),
        (
            "o-only fwd+bwd at n >= 512 <= 0.7x compile",
            0.7,
            "compile",
            lambda r: r["path"] == "o-only" and r["pass"] == "fwd+bwd" and r["shape"]["n"] >= 512,
        ),
        ("forward <= 0.9x composite", 0.9, "composite", lambda r: r["pass"] == "fwd"),
        (
            "forward at n >= 256 <= 1.0x jax",
            1.0,
            "jax",
            lambda r: r["pass"] == "fwd" and r["shape"]["n"] >= 256,
        ),
    ]
    measured: list[tuple[str, float, list[tuple[float, str]]]] = []
    for text, limit, baseline, keep in specs:
        ratios = [(r["ratios"].get(baseline), _row_label(r)) for r in rows if keep(r)]
        measured.append((text, limit, [(x, label) for x, label in ratios if x is not None]))
    layer_ratios = [(r["ratio"], _row_label(r)) for r in layer]
    measured.append(("layer training step <= 1.0x nn.MultiheadAttention", 1.0, layer_ratios))
    out = []
    for text, limit, found in measured:
        worst = max(found, default=None)
        out.append(
            {
                "goal": text,
                "limit": limit,
                "rows": len(found),
                "met": None if worst is None else worst[0] <= limit,
                "worst": None if worst is None else {"ratio": worst[0], "row": worst[1]},
            }
        )
    return out


def _goal_line(goal: dict[str, Any]) -> str:
    if goal["met"] is None:
        return f"{goal['goal']}: not run"
    worst = goal["worst"]
    verdict = "met" if goal["met"] else "missed"
    return (
        f"{goal['goal']}: {verdict} ({goal['rows']} rows; worst {worst['ratio']:.2f}x "
        f"at {worst['row']})"
    )


# --------------------------------------------------------------------------------------------
# Output
# --------------------------------------------------------------------------------------------


def _fmt(value: float | None, unit: str = "") -> str:
    if value is None:
        return "-"
    return (f"{value:.3g}" if value < 100 else f"{value:.0f}") + unit


def table_rows(report: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    """Header and rows of the model-shape table: times of each implementation, then ratios."""
    header = ["shape", "causal", "path", "pass", "thr"]
    header += [f"{impl} ms" for impl in IMPLEMENTATIONS] + [f"/ {b}" for b in BASELINES]
    rows = []
    for r in report["rows"]:
        row = [r["name"], "yes" if r["causal"] else "no", r["path"], r["pass"], str(r["threads"])]
        row += [_fmt(r["ms"].get(impl)) for impl in IMPLEMENTATIONS]
        row += [f"{r['ratios'][b]:.2f}x" if b in r["ratios"] else "-" for b in BASELINES]
        rows.append(row)
    return header, rows


def layer_table_rows(report: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    """Header and rows of the layer-step table."""
    header = ["layer", "variant", "thr", "ours ms", "softmax ms", "/ softmax"]
    rows = [
        [
            r["name"],
            r["variant"],
            str(r["threads"]),
            _fmt(r["ms"]["ours"]),
            _fmt(r["ms"]["softmax"]),
            f"{r['ratio']:.2f}x",
        ]
        for r in report["layer"]
    ]
    return header, rows


def markdown(report: dict[str, Any]) -> str:
    """The tables and the goals as Markdown."""
    lines = [f"`{report.get('command', 'tanh-attention bench --models')}`", ""]
    for header, rows in (table_rows(report), layer_table_rows(report)):
        if rows:
            lines += ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
            lines += ["| " + " | ".join(row) + " |" for row in rows] + [""]
    lines += ["Goals (ours / baseline, best of the repeats):", ""]
    lines += [f"- {_goal_line(goal)}" for goal in report["goals"]]
    return "\n".join(lines) + "\n"


def plot(report: dict[str, Any], path: Path) -> None:
    """Ratios ours / composite and ours / compile against n, one line per (B x H, d); solid
    non-causal, dashed causal; one column per path and pass; the first thread count."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    threads = report["threads"][0]
    modes = [(p, s) for p in PATHS for s in PASSES]
    fig, axes = plt.subplots(2, len(modes), figsize=(5 * len(modes), 8), sharex=True, squeeze=False)
    keys = sorted({(r["shape"]["B"], r["shape"]["H"], r["shape"]["d"]) for r in report["rows"]})
    colors = {key: f"C{i % 10}" for i, key in enumerate(keys)}
    for col, (path_, pass_) in enumerate(modes):
        for row, baseline in enumerate(("composite", "compile")):
            ax = axes[row][col]
            for key in keys:
                for causal in (False, True):
                    points = sorted(
                        (r["shape"]["n"], r["ratios"][baseline])
                        for r in report["rows"]
                        if (r["shape"]["B"], r["shape"]["H"], r["shape"]["d"]) == key
                        and r["causal"] == causal
                        and r["path"] == path_
                        and r["pass"] == pass_
                        and r["threads"] == threads
                        and baseline in r["ratios"]
                    )
                    if points:
                        xs, ys = zip(*points, strict=True)
                        label = f"{key[0]}x{key[1]} d={key[2]}" if not causal else None
                        ax.plot(
                            xs, ys, "--o" if causal else "-o", color=colors[key], label=label,
                            markersize=4,
                        )  # fmt: skip
            ax.axhline(1.0, color="gray", linewidth=0.8)
            ax.set_xscale("log", base=2)
            ax.set_title(f"{path_} {pass_}: ours / {baseline}")
            ax.grid(True, which="both", alpha=0.3)
            if row == 1:
                ax.set_xlabel("n = m (float32; dashed: causal)")
    axes[0][0].legend(fontsize=7)
    fig.suptitle(
        f"tanh attention, model shapes, {report['machine'].get('cpu_model', 'CPU')}, "
        f"{threads} thread(s)"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# --------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------


def parse_threads(text: str) -> list[int]:
    """``--threads``: comma-separated positive integers, e.g. ``1,2``."""
    try:
        values = [int(part) for part in text.split(",")]
    except ValueError:
        values = []
    if not values or any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(
            f"must be comma-separated positive integers such as 1,2, got {text!r}"
        )
    return values


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags ``--models``, ``--layer`` and ``--threads`` of ``tanh-attention bench``."""
    parser.add_argument(
        "--models",
        action="store_true",
        help="model shapes instead: B x H up to 256, n = m = 16..1024, d = 16..128, fwd and "
        "fwd+bwd, (o, a) and o-only, vs the composite, compile and JAX; plus the layer step "
        "(with --quick: five shapes, about a minute or two)",
    )
    parser.add_argument(
        "--layer",
        action="store_true",
        help="only the layer training step: MultiheadTanhAttention vs nn.MultiheadAttention",
    )
    parser.add_argument(
        "--threads",
        type=parse_threads,
        default=None,
        metavar="N[,N...]",
        help="torch threads for --models/--layer, e.g. 1,2 (default 1)",
    )


def _command(args: argparse.Namespace) -> str:
    from .bench import _command as bench_command

    flags = ["--models"] if args.models else []
    flags += ["--layer"] if args.layer and not args.models else []
    if args.threads and list(args.threads) != [1]:
        flags += ["--threads", ",".join(map(str, args.threads))]
    prefix = "tanh-attention bench"
    return bench_command(args).replace(prefix, " ".join([prefix, *flags]), 1)


def run_cli(args: argparse.Namespace, console: Any) -> int:
    """``tanh-attention bench --models`` / ``--layer``: run, print, write the outputs."""
    from rich.console import Console
    from rich.table import Table

    if args.decode:
        raise ValueError("bench: --decode and --models/--layer are separate modes; pick one")
    if args.sizes:
        raise ValueError("bench: --sizes does not apply to --models/--layer")
    threads = args.threads or [1]
    shapes, skipped = model_sweep(args.quick) if args.models else ([], [])
    layer_count = len(layer_shapes()) * len(LAYER_VARIANTS)
    steps = len(threads) * (len(shapes) * len(PATHS) * len(PASSES) + layer_count)
    for shape in skipped:
        console.print(f"skipped {shape.name}: a is {shape.a_bytes() / 2**20:.0f} MiB (> 512 MiB)")
    with step_progress(console, "bench --models", steps) as progress:
        report = run_models(
            shapes,
            models=args.models,
            layer=True,
            impls=args.impls,
            threads=threads,
            repeats=args.repeats,
            progress=progress,
            partial=partial_writer(args.json),
        )
    report["skipped_shapes"] = [
        {**dataclasses.asdict(s), "a_mib": s.a_bytes() / 2**20} for s in skipped
    ]
    report["command"] = _command(args)

    out = Console(width=None if sys.stdout.isatty() else 160)
    machine = report["machine"]
    title = (
        f"{machine.get('cpu_model', 'CPU')}, torch {machine['torch']}, best of "
        f"{report['repeats']} x ~{report['target_ms']:.0f} ms (ratios: ours / baseline)"
    )
    for label, left, (header, rows) in (
        ("tanh attention, model shapes", 5, table_rows(report)),
        ("layer training step", 3, layer_table_rows(report)),
    ):
        if not rows:
            continue
        table = Table(title=f"{label}, {title}")
        for i, column in enumerate(header):
            table.add_column(column, justify="left" if i < left else "right")
        for row in rows:
            table.add_row(*row)
        out.print(table)
    reasons = {reason for r in report["rows"] for reason in r["skipped"].values()}
    for reason in sorted(reasons):
        out.print(f"skipped column: {reason}")
    out.print("goals:")
    for goal in report["goals"]:
        color = {True: "green", False: "red", None: "dim"}[goal["met"]]
        out.print(f"  [{color}]{_goal_line(goal)}[/]", highlight=False)
    if args.json:
        args.json.write_text(json.dumps(report, indent=1))
    if args.markdown:
        args.markdown.write_text(markdown(report))
    if args.plot:
        if not report["rows"]:
            console.print("no model-shape rows: no plot written")
        else:
            try:
                plot(report, args.plot)
            except ImportError:
                console.print("matplotlib is not installed (pip install matplotlib): no plot")
    return 0
