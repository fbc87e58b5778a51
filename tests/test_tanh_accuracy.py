"""The tanh the kernels use stays within 4 float32 ulp of the exact tanh; by the "compiled"
method (``kernels/tanh.c``) within ``native.MAX_ULP`` = 5 ulp and ``native.MAX_ERROR``
absolutely; by the "sigmoid" method (``2 * sigmoid(2x) - 1``, taken where it is much the
faster), within ``SIGMOID_MAX_ERROR`` of it (and 4 ulp where ``|tanh x| >= 1/2``).

A dense sweep of float32 inputs: every 37th bit pattern from 0 up to 10 (past which tanh
rounds to 1), about 227,000 per binade, so subnormals and tiny |x| are included (where
``2*sigmoid(2x) - 1`` loses everything), both signs; plus special values. The exact value
is float64 tanh, and an ulp is the float32 spacing at it. The sweep runs through
``kernels.cpu.scores_tanh`` with a 1 x 1 key of 1.0, so it checks the very code path of the
kernels (``q @ k^T`` is then exact).
"""

from __future__ import annotations

import pytest
import torch

from tanh_attention.kernels import cpu as cpu_kernels
from tanh_attention.kernels import native

MAX_ULP = 4.0
_STRIDE = 37
_TOP = torch.tensor(10.0).view(torch.int32).item()  # bit pattern of 10.0


def _sweep(stride: int = _STRIDE) -> torch.Tensor:
    bits = torch.arange(0, _TOP + 1, stride, dtype=torch.int32)
    x = bits.view(torch.float32)
    return torch.cat([x, -x])


def _ulp_error(got: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    exact = torch.tanh(x.double())
    magnitude = exact.abs().float()
    spacing = torch.nextafter(magnitude, torch.tensor(float("inf"))) - magnitude
    return (got.double() - exact).abs() / spacing.double()


def _kernel_tanh(x: torch.Tensor) -> torch.Tensor:
    one = torch.ones(1, 1, 1, dtype=x.dtype)
    out = torch.empty_like(x)
    for chunk, dst in zip(x.split(1 << 22), out.split(1 << 22), strict=True):
        dst.copy_(cpu_kernels.scores_tanh(chunk.view(1, -1, 1), one, 1.0).view(-1))
    return out


def _use(method: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Make the kernels use ``method``, whichever the timing probe would pick here (where
    this machine cannot run it accurately, ``torch.tanh_`` serves: then that is checked)."""
    monkeypatch.setattr(cpu_kernels, "_timed_choice", lambda dtype: (method, "forced by a test"))
    assert cpu_kernels.tanh_method(torch.float32)[0] in (method, "torch")


@pytest.mark.parametrize("method", ["onednn", "torch"])
def test_kernel_tanh_within_4_ulp_over_dense_float32_sweep(
    method: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Both accurate block methods."""
    _use(method, monkeypatch)
    x = _sweep()
    assert x.numel() > 5e7
    err = _ulp_error(_kernel_tanh(x), x)
    worst = int(err.argmax())
    assert err[worst] <= MAX_ULP, f"{err[worst].item():.3g} ulp at x = {x[worst].item()!r}"


@pytest.mark.parametrize("threads", [1, 2])
def test_compiled_method_within_its_bounds_over_dense_float32_sweep(
    threads: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The compiled tanh: within native.MAX_ULP ulp and native.MAX_ERROR absolutely, on one
    thread and split between two (the same values either way)."""
    if native.unavailable_reason() is not None:
        pytest.skip(f"the compiled tanh is unavailable here: {native.unavailable_reason()}")
    _use("compiled", monkeypatch)
    x = _sweep()
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        got = _kernel_tanh(x)
    finally:
        torch.set_num_threads(before)
    err = _ulp_error(got, x)
    worst = int(err.argmax())
    assert err[worst] <= native.MAX_ULP, f"{err[worst].item():.3g} ulp at x = {x[worst].item()!r}"
    absolute = (got.double() - torch.tanh(x.double())).abs().max().item()
    assert absolute <= native.MAX_ERROR, absolute


def test_sigmoid_method_within_its_absolute_bound_over_dense_float32_sweep(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The fast method: absolute error at most SIGMOID_MAX_ERROR everywhere, and within 4
    ulp where |tanh x| >= 1/2 (away from 0 it is as accurate as the others)."""
    _use("sigmoid", monkeypatch)
    x = _sweep()
    got = _kernel_tanh(x)
    err = (got.double() - torch.tanh(x.double())).abs()
    worst = int(err.argmax())
    assert err[worst] <= cpu_kernels.SIGMOID_MAX_ERROR, (err[worst].item(), x[worst].item())
    far = torch.tanh(x.double()).abs() >= 0.5
    assert _ulp_error(got[far], x[far]).max() <= MAX_ULP


@pytest.mark.parametrize("method", ["onednn", "compiled", "sigmoid", "torch"])
def test_special_values(method: str, monkeypatch: pytest.MonkeyPatch) -> None:
    _use(method, monkeypatch)
    inf, nan = float("inf"), float("nan")
    x = torch.tensor([0.0, -0.0, inf, -inf, 1e30, -1e30, 88.0, -88.0, 1e-45, -1e-45, nan, 3e38])
    got = _kernel_tanh(x)
    want = torch.tanh(x.double()).float()
    atol = cpu_kernels.SIGMOID_MAX_ERROR if method == "sigmoid" else 0.0
    torch.testing.assert_close(got, want, rtol=0, atol=atol, equal_nan=True)
    assert torch.equal(got[[0, 2, 3, 4, 5, 6, 7, 11]], want[[0, 2, 3, 4, 5, 6, 7, 11]])


def test_sweep_catches_an_inaccurate_tanh() -> None:
    """The sweep has teeth: 2 * sigmoid(2x) - 1 is fast but fails it near 0."""
    x = _sweep(stride=1009)
    err = _ulp_error(2 * torch.sigmoid(2 * x) - 1, x)
    assert err.max() > 1e6


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_method_is_reported(dtype: torch.dtype) -> None:
    method, reason = cpu_kernels.tanh_method(dtype)
    assert method in ("onednn", "compiled", "sigmoid", "torch") and reason
