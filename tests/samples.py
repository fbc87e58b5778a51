"""The OpInfo-style sample inputs, independent reference and implementation registry.

Every implementation of tanh attention (stages 2-4 and the public function, plus any later
kernel) is listed in ``IMPLEMENTATIONS`` and runs through the same samples and checks in
``test_opinfo.py``. The reference here is written directly from the definition, in float64,
and shares no code with the package.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

import tanh_attention
from tanh_attention import AttnFunction

F64 = torch.float64


def reference(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    attn_mask: Tensor | None = None,
    scale: float = 1.0,
    causal: bool = False,
) -> tuple[Tensor, Tensor]:
    """tanh attention from its definition: where(keep, tanh(scale q k^T), 0) @ v."""
    x = scale * torch.matmul(q, k.transpose(-1, -2))
    n, m = x.shape[-2], x.shape[-1]
    keep = torch.ones(n, m, dtype=torch.bool, device=q.device)
    if causal:
        rows = torch.arange(n, device=q.device).unsqueeze(-1)
        cols = torch.arange(m, device=q.device)
        keep = keep & (cols <= rows)
    if attn_mask is not None:
        keep = keep & attn_mask
    a = torch.where(keep, torch.tanh(x), torch.zeros((), dtype=x.dtype))
    return torch.matmul(a, v), a


@dataclasses.dataclass(frozen=True)
class Sample:
    """One test case.

    ``make(dtype)`` builds fresh leaf tensors ``(q, k, v)``; ``mask()`` the same bool mask
    at every call (it draws from its own seeded generator); ``view``, if set,
    turns the leaves into the (non-contiguous) tensors the implementation receives, so
    gradcheck perturbs plain leaves while the op sees strided views.
    """

    name: str
    make: Callable[[torch.dtype], tuple[Tensor, Tensor, Tensor]]
    mask: Callable[[], Tensor] | None = None
    scale: float = 1.0
    causal: bool = False
    self_attention: bool = False  # q, k and v are one tensor
    view: Callable[[Tensor, Tensor, Tensor], tuple[Tensor, Tensor, Tensor]] | None = None

    def __str__(self) -> str:
        return self.name


def _shapes(
    qs: tuple[int, ...], ks: tuple[int, ...], vs: tuple[int, ...]
) -> Callable[[torch.dtype], tuple[Tensor, Tensor, Tensor]]:
    def make(dtype: torch.dtype) -> tuple[Tensor, Tensor, Tensor]:
        return (
            torch.randn(qs, dtype=dtype),
            torch.randn(ks, dtype=dtype),
            torch.randn(vs, dtype=dtype),
        )

    return make


def _noncontiguous_view(q: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    # transposed q (2, 3, 5), every other row of k (4, 5), stride-0 columns of v (4, 6)
    return q.mT, k[::2], v.expand(4, 6)


def _random_mask(*shape: int, p: float = 0.6) -> Callable[[], Tensor]:
    return lambda: torch.rand(shape, generator=torch.Generator().manual_seed(7)) < p


def _row_masked(n: int, m: int) -> Callable[[], Tensor]:
    def mask() -> Tensor:
        keep = _random_mask(n, m, p=0.7)()
        keep[1] = False  # a fully masked row: zeros, not NaN
        return keep

    return mask


SAMPLES: list[Sample] = [
    Sample("lab_2x3_2x3_2x4", _shapes((2, 3), (2, 3), (2, 4))),
    Sample("n_ne_m", _shapes((3, 4), (5, 4), (5, 2))),
    Sample("d_ne_e_scaled", _shapes((4, 2), (3, 2), (3, 5)), scale=-0.7),
    Sample("one_by_one", _shapes((1, 1), (1, 1), (1, 1))),
    Sample("n_zero", _shapes((0, 3), (2, 3), (2, 4))),
    Sample("m_zero", _shapes((2, 3), (0, 3), (0, 4))),
    Sample("d_zero", _shapes((2, 0), (3, 0), (3, 2))),
    Sample("batched_heads_shared_kv", _shapes((2, 3, 4, 5), (2, 1, 6, 5), (2, 1, 6, 3))),
    Sample("batch_broadcast_ranks", _shapes((3, 4, 2), (2, 1, 5, 2), (5, 3)), scale=0.5),
    Sample(
        "noncontiguous", _shapes((2, 5, 3), (8, 5), (4, 1)), scale=0.9, view=_noncontiguous_view
    ),
    Sample("self_attention", _shapes((2, 4, 3), (1, 1), (1, 1)), scale=0.8, self_attention=True),
    Sample("causal_n_lt_m", _shapes((3, 4), (5, 4), (5, 2)), causal=True),
    Sample("causal_n_eq_m", _shapes((2, 4, 3), (2, 4, 3), (2, 4, 2)), causal=True, scale=0.6),
    Sample("causal_n_gt_m", _shapes((5, 3), (3, 3), (3, 4)), causal=True),
    Sample("mask", _shapes((3, 4), (5, 4), (5, 2)), _random_mask(3, 5)),
    Sample("mask_key_padding", _shapes((2, 3, 4), (2, 5, 4), (2, 5, 3)), _random_mask(2, 1, 5)),
    Sample("mask_and_causal", _shapes((4, 3), (4, 3), (4, 2)), _random_mask(4, 4), causal=True),
    Sample("mask_full_row", _shapes((3, 2), (4, 2), (4, 3)), _row_masked(3, 4)),
]

SAMPLE_IDS = [s.name for s in SAMPLES]


def build(sample: Sample, dtype: torch.dtype = F64, requires_grad: bool = True) -> list[Tensor]:
    """Fresh leaf tensors for ``sample``: ``[q, k, v]``, or ``[x]`` for self-attention."""
    q, k, v = sample.make(dtype)
    out = [q] if sample.self_attention else [q, k, v]
    return [t.requires_grad_(requires_grad) for t in out]


def as_fn(impl: Callable[..., Any], sample: Sample) -> Callable[..., Any]:
    """``f(*leaves) -> impl(q, k, v, mask, scale, causal)``, with the sample's mask and views.

    Every wrapped implementation sees the same mask.
    """
    mask = None if sample.mask is None else sample.mask()

    def f(*xs: Tensor) -> Any:
        q, k, v = (xs[0],) * 3 if sample.self_attention else xs
        if sample.view is not None:
            q, k, v = sample.view(q, k, v)
        return impl(q, k, v, mask, sample.scale, sample.causal)

    return f


# --------------------------------------------------------------------------------------------
# Implementations: each is f(q, k, v, attn_mask, scale, causal) -> (o, a)
# --------------------------------------------------------------------------------------------

Impl = Callable[[Tensor, Tensor, Tensor, "Tensor | None", float, bool], tuple[Tensor, Tensor]]


def _public(q: Tensor, k: Tensor, v: Tensor, m: Tensor | None, s: float, c: bool) -> Any:
    return tanh_attention.attn(q, k, v, scale=s, causal=c, attn_mask=m)


def _with_oracle_weights(lean: Callable[..., Tensor]) -> Impl:
    """An o-only implementation as ``(o, a)``: ``o`` from ``lean``, ``a`` from the composite.

    The suite's checks of ``o`` (forward, gradcheck, gradgradcheck, forward AD, dtypes,
    inputs unchanged) then test the o-only path; its checks of ``a`` test only the oracle.
    """

    def f(q: Tensor, k: Tensor, v: Tensor, m: Tensor | None, s: float, c: bool) -> Any:
        return lean(q, k, v, m, s, c), torch.ops.tanh_attention.attn_composite(q, k, v, m, s, c)[1]

    return f


@dataclasses.dataclass(frozen=True)
class Implementation:
    name: str
    fn: Impl


IMPLEMENTATIONS: list[Implementation] = [
    Implementation("composite", torch.ops.tanh_attention.attn_composite),
    Implementation("function", AttnFunction.apply),
    Implementation("op", torch.ops.tanh_attention.attn),
    Implementation("public", _public),
    Implementation("lean", _with_oracle_weights(torch.ops.tanh_attention.attn_lean)),
]

IMPL_IDS = [i.name for i in IMPLEMENTATIONS]
