"""The Triton backend: fused kernels (``kernels/triton_attn.py``) behind two op pairs,
``torch.ops.tanh_attention.triton_attn`` (with weights) and ``triton_attn_lean`` (o only,
nothing of size ``n x m``), declared by ``ops.declare_op_pair`` at the first call.

Triton is imported lazily: ``import tanh_attention`` neither needs nor imports it; the kernel
module is imported, and the ops registered, when this backend first runs. CUDA tensors run
the compiled kernels; CPU tensors run Triton's interpreter, only when ``TRITON_INTERPRET=1``
was set before ``tanh_attention`` was imported (Triton reads it when its kernels are
defined), and only when forced with ``backend="triton"``: the interpreter is right but slow.
"""

from __future__ import annotations

import os
import threading
from typing import ClassVar

import torch
from torch import Tensor

from .. import _torch_private
from ..ops import Kernels, OpPair, declare_op_pair
from . import Backend, Inputs

__all__ = ["TritonBackend", "op_pairs"]

# Read once, at import, as Triton reads it once when its kernels are defined.
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"

_LOCK = threading.Lock()
_PAIRS: tuple[OpPair, OpPair] | None = None


def op_pairs() -> tuple[OpPair, OpPair]:
    """``(triton_attn, triton_attn_lean)``: imports Triton and registers the ops on first use.

    Call it once eagerly before ``torch.compile`` of a region that uses the backend with
    ``fullgraph=True`` (registering an op cannot be traced).
    """
    global _PAIRS
    if _PAIRS is not None:  # the path torch.compile traces: no lock
        return _PAIRS
    with _LOCK:
        if _PAIRS is None:
            from ..kernels import blockwise, triton_attn

            # Forward AD's tangent of o comes from the blocked JVP (torch code, any device).
            k = Kernels(triton_attn.forward, triton_attn.backward, blockwise.jvp)
            per_device = {"cpu": k, "cuda": k}
            _PAIRS = (
                declare_op_pair("triton_attn", weights=True, kernels=per_device),
                declare_op_pair("triton_attn_lean", weights=False, kernels=per_device),
            )
        return _PAIRS


class TritonBackend(Backend):
    name = "triton"
    description = (
        "torch.ops.tanh_attention.triton_attn / triton_attn_lean: fused Triton kernels for "
        "CUDA (CPU tensors under TRITON_INTERPRET=1, forced only); o-only path keeps no "
        "n x m for long sequences"
    )
    device_types: ClassVar[frozenset[str]] = (
        frozenset({"cuda", "cpu"}) if INTERPRET else frozenset({"cuda"})
    )
    max_head_dim = 256
    memory_efficient = True
    explicit_ops = True
    forced_only_on: ClassVar[frozenset[str]] = frozenset({"cpu"})

    def unavailable_reason(self) -> str | None:
        if not _torch_private.module_available("triton"):
            return "Triton is not installed (pip install triton)"
        if not INTERPRET and not torch.cuda.is_available():
            return (
                "no CUDA device (set TRITON_INTERPRET=1 before importing tanh_attention to "
                "run Triton's interpreter on CPU tensors)"
            )
        return None

    def not_supported_reasons(self, inputs: Inputs) -> list[str]:
        reasons = super().not_supported_reasons(inputs)
        scale = inputs.scale
        if (
            isinstance(scale, float)
            and inputs.dtype != torch.float64
            and abs(scale) > torch.finfo(torch.float32).max
        ):
            reasons.append(f"scores in float32: scale={scale} is beyond its range")
        return reasons

    def dispatch_reasons(self, inputs: Inputs) -> list[str]:
        if inputs.device_type in self.forced_only_on:
            return ["CPU tensors run Triton's interpreter only when forced (backend='triton')"]
        return []

    def __call__(self, inputs: Inputs) -> tuple[Tensor, Tensor | None]:
        weights, lean = op_pairs()
        args = (inputs.q, inputs.k, inputs.v, inputs.attn_mask, inputs.scale, inputs.causal)
        if inputs.need_weights:
            o, a = weights(*args)
            return o, a
        return lean(*args), None
