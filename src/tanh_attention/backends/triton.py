"""The Triton backend: fused GPU kernels. Not in this version yet; it is listed so that
``backends()`` and ``tanh-attention check`` say so, and a forced ``backend="triton"`` fails
with that reason instead of an unknown name."""

from __future__ import annotations

import importlib.util
from typing import ClassVar

from torch import Tensor

from . import Backend, Inputs

__all__ = ["TritonBackend"]


class TritonBackend(Backend):
    name = "triton"
    description = "fused Triton kernels for CUDA (CPU tensors under TRITON_INTERPRET=1)"
    device_types: ClassVar[frozenset[str]] = frozenset({"cuda"})
    memory_efficient = True

    def unavailable_reason(self) -> str | None:
        if importlib.util.find_spec("triton") is None:
            return "Triton is not installed"
        return "no Triton kernels in this version of tanh-attention yet"

    def __call__(self, inputs: Inputs) -> tuple[Tensor, Tensor | None]:
        raise NotImplementedError(self.unavailable_reason())
