"""The fast path of ``tanh_attention.attn``: the plainest calls, straight to the CPU kernels.

A small attention is a few aten calls, tens of microseconds. Validating a call into
``backends.Inputs``, asking the backends and routing it through the op pair cost as much
again (``benchmarks/per_call.py``). The calls that need none of it take this path instead,
to the same op pair and the same kernels the full path would reach:

- dense CPU tensors q, k, v (``torch.Tensor`` or ``nn.Parameter``) of one supported dtype,
  with the same rank (at least 2) and batch shape, matching feature and key sizes;
- a float scale (finite), ``causal`` a bool or a variant's name, ``need_weights`` a bool, and
  no mask, bias, dropout or forced backend;
- the CPU backend is the dispatcher's first choice for CPU tensors (``backends.first_for``),
  and nothing but plain autograd sees the call (``ops.plain_eager``: no compiler, tracer,
  ``torch.func`` transform, mode, autocast, subclass or forward-AD tangent).

Every other call, valid or not, goes the full way, which validates (with its errors),
dispatches and routes. ``tests/test_fastpath.py`` checks that the two ways agree.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from . import ops
from ._checks import CAUSAL_VARIANTS, SUPPORTED_DTYPES
from .backends import first_for
from .backends.cpu import CpuBackend

__all__ = ["attn"]

_PLAIN_TYPES = (Tensor, torch.nn.Parameter)


def attn(
    q: object, k: object, v: object, scale: object, causal: object, need_weights: object
) -> tuple[Tensor, Tensor | None] | None:
    """``tanh_attention.attn(q, k, v, scale=scale, causal=causal, need_weights=need_weights)``
    (no mask, bias, dropout or backend) where the call is of the kind above, else None (the
    caller then takes the full path)."""
    if torch.compiler.is_compiling():
        return None  # (first: Dynamo traces this function, and scale may be symbolic)
    if type(q) not in _PLAIN_TYPES or type(k) not in _PLAIN_TYPES or type(v) not in _PLAIN_TYPES:
        return None
    assert isinstance(q, Tensor) and isinstance(k, Tensor) and isinstance(v, Tensor)  # (mypy)
    dtype = q.dtype
    if (
        not (q.is_cpu and k.is_cpu and v.is_cpu)
        or dtype not in SUPPORTED_DTYPES
        or k.dtype is not dtype
        or v.dtype is not dtype
        or q.layout is not torch.strided
        or k.layout is not torch.strided
        or v.layout is not torch.strided
        or q.is_nested
        or k.is_nested
        or v.is_nested
    ):
        return None
    q_shape, k_shape, v_shape = q.shape, k.shape, v.shape
    rank = len(q_shape)
    # (one comparison where q, k and v have one shape, as in self-attention: the slices of
    # torch.Size below cost a microsecond, a share of the smallest calls)
    if rank < 2:
        return None
    if not (q_shape == k_shape == v_shape) and (
        len(k_shape) != rank
        or len(v_shape) != rank
        or q_shape[:-2] != k_shape[:-2]
        or q_shape[:-2] != v_shape[:-2]
        or q_shape[-1] != k_shape[-1]
        or k_shape[-2] != v_shape[-2]
    ):
        return None
    if type(scale) is not float or not math.isfinite(scale) or type(need_weights) is not bool:
        return None
    if causal is False:
        variant = "none"
    elif causal is True:
        variant = "top_left"
    elif type(causal) is str and causal in CAUSAL_VARIANTS:
        variant = causal
    else:
        return None
    if type(first_for("cpu")) is not CpuBackend or not ops.plain_eager((q, k, v, None), "cpu"):
        return None
    pair = ops.attn if need_weights else ops.attn_lean
    out = pair.eager(pair.kernels["cpu"], q, k, v, None, scale, variant)
    return out if need_weights else (out, None)
