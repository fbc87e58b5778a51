"""The CPU backend: the explicit ops ``torch.ops.tanh_attention.attn`` (with weights) and
``attn_lean`` (o only, nothing of size ``n x m``), on the blocked CPU kernels
(``kernels/blockwise.py``). Every autograd order, forward AD, ``torch.func``, vmap,
``torch.compile`` and ``torch.export`` go through the ops' registrations (``ops.py``)."""

from __future__ import annotations

from typing import ClassVar

from torch import Tensor

from .. import ops
from . import Backend, Inputs

__all__ = ["CpuBackend"]


class CpuBackend(Backend):
    name = "cpu"
    description = (
        "stage 4, torch.ops.tanh_attention.attn / attn_lean: custom ops on blocked CPU "
        "kernels (oneDNN's fused tanh where accurate); o-only path keeps no n x m for long "
        "sequences"
    )
    device_types: ClassVar[frozenset[str]] = frozenset({"cpu"})
    memory_efficient = True
    explicit_ops = True

    def __call__(self, inputs: Inputs) -> tuple[Tensor, Tensor | None]:
        args = (inputs.q, inputs.k, inputs.v, inputs.attn_mask, inputs.scale, inputs.causal)
        if inputs.need_weights:
            o, a = ops.attn(*args)
            return o, a
        return ops.attn_lean(*args), None
