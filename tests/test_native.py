"""The compiled kernels (``kernels/native.py``; ``tanh.c``, ``attn.c``, ``attn_wide.c``): how
they are built, shipped, cached and checked, the layouts and threads the tanh takes, and that
the kernels fall back cleanly wherever they cannot be built. The tanh's accuracy over every
float32 input: ``test_tanh_accuracy.py``; the attention kernels: ``test_native_attn.py``."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

import tanh_attention
from tanh_attention.kernels import cpu as cpu_kernels
from tanh_attention.kernels import native

needs_compiled = pytest.mark.skipif(
    native.unavailable_reason() is not None,
    reason=f"the compiled kernels are unavailable here: {native.unavailable_reason()}",
)


@pytest.fixture
def fresh(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[Path]:
    """A process that has not loaded the kernel yet, with an empty cache at the returned
    path; afterwards the real kernel and the real probe come back."""
    monkeypatch.setenv("TANH_ATTENTION_CACHE", str(tmp_path))
    native._load.cache_clear()
    cpu_kernels._timed_choice.cache_clear()
    yield tmp_path
    monkeypatch.undo()
    native._load.cache_clear()
    cpu_kernels._timed_choice.cache_clear()


def _attention_is_right() -> None:
    """A blocked float32 call (large enough for the kernels' blocks) matches float64."""
    q, k, v = (torch.randn(1, 2, 300, 16) for _ in range(3))
    o, a = tanh_attention.attn(q, k, v, scale=0.25, causal=True)
    a_ref = torch.tanh(0.25 * q.double() @ k.double().mT).tril()
    torch.testing.assert_close(a.double(), a_ref, rtol=0, atol=1e-6)
    torch.testing.assert_close(o.double(), a_ref @ v.double(), rtol=0, atol=1e-4)


def _falls_back(reason_part: str) -> None:
    why = native.unavailable_reason()
    assert why is not None and reason_part in why, why
    method, reason = cpu_kernels.tanh_method(torch.float32)
    assert method != "compiled" and reason
    with pytest.raises(RuntimeError, match="compiled tanh is unavailable"):
        native.tanh_(torch.ones(3))
    _attention_is_right()


def test_without_a_compiler_the_kernels_fall_back(
    fresh: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("CC", raising=False)
    monkeypatch.setenv("PATH", str(fresh))  # an empty directory: no cc, gcc or clang
    _falls_back("no C compiler")


def test_a_failing_compiler_falls_back(fresh: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    script = fresh / "broken-cc"
    script.write_text("#!/bin/sh\necho 'broken-cc: cannot compile' >&2\nexit 1\n")
    script.chmod(0o755)
    monkeypatch.setenv("CC", str(script))
    _falls_back("the C compiler failed")
    assert "cannot compile" in str(native.unavailable_reason())
    assert not list(fresh.glob("*.so")), "a failed build left a file behind"


def test_it_can_be_turned_off(fresh: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TANH_ATTENTION_NO_COMPILE", "1")
    _falls_back("TANH_ATTENTION_NO_COMPILE")
    assert not list(fresh.iterdir())


@pytest.mark.skipif(
    native._compiler() is None or bool(os.environ.get("TANH_ATTENTION_NO_COMPILE", "").strip("0 ")),
    reason="no C compiler here, or the compiled kernels are turned off",
)
def test_the_sources_ship_with_the_package() -> None:
    """An installed (not editable) package holds every file the build reads (pyproject's
    package-data; tomllib is not in Python 3.10)."""
    pyproject = (Path(__file__).parents[1] / "pyproject.toml").read_text()
    shipped = pyproject.split("[tool.setuptools.package-data]")[1].split("\n[")[0]
    for path in (*native._SOURCES, *native._HEADERS):
        assert f'"kernels/{path.name}"' in shipped, path.name


def test_with_a_compiler_the_kernels_build_and_pass_their_checks() -> None:
    """Where a compiler is on PATH the library must build, load and pass its checks against
    float64: a wrong kernel fails here rather than only skipping the tests that need it."""
    assert native.unavailable_reason() is None


@needs_compiled
def test_an_inaccurate_build_is_refused(fresh: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The load-time check has teeth: ask for 0.5 ulp, which the kernel does not give."""
    monkeypatch.setattr(native, "MAX_ULP", 0.5)
    _falls_back("ulp off")


@needs_compiled
def test_it_is_built_once_into_the_cache(fresh: Path, capfd: pytest.CaptureFixture[str]) -> None:
    """Built once (and said so on stderr: it takes a while), then loaded from the cache."""
    assert native.unavailable_reason() is None
    assert "compiling the CPU kernels" in capfd.readouterr().err
    built = list(fresh.glob("native-*.so"))
    assert len(built) == 1 and list(fresh.iterdir()) == built  # no temporary file left
    stamp = built[0].stat().st_mtime_ns
    native._load.cache_clear()  # a new process: loads the cached build
    assert native.unavailable_reason() is None
    assert "compiling" not in capfd.readouterr().err
    assert built[0].stat().st_mtime_ns == stamp and list(fresh.iterdir()) == built


@needs_compiled
def test_a_cached_build_of_any_attempt_is_taken_without_compiling(
    fresh: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Where the first attempt (OpenMP) failed once and a later one was cached, a new process
    loads that one and runs no compiler."""
    log = fresh / "calls.log"
    wrapper = fresh / "logging-cc"
    wrapper.write_text(f'#!/bin/sh\necho "$@" >> {log}\nexec {native._compiler()} "$@"\n')
    wrapper.chmod(0o755)
    monkeypatch.setenv("CC", str(wrapper))
    assert native.unavailable_reason() is None
    assert len(log.read_text().splitlines()) == 1
    (_, first), (_, second), _ = native._targets(str(wrapper))
    first.rename(second)  # as if only the second attempt had built
    native._load.cache_clear()
    assert native.unavailable_reason() is None
    assert len(log.read_text().splitlines()) == 1, "it compiled again"
    assert not first.exists() and second.exists()


@needs_compiled
@pytest.mark.parametrize(
    "make",
    [
        lambda: torch.randn(5, 7, 9),  # contiguous
        lambda: torch.randn(3, 5, 16)[:, :, 2:11],  # rows of a wider buffer
        lambda: torch.randn(1, 6, 20)[:, 1:5, 3:9],  # one problem, strided rows
        lambda: torch.randn(0, 4),  # empty
    ],
    ids=["contiguous", "strided_rows", "one_problem", "empty"],
)
@pytest.mark.parametrize("scale", [1.0, 0.3, -2.5])
def test_layouts(make: object, scale: float) -> None:
    x = make()  # type: ignore[operator]
    base = x._base if x._base is not None else x
    untouched = base.clone()
    got = native.tanh_(x, scale)
    assert got is x
    want = torch.tanh(scale * untouched.double())
    if x._base is not None:  # only the view's entries changed
        inside = torch.zeros_like(base, dtype=torch.bool)
        inside.as_strided(x.shape, x.stride(), x.storage_offset()).fill_(True)
        assert torch.equal(base[~inside], untouched[~inside])
        want = want.as_strided(x.shape, x.stride(), x.storage_offset())
    torch.testing.assert_close(x.double(), want, rtol=0, atol=native.MAX_ERROR)


@needs_compiled
def test_layouts_it_does_not_walk_are_refused_and_the_kernels_fall_back() -> None:
    x = torch.randn(4, 6, 5).transpose(1, 2)  # rows not contiguous
    before = x.clone()
    assert native.try_tanh_(x) is None
    assert torch.equal(x, before)  # refused, untouched
    with pytest.raises(ValueError, match="strides"):
        native.tanh_(x)
    with pytest.raises(ValueError, match="float32"):
        native.tanh_(torch.ones(3, dtype=torch.float64))
    with pytest.raises(ValueError, match="scale"):
        native.tanh_(torch.ones(3), 1e39)
    want = torch.tanh(0.5 * x.double())
    torch.testing.assert_close(cpu_kernels._compiled_tanh_(x, 0.5).double(), want)


@needs_compiled
def test_a_scale_beyond_float32_saturates_and_keeps_zeros() -> None:
    """As formulas.scaled: 0 * huge stays 0, anything else saturates to +-1."""
    x = torch.tensor([0.0, -0.0, 1e-30, -1e-30, 3.0])
    got = cpu_kernels._compiled_tanh_(x.clone(), 1e300)
    assert torch.equal(got, torch.tensor([0.0, 0.0, 1.0, -1.0, 1.0]))


@needs_compiled
@pytest.mark.parametrize("shape", [(70001,), (3, 300, 256)], ids=["span", "rows"])
def test_two_threads_give_the_same_values(shape: tuple[int, ...]) -> None:
    """Split between threads (past the kernel's 65536-entry threshold, sizes that do not
    divide evenly), every entry is computed, once, as on one thread."""
    base = torch.randn(shape) * 4

    def run(threads: int) -> torch.Tensor:
        x = base.clone()
        torch.set_num_threads(threads)
        return native.tanh_(x if len(shape) == 1 else x[:, :, 3:253], 0.7)

    before = torch.get_num_threads()
    try:
        one, two = run(1), run(2)
    finally:
        torch.set_num_threads(before)
    x = base if len(shape) == 1 else base[:, :, 3:253]
    assert torch.equal(one, two)
    assert not one.is_contiguous() or len(shape) == 1
    torch.testing.assert_close(one.double(), torch.tanh(0.7 * x.double()), rtol=0, atol=2e-7)


# --------------------------------------------------------------------------------------------
# The backward's step through the tanh: g = (g + g_a) * (1 - a^2), one pass
# --------------------------------------------------------------------------------------------


@needs_compiled
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("with_g_a", [True, False], ids=["g_a", "no_g_a"])
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("problems", [1, 3])
def test_tanh_backward_against_float64(
    dtype: torch.dtype,
    with_g_a: bool,
    threads: int,
    problems: int,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A block of g as the backward makes it (its own buffer) and blocks of g_a and a: of one
    problem, read from larger matrices (rows strided apart, as the saved weights are read),
    or of several, whole; a NaN and an infinity among them, past the 65536 entries that
    split the rows between threads: within one rounding of the float64 value (bfloat16:
    rounded once, not after each of aten's two passes); the entries around untouched."""
    monkeypatch.setattr(torch, "get_num_threads", lambda: threads)
    gen = torch.Generator().manual_seed(5)
    rows, cols = 300, 230
    pad = (4, 9) if problems == 1 else (0, 0)
    g = torch.randn(problems, rows, cols, generator=gen).to(dtype)
    big_g_a, big_a = (
        torch.randn(problems, rows + pad[0], cols + pad[1], generator=gen).to(dtype)
        for _ in range(2)
    )
    big_a = big_a.tanh()
    g_a, a = (big[:, pad[0] :, pad[1] :] for big in (big_g_a, big_a))
    g[0, 4, 7], g_a[-1, 9, 3], g[-1, 2, 2] = float("nan"), float("nan"), float("inf")
    around = (big_g_a.clone(), big_a.clone())
    total = g.double() + (g_a.double() if with_g_a else 0.0)
    want = total * (1 - a.double() ** 2)
    got = native.try_tanh_backward_(g, g_a if with_g_a else None, a)
    assert got is g
    assert torch.equal(g.isnan(), want.isnan())
    finite = want.isfinite()
    assert torch.equal(g[~finite].nan_to_num(), want[~finite].to(dtype).nan_to_num())
    # float32's own roundings (g + g_a, a^2 near 1) off by a few ulp of the total, then
    # the result's rounding to the dtype
    bound = torch.finfo(dtype).eps * want.abs() + 4 * torch.finfo(torch.float32).eps * total.abs()
    assert ((g.double() - want).abs()[finite] <= bound[finite]).all()
    for big, before in zip((big_g_a, big_a), around, strict=True):  # (read only)
        torch.testing.assert_close(big, before, rtol=0, atol=0, equal_nan=True)


@needs_compiled
def test_tanh_backward_refuses_what_it_cannot_walk_and_the_blocks_fall_back() -> None:
    """Rows not contiguous, another dtype, mismatched shapes: None, g untouched; the blocks'
    tanh_backward_ (kernels/cpu.py) then takes aten's, with the same values."""
    g = torch.randn(3, 4, 5)
    a = torch.randn(3, 5, 4).tanh().mT  # rows not contiguous
    before = g.clone()
    assert native.try_tanh_backward_(g, None, a) is None
    assert native.try_tanh_backward_(g.double(), None, a.double()) is None
    assert native.try_tanh_backward_(g, None, torch.randn(3, 4, 6)) is None
    assert torch.equal(g, before)
    g_a = torch.randn(3, 4, 5)
    want = (g.double() + g_a.double()) * (1 - a.double() ** 2)
    torch.testing.assert_close(cpu_kernels.tanh_backward_(g, g_a, a).double(), want)


# --------------------------------------------------------------------------------------------
# bfloat16 blocks by AVX512-BF16 pairs (pairs.c)
# --------------------------------------------------------------------------------------------

needs_pairs = pytest.mark.skipif(
    not native.block_pairs(),
    reason="no AVX512-BF16 here (or the compiled kernels are unavailable): pairs.c never runs",
)


@needs_pairs
@pytest.mark.parametrize("epilogue", ["plain", "tanh", "backward", "backward_no_g_a"])
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("layout", ["one", "shared_y", "own_y"])
def test_pairs_block_against_float64(
    epilogue: str, threads: int, layout: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """f(alpha x y^T) of bfloat16 blocks read from larger matrices (rows strided apart),
    written into a block of a larger one: sizes no multiple of the register block (6 rows,
    64 columns), enough work to split over threads, one problem or three (y shared or each
    its own), a NaN and an infinity among the inputs: within one bfloat16 rounding of the
    float64 value of the same inputs, plus float32's rounding of the sums; the entries
    around the output untouched."""
    monkeypatch.setattr(torch, "get_num_threads", lambda: threads)
    gen = torch.Generator().manual_seed(7)
    groups, d = (1, 64) if layout == "one" else (3, 24)
    rows, cols, alpha = 131, 197, 0.3

    def block(*shape: int, pad: tuple[int, int] = (3, 5)) -> torch.Tensor:
        big = torch.randn(shape[0], shape[1] + pad[0], shape[2] + pad[1], generator=gen)
        return big.bfloat16()[:, pad[0] :, pad[1] :]

    x = block(groups, rows, d)
    y = block(1 if layout == "shared_y" else groups, cols, d)
    a = block(groups, rows, cols).tanh()
    g_a = block(groups, rows, cols)
    x[0, 5, 3], g_a[-1, 7, 100] = float("nan"), float("inf")
    big_out = torch.zeros(groups, rows + 2, cols + 9, dtype=torch.bfloat16)
    out = big_out[:, 1:-1, 4:-5]
    s = alpha * x.double() @ y.double().mT
    terms = alpha * x.double().abs() @ y.double().abs().mT
    kwargs: dict[str, object] = {}
    if epilogue == "plain":
        want = s
    elif epilogue == "tanh":
        want, kwargs = s.tanh(), {"tanh": True}
    else:
        with_g_a = epilogue == "backward"
        total = s + g_a.double() if with_g_a else s
        want = total * (1 - a.double() ** 2)
        kwargs = {"a": a, "g_a": g_a if with_g_a else None}
    got = native.try_pairs_block(x, y, alpha, out=out, **kwargs)  # type: ignore[arg-type]
    assert got is out
    assert torch.equal(got.isnan(), want.isnan())
    finite = want.isfinite()
    assert torch.equal(got[~finite & ~want.isnan()].double(), want[~finite & ~want.isnan()])
    bound = 2.0**-8 * want.abs() + 8 * d * torch.finfo(torch.float32).eps * terms
    error = (got.double() - want).abs()
    assert (error[finite] <= bound[finite]).all(), error[finite].max()
    around = big_out.clone()
    around[:, 1:-1, 4:-5] = 0
    assert not around.any(), "it wrote outside its block"


@needs_compiled
def test_pairs_block_refuses_what_it_cannot_serve() -> None:
    """Another dtype, d odd or 0, rows not contiguous, shapes that disagree, or turned off:
    None and nothing written. (Where the CPU lacks AVX512-BF16 every call is refused.)"""
    x, y = torch.randn(2, 7, 8).bfloat16(), torch.randn(2, 9, 8).bfloat16()
    out = torch.zeros(2, 7, 9, dtype=torch.bfloat16)
    for args in (
        (x.float(), y.float()),
        (x[..., :7], y[..., :7]),
        (x[..., :0], y[..., :0]),
        (x.mT.contiguous().mT, y),
        (x, y[:1].expand(3, -1, -1)),
    ):
        assert native.try_pairs_block(*args, 1.0, out=out) is None
    assert native.try_pairs_block(x, y, 1.0, a=torch.zeros(2, 7, 8).bfloat16()) is None
    was = native.block_pairs()
    try:
        assert not native.block_pairs(False)
        assert native.try_pairs_block(x, y, 1.0, out=out) is None
    finally:
        native.block_pairs(was)
    assert not out.any()


@needs_pairs
def test_a_wrong_pairs_build_is_refused() -> None:
    """The load-time check of pairs.c has teeth: the same kernel with its epilogues swapped
    fails it, and so does one that writes nothing."""
    library = native._load()[0]
    assert library is not None and library.pairs_block is not None
    assert native._check_pairs(library.pairs_block) is None

    def swapped(*args: object) -> int:
        *rest, mode, threads = args
        return int(library.pairs_block(*rest, (int(mode) + 1) % 3, threads))  # type: ignore[call-overload]

    assert "wrong" in str(native._check_pairs(swapped))
    assert "wrong" in str(native._check_pairs(lambda *args: 0))
