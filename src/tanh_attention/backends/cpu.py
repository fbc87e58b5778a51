"""The CPU backend: the explicit ops ``torch.ops.tanh_attention.attn`` (with weights) and
``attn_lean`` (o only, nothing of size ``n x m``), on the blocked CPU kernels
(``kernels/blockwise.py``). Every autograd order, forward AD, ``torch.func``, vmap,
``torch.compile`` and ``torch.export`` go through the ops' registrations (``ops.py``).
Dropout regenerates its mask in the backward from the call's seed (``dropout.py``), with
first derivatives; forward AD and ``torch.func`` through dropout are left to the composite."""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import Tensor

from .. import _torch_private, ops
from . import Backend, Inputs

__all__ = ["CpuBackend"]


class CpuBackend(Backend):
    name = "cpu"
    description = (
        "stage 4, torch.ops.tanh_attention.attn / attn_lean: custom ops on blocked CPU "
        "kernels (oneDNN's fused tanh where accurate); o-only path keeps no n x m for long "
        "sequences; dropout masks made again from a seed, never stored"
    )
    device_types: ClassVar[frozenset[str]] = frozenset({"cpu"})
    memory_efficient = True
    explicit_ops = True
    supports_dropout = True

    def not_supported_reasons(self, inputs: Inputs) -> list[str]:
        reasons = super().not_supported_reasons(inputs)
        # (A compiled call carries no tangents here, and reading them would break the graph.)
        if (
            inputs.dropout_p > 0.0
            and not torch.compiler.is_compiling()
            and (
                _torch_private.functorch_active()
                or _torch_private.tangents((inputs.q, inputs.k, inputs.v)) is not None
            )
        ):
            reasons.append("dropout under forward AD or torch.func: the composite has it")
        return reasons

    def __call__(self, inputs: Inputs) -> tuple[Tensor, Tensor | None]:
        args = (
            inputs.q,
            inputs.k,
            inputs.v,
            inputs.attn_mask,
            inputs.scale,
            inputs.causal,
            inputs.dropout_p,
            inputs.dropout_seed,
        )
        if inputs.need_weights:
            o, a = ops.attn(*args)
            return o, a
        return ops.attn_lean(*args), None
