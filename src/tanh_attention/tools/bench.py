"""``tanh-attention bench``: time and memory of tanh attention against the alternatives.

For each configuration (n = m, d = e, batch, causal, dtype, forward or forward+backward,
``(o, a)`` or o-only) it times, in one run:

- ``ours``: ``tanh_attention.attn(..., need_weights=...)``, the registered ops;
- ``composite``: ``torch.ops.tanh_attention.attn_composite`` in eager mode;
- ``compile``: ``torch.compile(composite, fullgraph=True)`` (inductor);
- ``jax``: ``jax.jit`` of the same composite written in JAX, when JAX is installed;

and the **matmul limit**: the op's matrix-product FLOPs (forward ``2nm(d+e)``, forward and
backward ``6nm(d+e)``, plus ``2nmd`` for the o-only backward's recompute of the scores;
``12nmd``, ``14nmd`` at d = e; scaled by the kept fraction when causal) at the rate
``torch.mm`` reaches on a 2048^3 product of that dtype in the same run.

Time is the median of ``--repeats`` runs (at least 5) after a warm-up (three runs, the first
of which compiles, and more until a second has passed); the torch implementations take
turns, one run each per round, so that a slow spell of a shared machine hits them alike
(JAX runs after them).
Peak memory is measured in a fresh process per configuration and implementation: inputs
are built, one warm-up run is
made (compiling, if any), the peak is reset (``/proc/self/clear_refs``; without it,
``resource.getrusage`` gives the peak since process start) and one more run is measured;
the table reports the peak above the resident size before that run.

Heavy imports (torch, JAX, matplotlib, Rich) happen inside functions, so ``tanh-attention
--help`` stays fast.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

__all__ = [
    "IMPLEMENTATIONS",
    "Config",
    "add_arguments",
    "matmul_rate",
    "median_ms",
    "run",
    "run_benchmarks",
    "sweep",
    "torch_runner",
]

IMPLEMENTATIONS = ("ours", "composite", "compile", "jax")
BASELINES = ("composite", "compile", "jax", "limit")
_MIB = 2**20


# --------------------------------------------------------------------------------------------
# Configurations
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Config:
    """One benchmarked case: ``q (*batch, n, d)``, ``k (*batch, n, d)``, ``v (*batch, n, d)``."""

    n: int
    d: int = 64
    batch: tuple[int, ...] = ()
    causal: bool = False
    dtype: str = "float32"
    backward: bool = False  # forward and backward, else forward only
    weights: bool = True  # (o, a), else o only (need_weights=False)

    @property
    def name(self) -> str:
        """E.g. ``n=4096 d=64 f32 fwd+bwd (o,a)``, ``n=1024 d=64 B,H=2,8 causal bf16 fwd o``."""
        parts = [f"n={self.n}", f"d={self.d}"]
        if self.batch:
            parts.append("B,H=" + ",".join(map(str, self.batch)))
        parts += ["causal" if self.causal else "", {"float32": "f32"}.get(self.dtype, "bf16")]
        parts += ["fwd+bwd" if self.backward else "fwd", "(o,a)" if self.weights else "o"]
        return " ".join(p for p in parts if p)

    @property
    def problems(self) -> int:
        return math.prod(self.batch)

    def kept_fraction(self) -> float:
        """The fraction of the n x m entries that take part (causal keeps j <= i)."""
        return (self.n + 1) / (2 * self.n) if self.causal else 1.0

    def flops(self) -> float:
        """The op's matrix-product FLOPs (see the module docstring)."""
        n = m = self.n
        d = e = self.d
        per = 2 * n * m * (d + e)
        if self.backward:
            per = 3 * per + (0 if self.weights else 2 * n * m * d)
        return per * self.problems * self.kept_fraction()

    def nm_bytes(self) -> int:
        """Bytes of one ``(*batch, n, m)`` tensor in this dtype."""
        return self.problems * self.n * self.n * (4 if self.dtype == "float32" else 2)

    def input_bytes(self) -> int:
        """Bytes of q, k and v (their gradients take as much again)."""
        return 3 * self.problems * self.n * self.d * (4 if self.dtype == "float32" else 2)


def sweep(quick: bool = False, sizes: Sequence[int] | None = None) -> list[Config]:
    """The configurations of issue 3's sweep (or of ``--quick``), main sweep first.

    Main sweep: float32, d = 64, n = 256 ... 16384 (o-only to 32768); forward and
    forward+backward; (o, a) and o-only. Around n = 1024 and 4096: d = 128, causal,
    bfloat16; and a batched multi-head case (B = 2, H = 8).
    """
    if sizes is not None:
        main = list(sizes)
        extra_at: list[int] = []
    elif quick:
        main, extra_at = [256, 1024], []
    else:
        main, extra_at = [256, 512, 1024, 2048, 4096, 8192, 16384], [1024, 4096]
    configs = [
        Config(n, backward=backward, weights=weights)
        for n in main
        for weights in (True, False)
        for backward in (False, True)
    ]
    if sizes is None and not quick:
        configs += [Config(32768, backward=b, weights=False) for b in (False, True)]
    for n in extra_at:
        for backward in (False, True):
            for weights in (True, False):
                configs += [
                    Config(n, d=128, backward=backward, weights=weights),
                    Config(n, causal=True, backward=backward, weights=weights),
                    Config(n, dtype="bfloat16", backward=backward, weights=weights),
                ]
    batched = [256, 1024, 2048] if sizes is None and not quick else []
    for n in batched:
        for weights in (True, False):
            configs += [Config(n, batch=(2, 8), backward=b, weights=weights) for b in (False, True)]
    if sizes is None and not quick:
        configs += [Config(16384, causal=True, backward=b, weights=False) for b in (False, True)]
    return configs


# --------------------------------------------------------------------------------------------
# Runners: one call = one timed iteration, finished (JAX results are waited for)
# --------------------------------------------------------------------------------------------


def _needed_bytes(impl: str, config: Config) -> int:
    """A rough peak for skipping what cannot fit: how many n x m tensors each one holds."""
    if impl == "ours":
        count = (3 if config.backward else 1) if config.weights else 0
    else:
        count = 6 if config.backward else 2
    return count * config.nm_bytes() + 3 * config.input_bytes()


def _torch_inputs(config: Config, seed: int = 0) -> dict[str, Any]:
    import torch

    dtype = getattr(torch, config.dtype)
    gen = torch.Generator().manual_seed(seed)
    shape = (*config.batch, config.n, config.d)
    q, k, v = (torch.randn(shape, generator=gen).to(dtype) for _ in range(3))
    inputs: dict[str, Any] = {"q": q, "k": k, "v": v, "scale": config.d**-0.5}
    if config.backward:
        for t in (q, k, v):
            t.requires_grad_()
        inputs["g_o"] = torch.randn(shape, generator=gen).to(dtype)
        if config.weights:
            nm = (*config.batch, config.n, config.n)
            inputs["g_a"] = torch.randn(nm, generator=gen).to(dtype)
    return inputs


def _torch_runner(impl: str, config: Config, x: dict[str, Any]) -> Callable[[], Any]:
    import torch

    variant = "top_left" if config.causal else "none"  # the composite op's causal argument

    def composite(q: Any, k: Any, v: Any) -> Any:
        o, a = torch.ops.tanh_attention.attn_composite(q, k, v, None, x["scale"], variant)
        return (o, a) if config.weights else (o,)

    return torch_runner(impl, config, x, composite)


def torch_runner(
    impl: str, config: Config, x: dict[str, Any], composite: Callable[..., Any]
) -> Callable[[], Any]:
    """One timed iteration of ``impl`` ("ours", "composite", or "compile" of ``composite``):
    the forward under ``no_grad``, or the forward and ``torch.autograd.grad`` of its outputs.
    ``composite(q, k, v)`` returns ``(o, a)`` or ``(o,)`` as ``config.weights`` says."""
    import torch

    import tanh_attention

    q, k, v, scale, causal = x["q"], x["k"], x["v"], x["scale"], config.causal

    def ours(q: Any, k: Any, v: Any) -> Any:
        o, a = tanh_attention.attn(q, k, v, scale=scale, causal=causal, need_weights=config.weights)
        return (o, a) if config.weights else (o,)

    fn: Callable[..., Any]
    if impl == "compile":
        torch._dynamo.reset()
        fn = torch.compile(composite, fullgraph=True, dynamic=False)
    else:
        runners: dict[str, Callable[..., Any]] = {"ours": ours, "composite": composite}
        fn = runners[impl]
    if not config.backward:

        def forward() -> Any:
            with torch.no_grad():
                return fn(q, k, v)

        return forward
    grads = (x["g_o"], x["g_a"]) if config.weights else (x["g_o"],)

    def forward_backward() -> Any:
        outputs = fn(q, k, v)
        return outputs, torch.autograd.grad(outputs, (q, k, v), grads)

    return forward_backward


def _jax_runner(config: Config, x: dict[str, Any]) -> Callable[[], Any]:
    import jax
    import jax.numpy as jnp

    dtype = getattr(jnp, config.dtype)

    def to_jax(t: Any) -> Any:
        return jnp.asarray(t.detach().float().numpy(), dtype=dtype)

    q, k, v = (to_jax(x[name]) for name in "qkv")
    scale, causal, n = x["scale"], config.causal, config.n

    def attn(q: Any, k: Any, v: Any) -> Any:
        s = scale * jnp.matmul(q, jnp.swapaxes(k, -1, -2))
        if causal:
            s = jnp.where(jnp.tril(jnp.ones((n, n), dtype=bool)), s, 0)
        a = jnp.tanh(s)
        o = jnp.matmul(a, v)
        return (o, a) if config.weights else (o,)

    if not config.backward:
        fn = jax.jit(attn)
        args: tuple[Any, ...] = (q, k, v)
    else:

        def forward_backward(q: Any, k: Any, v: Any, *cotangents: Any) -> Any:
            outputs, pullback = jax.vjp(attn, q, k, v)
            return outputs, pullback(cotangents)

        fn = jax.jit(forward_backward)
        cot = (x["g_o"], x["g_a"]) if config.weights else (x["g_o"],)
        args = (q, k, v, *(to_jax(c) for c in cot))

    def call() -> Any:
        return jax.block_until_ready(fn(*args))

    return call


def _runner(impl: str, config: Config, inputs: dict[str, Any] | None = None) -> Callable[[], Any]:
    """One timed iteration of ``impl`` on ``config``'s inputs (made if not given)."""
    x = _torch_inputs(config) if inputs is None else inputs
    return _jax_runner(config, x) if impl == "jax" else _torch_runner(impl, config, x)


def _unavailable(impl: str, config: Config, max_bytes: int) -> str | None:
    """Why ``impl`` is not run for ``config``, or None."""
    if impl == "jax":
        import importlib.util

        if importlib.util.find_spec("jax") is None:
            return "JAX is not installed (pip install jax)"
    needed = _needed_bytes(impl, config)
    if needed > max_bytes:
        return f"needs ~{needed / 2**30:.0f} GiB (limit --max-gib {max_bytes / 2**30:.0f})"
    return None


# --------------------------------------------------------------------------------------------
# Measuring
# --------------------------------------------------------------------------------------------


def _warm_up(fn: Callable[[], Any], seconds: float = 1.0, runs: int = 3) -> None:
    """Run ``fn`` at least ``runs`` times and for at least ``seconds`` (the first run
    compiles and faults memory in; on the benchmark machine the next few are still slower)."""
    start = time.perf_counter()
    for _ in range(runs):
        fn()
    while time.perf_counter() - start < seconds:
        fn()


def _time_ms(fn: Callable[[], Any]) -> float:
    start = time.perf_counter()
    fn()
    return (time.perf_counter() - start) * 1e3


def median_ms(fn: Callable[[], Any], repeats: int = 5) -> tuple[float, list[float]]:
    """Milliseconds of ``fn()``: the median of ``repeats`` runs after a warm-up, and the runs.

    The timing used by ``tanh-attention bench`` and the scripts in ``benchmarks/``."""
    _warm_up(fn)
    times = [_time_ms(fn) for _ in range(repeats)]
    return statistics.median(times), times


def matmul_rate(dtype: str = "float32", repeats: int = 5) -> float:
    """FLOP/s of ``torch.mm`` on a 2048^3 product of ``dtype``, median of ``repeats``."""
    import torch

    a, b = (torch.randn(2048, 2048).to(getattr(torch, dtype)) for _ in range(2))
    ms, _ = median_ms(lambda: torch.mm(a, b), repeats)
    return 2 * 2048**3 / (ms / 1e3)


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _peak_bytes() -> int:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM, the peak resident set size (Linux >= 4.0)
        return True
    except OSError:
        return False


def _release_free_heap() -> None:
    """Return freed heap memory to the kernel (glibc ``malloc_trim``), so that the resident
    size before a measured run counts live data only, not what an earlier run left cached."""
    import contextlib
    import ctypes

    with contextlib.suppress(OSError, AttributeError):  # not glibc: nothing to do
        ctypes.CDLL(None).malloc_trim(0)


def memory_probe(impl: str, config: Config) -> dict[str, Any]:
    """Run in a fresh process: the peak resident memory of one run above the resident size
    before it (inputs, output gradients and the library already loaded)."""
    import gc

    fn = _runner(impl, config)
    fn()  # warm-up (compiles); its outputs are freed before measuring
    gc.collect()
    _release_free_heap()
    before = _rss_bytes()
    reset = _reset_peak()
    fn()
    peak = _peak_bytes()
    return {"peak_mib": (peak - before) / _MIB, "peak_reset": reset}


def _measure_memory(impl: str, config: Config, threads: int) -> float | None:
    code = (
        f"import json, sys, torch; torch.set_num_threads({threads}); "
        "from tanh_attention.tools.bench import Config, memory_probe; "
        "c = json.loads(sys.argv[1]); c['batch'] = tuple(c['batch']); "
        "print(json.dumps(memory_probe(sys.argv[2], Config(**c))))"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code, json.dumps(dataclasses.asdict(config)), impl],
        capture_output=True,
        text=True,
        check=False,
    )
    if proc.returncode != 0:
        raise RuntimeError(
            f"memory probe for {impl} at {config.name} failed:\n{proc.stderr[-2000:]}"
        )
    return float(json.loads(proc.stdout.strip().splitlines()[-1])["peak_mib"])


# --------------------------------------------------------------------------------------------
# Running a sweep
# --------------------------------------------------------------------------------------------


def machine_info() -> dict[str, Any]:
    """Cores, CPU model and flags, load, torch and JAX versions."""
    import torch

    info: dict[str, Any] = {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "load_average": os.getloadavg() if hasattr(os, "getloadavg") else None,
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
    }
    try:
        import jax

        info["jax"] = jax.__version__
    except ImportError:
        info["jax"] = None
    try:
        cpuinfo = Path("/proc/cpuinfo").read_text()
        for line in cpuinfo.splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name" and "cpu_model" not in info:
                info["cpu_model"] = value.strip()
            if key.strip() == "flags" and "cpu_flags" not in info:
                flags = value.split()
                info["cpu_flags"] = sorted(f for f in flags if f.startswith(("avx", "fma", "amx")))
    except OSError:
        pass
    from ..kernels import native
    from ..kernels.cpu import tanh_method

    info["tanh_method_float32"] = tanh_method(torch.float32)[0]
    # (the compiled attention kernels' vectors at d = 64; None: they serve no call)
    info["attn_vector_floats"] = native.vector_floats()
    return info


def run_benchmarks(
    configs: Sequence[Config],
    *,
    impls: Sequence[str] = IMPLEMENTATIONS,
    repeats: int = 5,
    memory: str = "main",
    max_gib: float = 8.0,
    progress: Callable[[str], None] | None = None,
    partial: Callable[[dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """Time (and measure) every implementation on every configuration.

    Args:
        configs: what to run (see :func:`sweep`).
        impls: a subset of :data:`IMPLEMENTATIONS`.
        repeats: timed runs per measurement (the median is reported).
        memory: ``"all"`` configurations, ``"main"`` (forward+backward, float32, d = 64, no
            batch, not causal) or ``"none"``.
        max_gib: skip an implementation whose estimated peak exceeds this.
        progress: called with a label before each measurement.
        partial: called with the report so far after each configuration (a long run that
            is interrupted keeps what it measured).

    Returns:
        A JSON-ready dict: ``machine``, ``matmul_gflops`` per dtype, and ``results``: one
        entry per configuration with ``limit_ms`` and, per implementation, ``time_ms``
        (median), ``times_ms``, ``peak_mib`` or ``skipped``.
    """
    import torch

    max_bytes = int(max_gib * 2**30)
    say = progress or (lambda _: None)
    rates = {}
    for dtype in sorted({c.dtype for c in configs}):
        say(f"torch.mm 2048^3 {dtype}")
        rates[dtype] = matmul_rate(dtype, max(repeats, 5))
    threads = torch.get_num_threads()
    results = []
    for config in configs:
        entry: dict[str, Any] = {
            "config": {**dataclasses.asdict(config), "batch": list(config.batch)},
            "name": config.name,
            "flops": config.flops(),
            "limit_ms": config.flops() / rates[config.dtype] * 1e3,
            "impls": {},
        }
        want_memory = memory == "all" or (
            memory == "main"
            and config.backward
            and config.dtype == "float32"
            and config.d == 64
            and not config.batch
            and not config.causal
        )
        available = []
        for impl in impls:
            reason = _unavailable(impl, config, max_bytes)
            if reason is None:
                available.append(impl)
            else:
                entry["impls"][impl] = {"skipped": reason}
        inputs = _torch_inputs(config)
        times: dict[str, list[float]] = {}
        # The torch implementations take turns, one run each per round, so that a slow spell
        # of the machine hits all of them alike. JAX goes last, on its own: its thread pool
        # keeps spinning after a call and slows down whatever torch runs next.
        for group in ([i for i in available if i != "jax"], [i for i in available if i == "jax"]):
            runners = {}
            for impl in group:
                say(f"{impl}: {config.name} (warm-up)")
                runners[impl] = _runner(impl, config, inputs)
                _warm_up(runners[impl])
            say(f"timing {config.name}")
            for _ in range(repeats):
                for impl, fn in runners.items():
                    times.setdefault(impl, []).append(_time_ms(fn))
            del runners
        del inputs
        for impl, samples in times.items():
            result: dict[str, Any] = {"time_ms": statistics.median(samples), "times_ms": samples}
            if want_memory:
                say(f"{impl}: {config.name} (memory, fresh process)")
                result["peak_mib"] = _measure_memory(impl, config, threads)
            entry["impls"][impl] = result
        results.append(entry)
        if partial is not None:
            partial(_report(results, rates, repeats))
    return _report(results, rates, repeats)


def _report(results: list[dict[str, Any]], rates: dict[str, float], repeats: int) -> dict[str, Any]:
    return {
        "machine": machine_info(),
        "matmul_gflops": {k: v / 1e9 for k, v in rates.items()},
        "repeats": repeats,
        "results": results,
        "goals": goals(results),
    }


def _lookup(results: Sequence[dict[str, Any]], impl: str, key: str, **match: Any) -> float | None:
    """``key`` ("time_ms" or "peak_mib") of ``impl`` ("limit": the matmul limit) in the
    float32, d = 64, unbatched, non-causal configuration that also matches ``match``."""
    want = {"d": 64, "batch": [], "dtype": "float32", "causal": False, **match}
    for entry in results:
        if all(entry["config"].get(k) == v for k, v in want.items()):
            if impl == "limit":
                return float(entry["limit_ms"]) if key == "time_ms" else None
            value = entry["impls"].get(impl, {}).get(key)
            return None if value is None else float(value)
    return None


def _ratio(results: Sequence[dict[str, Any]], other: str, **match: Any) -> float | None:
    ours = _lookup(results, "ours", "time_ms", **match)
    theirs = _lookup(results, other, "time_ms", **match)
    return None if ours is None or theirs is None else ours / theirs


def _met(ratios: dict[str, float | None], limits: dict[str, float]) -> bool | None:
    values = [ratios[k] for k in limits]
    if any(v is None for v in values):
        return None
    return all(v <= limits[k] for k, v in zip(limits, values, strict=True))  # type: ignore[operator]


def goals(results: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Issue 3's five goals (float32, d = e = 64), each with its measured ratios (ours /
    baseline) and whether it is met (None when its configurations were not run)."""
    out = []
    for text, match, limits in [
        (
            "1. (o, a) fwd+bwd, n = 4096: <= 0.8x compile, <= 1.5x matmul limit",
            {"n": 4096, "backward": True, "weights": True},
            {"compile": 0.8, "limit": 1.5},
        ),
        (
            "2. o-only fwd+bwd, n = 4096: <= 0.7x compile, <= 1.6x matmul limit",
            {"n": 4096, "backward": True, "weights": False},
            {"compile": 0.7, "limit": 1.6},
        ),
        (
            "3. o-only fwd, n = 4096: faster than JAX jit (< 1x), <= 1.3x matmul limit",
            {"n": 4096, "backward": False, "weights": False},
            {"jax": 1.0 - 1e-9, "limit": 1.3},
        ),
    ]:
        ratios = {k: _ratio(results, k, **match) for k in limits}
        out.append({"goal": text, "ratios": ratios, "met": _met(ratios, limits)})

    peak = _lookup(results, "ours", "peak_mib", n=32768, backward=True, weights=False)
    gradients = Config(32768).input_bytes() / _MIB
    extra = None if peak is None else peak - gradients
    out.append(
        {
            "goal": "4. o-only fwd+bwd, n = 32768: peak <= 256 MiB above inputs and gradients",
            "ratios": {"extra_mib": extra, "peak_mib": peak, "gradients_mib": gradients},
            "met": None if extra is None else extra <= 256,
        }
    )
    causal: dict[str, float | None] = {}
    for n in (4096, 16384):
        for backward in (False, True):
            match = {"n": n, "backward": backward, "weights": False}
            full = _lookup(results, "ours", "time_ms", **match)
            half = _lookup(results, "ours", "time_ms", **match, causal=True)
            if full is not None and half is not None:
                causal[f"n={n} {'fwd+bwd' if backward else 'fwd'}"] = half / full
    out.append(
        {
            "goal": "5. causal o-only: <= 0.6x the non-causal time",
            "ratios": causal,
            "met": _met(causal, dict.fromkeys(causal, 0.6)) if causal else None,
        }
    )
    return out


# --------------------------------------------------------------------------------------------
# Output: table, markdown, plot
# --------------------------------------------------------------------------------------------


def _fmt_ms(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:.3g}" if value < 100 else f"{value:.0f}"


def table_rows(report: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    """Header and rows of the summary table: ours' time, then ours / each baseline."""
    header = ["configuration", "ours ms"]
    header += [f"/ {b}" for b in BASELINES] + ["ours MiB", "composite MiB"]
    rows = []
    for entry in report["results"]:
        impls = entry["impls"]
        ours = impls.get("ours", {}).get("time_ms")
        row = [entry["name"], _fmt_ms(ours)]
        for b in BASELINES:
            other = entry["limit_ms"] if b == "limit" else impls.get(b, {}).get("time_ms")
            row.append("-" if ours is None or other is None else f"{ours / other:.2f}x")
        for impl in ("ours", "composite"):
            peak = impls.get(impl, {}).get("peak_mib")
            row.append("-" if peak is None else f"{peak:.0f}")
        rows.append(row)
    return header, rows


def markdown(report: dict[str, Any]) -> str:
    """The results as Markdown: times of every implementation, ratios, goals."""
    lines = ["| configuration | ours ms | composite ms | compile ms | JAX ms | limit ms |"]
    lines += ["| --- | ---: | ---: | ---: | ---: | ---: |"]
    for entry in report["results"]:
        impls = entry["impls"]
        cells = [entry["name"]]
        for impl in IMPLEMENTATIONS:
            value = impls.get(impl, {}).get("time_ms")
            cells.append(_fmt_ms(value) if value is not None else "skipped")
        cells.append(_fmt_ms(entry["limit_ms"]))
        lines.append("| " + " | ".join(cells) + " |")
    header, rows = table_rows(report)
    lines += ["", "| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    lines += ["", "| goal | measured | met |", "| --- | --- | --- |"]
    for goal in report["goals"]:
        ratios = ", ".join(
            f"{k} {v:.2f}" if isinstance(v, float) else f"{k} -" for k, v in goal["ratios"].items()
        )
        met = {True: "yes", False: "no", None: "not run"}[goal["met"]]
        lines.append(f"| {goal['goal']} | {ratios} | {met} |")
    return "\n".join(lines) + "\n"


def plot(report: dict[str, Any], path: Path) -> None:
    """Time and peak memory against n, one line per implementation (main sweep)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    modes = [(False, True), (True, True), (False, False), (True, False)]  # (backward, weights)
    fig, axes = plt.subplots(2, 4, figsize=(18, 8), sharex=True)
    for col, (backward, weights) in enumerate(modes):
        entries = [
            e
            for e in report["results"]
            if e["config"]["backward"] == backward
            and e["config"]["weights"] == weights
            and e["config"]["d"] == 64
            and not e["config"]["batch"]
            and not e["config"]["causal"]
            and e["config"]["dtype"] == "float32"
        ]
        entries.sort(key=lambda e: e["config"]["n"])
        title = ("fwd+bwd" if backward else "fwd") + (" (o, a)" if weights else " o-only")
        for impl in (*IMPLEMENTATIONS, "limit"):
            for row, key in enumerate(("time_ms", "peak_mib")):
                if impl == "limit" and key == "peak_mib":
                    continue
                points = [
                    (e["config"]["n"], e["limit_ms"] if impl == "limit" else e["impls"][impl][key])
                    for e in entries
                    if impl == "limit" or key in e["impls"].get(impl, {})
                ]
                if points:
                    xs, ys = zip(*points, strict=True)
                    style = "--" if impl == "limit" else "-o"
                    label = "matmul limit" if impl == "limit" else impl
                    axes[row][col].plot(xs, ys, style, label=label, markersize=4)
        axes[0][col].set_title(title)
        for row, unit in enumerate(("time (ms)", "peak memory above start (MiB)")):
            ax = axes[row][col]
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_ylabel(unit)
            ax.grid(True, which="both", alpha=0.3)
        axes[1][col].set_xlabel("n = m (float32, d = e = 64)")
        if not axes[1][col].lines:
            axes[1][col].text(
                0.5, 0.5, "not measured\n(--memory all measures it)",
                ha="center", va="center", transform=axes[1][col].transAxes,
            )  # fmt: skip
    axes[0][0].legend()
    fig.suptitle(f"tanh attention on {report['machine'].get('cpu_model', 'CPU')}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# --------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of ``tanh-attention bench``."""
    parser.add_argument(
        "--quick", action="store_true", help="a ~1-minute run: n = 256 and 1024, float32, d = 64"
    )
    parser.add_argument(
        "--sizes",
        type=lambda s: [int(x) for x in s.split(",")],
        help="comma-separated n = m values instead of the sweep (float32, d = 64)",
    )
    parser.add_argument(
        "--impls",
        type=lambda s: s.split(","),
        default=list(IMPLEMENTATIONS),
        help=f"comma-separated subset of {','.join(IMPLEMENTATIONS)}",
    )
    parser.add_argument(
        "--decode",
        action="store_true",
        help="decoding steps instead: n = 1, 16 queries against m = 1024..32768 cached keys "
        "(B x H = 32, d = 128, bottom-right causal, o only) vs the composite and the memory "
        "limit (with --quick: m <= 4096)",
    )
    from . import bench_models  # --models, --layer, --threads

    bench_models.add_arguments(parser)
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per case (>= 5)")
    parser.add_argument(
        "--memory",
        choices=("all", "main", "none"),
        default="main",
        help="which cases get a peak-memory run in a fresh process (default: main sweep "
        "forward+backward)",
    )
    parser.add_argument(
        "--max-gib", type=float, default=8.0, help="skip cases estimated to need more memory"
    )
    parser.add_argument("--json", type=Path, metavar="PATH", help="write the results as JSON")
    parser.add_argument("--markdown", type=Path, metavar="PATH", help="write Markdown tables")
    parser.add_argument(
        "--plot", type=Path, metavar="PATH", default=None, help="write a PNG plot (matplotlib)"
    )


def _validate(args: argparse.Namespace) -> None:
    unknown = sorted(set(args.impls) - set(IMPLEMENTATIONS))
    if unknown:
        raise ValueError(
            f"bench: unknown implementation(s) {unknown}; choose from {list(IMPLEMENTATIONS)}"
        )
    if args.repeats < 5:
        raise ValueError(f"bench: --repeats must be at least 5 (median of 5), got {args.repeats}")


def _command(args: argparse.Namespace) -> str:
    """The command line that reproduces this run."""
    words = ["tanh-attention", "bench"]
    if args.decode:
        words.append("--decode")
    if args.quick:
        words.append("--quick")
    if args.sizes:
        words += ["--sizes", ",".join(map(str, args.sizes))]
    if list(args.impls) != list(IMPLEMENTATIONS):
        words += ["--impls", ",".join(args.impls)]
    for flag, value, default in [
        ("--repeats", args.repeats, 5),
        ("--memory", args.memory, "main"),
        ("--max-gib", args.max_gib, 8.0),
    ]:
        if value != default:
            words += [flag, str(value)]
    for flag in ("json", "markdown", "plot"):
        if getattr(args, flag):
            words += [f"--{flag}", str(getattr(args, flag))]
    return " ".join(words)


@contextlib.contextmanager
def step_progress(console: Any, title: str, steps: int) -> Iterator[Callable[[str], None]]:
    """A progress bar of ``steps`` steps; yields ``progress(label)``, called once per step.
    Where the console is not a terminal (a log), each step prints one line instead."""
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
    )

    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
        transient=True,
    ) as bar:
        task = bar.add_task(title, total=steps)

        def progress(label: str) -> None:
            bar.update(task, description=label[:60], advance=1)
            if not console.is_terminal:
                done = int(bar.tasks[0].completed)
                console.print(f"[{done}/{steps}] {time.strftime('%H:%M:%S')} {label}")

        yield progress


def partial_writer(path: Path | None) -> Callable[[dict[str, Any]], None]:
    """``partial(report)``: writes an unfinished report to ``path`` (marked ``partial``), so
    an interrupted run leaves what it measured; a no-op without a path."""

    def partial(report: dict[str, Any]) -> None:
        if path:
            path.write_text(json.dumps({**report, "partial": True}, indent=1))

    return partial


def run(args: argparse.Namespace) -> int:
    """Run ``tanh-attention bench``; returns 0 (a missed goal is a result, not an error)."""
    from rich.console import Console
    from rich.table import Table

    _validate(args)
    console = Console(stderr=True)
    if args.models or args.layer:
        from . import bench_models

        return bench_models.run_cli(args, console)
    if args.threads is not None:
        raise ValueError("bench: --threads applies to --models and --layer only")
    if args.decode:
        return _run_decode(args, console)
    configs = sweep(quick=args.quick, sizes=args.sizes)
    memory = args.memory
    if args.quick and memory == "main":
        memory = "none"
    steps = len(configs) * (len(args.impls) * 2 + 2) + 2
    with step_progress(console, "bench", steps) as progress:
        report = run_benchmarks(
            configs,
            impls=args.impls,
            repeats=args.repeats,
            memory=memory,
            max_gib=args.max_gib,
            progress=progress,
            partial=partial_writer(args.json),
        )
    report["command"] = _command(args)

    header, rows = table_rows(report)
    machine = report["machine"]
    table = Table(
        title=f"tanh attention, {machine.get('cpu_model', 'CPU')}, "
        f"{machine['torch_threads']} threads, torch {machine['torch']} "
        f"(ratios: ours / baseline, lower is better)"
    )
    for i, column in enumerate(header):
        table.add_column(column, justify="left" if i == 0 else "right")
    for row in rows:
        table.add_row(*row)
    out = Console(width=None if sys.stdout.isatty() else 140)
    out.print(table)
    gflops = ", ".join(f"{k} {v:.0f}" for k, v in report["matmul_gflops"].items())
    out.print(f"torch.mm 2048^3: {gflops} GFLOP/s (the matmul limit's rate)")
    for goal in report["goals"]:
        met = {True: "[green]met[/]", False: "[red]not met[/]", None: "[dim]not run[/]"}
        ratios = ", ".join(
            f"{k} {v:.2f}" if isinstance(v, float) else f"{k} -" for k, v in goal["ratios"].items()
        )
        out.print(f"{goal['goal']}: {ratios} -> {met[goal['met']]}")
    if args.json:
        args.json.write_text(json.dumps(report, indent=1))
    if args.markdown:
        args.markdown.write_text(markdown(report))
    if args.plot:
        try:
            plot(report, args.plot)
        except ImportError:
            console.print("matplotlib is not installed (pip install matplotlib): no plot written")
    return 0


def _run_decode(args: argparse.Namespace, console: Any) -> int:
    """``tanh-attention bench --decode``: see ``bench_decode``."""
    from . import bench_decode

    configs = bench_decode.decode_sweep(quick=args.quick)
    total = len(configs)
    done = [0]

    def progress(label: str) -> None:
        done[0] += 1
        console.print(f"[{done[0]}/{total}] {time.strftime('%H:%M:%S')} decode {label}")

    report = bench_decode.run_decode(configs, repeats=args.repeats, progress=progress)
    report["machine"] = machine_info()
    report["command"] = _command(args)
    text = bench_decode.markdown(report)
    print(text)
    if args.json:
        args.json.write_text(json.dumps(report, indent=1))
    if args.markdown:
        args.markdown.write_text(text + "\n")
    return 0


def _main(argv: Iterable[str] | None = None) -> int:  # python -m tanh_attention.tools.bench
    parser = argparse.ArgumentParser(prog="tanh-attention bench")
    add_arguments(parser)
    return run(parser.parse_args(list(argv) if argv is not None else None))


if __name__ == "__main__":
    sys.exit(_main())
