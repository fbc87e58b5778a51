"""The compiled tanh (``tanh.c``): built on first use with the machine's C compiler, cached,
loaded with ctypes; where it cannot be, the CPU kernels keep their other tanh methods.

Why at run time: the package installs as pure Python (no compiler needed, one wheel for
every machine), and the kernel is one C function with no PyTorch headers, so building it
takes a fraction of a second. The library is cached per source, compiler and flags in
``$TANH_ATTENTION_CACHE`` (default ``$XDG_CACHE_HOME/tanh_attention`` or
``~/.cache/tanh_attention``), written to a temporary name and renamed, so concurrent
processes (distributed workers) never load a half-written file. On x86-64 one build holds
clones for AVX-512, AVX2 and baseline x86-64, chosen by the CPU at load time, so a cache
shared by different machines is safe. ``TANH_ATTENTION_NO_COMPILE=1`` never builds it.

:func:`unavailable_reason` says why it is not used (no compiler, a failed build, a failed
load, or an accuracy check that failed on this machine); ``kernels.cpu.tanh_method`` then
picks among the others, and says so.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from torch import Tensor

__all__ = ["MAX_ERROR", "MAX_ULP", "tanh_", "try_tanh_", "unavailable_reason"]

# The kernel's promise for every float32 input (tanh.c; tests/test_tanh_accuracy.py sweeps
# it): within MAX_ULP float32 ulp of tanh, and within MAX_ERROR absolutely.
MAX_ULP = 5.0
MAX_ERROR = 2.0**-22

_SOURCE = Path(__file__).with_name("tanh.c")
_NO_COMPILE_ENV = "TANH_ATTENTION_NO_COMPILE"
_CACHE_ENV = "TANH_ATTENTION_CACHE"
# Tried in order until one builds: OpenMP (threads) and per-CPU clones, then fewer features.
_ATTEMPTS: tuple[list[str], ...] = (["-fopenmp"], [], ["-DTA_NO_CLONES"])
_BASE_FLAGS = ["-O3", "-fPIC", "-shared", "-fno-math-errno", "-fno-trapping-math"]
_BUILD_TIMEOUT_S = 120
_FLOAT32_MAX = torch.finfo(torch.float32).max


def _compiler() -> str | None:
    for name in (os.environ.get("CC"), "cc", "gcc", "clang"):
        if name and shutil.which(name):
            return name
    return None


def _cache_dir() -> Path:
    explicit = os.environ.get(_CACHE_ENV)
    if explicit:
        return Path(explicit)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "tanh_attention"


def _targets(compiler: str) -> list[tuple[list[str], Path]]:
    """Each build attempt's flags and cached library, keyed by source, compiler and flags."""
    source = _SOURCE.read_bytes()
    targets = []
    for extra in _ATTEMPTS:
        flags = [*_BASE_FLAGS, *extra]
        key = hashlib.sha256(
            b"\0".join([source, compiler.encode(), " ".join(flags).encode(), sys.platform.encode()])
        ).hexdigest()[:16]
        targets.append((flags, _cache_dir() / f"tanh-{key}.so"))
    return targets


def _build(compiler: str) -> tuple[Path | None, str]:
    """The cached library (built if missing), or None and why not. A build of any attempt
    already in the cache is taken first: a machine whose compiler lacks OpenMP does not try
    (and fail) that build again in every process."""
    targets = _targets(compiler)
    for _, target in targets:
        if target.exists():
            return target, ""
    directory = _cache_dir()
    errors = []
    for flags, target in targets:
        try:
            directory.mkdir(parents=True, exist_ok=True)
            fd, partial = tempfile.mkstemp(suffix=".so", dir=directory)
            os.close(fd)
        except OSError as e:
            return None, f"cannot write the build cache {directory} ({e}); set {_CACHE_ENV}"
        command = [compiler, *flags, str(_SOURCE), "-o", partial]
        try:
            done = subprocess.run(
                command, capture_output=True, text=True, timeout=_BUILD_TIMEOUT_S, check=False
            )
        except (OSError, subprocess.TimeoutExpired) as e:
            done = None
            errors.append(f"{' '.join(command)}: {e}")
        if done is not None and done.returncode == 0:
            os.replace(partial, target)
            return target, ""
        if done is not None:
            errors.append(f"{' '.join(command)}: {done.stderr.strip()[-300:]}")
        Path(partial).unlink(missing_ok=True)
    return None, "the C compiler failed: " + " | ".join(errors)


def _check(function: ctypes._CFuncPtr) -> str | None:  # type: ignore[name-defined]
    """Why this build is not accurate enough here (None: it is), on a sample from 1e-30 to
    20 of both signs, the specials and a scale."""
    x = torch.cat(
        [
            torch.logspace(-30, 1.3, 20001),
            torch.linspace(0, 12, 20001),
            torch.tensor([0.0, float("inf"), 3e38]),
        ]
    )
    x = torch.cat([x, -x])
    for alpha in (1.0, 0.125):
        got = x.clone()
        function(got.data_ptr(), 1, got.numel(), got.numel(), alpha, 1)
        exact = torch.tanh(alpha * x.double())
        error = (got.double() - exact).abs()
        magnitude = exact.abs().float()
        spacing = (torch.nextafter(magnitude, torch.tensor(float("inf"))) - magnitude).double()
        ulp = (error / spacing).max().item()
        if not ulp <= MAX_ULP or not error.max().item() <= MAX_ERROR:
            return f"the compiled tanh is {ulp:.3g} ulp off here (limit {MAX_ULP:g})"
    nan = torch.tensor([float("nan")])
    function(nan.data_ptr(), 1, 1, 1, 1.0, 1)
    return None if bool(nan.isnan()) else "the compiled tanh does not keep NaN here"


@functools.cache
def _load() -> tuple[ctypes._CFuncPtr | None, str | None]:  # type: ignore[name-defined]
    """The kernel, or None and why not (decided once per process)."""
    if os.environ.get(_NO_COMPILE_ENV, "").strip() not in ("", "0"):
        return None, f"{_NO_COMPILE_ENV} is set"
    compiler = _compiler()
    if compiler is None:
        return None, "no C compiler (cc, gcc or clang; or $CC) is on PATH"
    path, why = _build(compiler)
    if path is None:
        return None, why
    try:
        function = ctypes.CDLL(str(path)).ta_tanh_f32
    except (OSError, AttributeError) as e:
        return None, f"cannot load the compiled tanh {path}: {e}"
    function.argtypes = [
        ctypes.c_void_p,
        ctypes.c_int64,
        ctypes.c_int64,
        ctypes.c_int64,
        ctypes.c_float,
        ctypes.c_int,
    ]
    function.restype = None
    bad = _check(function)
    return (None, bad) if bad else (function, None)


def unavailable_reason() -> str | None:
    """Why the compiled tanh cannot serve here, or None if it can (builds it on first call)."""
    return _load()[1]


def _layout(x: Tensor) -> tuple[int, int, int] | None:
    """``(rows, cols, row stride)`` of x's entries as the kernel walks them, or None."""
    if x.is_contiguous():
        return 1, x.numel(), x.numel()
    if (
        x.dim() == 3
        and x.stride(2) == 1
        and (x.shape[0] == 1 or x.stride(0) == x.stride(1) * x.shape[1])
    ):
        return x.shape[0] * x.shape[1], x.shape[2], x.stride(1)
    return None


def tanh_(x: Tensor, scale: float = 1.0) -> Tensor:
    """In place: ``tanh(scale * x)`` of a float32 CPU tensor, by the compiled kernel, on
    ``torch.get_num_threads()`` threads.

    Args:
        x: float32, on the CPU, contiguous or ``(G, n, m)`` with contiguous rows evenly
            strided (a block of a larger buffer); other layouts: ``ValueError``.
        scale: multiplies ``x`` first (in float32, as the product's epilogue would: a score
            beyond float32's range is +-inf, which gives +-1). ``abs(scale)`` must be within
            float32's range (callers scale by ``formulas.scaled`` beyond it).

    Returns:
        ``x``.

    Raises:
        RuntimeError: the kernel is unavailable (see :func:`unavailable_reason`).

    Example:
        >>> x = torch.linspace(-3, 3, 7)
        >>> if unavailable_reason() is None:
        ...     assert torch.allclose(tanh_(x.clone(), 0.5), torch.tanh(0.5 * x))
    """
    function, why = _load()
    if function is None:
        raise RuntimeError(f"tanh_attention: the compiled tanh is unavailable: {why}")
    if x.dtype != torch.float32 or x.device.type != "cpu":
        raise ValueError(f"tanh_(): expected a float32 CPU tensor, got {x.dtype} on {x.device}")
    if not abs(scale) <= _FLOAT32_MAX:
        raise ValueError(f"tanh_(): expected a scale within float32's range, got {scale!r}")
    if try_tanh_(x, scale) is None:
        raise ValueError(
            "tanh_(): expected a contiguous tensor or (G, n, m) rows evenly strided, got "
            f"shape {tuple(x.shape)} and strides {x.stride()}"
        )
    return x


def try_tanh_(x: Tensor, scale: float = 1.0) -> Tensor | None:
    """:func:`tanh_` for a caller that has checked the rest (the kernel loaded, ``x`` float32
    on the CPU, the scale in range): ``x``, or None, untouched, where its layout is not one
    the kernel walks. (A small call's blocks take microseconds: the checks are not repeated.)"""
    layout = _layout(x)
    if layout is None:
        return None
    rows, cols, stride = layout
    if rows * cols:
        function = _load()[0]
        assert function is not None
        function(x.data_ptr(), rows, cols, stride, scale, torch.get_num_threads())
    return x
