"""Input validation: the one place where bad input becomes an error.

Every entry point (the public function, the registered ops, their fake kernels and the
autograd.Function) calls :func:`validate_attn_inputs` first, so a bad call fails before any
work is done and with the same message whichever path it took. The checks read only shapes,
dtypes and devices, never data, so they also run on fake tensors under ``torch.compile``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = ["SUPPORTED_DTYPES", "batch_shape", "validate_attn_inputs"]

SUPPORTED_DTYPES: tuple[torch.dtype, ...] = (
    torch.float64,
    torch.float32,
    torch.bfloat16,
    torch.float16,
)

_DTYPE_NAMES = ", ".join(str(d).removeprefix("torch.") for d in SUPPORTED_DTYPES)


def _shape(t: Tensor) -> tuple[int, ...]:
    return tuple(t.shape)


def _validate_tensor(name: str, t: object) -> Tensor:
    if not isinstance(t, Tensor):
        raise TypeError(
            f"attn(): argument '{name}' must be a torch.Tensor, but got {type(t).__name__}. "
            f"Try torch.as_tensor({name}, dtype=torch.float32)."
        )
    if t.dtype not in SUPPORTED_DTYPES:
        raise TypeError(
            f"attn(): expected '{name}' to have a floating dtype in ({_DTYPE_NAMES}), "
            f"but got {name}.dtype={t.dtype}."
        )
    if t.dim() < 2:
        raise ValueError(
            f"attn(): expected '{name}' to have at least 2 dimensions (..., rows, features), "
            f"but got {name}.shape={_shape(t)}. Try {name}.unsqueeze(0)."
        )
    return t


def _validate_same(q: Tensor, k: Tensor, v: Tensor) -> None:
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(
            "attn(): expected q, k and v to have the same dtype, but got "
            f"q.dtype={q.dtype}, k.dtype={k.dtype}, v.dtype={v.dtype}. "
            "Cast them to one dtype first."
        )
    if not (q.device == k.device == v.device):
        raise ValueError(
            "attn(): expected q, k and v on the same device, but got "
            f"q.device={q.device}, k.device={k.device}, v.device={v.device}."
        )


def _validate_sizes(q: Tensor, k: Tensor, v: Tensor) -> tuple[int, ...]:
    if q.shape[-1] != k.shape[-1]:
        raise ValueError(
            "attn(): expected q and k to have the same feature size (last dimension), but got "
            f"q.shape={_shape(q)} and k.shape={_shape(k)}."
        )
    if k.shape[-2] != v.shape[-2]:
        raise ValueError(
            "attn(): expected k and v to have the same number of keys (dimension -2), but got "
            f"k.shape={_shape(k)} and v.shape={_shape(v)}."
        )
    try:
        return batch_shape(q, k, v)
    except RuntimeError:
        raise ValueError(
            "attn(): the batch dimensions of q, k and v (all but the last two) must broadcast "
            f"as in torch.matmul, but got q.shape={_shape(q)}, k.shape={_shape(k)}, "
            f"v.shape={_shape(v)}."
        ) from None


def _validate_scale(scale: object) -> None:
    if isinstance(scale, bool) or not isinstance(scale, (int, float)):
        raise TypeError(
            f"attn(): argument 'scale' must be a real number, but got {type(scale).__name__}."
        )
    if not math.isfinite(scale):
        raise ValueError(f"attn(): argument 'scale' must be finite, but got scale={scale}.")


def _validate_flag(name: str, value: object) -> None:
    if not isinstance(value, bool):
        raise TypeError(
            f"attn(): argument '{name}' must be a bool, but got {type(value).__name__} ({value!r})."
        )


def _validate_mask(attn_mask: object, q: Tensor, batch: Sequence[int], m: int) -> None:
    if attn_mask is None:
        return
    if not isinstance(attn_mask, Tensor):
        raise TypeError(
            "attn(): argument 'attn_mask' must be a boolean torch.Tensor or None, but got "
            f"{type(attn_mask).__name__}."
        )
    if attn_mask.dtype != torch.bool:
        raise TypeError(
            "attn(): expected 'attn_mask' to be a boolean mask (True = takes part), but got "
            f"attn_mask.dtype={attn_mask.dtype}. Additive float masks do not work with tanh "
            "attention: tanh(-inf) is -1, not 0, so a -inf score would still contribute. "
            "Pass mask == 0 (or mask > -inf) as a boolean mask instead."
        )
    if attn_mask.device != q.device:
        raise ValueError(
            f"attn(): expected 'attn_mask' on {q.device} like q, but got "
            f"attn_mask.device={attn_mask.device}."
        )
    target = (*batch, q.shape[-2], m)
    try:
        broadcast = torch.broadcast_shapes(attn_mask.shape, target)
    except RuntimeError:
        broadcast = None
    if broadcast != torch.Size(target):
        raise ValueError(
            f"attn(): 'attn_mask' must broadcast to the attention shape {target} "
            f"(..., n, m), but got attn_mask.shape={_shape(attn_mask)}."
        )


def batch_shape(q: Tensor, k: Tensor, v: Tensor) -> tuple[int, ...]:
    """The broadcast batch shape of ``q (..., n, d)``, ``k (..., m, d)`` and ``v (..., m, e)``.

    Raises:
        RuntimeError: if the batch shapes do not broadcast (callers turn it into ValueError).
    """
    return tuple(torch.broadcast_shapes(q.shape[:-2], k.shape[:-2], v.shape[:-2]))


def validate_attn_inputs(
    q: object,
    k: object,
    v: object,
    attn_mask: object = None,
    *,
    scale: object = 1.0,
    causal: object = False,
    need_weights: object = True,
) -> tuple[int, ...]:
    """Check the arguments of any attn entry point; return the broadcast batch shape.

    Args:
        q: queries ``(..., n, d)``.
        k: keys ``(..., m, d)``.
        v: values ``(..., m, e)``.
        attn_mask: None, or a bool mask broadcastable to ``(*batch, n, m)``.
        scale: a finite real number.
        causal: bool.
        need_weights: bool.

    Returns:
        The broadcast batch shape of q, k and v.

    Raises:
        TypeError: a non-tensor argument, an unsupported or mixed dtype, a non-bool flag.
        ValueError: rank below 2, mismatched feature or key sizes, batch shapes that do
            not broadcast, mixed devices, a non-finite scale, a mask of the wrong shape.
    """
    q = _validate_tensor("q", q)
    k = _validate_tensor("k", k)
    v = _validate_tensor("v", v)
    _validate_same(q, k, v)
    batch = _validate_sizes(q, k, v)
    _validate_scale(scale)
    _validate_flag("causal", causal)
    _validate_flag("need_weights", need_weights)
    _validate_mask(attn_mask, q, batch, k.shape[-2])
    return batch
