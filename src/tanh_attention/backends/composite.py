"""The composite backend: ``torch.ops.tanh_attention.attn_composite`` (aten ops; autograd
derives the backward). It runs on every device, dtype and context, so the dispatcher falls
back to it; ``need_weights=False`` still builds the ``n x m`` weights here."""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import Tensor

from . import Backend, Inputs

__all__ = ["CompositeBackend"]


class CompositeBackend(Backend):
    name = "composite"
    description = (
        "stage 3, torch.ops.tanh_attention.attn_composite: aten ops, autograd derives the "
        "backward; any device; builds the n x m weights even for need_weights=False"
    )
    device_types: ClassVar[frozenset[str]] = frozenset({"cpu", "cuda", "mps", "xpu", "meta"})
    supports_bias = True
    supports_dropout = True  # autograd keeps the n x m dropout factors for backward

    def __call__(self, inputs: Inputs) -> tuple[Tensor, Tensor | None]:
        o, a = torch.ops.tanh_attention.attn_composite(
            inputs.q,
            inputs.k,
            inputs.v,
            inputs.attn_mask,
            inputs.scale,
            inputs.causal,
            inputs.bias,
            inputs.dropout_p,
            inputs.dropout_seed,
        )
        return o, (a if inputs.need_weights else None)
