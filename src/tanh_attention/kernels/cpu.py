"""The two block primitives of the CPU kernels: ``tanh(scale * q @ k^T)`` and ``x @ y^T + c``.

Why tanh is its own kernel: on the CPUs this package is benchmarked on, ``torch.tanh`` costs
more than the matrix products around it, and ``2 * sigmoid(2x) - 1`` is fast but loses all
relative accuracy near 0 (tanh(1e-8) comes out as 0: it is the last resort, see below);
``benchmarks/tanh_methods.py`` measures
the candidates and benchmarks/RESULTS.md holds the figures. oneDNN, which the x86 and
aarch64 PyTorch wheels ship, can apply tanh in the epilogue of its matrix product while the
scores are still in registers (``torch.ops.mkldnn._linear_pointwise(q, k, None, "tanh", [],
"")`` computes ``tanh(q @ k^T)``), within a few float32 ulp of the exact tanh
(``tests/test_tanh_accuracy.py`` sweeps float32 densely and requires 4 ulp). The same oneDNN
product without the epilogue computes the backward's ``g_o @ v^T``; :func:`matmul_t` uses it.

A block of several small problems, each with its own keys (a batch of short sequences),
is one grouped 1x1 convolution with the same fused tanh (``_convolution_pointwise``, one
group per problem): one oneDNN call for the whole batch, where a matrix product per problem
would cost a Python and oneDNN call each, and ``torch.bmm`` followed by ``torch.tanh_`` pays
the slow tanh (``benchmarks/RESULTS.md``, "Many small problems").

Where both ``torch.tanh`` and oneDNN's tanh are slow (an AMD EPYC with AVX2 only: 3.5 ns an
entry for either, ``torch.sigmoid`` 1 ns), float32 blocks take ``2 * sigmoid(2x) - 1``
(method ``"sigmoid"``): the product scales ``x`` by twice the scale as it stores it (BLAS's
alpha, as it applies the scale for ``torch.tanh_``), and one ``sigmoid_`` and one fused
multiply-add follow. Its error is absolute, at
most ``SIGMOID_MAX_ERROR = 2**-22`` (measured: 3 * 2**-24), where the other two are within 4
ulp of tanh: near 0 that is the error the float32 product already has for scores of unit
size, but scores far below 1 (all of q or k tiny) lose their relative accuracy. So it runs
only where the timing probe finds it clearly faster than the others (``_SIGMOID_MIN_SPEEDUP``),
and ``TANH_ATTENTION_CPU_TANH=torch`` keeps relative accuracy at any speed.

Faster than all three where oneDNN's tanh is slow: the compiled tanh (method ``"compiled"``,
``native.py`` and ``tanh.c``), a rational function that the machine's C compiler vectorizes,
built on first use and cached; within ``native.MAX_ULP`` = 5 ulp of tanh (relative accuracy
near 0 included) and 2**-22 absolutely. On the AVX2 AMD EPYC it takes 0.26-0.48 ns an
entry, ``2 * sigmoid(2x) - 1`` 1.2 (``benchmarks/tanh_methods.py``, one thread). Where no
compiler is found, the build fails or its accuracy check does not pass, :func:`tanh_method`
says why and picks among the others. It runs on float32 blocks whose rows are contiguous and
evenly strided (the blocks' layout); any other layout takes ``torch.tanh_``.

The oneDNN paths are taken only where a probe on first use shows they run and are accurate
for the dtype (float32, and bfloat16 where the CPU supports it), and, for float32 and the
grouped convolution, that they are faster here: whether oneDNN's epilogue beats
``torch.tanh_`` depends on the CPU (on the AMD EPYC of benchmarks/RESULTS.md ``torch.tanh``
costs more than the products; on an Intel Xeon with AVX-512 and AMX it costs 0.34 ns an
entry and ``torch.matmul`` + ``tanh_`` is the faster), so one timing probe per process
decides, on a block of the kernels' usual size. Otherwise a block is computed with
``torch.matmul`` (and ``torch.tanh_``). :func:`tanh_method` says which one runs, and why;
``TANH_ATTENTION_CPU_TANH=onednn``, ``=compiled``, ``=sigmoid`` or ``=torch`` skips the timing
(accuracy, and for ``compiled`` a working build, still decide).

The accumulating products ``acc += alpha * x @ y`` of one-problem blocks (``o += a @ v`` and
the backward's three gradient products, :func:`add_product_`) follow the same rule with a
probe of their own: on the AMD EPYC of benchmarks/RESULTS.md ``torch.baddbmm`` runs MKL's
float32 kernel at about 95 GFLOP/s where oneDNN's reaches 210 (MKL takes its AVX2 path on
AMD CPUs), while on Intel MKL is the fast one. :func:`product_method` says which runs here.

A third probe, :func:`few_rows_method`, decides how a bfloat16 or float16 decoding step (a
few queries against a long cache) reads its keys and values: as they are, where products in
that dtype are fast, or converted to float32 block by block, where they are not (a CPU
without native bfloat16 runs them many times slower than float32 ones).
"""

from __future__ import annotations

import functools
import os
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from .._torch_private import linear_pointwise
from ..formulas import scaled
from . import blocks, native

__all__ = [
    "FUSED_MIN_ENTRIES",
    "PRODUCT_MIN_COLS",
    "PRODUCT_MIN_ENTRIES",
    "SIGMOID_MAX_ERROR",
    "add_product_",
    "few_rows_method",
    "matmul_t",
    "product_method",
    "scaled_tanh_",
    "score_grad",
    "scores_tanh",
    "tanh_",
    "tanh_backward_",
    "tanh_method",
]

# A probe sample: float32 inputs from 1e-30 to 20 (log-spaced, both signs) and 0, where
# tanh's relative accuracy is hardest near 0 and its rounding to +-1 near the top.
_PROBE_POINTS = 4097
# The accuracy promised for float32 (tests/test_tanh_accuracy.py checks a dense sweep).
MAX_ULP = 4.0


def _ulp_error(got: Tensor, x: Tensor) -> Tensor:
    """|got - tanh(x)| in units of the float32 spacing at tanh(x) (exact tanh in float64)."""
    exact = torch.tanh(x.double())
    magnitude = exact.abs().float()
    spacing = torch.nextafter(magnitude, torch.tensor(float("inf"))) - magnitude
    return (got.double() - exact).abs() / spacing.double()


# The "sigmoid" method's promise: |2 * sigmoid(2x) - 1 - tanh(x)| <= this for every float32 x
# (sigmoid's rounding near 1/2, doubled). The probe checks it on this machine's sigmoid.
SIGMOID_MAX_ERROR = 2.0**-22
# ... and it must beat the faster of the accurate methods by this factor: where they are
# about as fast, relative accuracy near 0 is worth more than the difference.
_SIGMOID_MIN_SPEEDUP = 1.25
# ... and :func:`tanh_` takes it only from this many entries: it is three passes where
# ``torch.tanh_`` is one, and below this their per-call cost exceeds what it saves (2 ns an
# entry on the AVX2 AMD EPYC of benchmarks/RESULTS.md; 16 x 16 scores: 134 against 113 us
# a whole 1 x 1 x 16 x 64 call).
_SIGMOID_MIN_ENTRIES = 4096
# -1 as a tensor: 2 * s - 1 is then one pass, torch.add(-1, s, alpha=2) (s.mul_(2).sub_(1)
# is two: 44 against 19 us on a 256 x 512 block).
_MINUS_ONE = torch.tensor(-1.0)

# Blocks with fewer score entries than this take torch.matmul and tanh_: below it a oneDNN
# call costs more than its fused tanh saves (measured: 32 x 32 scores, d = 64, 15 us by oneDNN,
# 6.5 us by torch; 64 x 64 equal; 128 x 128, 27 and 70 us).
FUSED_MIN_ENTRIES = 4096
# Accumulating products whose x has fewer entries than this take torch.baddbmm_: below it a
# oneDNN call and the separate add cost more than its faster kernel saves (measured on the
# AMD EPYC, x @ y with y of 64 columns: 128 x 128 blocks 23 us by baddbmm_, 25 by oneDNN;
# 256 x 256, 87 and 54 us; 512 x 1024, 691 and 309 us).
PRODUCT_MIN_ENTRIES = 65536
# ... and products of fewer columns than this (twice as many where x is read transposed, as
# the backward's g_x^T @ q and a^T @ g_o are): oneDNN reorders a transposed x, which narrow
# products do not pay for (x^T @ y, 256 x 256 blocks: 16 columns 38 us by baddbmm_, 59 by
# oneDNN; 64 columns, 102 and 86 us). A 4 x 4 x 256 x 16 backward took 3.9 ms without these
# limits, 2.8 ms by torch alone.
PRODUCT_MIN_COLS = 32
# Blocks of several problems with fewer score entries than this in all take torch.bmm: below
# it oneDNN's per-call cost exceeds what its fused tanh saves (measured: 16 problems of 16 x 16
# take 20 us by bmm + tanh_, 60 us by the grouped convolution; 64 of 32 x 32, 220 and 170 us).
_GROUPED_MIN_ENTRIES = 32768
# ... and blocks of fewer rows (queries) than this, or of more than 4 columns (keys) per row:
# a convolution over few positions with many output channels is slow (32 decoding steps, one
# query against 4096 keys each: 28 ms grouped, 7.8 ms by bmm; 16 queries against 1024 keys,
# d = 128: 4.0 against 3.7 ms in float32, 2.4 against 1.1 ms in bfloat16).
_GROUPED_MIN_ROWS = 16


def _onednn(x: Tensor, w: Tensor, attr: str) -> Tensor:
    """``attr(x @ w^T)`` by oneDNN: x ``(..., n, d)``, w ``(m, d)``; attr in the GEMM epilogue."""
    op = linear_pointwise()
    assert op is not None  # callers check _onednn_reason first
    return op(x, w, None, attr, [], "")


def _convolution_pointwise() -> Any:
    return getattr(torch.ops.mkldnn, "_convolution_pointwise", None)


def _onednn_grouped(x: Tensor, w: Tensor, attr: str) -> Tensor:
    """``attr(x @ w^T)`` for G problems at once: x ``(G, n, d)``, w ``(G, m, d)`` -> ``(G, n, m)``.

    One 1x1 convolution with G groups: the n queries are its positions and the G * m keys its
    output channels, group g seeing only problem g's d input channels. Channels-last input
    (positions outer, channels inner: x laid out as ``(n, G, d)``) is oneDNN's fast layout; the
    result comes back laid out ``(n, G, m)`` and is returned as a ``(G, n, m)`` view of it.
    """
    g, n, d = x.shape
    m = w.shape[1]
    positions = x.transpose(0, 1).reshape(1, n, 1, g * d).permute(0, 3, 1, 2)
    out = _convolution_pointwise()(
        positions, w.reshape(g * m, d, 1, 1), None, [0, 0], [1, 1], [1, 1], g, attr, [], ""
    )
    return out.permute(0, 2, 3, 1).reshape(n, g, m).transpose(0, 1)


def _probe_points() -> Tensor:
    """The probe sample: 0 and float32 values from 1e-30 to 20, log-spaced, both signs."""
    mag = torch.logspace(-30, torch.log10(torch.tensor(20.0)).item(), _PROBE_POINTS // 2)
    return torch.cat([-mag.flip(0), torch.zeros(1), mag])


@functools.cache
def _onednn_reason(dtype: torch.dtype) -> str | None:
    """Why oneDNN's fused tanh cannot serve ``dtype`` on this machine, or None if it can."""
    if linear_pointwise() is None:
        return "this PyTorch build has no oneDNN matmul with fused epilogue (mkldnn)"
    if dtype not in (torch.float32, torch.bfloat16):
        return f"oneDNN's fused tanh is not used for {dtype}"
    x = _probe_points()
    try:
        got = _onednn(x.to(dtype).unsqueeze(-1), torch.ones(1, 1, dtype=dtype), "tanh")
    except RuntimeError as err:  # oneDNN has no kernel for this dtype on this CPU
        return f"oneDNN cannot run it here ({str(err).splitlines()[0]})"
    got = got.squeeze(-1).float()
    return _accuracy_reason(got, x, dtype)


def _accuracy_reason(got: Tensor, x: Tensor, dtype: torch.dtype) -> str | None:
    """Why ``got`` is not accurate enough as ``tanh(x)`` in ``dtype``, or None."""
    if dtype == torch.float32:
        worst = _ulp_error(got, x).max().item()
        if worst > MAX_ULP:
            return f"oneDNN's tanh is {worst:.2g} ulp off here (limit {MAX_ULP})"
    elif not torch.allclose(got, torch.tanh(x.to(dtype).float()), rtol=2**-7, atol=0.0):
        return f"oneDNN's tanh is inaccurate for {dtype} here"
    return None


@functools.cache
def _grouped_reason(dtype: torch.dtype) -> str | None:
    """Why the grouped convolution with fused tanh cannot serve ``dtype`` here, or None."""
    reason = _onednn_reason(dtype)
    if reason is not None:
        return reason
    if _convolution_pointwise() is None:
        return "this PyTorch build has no oneDNN convolution with fused epilogue"
    x = _probe_points()
    # Two problems (so two groups), each x against the keys [1] and [-1].
    queries = torch.stack([x, -x]).unsqueeze(-1).to(dtype)
    keys = torch.tensor([[[1.0], [-1.0]], [[-1.0], [1.0]]], dtype=dtype)
    try:
        got = _onednn_grouped(queries, keys, "tanh")
    except RuntimeError as err:
        return f"oneDNN's grouped convolution cannot run it here ({str(err).splitlines()[0]})"
    for column, sign in ((0, 1.0), (1, -1.0)):
        reason = _accuracy_reason(got[0, :, column].float(), sign * x, dtype)
        if reason is None:
            reason = _accuracy_reason(got[1, :, column].float(), sign * x, dtype)
        if reason is not None:
            return reason
    return None


_CHOICE_ENV = "TANH_ATTENTION_CPU_TANH"


def _best_us(*candidates: Callable[[], object]) -> list[float]:
    """The best of 7 timings of each candidate, taking turns (after a warm-up), in us."""
    best = [float("inf")] * len(candidates)
    for _ in range(2):
        for candidate in candidates:
            candidate()
    for _ in range(7):
        for i, candidate in enumerate(candidates):
            start = time.perf_counter()
            candidate()
            best[i] = min(best[i], time.perf_counter() - start)
    return [b * 1e6 for b in best]


_METHODS = ("onednn", "compiled", "sigmoid", "torch")


def _forced() -> str | None:
    """The method ``TANH_ATTENTION_CPU_TANH`` forces (one of ``_METHODS``), or None."""
    value = os.environ.get(_CHOICE_ENV, "auto").strip().lower()
    if value != "auto" and value not in _METHODS:
        raise ValueError(
            f"{_CHOICE_ENV} must be 'auto', 'onednn', 'compiled', 'sigmoid' or 'torch', but "
            f"got {value!r}."
        )
    return None if value == "auto" else value


def _tanh_from_sigmoid_(x: Tensor) -> Tensor:
    """In place: ``tanh(x / 2)`` as ``2 * sigmoid(x) - 1`` (callers pass twice the scores)."""
    return torch.add(_MINUS_ONE, x.sigmoid_(), alpha=2, out=x)


@functools.cache
def _sigmoid_reason(dtype: torch.dtype) -> str | None:
    """Why ``2 * sigmoid(2x) - 1`` cannot serve ``dtype`` here, or None if it can: it is
    used for float32 only, and only if this machine's sigmoid keeps SIGMOID_MAX_ERROR."""
    if dtype != torch.float32:
        return f"2 * sigmoid(2x) - 1 is used for float32 only, not {dtype}"
    x = torch.cat([_probe_points(), torch.linspace(-10.0, 10.0, _PROBE_POINTS)])
    got = _tanh_from_sigmoid_(2.0 * x)
    worst = (got.double() - torch.tanh(x.double())).abs().max().item()
    if worst > SIGMOID_MAX_ERROR:
        return f"2 * sigmoid(2x) - 1 is {worst:.2g} off here (limit 2**-22)"
    return None


def _compiled_reason(dtype: torch.dtype) -> str | None:
    """Why the compiled tanh (``native.py``) cannot serve ``dtype`` here, or None if it can."""
    if dtype != torch.float32:
        return f"the compiled tanh is float32 only, not {dtype}"
    return native.unavailable_reason()


_FLOAT32_MAX = torch.finfo(torch.float32).max


def _compiled_tanh_(x: Tensor, scale: float = 1.0) -> Tensor:
    """In place: ``tanh(scale * x)`` by the compiled kernel, where it takes x's layout (else
    ``torch.tanh_``, as accurate); a scale beyond float32's range goes through
    ``formulas.scaled`` (so that a zero score stays 0)."""
    if abs(scale) > _FLOAT32_MAX:
        x, scale = scaled(x, scale), 1.0
    if native.try_tanh_(x, scale) is not None:  # (float32 on the CPU: the method's dtype)
        return x
    return _scaled_(x, scale).tanh_()  # a layout it does not walk: rare, and as accurate


@functools.cache
def _timed_choice(dtype: torch.dtype) -> tuple[str, str]:
    """The method the timing probe picks for ``dtype`` here, and the figures.

    float32 is timed on a 256 x 512 block, d = 64: the fastest of oneDNN's fused tanh (where
    accurate), the compiled tanh (where it builds and is accurate) and ``torch.tanh_``, or
    ``"sigmoid"`` where it beats that one by ``_SIGMOID_MIN_SPEEDUP``. bfloat16 is not timed:
    it takes oneDNN where it is accurate (its blocks stay bfloat16, see blockwise).
    :func:`tanh_method` then applies accuracy."""
    forced = _forced()
    if forced is not None:
        return forced, f"{_CHOICE_ENV}={forced}"
    if dtype != torch.float32:
        return "onednn", "not timed for this dtype"
    gen = torch.Generator().manual_seed(0)
    q, k = torch.randn(1, 256, 64, generator=gen), torch.randn(512, 64, generator=gen)
    candidates: dict[str, Callable[[], object]] = {"torch": lambda: torch.matmul(q, k.mT).tanh_()}
    if _onednn_reason(dtype) is None:
        candidates["onednn"] = lambda: _onednn(q, k, "tanh")
    if _compiled_reason(dtype) is None:
        candidates["compiled"] = lambda: _compiled_tanh_(torch.matmul(q, k.mT))
    if _sigmoid_reason(dtype) is None:
        candidates["sigmoid"] = lambda: _tanh_from_sigmoid_(torch.matmul(2.0 * q, k.mT))
    us = dict(zip(candidates, _best_us(*candidates.values()), strict=True))
    choice = min((m for m in us if m != "sigmoid"), key=us.__getitem__)
    if "sigmoid" in us and us["sigmoid"] * _SIGMOID_MIN_SPEEDUP < us[choice]:
        choice = "sigmoid"
    labels = {
        "onednn": "fused",
        "torch": "by torch",
        "compiled": "compiled",
        "sigmoid": "by sigmoid",
    }
    return choice, "timed here: " + ", ".join(f"{us[m]:.0f} us {labels[m]}" for m in us)


@functools.cache
def _grouped_speed(dtype: torch.dtype) -> bool:
    """Whether the grouped convolution beats ``torch.bmm`` + ``tanh_`` here (timed on 64
    problems of 32 x 32, d = 32)."""
    forced = _forced()
    if forced is not None:
        return forced == "onednn"
    gen = torch.Generator().manual_seed(0)
    q, k = (torch.randn(64, 32, 32, generator=gen).to(dtype) for _ in range(2))
    grouped, plain = _best_us(
        lambda: _onednn_grouped(q, k, "tanh"), lambda: torch.bmm(q, k.mT).tanh_()
    )
    return grouped < plain


def tanh_method(dtype: torch.dtype, device: torch.device | str = "cpu") -> tuple[str, str]:
    """Which method :func:`scores_tanh` uses for ``dtype`` on ``device``, and why.

    Returns:
        ``("onednn", reason)`` for oneDNN's matmul with a fused tanh epilogue,
        ``("compiled", reason)`` for ``torch.matmul`` followed by the compiled tanh of
        ``native.py`` (float32 only; within ``native.MAX_ULP`` ulp), ``("sigmoid", reason)``
        for ``torch.matmul`` followed by ``2 * sigmoid(2x) - 1`` (float32 only; absolute
        error at most ``SIGMOID_MAX_ERROR``), or ``("torch", reason)`` for ``torch.matmul``
        followed by ``torch.tanh_``.

    Example:
        >>> method, why = tanh_method(torch.float64)
        >>> method
        'torch'
    """
    method = method_name(dtype, device)
    if torch.device(device).type != "cpu":
        return method, "the fused oneDNN kernel is used on CPU only"
    choice, figures = _timed_choice(dtype)
    onednn = _onednn_reason(dtype)
    if method == "onednn":
        return method, f"oneDNN applies tanh in its matmul epilogue (runs, accurate; {figures})"
    if method == "compiled":
        return method, (
            "the compiled tanh (kernels/tanh.c) after torch.matmul: the fastest here, within "
            f"{native.MAX_ULP:g} ulp ({figures})"
        )
    if method == "sigmoid":
        return method, (
            "2 * sigmoid(2x) - 1 after torch.matmul: the fastest here, absolute error at most "
            f"2**-22 ({figures})"
        )
    # torch.tanh_: chosen, or the forced (or bfloat16's) method cannot serve dtype here.
    if choice == "sigmoid":
        unused = _sigmoid_reason(dtype)
    elif choice == "compiled":
        unused = _compiled_reason(dtype)
    else:
        unused = onednn
    if choice == "torch" and onednn is None:
        unused = "oneDNN's fused tanh runs and is accurate, but is slower here"
    return "torch", f"torch.matmul and torch.tanh_; {unused} ({figures})"


def method_name(dtype: torch.dtype, device: torch.device | str = "cpu") -> str:
    """``tanh_method(dtype, device)[0]`` without writing its reason: the kernels ask for
    every block, and a small call's blocks take microseconds."""
    if (device.type if isinstance(device, torch.device) else torch.device(device).type) != "cpu":
        return "torch"
    choice = _timed_choice(dtype)[0]
    if choice == "onednn" and _onednn_reason(dtype) is None:
        return "onednn"
    if choice == "compiled" and _compiled_reason(dtype) is None:
        return "compiled"
    if choice == "sigmoid" and _sigmoid_reason(dtype) is None:
        return "sigmoid"
    return "torch"


def _fused(x: Tensor, y: Tensor) -> bool:
    """Whether oneDNN serves ``x @ y^T`` for this block: one ``y`` for the whole block, no
    empty dimension (oneDNN rejects K = 0) and a dtype the probe accepted."""
    return (
        y.shape[0] == 1
        and x.shape[-1] > 0
        and x.shape[0] * x.shape[1] * y.shape[1] >= FUSED_MIN_ENTRIES
        and method_name(x.dtype, x.device) == "onednn"
    )


@functools.cache
def _product_speed(dtype: torch.dtype) -> tuple[bool, str]:
    """Whether oneDNN's product beats ``torch.baddbmm_`` for ``acc += x @ y`` here, and the
    figures (float32 only: timed on a 512 x 1024 block times 1024 x 64)."""
    if dtype != torch.float32:  # (forced or not: no other dtype takes it)
        return False, f"oneDNN's product is not used for {dtype}"
    forced = _forced()
    if forced is not None:
        return forced == "onednn", f"{_CHOICE_ENV}={forced}"
    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(1, 512, 1024, generator=gen), torch.randn(1, 1024, 64, generator=gen)
    acc = torch.zeros(1, 512, 64)
    fused, plain = _best_us(
        lambda: acc[0].add_(_onednn(x[0], y[0].mT, "none")), lambda: acc.baddbmm_(x, y)
    )
    return fused < plain, f"timed here: {fused:.0f} us by oneDNN, {plain:.0f} us by torch"


def product_method(dtype: torch.dtype, device: torch.device | str = "cpu") -> tuple[str, str]:
    """Which kernel :func:`add_product_` uses for large one-problem blocks of ``dtype`` on
    ``device``, and why: ``("onednn", reason)`` or ``("torch", reason)`` (``baddbmm_``).

    Example:
        >>> product_method(torch.float64)[0]
        'torch'
    """
    if torch.device(device).type != "cpu":
        return "torch", "oneDNN's product is used on CPU only"
    if linear_pointwise() is None:
        return "torch", "this PyTorch build has no oneDNN matmul (mkldnn)"
    faster, figures = _product_speed(dtype)
    if faster:
        return "onednn", f"oneDNN's matrix product is the faster here ({figures})"
    return "torch", f"torch.baddbmm_ ({figures})"


@functools.cache
def _half_products_speed(dtype: torch.dtype) -> tuple[bool, str]:
    """Whether few-row products read ``dtype`` (bfloat16 or float16) faster as they are than
    converted to float32 first, and the figures: timed on a decoding step's block, 2 problems
    of 16 queries against 1024 keys, d = e = 128 (both products, and the conversion of the
    keys and values into float32 buffers)."""
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(2, 16, 128, generator=gen).to(dtype)
    k, v = (torch.randn(2, 1024, 128, generator=gen).to(dtype) for _ in range(2))
    k32, v32 = torch.empty(2, 1024, 128), torch.empty(2, 1024, 128)

    def native() -> object:
        return torch.matmul(torch.matmul(q, k.mT), v)

    def converted() -> object:
        k32.copy_(k)
        v32.copy_(v)
        return torch.matmul(torch.matmul(q.float(), k32.mT), v32)

    native_us, converted_us = _best_us(native, converted)
    return native_us < converted_us, (
        f"timed here: {native_us:.0f} us in {dtype}, {converted_us:.0f} us converted to float32"
    )


def few_rows_method(dtype: torch.dtype, device: torch.device | str = "cpu") -> tuple[str, str]:
    """How the blocks of a bfloat16 or float16 call with few queries (a decoding step against
    a long cache) read the keys and values, and why.

    Returns:
        ``("native", reason)``: the products read ``dtype`` as it is, accumulating in float32
        (a decoding step is bound by reading K and V, and converting them would read and
        write them again), or ``("float32", reason)``: each block of keys and values is
        converted into float32 first. CPUs without native bfloat16 or float16 products run
        those products many times slower than float32 ones (an AVX2-only AMD EPYC: 16
        queries against 4096 keys of 32 heads, 460 ms in bfloat16, 18 ms converted block by
        block), so a timing probe decides, once per process and dtype.

    Example:
        >>> few_rows_method(torch.float32)[0]
        'float32'
    """
    if dtype not in (torch.bfloat16, torch.float16):
        return "float32", f"{dtype} is computed as it is"
    if torch.device(device).type != "cpu":
        return "native", "the probe is for CPUs; other devices multiply half types natively"
    faster, figures = _half_products_speed(dtype)
    if faster:
        return "native", f"products in {dtype} are the faster here ({figures})"
    return "float32", f"products in {dtype} are slow here ({figures})"


def add_product_(
    acc: Tensor, x: Tensor, y: Tensor, alpha: float = 1.0, *, first: bool = False
) -> Tensor:
    """In place: ``acc += alpha * x @ y``, or ``acc = alpha * x @ y`` with ``first``
    (:func:`kernels.blocks.add_product_`'s contract, which it is passed in place of).

    Args:
        acc: ``(G, n, e)``.  x: ``(G, n, c)``, any strides.  y: ``(G, c, e)``, any strides.

    One problem (G = 1) of at least ``PRODUCT_MIN_ENTRIES`` entries of x and
    ``PRODUCT_MIN_COLS`` columns of y (twice that for a transposed x), all float32, takes
    oneDNN's product where :func:`product_method` chose it (reading strided x and y as they
    are); everything else ``blocks.add_product_`` (``torch.baddbmm_``).
    """
    if (
        x.shape[0] == 1
        and x.shape[1] * x.shape[2] >= PRODUCT_MIN_ENTRIES
        and y.shape[2] >= (PRODUCT_MIN_COLS if x.stride(2) == 1 else 2 * PRODUCT_MIN_COLS)
        and acc.dtype == x.dtype == y.dtype == torch.float32
        and x.device.type == "cpu"
        and product_method(x.dtype)[0] == "onednn"
    ):
        product = _onednn(x[0], y[0].mT, "none")
        if not first:
            acc[0].add_(product, alpha=alpha)
        elif alpha != 1.0:
            torch.mul(product, alpha, out=acc[0])
        else:
            acc[0].copy_(product)
        return acc
    return blocks.add_product_(acc, x, y, alpha, first=first)


def tanh_backward_(g: Tensor, g_a: Tensor | None, a: Tensor) -> Tensor:
    """In place: ``g = (g + g_a) * (1 - a^2)`` (:func:`kernels.blocks.tanh_backward_`'s
    contract, which it is passed in place of): one pass of the compiled kernel for float32
    and bfloat16 blocks, rounded once (aten's two passes round bfloat16 twice, and took 1.6x
    the time on the AMD EPYC with AVX512-BF16: benchmarks/RESULTS.md); else aten's."""
    if native.try_tanh_backward_(g, g_a, a) is None:
        blocks.tanh_backward_(g, g_a, a)
    return g


def score_grad(x: Tensor, y: Tensor, g_a: Tensor | None, a: Tensor) -> Tensor | None:
    """``(x @ y^T + g_a) * (1 - a^2)`` of one bfloat16 block in one pass by AVX512-BF16's
    pairs (:data:`kernels.blocks.ScoreGrad`'s contract, which ``vjp_block_`` takes it for):
    the product's sums stay float32 and the result is rounded once, where oneDNN's product
    rounded ``x @ y^T`` to bfloat16 before :func:`tanh_backward_`'s pass; None where the
    kernel does not serve (``native.try_pairs_block``)."""
    if x.dtype != torch.bfloat16:
        return None
    return native.try_pairs_block(x, y, 1.0, a=a, g_a=g_a)


def _grouped(x: Tensor, y: Tensor) -> bool:
    """Whether the grouped convolution serves ``x @ y^T`` for this block: several problems
    with their own keys, enough entries to pay for a oneDNN call, a dtype the probe accepted."""
    g, n, m = x.shape[0], x.shape[1], y.shape[1]
    return (
        g > 1
        and y.shape[0] == g
        and n >= _GROUPED_MIN_ROWS
        and m <= 4 * n
        and g * n * m >= _GROUPED_MIN_ENTRIES
        and x.shape[2] > 0
        and x.device.type == "cpu"
        and _grouped_reason(x.dtype) is None
        and _grouped_speed(x.dtype)
    )


def scores_tanh(
    q: Tensor, k: Tensor, scale: float, prescale: bool = True, *, out: Tensor | None = None
) -> Tensor:
    """``tanh(scale * q @ k^T)`` for one block, in a new tensor (or in ``out``).

    Args:
        q: ``(G, n, d)`` queries of ``G`` problems.
        k: ``(G, m, d)`` or ``(1, m, d)`` keys (the latter shared by all ``G`` problems).
        scale: multiplies the scores.
        prescale: where oneDNN's fused tanh serves the block, scale q before the product
            (tanh stays in oneDNN's epilogue). The caller passes False where ``scale * q``
            could overflow although ``q @ k^T`` does not. The other methods scale the finished
            sums in the product's epilogue either way (``_scaled_product``).
        out: None, or a ``(G, n, m)`` tensor of q's dtype to write the result into (and
            return): contiguous, or (a block of a larger matrix) with contiguous rows, which
            only the bfloat16 blocks by pairs write in place (the other methods copy).

    Returns:
        ``(G, n, m)`` in q's dtype, possibly a strided view (each row contiguous). One key
        matrix for the block takes oneDNN's matrix product; several problems with their own
        keys (only small problems are batched that way, see ``blockwise``) one grouped
        convolution, or ``torch.bmm`` where the block is too small to pay for it.

    Example:
        >>> q, k = torch.randn(1, 3, 2), torch.randn(1, 4, 2)
        >>> got = scores_tanh(q, k, 0.5)
        >>> bool(torch.allclose(got, torch.tanh(0.5 * q @ k.mT), atol=1e-6))
        True
    """
    if q.dtype == torch.bfloat16:
        # AVX512-BF16's pairs with the tanh in the same pass, where this CPU has them
        # (native.try_pairs_block): 0.48 against oneDNN's 0.56 ms a 1024 x 512 block of d =
        # 64, one core of the AMD EPYC with AVX512-BF16, hot (benchmarks/RESULTS.md).
        done = native.try_pairs_block(q, k, scale, tanh=True, out=out)
        if done is not None:
            return done
    if out is not None and not out.is_contiguous():
        return out.copy_(scores_tanh(q, k, scale, prescale))
    method = method_name(q.dtype, q.device)
    if method == "onednn" and prescale:
        qs = q * scale if scale != 1.0 else q
        if _fused(qs, k):
            # oneDNN is fast on dense operands only: a stride-0 or permuted block (an expanded
            # gradient, a sequence-first view) is made contiguous first (block-sized).
            return _into(out, _onednn(qs.contiguous(), k[0].contiguous(), "tanh"))
        if _grouped(qs, k):
            return _into(out, _onednn_grouped(qs, k, "tanh"))
    if method == "sigmoid":
        return _tanh_from_sigmoid_(_scaled_product(q, k, 2.0 * scale, out))
    if method == "compiled":
        # The kernel scales as it reads (in float32, as the product's epilogue would).
        return _compiled_tanh_(_scaled_product(q, k, 1.0, out), scale)
    return _scaled_product(q, k, scale, out).tanh_()


def tanh_(x: Tensor) -> Tensor:
    """In place: ``tanh(x)`` of finished scores by this machine's method for x's dtype
    (:func:`tanh_method`): ``2 * sigmoid(2x) - 1`` where the probe chose it, else
    ``torch.tanh_`` (oneDNN's tanh lives in its product's epilogue, not for finished scores).
    For calls too small for blocks, which compute whole tensors (``formulas.forward``).

    Example:
        >>> x = torch.linspace(-3, 3, 7, dtype=torch.float64)
        >>> bool(torch.allclose(tanh_(x.clone()), torch.tanh(x)))
        True
    """
    method = method_name(x.dtype, x.device)
    if method == "compiled":
        return _compiled_tanh_(x)
    if method == "sigmoid" and x.numel() >= _SIGMOID_MIN_ENTRIES:
        return _tanh_from_sigmoid_(x.mul_(2.0))
    return x.tanh_()


def scaled_tanh_(x: Tensor, scale: float) -> Tensor:
    """``tanh(scale * x)`` of a block of scores ``x`` by :func:`tanh_method`'s method for its
    dtype (``torch.tanh_`` where that is oneDNN's, which needs the product), in ``x``'s memory
    (or, for a scale beyond the dtype's range, which saturates as ``formulas.scaled`` says,
    a new tensor)."""
    method = method_name(x.dtype, x.device)
    if method == "compiled":
        return _compiled_tanh_(x, scale)
    if method == "sigmoid":
        return _tanh_from_sigmoid_(_scaled_(x, 2.0 * scale))
    return _scaled_(x, scale).tanh_()


def _scaled_(x: Tensor, scale: float) -> Tensor:
    """``scale * x`` in x's memory, or (a scale beyond the dtype's range) a new tensor."""
    if abs(scale) > _largest(x.dtype):
        return scaled(x, scale)
    return x if scale == 1.0 else x.mul_(scale)


def _scaled_product(q: Tensor, k: Tensor, alpha: float, out: Tensor | None) -> Tensor:
    """``alpha * q @ k^T`` (q ``(G or 1, n, d)``, k ``(G or 1, m, d)``), in ``out`` if given.

    The product applies ``alpha`` as it stores its result (BLAS's alpha), so scaling costs no
    pass over q or the scores, and it scales the finished sums as the composite does: a
    score beyond the dtype's range is +-inf, which tanh saturates. An ``alpha`` beyond the
    dtype's range goes through ``formulas.scaled`` (so that a zero score stays 0)."""
    if abs(alpha) > _largest(q.dtype):
        return _into(out, scaled(torch.matmul(q, k.mT), alpha))
    g, n, m = max(q.shape[0], k.shape[0]), q.shape[1], k.shape[1]
    if q.shape[0] == k.shape[0] and alpha == 1.0:
        # (A scale in the product costs a pass of its own in small ones: bmm without one.)
        return torch.bmm(q, k.mT) if out is None else torch.bmm(q, k.mT, out=out)
    if out is None:
        out = torch.empty(g, n, m, dtype=q.dtype, device=q.device)
    if q.shape[0] == k.shape[0]:
        out.baddbmm_(q, k.mT, beta=0.0, alpha=alpha)
    elif k.shape[0] == 1 and q.is_contiguous():
        # Shared keys: one (g * n) x m product instead of g small ones.
        out.view(g * n, m).addmm_(q.view(g * n, -1), k[0].mT, beta=0.0, alpha=alpha)
    else:
        out.baddbmm_(q.expand(g, -1, -1), k.expand(g, -1, -1).mT, beta=0.0, alpha=alpha)
    return out


@functools.cache
def _largest(dtype: torch.dtype) -> float:
    return torch.finfo(dtype).max


def _into(out: Tensor | None, result: Tensor) -> Tensor:
    return result if out is None else out.copy_(result)


def matmul_t(x: Tensor, y: Tensor, add: Tensor | None = None) -> Tensor:
    """``x @ y^T + add`` for one block, in a new tensor.

    Args:
        x: ``(G, n, c)``.  y: ``(G, m, c)`` or ``(1, m, c)`` (shared by the ``G`` problems).
        add: ``(G, n, m)`` or None.

    Returns:
        ``(G, n, m)``.
    """
    if _fused(x, y):
        # oneDNN's own "add" epilogue (_linear_pointwise.binary) is slower than a separate
        # in-place add here, by far when ``add`` is a strided block of g_a: it copies it.
        out = _onednn(x.contiguous(), y[0].contiguous(), "none")  # dense: see scores_tanh
        return out if add is None else out.add_(add)
    if add is None:
        # (bmm where it can: torch.matmul's broadcasting costs microseconds a call.)
        return torch.bmm(x, y.mT) if x.shape[0] == y.shape[0] else torch.matmul(x, y.mT)
    return torch.baddbmm(add, x, y.mT)
