"""The OpInfo-style sample inputs, independent reference and implementation registry.

Every implementation of tanh attention (stages 2-4, the public function through the
dispatcher, and each backend forced by name, with and without weights) is listed in
``IMPLEMENTATIONS`` and runs through the same samples and checks in ``test_opinfo.py``. The
reference here is written directly from the definition, in float64, and shares no code with
the package.
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


def keep_mask(n: int, m: int, causal: bool | str, device: Any = "cpu") -> Tensor:
    """The (n, m) keep-mask of a causal variant, from its definition."""
    rows = torch.arange(n, device=device).unsqueeze(-1)
    cols = torch.arange(m, device=device)
    if causal in (True, "top_left"):
        return cols <= rows
    if causal == "bottom_right":
        return cols <= rows + (m - n)
    assert causal in (False, "none"), causal
    return torch.ones(n, m, dtype=torch.bool, device=device)


def reference(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    attn_mask: Tensor | None = None,
    scale: float = 1.0,
    causal: bool | str = "none",
) -> tuple[Tensor, Tensor]:
    """tanh attention from its definition: tanh(where(keep, q k^T * scale, 0)) @ v.

    Masked scores are replaced before tanh, so a masked entry has a = 0 and gradient exactly
    0 even where its score is NaN (masking after tanh would give 0 * (1 - NaN^2) = NaN).
    """
    x = torch.matmul(q, k.transpose(-1, -2)) * scale
    keep = keep_mask(x.shape[-2], x.shape[-1], causal, q.device)
    if attn_mask is not None:
        keep = keep & attn_mask
    a = torch.tanh(torch.where(keep, x, torch.zeros((), dtype=x.dtype)))
    return torch.matmul(a, v), a


def rounds_weights(dtype: torch.dtype) -> bool:
    """Whether the CPU path rounds the weights ``a`` to ``dtype`` before ``a @ v``: for
    bfloat16 where this CPU multiplies it natively (``kernels.cpu.method_name`` says
    "onednn": the blocks stay bfloat16, products accumulating in float32, as FlashAttention
    rounds its P); elsewhere the blocks are float32 and ``o`` is rounded once."""
    from tanh_attention.kernels import cpu

    return dtype == torch.bfloat16 and cpu.method_name(dtype) == "onednn"


def o_atol(
    dtype: torch.dtype,
    atol: float,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    scale: float,
    causal: bool | str = "none",
    attn_mask: Tensor | None = None,
) -> float:
    """The absolute tolerance of ``o`` for inputs of ``dtype``: ``atol`` where the path
    computes in float32 blocks; where it rounds the weights (:func:`rounds_weights`),
    at least twice the largest error of the composite computed in ``dtype`` by torch's own
    ops against float64 (a weight rounded errs by up to half its ulp, and summed over m keys
    those err about ``2**-9 * sqrt(m)`` of ``o``'s scale: beyond any elementwise tolerance
    of a float32 computation, as the composite's own error is)."""
    if not rounds_weights(dtype):
        return atol
    wide = [x.detach().double() for x in (q, k, v)]
    want = reference(*wide, attn_mask, scale, causal)[0]
    got = reference(*(x.to(dtype) for x in wide), attn_mask, scale, causal)[0]
    return max(atol, 2 * (got.double() - want).abs().max().item())


@dataclasses.dataclass(frozen=True)
class Sample:
    """One test case.

    ``make(dtype)`` builds fresh leaf tensors ``(q, k, v)``; ``mask()`` the same bool mask
    at every call (it draws from its own seeded generator); ``view``, if set,
    turns the leaves into the (non-contiguous) tensors the implementation receives, so
    gradcheck perturbs plain leaves while the op sees strided views. ``large`` samples cross
    the kernels' default block boundaries (512 rows, 1024 columns); gradcheck runs them in
    fast mode.
    """

    name: str
    make: Callable[[torch.dtype], tuple[Tensor, Tensor, Tensor]]
    mask: Callable[[], Tensor] | None = None
    scale: float = 1.0
    causal: str = "none"
    self_attention: bool = False  # q, k and v are one tensor
    view: Callable[[Tensor, Tensor, Tensor], tuple[Tensor, Tensor, Tensor]] | None = None
    large: bool = False

    def __str__(self) -> str:
        return self.name

    @property
    def masked(self) -> bool:
        return self.mask is not None or self.causal != "none"


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
    # v (and below, the mask) with batch dims that q and k lack: a has q's and k's batch.
    Sample("v_batch_only", _shapes((5, 4), (6, 4), (3, 6, 2))),
    Sample("v_batch_only_causal", _shapes((2, 1, 4, 3), (4, 3), (2, 3, 4, 2)), causal="top_left"),
    Sample("mask_batch_only", _shapes((3, 2), (4, 2), (4, 3)), _random_mask(2, 3, 4)),
    Sample(
        "noncontiguous", _shapes((2, 5, 3), (8, 5), (4, 1)), scale=0.9, view=_noncontiguous_view
    ),
    Sample("self_attention", _shapes((2, 4, 3), (1, 1), (1, 1)), scale=0.8, self_attention=True),
    Sample("causal_n_lt_m", _shapes((3, 4), (5, 4), (5, 2)), causal="top_left"),
    Sample("causal_n_eq_m", _shapes((2, 4, 3), (2, 4, 3), (2, 4, 2)), causal="top_left", scale=0.6),
    Sample("causal_n_gt_m", _shapes((5, 3), (3, 3), (3, 4)), causal="top_left"),
    Sample("bottom_right_n_lt_m", _shapes((2, 3, 4), (2, 6, 4), (2, 6, 2)), causal="bottom_right"),
    Sample("bottom_right_n_gt_m", _shapes((5, 3), (3, 3), (3, 4)), causal="bottom_right"),
    Sample("bottom_right_decode", _shapes((2, 1, 3), (2, 7, 3), (2, 7, 2)), causal="bottom_right"),
    Sample("mask", _shapes((3, 4), (5, 4), (5, 2)), _random_mask(3, 5)),
    Sample("mask_key_padding", _shapes((2, 3, 4), (2, 5, 4), (2, 5, 3)), _random_mask(2, 1, 5)),
    Sample(
        "mask_and_causal", _shapes((4, 3), (4, 3), (4, 2)), _random_mask(4, 4), causal="top_left"
    ),
    Sample(
        "mask_and_bottom_right",
        _shapes((3, 2), (5, 2), (5, 3)),
        _random_mask(3, 5, p=0.8),
        causal="bottom_right",
    ),
    Sample("mask_full_row", _shapes((3, 2), (4, 2), (4, 3)), _row_masked(3, 4)),
    # Across the default blocks (512 x 1024) through the public path: small d keeps them fast.
    Sample("large_causal", _shapes((2, 600, 2), (600, 2), (600, 3)), causal="top_left", large=True),
    Sample(
        "large_bottom_right_mask",
        _shapes((520, 2), (1100, 2), (1100, 2)),
        _random_mask(520, 1100, p=0.9),
        causal="bottom_right",
        scale=0.7,
        large=True,
    ),
    Sample(
        "large_mask", _shapes((530, 3), (1040, 3), (1040, 2)), _random_mask(1, 1040), large=True
    ),
]

SAMPLE_IDS = [s.name for s in SAMPLES]


def build(sample: Sample, dtype: torch.dtype = F64, requires_grad: bool = True) -> list[Tensor]:
    """Fresh leaf tensors for ``sample``: ``[q, k, v]``, or ``[x]`` for self-attention."""
    q, k, v = sample.make(dtype)
    out = [q] if sample.self_attention else [q, k, v]
    return [t.requires_grad_(requires_grad) for t in out]


class Bound:
    """``f(*leaves) -> impl(q, k, v, mask, scale, causal)``, with the sample's mask and views.

    ``mask`` is the very tensor every call passes (so a test can check it is unchanged).
    """

    def __init__(self, impl: Callable[..., Any], sample: Sample) -> None:
        self.impl, self.sample = impl, sample
        self.mask = None if sample.mask is None else sample.mask()

    def __call__(self, *xs: Tensor) -> Any:
        q, k, v = (xs[0],) * 3 if self.sample.self_attention else xs
        if self.sample.view is not None:
            q, k, v = self.sample.view(q, k, v)
        return self.impl(q, k, v, self.mask, self.sample.scale, self.sample.causal)


def as_fn(impl: Callable[..., Any], sample: Sample) -> Bound:
    return Bound(impl, sample)


# --------------------------------------------------------------------------------------------
# Implementations: each is f(q, k, v, attn_mask, scale, causal) -> (o, a), or (o, None) for
# those without weights
# --------------------------------------------------------------------------------------------

Impl = Callable[[Tensor, Tensor, Tensor, "Tensor | None", float, str], tuple[Any, Any]]


@dataclasses.dataclass(frozen=True)
class Implementation:
    name: str
    fn: Impl
    weights: bool = True  # returns a; False: (o, None)
    blocked: bool = False  # runs block kernels (the large samples cross their blocks)


def _public(backend: str | None, need_weights: bool) -> Impl:
    def f(q: Tensor, k: Tensor, v: Tensor, m: Tensor | None, s: float, c: str) -> Any:
        o, a = tanh_attention.attn(
            q, k, v, scale=s, causal=c, attn_mask=m, need_weights=need_weights, backend=backend
        )
        assert (a is None) != need_weights
        return o, a

    return f


def _forced() -> list[Implementation]:
    out = []
    for b in tanh_attention.backends():
        if not b.available or "cpu" not in b.device_types:
            continue
        blocked = b.name != "composite"
        out.append(Implementation(f"attn[{b.name}]", _public(b.name, True), True, blocked))
        out.append(Implementation(f"attn[{b.name}]_o_only", _public(b.name, False), False, blocked))
    return out


IMPLEMENTATIONS: list[Implementation] = [
    Implementation("composite", torch.ops.tanh_attention.attn_composite),
    Implementation("function", AttnFunction.apply),
    Implementation("op", torch.ops.tanh_attention.attn, blocked=True),
    Implementation("attn", _public(None, True), blocked=True),
    Implementation("attn_o_only", _public(None, False), False, blocked=True),
    *_forced(),
]
WEIGHTS = [i for i in IMPLEMENTATIONS if i.weights]

IMPL_IDS = [i.name for i in IMPLEMENTATIONS]
