"""The compiled kernels: built on first use with the machine's C compiler into one library,
cached, loaded with ctypes; where they cannot be, the CPU kernels keep their other paths.

- ``tanh.c``: the "compiled" tanh method of the CPU kernels (:func:`tanh_`, :func:`try_tanh_`),
  and the backward's step through it, ``g = (g + g_a) * (1 - a^2)`` of a block in one pass
  (:func:`try_tanh_backward_`);
- ``attn.c``: the whole forward and the whole backward of a float32 call (:func:`try_attn`,
  :func:`try_attn_backward`), in one C call each: no aten op's cost per call, products near
  the core's peak, causal blocks that stop at the diagonal; and decoding steps, float32 or
  bfloat16, reading the cache once, in place (:func:`try_decode`). ``attn_wide.c`` builds it
  again with vectors of 16 floats, which calls take on CPUs with AVX-512
  (:func:`vector_floats`);
- ``pairs.c``: the n x m blocks of bfloat16 calls, ``f(alpha * x @ y^T)`` with the forward's
  tanh or the backward's ``(s + g_a) * (1 - a^2)`` in the same pass, by AVX512-BF16's
  bfloat16 pairs, on CPUs that have them (:func:`try_pairs_block`).

Why at run time: the package installs as pure Python (no compiler needed, one wheel for
every machine), and the kernels are plain C functions with no PyTorch headers. Building them
takes about half a minute (GCC 12, 2 cores: 26 s of it the 16-float build's three per-CPU
clones), once per machine and source; it says so on stderr. The library is cached per
source, compiler and flags in
``$TANH_ATTENTION_CACHE`` (default ``$XDG_CACHE_HOME/tanh_attention`` or
``~/.cache/tanh_attention``), written to a temporary name and renamed, so concurrent
processes (distributed workers) never load a half-written file. On x86-64 one build holds
clones for AVX-512 (x86-64-v4), AVX2 (x86-64-v3) and baseline x86-64, chosen by the CPU at
load time, so a cache shared by different machines is safe. ``TANH_ATTENTION_NO_COMPILE=1``
never builds it.

On load every kernel is checked against float64 on this machine. :func:`unavailable_reason`
says why the library is not used (no compiler, a failed build, a failed load, or a check
that failed); ``kernels.cpu.tanh_method`` then picks among the other tanh methods, and says
so, and attention takes the aten ops (``kernels/blockwise.py``).
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import math
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import Tensor

__all__ = [
    "DECODE_MAX_QUERIES",
    "MAX_ERROR",
    "MAX_KEYS_PER_QUERY",
    "MAX_ULP",
    "PARALLEL_MIN",
    "block_pairs",
    "decode_pairs",
    "serves",
    "tanh_",
    "try_attn",
    "try_attn_backward",
    "try_decode",
    "try_pairs_block",
    "try_tanh_",
    "try_tanh_backward_",
    "unavailable_reason",
    "vector_floats",
]

# The tanh's promise for every float32 input (native.h; tests/test_tanh_accuracy.py sweeps
# it): within MAX_ULP float32 ulp of tanh, and within MAX_ERROR absolutely.
MAX_ULP = 5.0
MAX_ERROR = 2.0**-22

# The calls attn.c serves (try_attn, try_attn_backward): every float32 call it can read, but
# decoding steps: at most this many keys a query. A decoding step (few queries, many keys)
# costs attn.c a packed copy of each problem's keys, as much as its products, and its
# register blocks compute at least four rows for one (32 x 1 x 1024 x 128, one thread: 4.8 ms
# in C, 2.6 ms through aten, 2.7 ms the composite). Everywhere else it costs less than the aten
# path (benchmarks/RESULTS.md, "every forward and backward in one C call": one thread and
# two, 1 x 1 to 64 x 4, n = 16 to 1024, d = 16 to 128, forward 0.3-1.0x the aten path's time,
# forward+backward 0.4-1.0x).
MAX_KEYS_PER_QUERY = 16
# The decoding steps try_decode serves: at most this many queries (its register panel).
DECODE_MAX_QUERIES = 16
# Calls with at least this many multiply-adds, G * n * m * (d + e), run on torch's threads
# (a parallel region costs a few microseconds).
PARALLEL_MIN = 2**20

_HERE = Path(__file__).parent
_SOURCES = (_HERE / "tanh.c", _HERE / "attn.c", _HERE / "attn_wide.c", _HERE / "pairs.c")
_HEADERS = (_HERE / "native.h",)
_NO_COMPILE_ENV = "TANH_ATTENTION_NO_COMPILE"
_CACHE_ENV = "TANH_ATTENTION_CACHE"
# Tried in order until one builds: OpenMP (threads) and per-CPU clones, then fewer features.
_ATTEMPTS: tuple[list[str], ...] = (["-fopenmp"], [], ["-DTA_NO_CLONES"])
_BASE_FLAGS = ["-O3", "-fPIC", "-shared", "-fno-math-errno", "-fno-trapping-math"]
_BUILD_TIMEOUT_S = 120
_FLOAT32_MAX = torch.finfo(torch.float32).max
_FLOAT32_EPS = torch.finfo(torch.float32).eps
# pairs.c's epilogues (its enum)
_PLAIN, _TANH, _BACKWARD = 0, 1, 2
# Whether try_pairs_block serves (block_pairs turns it off, to measure and test both ways)
_pairs_wanted = True


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
    """Each build attempt's flags and cached library, keyed by sources, compiler and flags."""
    source = b"\0".join(path.read_bytes() for path in (*_SOURCES, *_HEADERS))
    targets = []
    for extra in _ATTEMPTS:
        flags = [*_BASE_FLAGS, *extra]
        key = hashlib.sha256(
            b"\0".join([source, compiler.encode(), " ".join(flags).encode(), sys.platform.encode()])
        ).hexdigest()[:16]
        targets.append((flags, _cache_dir() / f"native-{key}.so"))
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
    # (a first call would otherwise seem to hang)
    print(
        f"tanh_attention: compiling the CPU kernels with {compiler}, once (about half a "
        f"minute); cached in {directory}",
        file=sys.stderr,
        flush=True,
    )
    errors = []
    for flags, target in targets:
        try:
            directory.mkdir(parents=True, exist_ok=True)
            fd, partial = tempfile.mkstemp(suffix=".so", dir=directory)
            os.close(fd)
        except OSError as e:
            return None, f"cannot write the build cache {directory} ({e}); set {_CACHE_ENV}"
        command = [compiler, *flags, *map(str, _SOURCES), "-o", partial]
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


def _check_tanh_backward(function: Any) -> str | None:
    """Why this build's ``(g + g_a) * (1 - a^2)`` is wrong here (None: it is right), float32
    and bfloat16, with and without ``g_a``, rows strided apart, one thread and two: within
    the float64 value's rounding to the dtype (one, for bfloat16) and float32's own, NaN
    kept, and the entries past ``cols`` untouched."""
    gen = torch.Generator().manual_seed(2)
    rows, cols = 5, 37
    for dtype, bf16 in ((torch.float32, 0), (torch.bfloat16, 1)):
        g, g_a, a = (torch.randn(rows, cols + 3, generator=gen).to(dtype) for _ in range(3))
        a = a.tanh()
        g[1, 2] = g_a[3, 4] = float("nan")
        for with_g_a, threads in ((True, 1), (False, 2)):
            got = g.clone()
            function(
                *_pointers(got, g_a if with_g_a else None, a),
                rows, cols, cols + 3, cols + 3, cols + 3, bf16, threads,
            )  # fmt: skip
            total = (g.double() + (g_a.double() if with_g_a else 0.0))[:, :cols]
            want = total * (1 - a.double()[:, :cols] ** 2)
            error = (got[:, :cols].double() - want).abs().nan_to_num(0.0)
            # (float32's roundings of g + g_a and of a^2 near 1: ulps of the total)
            bound = torch.finfo(dtype).eps * want.abs() + 4 * _FLOAT32_EPS * total.abs()
            if (
                not torch.equal(got[:, :cols].isnan(), want.isnan())
                or not bool((error <= bound.nan_to_num(0.0)).all())
                or not torch.equal(got[:, cols:], g[:, cols:])
            ):
                return f"the compiled tanh backward is wrong here ({dtype})"
    return None


def _check_attn(attn: Any, backward: Any, vector_floats: int = 8) -> str | None:
    """Why this build's attention forward or backward is wrong here (None: both are right),
    against float64 on problems of sizes that are no multiples of the register block (its
    columns: two vectors of ``vector_floats``), each kind of causal diagonal (causal rows in
    two blocks), one thread and two, with a saved and a recomputed ``a``."""
    gen = torch.Generator().manual_seed(0)
    groups, n, m, d, e, scale = 3, 30, 2 * vector_floats + 3, 7, 9, 0.3
    q, k, v = (
        torch.randn(groups, rows, cols, generator=gen) for rows, cols in ((n, d), (m, d), (m, e))
    )
    g_o, g_a = torch.randn(groups, n, e, generator=gen), torch.randn(groups, n, m, generator=gen)
    rows = torch.arange(n).unsqueeze(-1)
    for diagonal, threads in ((m, 1), (0, 2), (-2, 1), (m - n, 2)):
        keep = torch.arange(m) <= rows + diagonal
        # The VJP by hand (this may run where autograd is off; the tests use autograd).
        q64, k64, v64, g_o64 = q.double(), k.double(), v.double(), g_o.double()
        a_ref = torch.where(keep, torch.tanh(scale * q64 @ k64.mT), 0.0)
        o_ref = a_ref @ v64
        g_s = torch.where(keep, (g_o64 @ v64.mT + g_a.double()) * (1 - a_ref**2), 0.0) * scale
        grads_ref = (g_s @ k64, g_s.mT @ q64, a_ref.mT @ g_o64)
        o, a = torch.empty(groups, n, e), torch.empty(groups, n, m)
        failed = attn(*_pointers(q, k, v, o, a), groups, n, m, d, e, scale, diagonal, threads)
        right = not failed and (
            torch.equal(a[:, ~keep], torch.zeros_like(a[:, ~keep]))
            and (a.double() - a_ref).abs().max().item() <= 1e-6
            and (o.double() - o_ref).abs().max().item() <= 1e-5
        )
        for saved in (a, None):
            grads = [torch.empty_like(t) for t in (q, k, v)]
            failed = backward(
                *_pointers(q, k, v, saved, g_o, g_a, *grads),
                groups,
                n,
                m,
                d,
                e,
                scale,
                diagonal,
                threads,
            )
            right = (
                right
                and not failed
                and all(
                    (got.double() - want).abs().max().item() <= 1e-5
                    for got, want in zip(grads, grads_ref, strict=True)
                )
            )
        if not right:
            return f"the compiled attention kernels are wrong here (causal diagonal {diagonal})"
    return None


def _check_decode(decode: Any) -> str | None:
    """Why this build's decoding step is wrong here (None: it is right), against float64 on
    keys in more than one of its groups (1024 keys) and pieces (256), one or two queries (a
    dot product per score) and more (the register panel, not filled), each kind of causal
    diagonal, shares of problems and of keys over two threads, a float32 and a bfloat16
    cache."""
    gen = torch.Generator().manual_seed(1)
    m, scale = 1100, 0.3
    # (problems, queries, causal diagonal, threads, bfloat16, d, e); a bfloat16 cache with d
    # even and q of bfloat16 values takes scores_pairs where the CPU has them; few_keys reads
    # a bfloat16 cache's rows in pieces of 16 or 32 entries, then one by one (d, e = 40, 35).
    cases = (
        (3, 5, m, 1, 0, 7, 9),
        (1, 5, m - 5, 2, 1, 7, 9),
        (3, 2, 2, 2, 1, 7, 9),
        (1, 1, -1, 1, 0, 7, 9),
        (2, 2, m - 2, 2, 0, 7, 9),
        (2, 5, m, 2, 1, 8, 9),
        (2, 4, m - 4, 2, 1, 40, 35),
        (1, 3, m, 1, 1, 40, 35),
    )
    for groups, n, diagonal, threads, bf16, d, e in cases:
        q, k, v = (
            torch.randn(groups, rows, cols, generator=gen)
            for rows, cols in ((n, d), (m, d), (m, e))
        )
        if bf16:
            q, k, v = q.bfloat16().float(), k.bfloat16(), v.bfloat16()
        keep = torch.arange(m) <= torch.arange(n).unsqueeze(-1) + diagonal
        a_ref = torch.where(keep, torch.tanh(scale * q.double() @ k.double().mT), 0.0)
        o = torch.empty(groups, n, e)
        failed = decode(*_pointers(q, k, v, o), groups, n, m, d, e, scale, diagonal, threads, bf16)
        if failed or not (o.double() - a_ref @ v.double()).abs().max().item() <= 1e-4:
            return f"the compiled decoding step is wrong here ({n} queries, diagonal {diagonal})"
    return None


def _check_pairs(pairs_block: Any) -> str | None:
    """Why this build's bfloat16 blocks by pairs are wrong here (None: they are right),
    against float64 of the same bfloat16 inputs: each epilogue, sizes that are no multiples
    of its register block (6 rows, 64 columns), one y shared by two problems and one each,
    rows strided apart, one thread and two, NaN kept, the memory past each row untouched."""
    gen = torch.Generator().manual_seed(3)
    groups, rows, cols, d, alpha = 2, 13, 70, 10, 0.3
    x = torch.randn(groups, rows, d + 2, generator=gen).bfloat16()[..., :d]
    y = torch.randn(groups, cols, d, generator=gen).bfloat16()
    a = torch.randn(groups, rows, cols, generator=gen).tanh().bfloat16()
    g_a = torch.randn(groups, rows, cols, generator=gen).bfloat16()
    x[1, 4, 3] = g_a[0, 2, 5] = float("nan")
    for mode, shared, threads in ((_PLAIN, False, 1), (_TANH, True, 2), (_BACKWARD, False, 2)):
        ys = y[:1].expand(groups, -1, -1) if shared else y
        s = alpha * x.double() @ ys.double().mT
        want = (
            s
            if mode == _PLAIN
            else s.tanh()
            if mode == _TANH
            else (s + g_a.double()) * (1 - a.double() ** 2)
        )
        out = torch.zeros(groups, rows, cols + 5, dtype=torch.bfloat16)
        failed = pairs_block(
            *_pointers(x, ys, out, a, g_a), groups, rows, cols, d,
            x.stride(1), x.stride(0), d, 0 if shared else cols * d,
            cols + 5, rows * (cols + 5), cols, rows * cols, cols, rows * cols,
            alpha, mode, threads,
        )  # fmt: skip
        got = out[..., :cols].double()
        # One bfloat16 rounding of the result, float32's of the sums (|x| |y| terms).
        terms = alpha * x.double().abs() @ ys.double().abs().mT
        if mode == _BACKWARD:
            terms = terms + g_a.double().abs()
        bound = 2.0**-8 * want.abs() + 8 * d * _FLOAT32_EPS * terms + 1e-30
        error = (got - want).abs()
        if (
            failed
            or not torch.equal(got.isnan(), want.isnan())
            or not bool((error.nan_to_num(0.0) <= bound.nan_to_num(0.0)).all())
            or bool(out[..., cols:].any())
        ):
            return f"the compiled bfloat16 blocks by pairs are wrong here (epilogue {mode})"
    return None


def _pointers(*tensors: Tensor | None) -> list[int | None]:
    return [None if t is None else t.data_ptr() for t in tensors]


# ta_attn_<part>f32 of _Kernels' fields, in order
_SYMBOL_PARTS = ("", "backward_", "decode_")


class _Kernels(NamedTuple):
    """One build of attn.c: its forward, backward and decoding step (argument types set)."""

    attn: Any
    backward: Any
    decode: Any


class _Library(NamedTuple):
    """The loaded library's kernels."""

    tanh: Any
    tanh_backward: Any
    narrow: _Kernels  # vectors of 8 floats (attn.c)
    wide: _Kernels  # of 16 (attn_wide.c)
    vector_floats: int  # of the build this CPU runs at full width: 16, 8 or 0 (neither)
    decode_pairs: Any  # ta_attn_decode_pairs of the 8-float build
    pairs_block: Any  # ta_pairs_block, or None where this CPU or build lacks AVX512-BF16


@functools.cache
def _load() -> tuple[_Library | None, str | None]:
    """The kernels, or None and why not (decided once per process)."""
    if os.environ.get(_NO_COMPILE_ENV, "").strip() not in ("", "0"):
        return None, f"{_NO_COMPILE_ENV} is set"
    compiler = _compiler()
    if compiler is None:
        return None, "no C compiler (cc, gcc or clang; or $CC) is on PATH"
    path, why = _build(compiler)
    if path is None:
        return None, why
    try:
        library = ctypes.CDLL(str(path))
        tanh, vector_floats = library.ta_tanh_f32, library.ta_attn_vector_floats
        tanh_backward = library.ta_tanh_backward
        pairs = library.ta_attn_decode_pairs
        pairs_block, pairs_available = library.ta_pairs_block, library.ta_pairs_available
        builds = [
            _Kernels(*(getattr(library, f"ta_attn_{part}f32{suffix}") for part in _SYMBOL_PARTS))
            for suffix in ("", "_wide")
        ]
    except (OSError, AttributeError) as e:
        return None, f"cannot load the compiled kernels {path}: {e}"
    i64, pointer = ctypes.c_int64, ctypes.c_void_p
    tanh.argtypes = [pointer, i64, i64, i64, ctypes.c_float, ctypes.c_int]
    tanh.restype = None
    tanh_backward.argtypes = [*[pointer] * 3, *[i64] * 5, ctypes.c_int, ctypes.c_int]
    tanh_backward.restype = None
    vector_floats.argtypes, vector_floats.restype = [], ctypes.c_int
    pairs.argtypes, pairs.restype = [ctypes.c_int], ctypes.c_int
    pairs_block.argtypes = [*[pointer] * 5, *[i64] * 14, ctypes.c_float, *[ctypes.c_int] * 2]
    pairs_block.restype = ctypes.c_int
    pairs_available.argtypes, pairs_available.restype = [], ctypes.c_int
    blocks = pairs_block if pairs_available() else None  # (this CPU has AVX512-BF16)
    for build in builds:
        for function, pointers in zip(build, (5, 9, 4), strict=True):
            sizes = [*[i64] * 5, ctypes.c_float, i64, ctypes.c_int]
            function.argtypes = [*[pointer] * pointers, *sizes]
            function.restype = ctypes.c_int
        build.decode.argtypes.append(ctypes.c_int)  # (k and v bfloat16)
    narrow, wide = builds
    bad = (
        _check(tanh)
        or _check_tanh_backward(tanh_backward)
        or _check_attn(narrow.attn, narrow.backward)
        or _check_attn(wide.attn, wide.backward, vector_floats=16)
        or _check_decode(narrow.decode)
        or (blocks is not None and _check_pairs(blocks))
    )
    if bad:
        return None, bad
    return _Library(tanh, tanh_backward, narrow, wide, int(vector_floats()), pairs, blocks), None


def decode_pairs(enable: bool | None = None) -> bool:
    """Whether the compiled bfloat16 decoding step multiplies its scores by bfloat16 pairs
    here (AVX512-BF16's ``vdpbf16ps``: twice the multiply-adds of float32 FMAs; ``attn.c``'s
    ``scores_pairs``), for calls whose d is even (q of a bfloat16 call always qualifies);
    with ``enable``, after turning that on or off for this process (on by default; for
    measuring and testing both ways). False where the kernels are unavailable.

    Example:
        >>> decode_pairs() in (True, False)
        True
    """
    library = _load()[0]
    if library is None:
        return False
    return bool(library.decode_pairs(-1 if enable is None else int(enable)))


def _use_wide(library: _Library, d: int, e: int, m: int | None = None) -> bool:
    """Whether a call with these feature sizes (and ``m`` keys, where given) takes the
    16-float kernels: on a CPU with AVX-512, where the products' columns (d, e, and m for
    the scores) fill 32-column panels about as fully as 16-column ones (at most a 32nd more
    columns, zeros included). Elsewhere AMD's AVX-512 before Zen 5, which runs 512 bits in
    two halves, spends as long on the zero columns as on work: with d or e 16 or less, or
    m = 16, the 16-float kernels took up to twice the time of the 8-float ones (64 x 4 x 16
    x 128 forward, one thread, AMD EPYC Zen 4: 1028 us against 586), and where the panels
    are full they gain 0-10% (benchmarks/RESULTS.md)."""
    return library.vector_floats == 16 and _wide_panels_fill(d, e, m)


@functools.lru_cache(maxsize=1024)
def _wide_panels_fill(*columns: int | None) -> bool:
    """Whether 32-column panels of each of ``columns`` (None: many) hold at most a 32nd
    more columns than 16-column ones. (Cached: small calls ask it every time.)"""
    return all(c is None or 32 * -(-c // 32) * 32 <= 33 * -(-c // 16) * 16 for c in columns)


def vector_floats(d: int = 64, e: int | None = None, m: int | None = None) -> int | None:
    """The vector width, in floats, of the compiled attention kernels that serve a call of
    feature sizes ``d`` (q, k) and ``e`` (v; default ``d``) and ``m`` keys (default: many)
    here: 16 on a CPU with AVX-512 where d, e and m fill 32-column panels about as fully as
    16-column ones (``_use_wide``), else 8; None where they serve no call: the library is
    unavailable (see :func:`unavailable_reason`), or neither build runs at its full width on
    this CPU (x86-64 without AVX2 and FMA, or another architecture: there the vectors are
    computed piece by piece, 30-40x slower, and attention keeps its aten path)."""
    library = _load()[0]
    if library is None or library.vector_floats == 0:
        return None
    return 16 if _use_wide(library, d, d if e is None else e, m) else 8


def unavailable_reason() -> str | None:
    """Why the compiled kernels cannot serve here, or None if they can (builds them on first
    call)."""
    return _load()[1]


def _rows(x: Tensor) -> tuple[int, int, int] | None:
    """``(rows, cols, row stride)`` of x's entries as the kernels walk them: rows of its last
    dim, each contiguous, one stride apart (leading dims collapse onto the rows; a vector is
    one row), or None."""
    cols = x.shape[-1] if x.dim() else 1
    if x.is_contiguous():
        return x.numel() // max(1, cols), cols, cols
    if x.dim() < 2 or (cols > 1 and x.stride(-1) != 1):
        return None
    for i in range(x.dim() - 3, -1, -1):  # each leading dim: its rows follow on
        if x.shape[i] > 1 and x.stride(i) != x.stride(i + 1) * x.shape[i + 1]:
            return None
    return x.numel() // max(1, cols), cols, x.stride(-2)


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
    library, why = _load()
    if library is None:
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
    layout = _rows(x)
    if layout is None:
        return None
    rows, cols, stride = layout
    if rows * cols:
        library = _load()[0]
        assert library is not None
        library.tanh(x.data_ptr(), rows, cols, stride, scale, torch.get_num_threads())
    return x


def try_tanh_backward_(g: Tensor, g_a: Tensor | None, a: Tensor) -> Tensor | None:
    """In place: ``g = (g + g_a) * (1 - a^2)`` of one block (``g_a`` None: no term) by the
    compiled kernel, in float32 and, for bfloat16 blocks, rounded once; or None, ``g``
    untouched, where the kernel cannot serve (not loaded, another dtype or device, a layout
    it does not walk: see ``_rows``). The drivers' blocks are ``(G, rows, cols)`` with
    contiguous rows; ``g`` is the block's own buffer, which no other operand overlaps."""
    library = _load()[0]
    if (
        library is None
        or g.dtype not in (torch.float32, torch.bfloat16)
        or g.device.type != "cpu"
        or any(t is not None and (t.dtype != g.dtype or t.shape != g.shape) for t in (g_a, a))
        or a.device.type != "cpu"
        or (g_a is not None and g_a.device.type != "cpu")
    ):
        return None
    layouts = [_rows(t) for t in (g, a, g_a if g_a is not None else g)]
    if any(layout is None for layout in layouts):
        return None
    (rows, cols, ldg), (_, _, lda), (_, _, ldg_a) = layouts  # type: ignore[misc]
    if rows * cols:
        library.tanh_backward(
            *_pointers(g, g_a, a), rows, cols, ldg, ldg_a, lda,
            int(g.dtype == torch.bfloat16), torch.get_num_threads(),
        )  # fmt: skip
    return g


def block_pairs(enable: bool | None = None) -> bool:
    """Whether :func:`try_pairs_block` serves bfloat16 blocks here (this CPU has AVX512-BF16
    and the kernels loaded); with ``enable``, after turning that on or off for this process
    (on by default; for measuring and testing both ways).

    Example:
        >>> block_pairs() in (True, False)
        True
    """
    global _pairs_wanted
    if enable is not None:
        _pairs_wanted = bool(enable)
    library = _load()[0]
    return _pairs_wanted and library is not None and library.pairs_block is not None


def try_pairs_block(
    x: Tensor,
    y: Tensor,
    alpha: float,
    *,
    tanh: bool = False,
    a: Tensor | None = None,
    g_a: Tensor | None = None,
    out: Tensor | None = None,
) -> Tensor | None:
    """One block of a bfloat16 call by ``pairs.c``: ``f(alpha * x @ y^T)`` in float32,
    rounded to bfloat16 once, where f is tanh (``tanh``), the backward's ``(s + g_a) * (1 -
    a^2)`` (``a`` given; ``g_a`` None: no term) or nothing.

    Args:
        x: ``(G, rows, d)``.  y: ``(G, cols, d)`` or ``(1, cols, d)`` (shared).
        alpha: multiplies the sums (in float32; within its range).
        tanh, a, g_a: the epilogue; ``a`` and ``g_a`` ``(G, rows, cols)``.
        out: ``(G, rows, cols)`` to write into (no operand overlaps it), or None: a new one.

    Returns:
        ``out`` (or the new tensor), or None, nothing written, where the kernel cannot serve:
        this CPU lacks AVX512-BF16 (:func:`block_pairs`), a tensor is not bfloat16 on the
        CPU, d is odd, a row is not contiguous, or the shapes disagree.
    """
    library = _load()[0]
    if library is None or library.pairs_block is None or not _pairs_wanted:
        return None
    if x.dim() != 3 or y.dim() != 3 or not abs(alpha) <= _FLOAT32_MAX:
        return None
    groups, rows, d = x.shape
    cols = y.shape[1]
    if y.shape[2] != d or d % 2 or d == 0 or y.shape[0] not in (1, groups):
        return None
    if (tanh and a is not None) or any(
        t is not None
        and (
            t.dtype != torch.bfloat16
            or t.device.type != "cpu"
            or (t.shape[-1] > 1 and t.stride(-1) != 1)
            or (i >= 2 and t.shape != (groups, rows, cols))
        )
        for i, t in enumerate((x, y, out, a, g_a))
    ):
        return None
    if out is None:
        out = torch.empty(groups, rows, cols, dtype=x.dtype, device=x.device)
    mode = _TANH if tanh else _BACKWARD if a is not None else _PLAIN

    def strides(t: Tensor | None) -> tuple[int, int]:
        return (0, 0) if t is None else (t.stride(1), t.stride(0) if t.shape[0] > 1 else 0)

    if out.numel() and library.pairs_block(
        *_pointers(x, y, out, a, g_a), groups, rows, cols, d,
        *strides(x), *strides(y), *strides(out), *strides(a), *strides(g_a),
        alpha, mode, torch.get_num_threads(),
    ):  # fmt: skip
        return None  # (the packed y's memory could not be had)
    return out


class _Call(NamedTuple):
    """A call attn.c serves: its kernels, sizes and threads."""

    kernels: _Kernels
    batch: torch.Size
    groups: int
    n: int
    m: int
    d: int
    e: int
    threads: int

    def run(
        self,
        function: Any,
        pointers: Sequence[int | None],
        scale: float,
        diagonal: int | None,
        *rest: int,
    ) -> bool:
        """``function`` (one of ``self.kernels``) on the tensors at ``pointers``, with attn.c's
        trailing arguments (the sizes, the scale, the causal diagonal: None keeps every
        entry, the threads, then ``rest``): whether it failed."""
        m = self.m
        diagonal = m if diagonal is None else diagonal
        sizes = self.groups, self.n, m, self.d, self.e
        return bool(function(*pointers, *sizes, scale, diagonal, self.threads, *rest))


def _served(q: Tensor, k: Tensor, v: Tensor, scale: float, decode: bool = False) -> _Call | None:
    """The call, where attn.c serves it (see :func:`try_attn`; with ``decode``,
    :func:`try_decode`), else None."""
    library = _load()[0]
    dtype = q.dtype if decode and q.dtype is torch.bfloat16 else torch.float32
    if (
        library is None
        or library.vector_floats == 0
        or q.dtype is not dtype
        or k.dtype is not dtype
        or v.dtype is not dtype
        or not (q.is_cpu and k.is_cpu and v.is_cpu)
        or not (q.is_contiguous() and k.is_contiguous() and v.is_contiguous())
        or not abs(scale) <= _FLOAT32_MAX
    ):
        return None
    sizes = _sizes(q.shape, k.shape, v.shape, decode, torch.get_num_threads())
    if sizes is None:
        return None
    batch, groups, n, m, d, e, threads = sizes
    # (a decoding step's queries are one panel of the 8-float build)
    kernels = library.wide if not decode and _use_wide(library, d, e, m) else library.narrow
    return _Call(kernels, batch, groups, n, m, d, e, threads)


_Sizes = tuple[torch.Size, int, int, int, int, int, int]


@functools.lru_cache(maxsize=1024)
def _sizes(
    q_shape: torch.Size, k_shape: torch.Size, v_shape: torch.Size, decode: bool, threads: int
) -> _Sizes | None:
    """For :func:`_served`, inputs of these shapes: ``(batch, groups, n, m, d, e, threads)``
    where attn.c serves them, else None. (Cached: the smallest calls take microseconds, a
    share of which these checks were.)"""
    if len(q_shape) < 2 or len(k_shape) != len(q_shape) or len(v_shape) != len(q_shape):
        return None
    batch = q_shape[:-2]
    n, d, m, e = q_shape[-2], q_shape[-1], v_shape[-2], v_shape[-1]
    if (
        k_shape[-1] != d
        or k_shape[-2] != m
        or not (batch == k_shape[:-2] == v_shape[:-2])
        or 0 in q_shape
        or 0 in v_shape
        or (m > MAX_KEYS_PER_QUERY * n) != decode
        or (decode and n > DECODE_MAX_QUERIES)
    ):
        return None
    groups = math.prod(batch)
    threads = threads if groups * n * m * (d + e) >= PARALLEL_MIN else 1
    return batch, groups, n, m, d, e, threads


def serves(q: Tensor, k: Tensor, v: Tensor, scale: float) -> bool:
    """Whether :func:`try_attn` and :func:`try_attn_backward` both serve a call of these
    inputs (no mask, no dropout; gradients and ``a`` of their shapes)."""
    return _served(q, k, v, scale) is not None


def try_attn(
    q: Tensor, k: Tensor, v: Tensor, scale: float, diagonal: int | None, need_weights: bool
) -> tuple[Tensor, Tensor | None] | None:
    """The forward of a float32 call by ``attn.c``: ``o = a @ v`` with
    ``a = M * tanh(scale * q @ k^T)``.

    Args:
        q: ``(..., n, d)``.  k: ``(..., m, d)``.  v: ``(..., m, e)``.
        scale: applied in float32 to the finished scores.
        diagonal: entry ``(i, j)`` is kept iff ``j <= i + diagonal``; None: every entry.
        need_weights: also return ``a``.

    Returns:
        ``(o, a)``: ``(..., n, e)`` and ``(..., n, m)`` (None unless ``need_weights``), in
        memory of their own; or None, having computed nothing, for any call it does not
        serve: the kernels unavailable or not at full width on this CPU
        (:func:`vector_floats`), an input not a contiguous float32 CPU tensor, batch
        shapes that differ, a size 0, a scale beyond float32's range, or more than
        ``MAX_KEYS_PER_QUERY`` keys a query (decoding steps). (It checks all of that
        itself: the kernel reads raw memory.)
    """
    call = _served(q, k, v, scale)
    if call is None:
        return None
    batch, n, m = call.batch, call.n, call.m
    # (new_empty with the sizes as arguments: a tuple costs a microsecond more, a share of
    # the smallest calls)
    o = q.new_empty(*batch, n, call.e)
    a = q.new_empty(*batch, n, m) if need_weights else None
    a_at = None if a is None else a.data_ptr()
    pointers = (q.data_ptr(), k.data_ptr(), v.data_ptr(), o.data_ptr(), a_at)
    failed = call.run(call.kernels.attn, pointers, scale, diagonal)
    return None if failed else (o, a)


def try_attn_backward(
    grad_o: Tensor | None,
    grad_a: Tensor | None,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    a: Tensor | None,
    scale: float,
    diagonal: int | None,
) -> tuple[Tensor, Tensor, Tensor] | None:
    """The VJP of :func:`try_attn`'s forward by ``attn.c``: ``(g_q, g_k, g_v)``.

    Args:
        grad_o: ``(..., n, e)`` or None (zero).  grad_a: ``(..., n, m)`` or None (zero).
        q, k, v, scale, diagonal: as for :func:`try_attn`.
        a: the forward's ``(..., n, m)`` weights, or None (recomputed).

    Returns:
        The three gradients, shaped like q, k and v, in memory of their own; or None, having
        computed nothing, for any call :func:`try_attn` would not serve, or whose gradients
        or ``a`` are not float32 CPU tensors of their shapes. (Gradients that are not
        contiguous, as a broadcast one from ``sum()``, are copied.)
    """
    call = _served(q, k, v, scale)
    if call is None:
        return None
    batch, n, m, e = call.batch, call.n, call.m, call.e
    given = []
    for t, cols in ((grad_o, e), (grad_a, m), (a, m)):
        if t is not None:
            if t.dtype is not torch.float32 or not t.is_cpu or t.shape != (*batch, n, cols):
                return None
            t = t.contiguous()
        given.append(t)
    grad_o, grad_a, a = given
    g_q, g_k, g_v = (torch.empty_like(t) for t in (q, k, v))
    pointers = _pointers(q, k, v, a, grad_o, grad_a, g_q, g_k, g_v)
    failed = call.run(call.kernels.backward, pointers, scale, diagonal)
    return None if failed else (g_q, g_k, g_v)


def _grouped(q: Tensor, k: Tensor, v: Tensor, diagonal: int | None) -> bool:
    """Whether q's heads dim -3 meets k's and v's of size 1 (grouped-query attention) in a
    call without a mask (the stacked queries' rows would shift a causal diagonal)."""
    rank = q.dim()
    return (
        rank >= 3
        and k.dim() == rank == v.dim()
        and k.shape[-3] == 1 == v.shape[-3]
        and q.shape[-3] > 1
        and q.shape[:-3] == k.shape[:-3] == v.shape[:-3]
        and (diagonal is None or diagonal >= k.shape[-2] - 1)
    )


def try_decode(
    q: Tensor, k: Tensor, v: Tensor, scale: float, diagonal: int | None
) -> Tensor | None:
    """``o`` of a float32 or bfloat16 decoding step by ``attn.c``: :func:`try_attn`'s forward
    without ``a``, for the calls it declines as decoding steps, computed transposed so that k
    and v are read once, in place (no packed or converted copy of the cache; a bfloat16
    entry is widened as the products read it, every sum float32, ``o`` rounded once; on a
    CPU with AVX512-BF16 the scores multiply bfloat16 pairs, :func:`decode_pairs`).

    Grouped-query attention (``scaled_dot_product_attention(..., enable_gqa=True)``): where k
    and v have a batch dim of size 1 just before their rows that q has ``r`` of (``r`` query
    heads sharing a key/value head) and nothing is masked, the ``r`` heads' queries run as
    ``r * n`` queries of one problem, so each key/value head is read once for all of them.

    Args:
        q: ``(..., n, d)``, ``n <= DECODE_MAX_QUERIES`` (grouped: ``r * n``).
        k: ``(..., m, d)`` with ``m > MAX_KEYS_PER_QUERY * n``.  v: ``(..., m, e)``.
        scale, diagonal: as for :func:`try_attn`.

    Returns:
        ``o``, ``(..., n, e)``, in memory of its own; or None, having computed nothing, for
        any call it does not serve (as :func:`try_attn`, and calls that are no such step).
    """
    if _grouped(q, k, v, diagonal):
        o = try_decode(q.flatten(-3, -2), k.squeeze(-3), v.squeeze(-3), scale, None)
        return None if o is None else o.unflatten(-2, q.shape[-3:-1])
    call = _served(q, k, v, scale, decode=True)
    if call is None:
        return None
    bf16 = q.dtype is torch.bfloat16
    q = q.float()  # (n x d: small)
    o = q.new_empty(*call.batch, call.n, call.e)
    failed = call.run(call.kernels.decode, _pointers(q, k, v, o), scale, diagonal, bf16)
    return None if failed else o.to(k.dtype)
