"""Input validation: the one place where bad input becomes an error.

Every entry point (the public function, the registered ops and their fake kernels, the
autograd.Function, the layers) calls :func:`validate_attn_inputs` first, so a bad call fails
before any work is done, with the same message whichever path it took. The checks read only
shapes, dtypes, layouts and devices, never data, so they also run on fake tensors under
``torch.compile``. A symbolic scale (``torch.compile(dynamic=True)``) is not checked here: its
value is unknown while tracing, so the ops check it when they run on real numbers.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from typing import Literal

import torch
from torch import Tensor

__all__ = [
    "SUPPORTED_DTYPES",
    "Causal",
    "Shapes",
    "call_shapes",
    "normalize_causal",
    "validate_attn_inputs",
    "validate_layout",
    "validate_scale",
]

SUPPORTED_DTYPES: tuple[torch.dtype, ...] = (
    torch.float64,
    torch.float32,
    torch.bfloat16,
    torch.float16,
)

# The causal variants, as the registered ops take them (the public function also takes bools).
Causal = Literal["none", "top_left", "bottom_right"]
CAUSAL_VARIANTS: tuple[str, ...] = ("none", "top_left", "bottom_right")

_DTYPE_NAMES = ", ".join(str(d).removeprefix("torch.") for d in SUPPORTED_DTYPES)


@dataclasses.dataclass(frozen=True)
class Shapes:
    """The sizes of a valid call.

    Attributes:
        batch: the broadcast batch shape of q, k, v and the mask: ``o`` is ``(*batch, n, e)``.
        weights_batch: that of q, k and the mask (not v): ``a`` is ``(*weights_batch, n, m)``,
            exactly what ``tanh(scale * q @ k^T)`` masked gives.
        n, m, d, e: queries, keys, q/k features, v features.
    """

    batch: tuple[int, ...]
    weights_batch: tuple[int, ...]
    n: int
    m: int
    d: int
    e: int


def _shape(t: Tensor) -> tuple[int, ...]:
    return tuple(t.shape)


def validate_layout(name: str, t: Tensor, where: str = "attn()") -> None:
    """A dense (strided) tensor: nested and sparse tensors are refused by name.

    Raises:
        TypeError: ``t`` is nested or not strided (sparse COO, CSR, ...).
    """
    if t.is_nested:
        raise TypeError(
            f"{where}: argument '{name}' is a nested tensor, which is not supported. "
            f"Pad it to a regular tensor (and mask the padding) first."
        )
    if t.layout != torch.strided:
        raise TypeError(
            f"{where}: expected '{name}' to be a dense (strided) tensor, but got "
            f"{name}.layout={t.layout}. Try {name}.to_dense()."
        )


def _validate_tensor(name: str, t: object) -> Tensor:
    if not isinstance(t, Tensor):
        raise TypeError(
            f"attn(): argument '{name}' must be a torch.Tensor, but got {type(t).__name__}. "
            f"Try torch.as_tensor({name}, dtype=torch.float32)."
        )
    validate_layout(name, t)
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


def _broadcast(*shapes: tuple[int, ...] | torch.Size) -> tuple[int, ...] | None:
    """The broadcast of ``shapes`` (as ``torch.broadcast_shapes``), or None if they clash."""
    first = shapes[0]
    if all(shape == first for shape in shapes):  # the common case: one batch shape
        return tuple(first)
    rank = max(map(len, shapes))
    dims = [(1,) * (rank - len(s)) + tuple(s) for s in shapes]
    if all(type(size) is int for shape in dims for size in shape):
        # Concrete sizes, the eager case: plain Python, a few microseconds. (torch's version
        # goes through its symbolic-shape guards, ten times slower, on every call of attn.)
        out = []
        for sizes in zip(*dims, strict=True):
            own = {size for size in sizes if size != 1}  # 1 broadcasts to anything, 0 too
            if len(own) > 1:
                return None
            out.append(own.pop() if own else 1)
        return tuple(out)
    try:
        return tuple(torch.broadcast_shapes(*shapes))
    except RuntimeError:
        return None


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
    batch = _broadcast(q.shape[:-2], k.shape[:-2], v.shape[:-2])
    if batch is None:
        raise ValueError(
            "attn(): the batch dimensions of q, k and v (all but the last two) must broadcast "
            f"as in torch.matmul, but got q.shape={_shape(q)}, k.shape={_shape(k)}, "
            f"v.shape={_shape(v)}."
        )
    return batch


def validate_scale(scale: object, where: str = "attn()") -> None:
    """A real, finite number; a symbolic one (``torch.compile(dynamic=True)``) passes here.

    Raises:
        TypeError: not a real number (a bool, a tensor, a string, ...).
        ValueError: infinite, NaN, or too large for a float (``10**400``).
    """
    symbolic = isinstance(scale, (torch.SymFloat, torch.SymInt))
    if isinstance(scale, bool) or not (symbolic or isinstance(scale, numbers.Real)):
        raise TypeError(
            f"{where}: argument 'scale' must be a real number, but got {type(scale).__name__}."
        )
    if symbolic or torch.compiler.is_compiling():
        # Its value may be unknown while tracing (torch.compile makes float arguments
        # dynamic); the ops check the real value when they run.
        return
    try:
        value = float(scale)  # type: ignore[arg-type]  # a numbers.Real
    except OverflowError:
        raise ValueError(
            f"{where}: argument 'scale' must be finite, but got an int of {len(str(scale))} "
            "digits, which overflows a float."
        ) from None
    if not math.isfinite(value):
        raise ValueError(f"{where}: argument 'scale' must be finite, but got scale={scale}.")


def normalize_causal(causal: object) -> Causal:
    """``causal`` as one of ``"none"``, ``"top_left"``, ``"bottom_right"``.

    ``False`` is ``"none"`` and ``True`` is ``"top_left"`` (row i keeps keys ``j <= i``, as
    ``scaled_dot_product_attention(is_causal=True)``); ``"bottom_right"`` aligns the n queries
    with the last n of the m keys (row i keeps ``j <= i + m - n``), as a decoding step does.

    Raises:
        TypeError: neither a bool nor a string.
        ValueError: a string that names no variant.
    """
    if causal is False:
        return "none"
    if causal is True:
        return "top_left"
    if not isinstance(causal, str):
        raise TypeError(
            "attn(): argument 'causal' must be a bool, 'top_left' or 'bottom_right', but got "
            f"{type(causal).__name__} ({causal!r})."
        )
    if causal not in CAUSAL_VARIANTS:
        raise ValueError(
            "attn(): argument 'causal' must be False, True, 'top_left' or 'bottom_right', but "
            f"got {causal!r}."
        )
    return causal  # type: ignore[return-value]  # one of CAUSAL_VARIANTS


def _validate_flag(name: str, value: object) -> None:
    if not isinstance(value, bool):
        raise TypeError(
            f"attn(): argument '{name}' must be a bool, but got {type(value).__name__} ({value!r})."
        )


def _validate_mask(attn_mask: object, q: Tensor, batch: tuple[int, ...], m: int) -> tuple[int, ...]:
    """Check the mask; return its batch shape (its dims before the last two)."""
    if attn_mask is None:
        return ()
    if not isinstance(attn_mask, Tensor):
        raise TypeError(
            "attn(): argument 'attn_mask' must be a boolean torch.Tensor or None, but got "
            f"{type(attn_mask).__name__}."
        )
    validate_layout("attn_mask", attn_mask)
    if attn_mask.dtype != torch.bool:
        raise TypeError(
            "attn(): expected 'attn_mask' to be a boolean mask (True = takes part), but got "
            f"attn_mask.dtype={attn_mask.dtype}. Additive float masks do not work with tanh "
            "attention: tanh(-inf) is -1, not 0, so a -inf score would still contribute. "
            "Pass mask == 0 (or mask > -inf) as a boolean mask instead."
        )
    return _validate_scores_shape("attn_mask", attn_mask, q, batch, m)


def _validate_scores_shape(
    name: str, t: Tensor, q: Tensor, batch: tuple[int, ...], m: int
) -> tuple[int, ...]:
    """A mask or bias on q's device that broadcasts to ``(..., n, m)``; returns its batch."""
    if t.device != q.device:
        raise ValueError(
            f"attn(): expected '{name}' on {q.device} like q, but got {name}.device={t.device}."
        )
    n = q.shape[-2]
    full = _broadcast(t.shape, (*batch, n, m))
    if full is None or full[-2:] != (n, m):
        raise ValueError(
            f"attn(): '{name}' must broadcast with the attention shape {(*batch, n, m)} "
            f"(..., n, m) to (..., n, m), but got {name}.shape={_shape(t)}."
        )
    return _shape(t)[:-2]


def _validate_bias(bias: object, q: Tensor, batch: tuple[int, ...], m: int) -> tuple[int, ...]:
    """Check the additive bias; return its batch shape."""
    if bias is None:
        return ()
    if not isinstance(bias, Tensor):
        raise TypeError(
            f"attn(): argument 'bias' must be a torch.Tensor or None, but got "
            f"{type(bias).__name__}."
        )
    validate_layout("bias", bias)
    if bias.dtype != q.dtype:
        raise TypeError(
            f"attn(): expected 'bias' to have q's dtype {q.dtype}, but got bias.dtype="
            f"{bias.dtype}. (A bool mask goes in attn_mask.)"
        )
    return _validate_scores_shape("bias", bias, q, batch, m)


def _validate_dropout(dropout_p: object) -> None:
    if isinstance(dropout_p, bool) or not isinstance(dropout_p, numbers.Real):
        raise TypeError(
            "attn(): argument 'dropout_p' must be a real number, but got "
            f"{type(dropout_p).__name__}."
        )
    if not torch.compiler.is_compiling() and not 0.0 <= float(dropout_p) <= 1.0:  # type: ignore[arg-type]
        raise ValueError(f"attn(): argument 'dropout_p' must be in [0, 1], but got {dropout_p}.")


def validate_attn_inputs(
    q: object,
    k: object,
    v: object,
    attn_mask: object = None,
    *,
    scale: object = 1.0,
    causal: object = False,
    need_weights: object = True,
    bias: object = None,
    dropout_p: object = 0.0,
) -> Shapes:
    """Check the arguments of any attn entry point; return the call's sizes.

    Args:
        q: queries ``(..., n, d)``.
        k: keys ``(..., m, d)``.
        v: values ``(..., m, e)``.
        attn_mask: None, or a bool mask that broadcasts with ``(*batch, n, m)`` to
            ``(..., n, m)``; its batch dims join the batch.
        scale: a finite real number (or a symbolic one while compiling).
        causal: a bool, ``"none"``, ``"top_left"`` or ``"bottom_right"``.
        need_weights: bool.
        bias: None, or a float tensor of q's dtype added to the scores before tanh, shaped
            like the mask; its batch dims join the batch.
        dropout_p: the probability of dropping a weight, in [0, 1].

    Returns:
        The call's :class:`Shapes`.

    Raises:
        TypeError: a non-tensor argument, a nested or sparse tensor, an unsupported or mixed
            dtype, a non-bool flag or mask, a non-number scale.
        ValueError: rank below 2, mismatched feature or key sizes, batch shapes that do not
            broadcast, mixed devices, a non-finite scale, a mask of the wrong shape, an unknown
            causal variant.
    """
    q = _validate_tensor("q", q)
    k = _validate_tensor("k", k)
    v = _validate_tensor("v", v)
    _validate_same(q, k, v)
    batch = _validate_sizes(q, k, v)
    validate_scale(scale)
    normalize_causal(causal)
    _validate_flag("need_weights", need_weights)
    m = k.shape[-2]
    mask_batch = _validate_mask(attn_mask, q, batch, m)
    bias_batch = _validate_bias(bias, q, batch, m)
    _validate_dropout(dropout_p)
    shapes = call_shapes(
        q,
        k,
        v,
        attn_mask if isinstance(attn_mask, Tensor) else None,
        bias if isinstance(bias, Tensor) else None,
    )
    if shapes is None:
        raise ValueError(
            "attn(): the batch dimensions of 'attn_mask' and 'bias' must broadcast with each "
            f"other and with q, k, v, but got attn_mask batch {mask_batch} and bias batch "
            f"{bias_batch}."
        )
    return shapes


def call_shapes(
    q: Tensor, k: Tensor, v: Tensor, attn_mask: Tensor | None = None, bias: Tensor | None = None
) -> Shapes | None:
    """The :class:`Shapes` of a call whose arguments :func:`validate_attn_inputs` accepted
    (the kernels, which run after it, read their sizes here without checking everything
    again); None where the batch dims do not broadcast."""
    q_shape, k_shape, v_shape = tuple(q.shape), tuple(k.shape), tuple(v.shape)
    own = [q_shape[:-2], k_shape[:-2]]
    own += [tuple(t.shape)[:-2] for t in (attn_mask, bias) if t is not None]
    weights_batch = _broadcast(*own)
    full = None if weights_batch is None else _broadcast(weights_batch, v_shape[:-2])
    if full is None or weights_batch is None:
        return None
    return Shapes(full, weights_batch, q_shape[-2], k_shape[-2], q_shape[-1], v_shape[-1])
