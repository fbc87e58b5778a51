"""The two block primitives of the CPU kernels: ``tanh(scale * q @ k^T)`` and ``x @ y^T + c``.

Why tanh is its own kernel: on the CPUs this package is benchmarked on, ``torch.tanh`` costs
more than the matrix products around it, and ``2 * sigmoid(2x) - 1`` is fast but loses all
relative accuracy near 0 (tanh(1e-8) comes out as 0); ``benchmarks/tanh_methods.py`` measures
the candidates and benchmarks/RESULTS.md holds the figures. oneDNN, which the x86 and
aarch64 PyTorch wheels ship, can apply tanh in the epilogue of its matrix product while the
scores are still in registers (``torch.ops.mkldnn._linear_pointwise(q, k, None, "tanh", [],
"")`` computes ``tanh(q @ k^T)``), within a few float32 ulp of the exact tanh
(``tests/test_tanh_accuracy.py`` sweeps float32 densely and requires 4 ulp). Nothing is
compiled on install or at run time. The same oneDNN product without the epilogue computes the
backward's ``g_o @ v^T``; :func:`matmul_t` uses it.

The oneDNN path is taken only where a probe on first use shows it runs and is accurate for
the dtype (float32, and bfloat16 where the CPU supports it); otherwise a block is computed
with ``torch.matmul`` (and ``torch.tanh_``). :func:`tanh_method` says which one runs, and why.
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor

from .._torch_private import linear_pointwise
from ..formulas import scaled

__all__ = ["matmul_t", "scores_tanh", "tanh_method"]

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


def _onednn(x: Tensor, w: Tensor, attr: str) -> Tensor:
    """``attr(x @ w^T)`` by oneDNN: x ``(..., n, d)``, w ``(m, d)``; attr in the GEMM epilogue."""
    op = linear_pointwise()
    assert op is not None  # callers check _onednn_reason first
    return op(x, w, None, attr, [], "")


@functools.cache
def _onednn_reason(dtype: torch.dtype) -> str | None:
    """Why oneDNN's fused tanh cannot serve ``dtype`` on this machine, or None if it can."""
    if linear_pointwise() is None:
        return "this PyTorch build has no oneDNN matmul with fused epilogue (mkldnn)"
    if dtype not in (torch.float32, torch.bfloat16):
        return f"oneDNN's fused tanh is not used for {dtype}"
    mag = torch.logspace(-30, torch.log10(torch.tensor(20.0)).item(), _PROBE_POINTS // 2)
    x = torch.cat([-mag.flip(0), torch.zeros(1), mag])
    try:
        got = _onednn(x.to(dtype).unsqueeze(-1), torch.ones(1, 1, dtype=dtype), "tanh")
    except RuntimeError as err:  # oneDNN has no kernel for this dtype on this CPU
        return f"oneDNN cannot run it here ({str(err).splitlines()[0]})"
    got = got.squeeze(-1).float()
    if dtype == torch.float32:
        worst = _ulp_error(got, x).max().item()
        if worst > MAX_ULP:
            return f"oneDNN's tanh is {worst:.2g} ulp off here (limit {MAX_ULP})"
    elif not torch.allclose(got, torch.tanh(x.to(dtype).float()), rtol=2**-7, atol=0.0):
        return f"oneDNN's tanh is inaccurate for {dtype} here"
    return None


def tanh_method(dtype: torch.dtype, device: torch.device | str = "cpu") -> tuple[str, str]:
    """Which method :func:`scores_tanh` uses for ``dtype`` on ``device``, and why.

    Returns:
        ``("onednn", reason)`` for oneDNN's matmul with a fused tanh epilogue, or
        ``("torch", reason)`` for ``torch.matmul`` followed by ``torch.tanh_``.

    Example:
        >>> method, why = tanh_method(torch.float64)
        >>> method
        'torch'
    """
    if torch.device(device).type != "cpu":
        return "torch", "the fused oneDNN kernel is used on CPU only"
    reason = _onednn_reason(dtype)
    if reason is None:
        return "onednn", "oneDNN applies tanh in its matmul epilogue (probed: runs, accurate)"
    return "torch", reason


def _fused(x: Tensor, y: Tensor) -> bool:
    """Whether oneDNN serves ``x @ y^T`` for this block: one ``y`` for the whole block, no
    empty dimension (oneDNN rejects K = 0) and a dtype the probe accepted."""
    return (
        y.shape[0] == 1
        and x.numel() > 0
        and y.numel() > 0
        and tanh_method(x.dtype, x.device)[0] == "onednn"
    )


def scores_tanh(q: Tensor, k: Tensor, scale: float, prescale: bool = True) -> Tensor:
    """``tanh(scale * q @ k^T)`` for one block, in a new tensor.

    Args:
        q: ``(G, n, d)`` queries of ``G`` problems.
        k: ``(G, m, d)`` or ``(1, m, d)`` keys (the latter shared by all ``G`` problems).
        scale: multiplies the scores.
        prescale: scale q before the product (faster: tanh stays in oneDNN's epilogue). The
            caller passes False where ``scale * q`` could overflow although ``q @ k^T`` does
            not; then the product is scaled afterwards.

    Returns:
        ``(G, n, m)`` in q's dtype. The oneDNN path needs one key matrix for the block; a
        block of several problems with their own keys (only tiny problems are batched that
        way, see ``blockwise``) takes the torch path.

    Example:
        >>> q, k = torch.randn(1, 3, 2), torch.randn(1, 4, 2)
        >>> got = scores_tanh(q, k, 0.5)
        >>> bool(torch.allclose(got, torch.tanh(0.5 * q @ k.mT), atol=1e-6))
        True
    """
    if not prescale:
        return scaled(torch.matmul(q, k.mT), scale).tanh_()
    qs = q * scale if scale != 1.0 else q
    if _fused(qs, k):
        # oneDNN is fast on dense operands only: a stride-0 or permuted block (an expanded
        # gradient, a sequence-first view) is made contiguous first (block-sized).
        return _onednn(qs.contiguous(), k[0].contiguous(), "tanh")
    return torch.matmul(qs, k.mT).tanh_()


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
        return torch.matmul(x, y.mT)
    return torch.baddbmm(add, x, y.mT)
