"""The registry of implementations: what exists on this machine, and why something does not.

Each backend says what it is and, through ``unavailable_reason``, whether it can run here.
``tanh-attention check`` walks this registry (as ``python -m xformers.info`` does for
xformers), and :func:`backends` lets a user inspect it.
"""

from __future__ import annotations

import dataclasses
import importlib.util
from collections.abc import Callable

import torch
from torch import Tensor

__all__ = ["Backend", "backends", "register_backend"]

AttnCall = Callable[[Tensor, Tensor, Tensor, "Tensor | None", float, bool], tuple[Tensor, ...]]


@dataclasses.dataclass(frozen=True)
class Backend:
    """One way to compute tanh attention.

    Attributes:
        name: short identifier, e.g. ``"op"``.
        description: what it is and where it lives.
        call: ``call(q, k, v, attn_mask, scale, causal) -> (o, a)``, or ``(o,)`` for a backend
            that never builds the weights; None if nothing to call.
        device: the device type its inputs live on.
        unavailable_reason: a function returning why the backend cannot run here, or None.
    """

    name: str
    description: str
    call: AttnCall | None
    device: str = "cpu"
    unavailable_reason: Callable[[], str | None] = lambda: None

    @property
    def available(self) -> bool:
        """Whether this backend can run on this machine."""
        return self.unavailable_reason() is None


_REGISTRY: dict[str, Backend] = {}


def register_backend(backend: Backend) -> None:
    """Add (or replace) a backend in the registry."""
    _REGISTRY[backend.name] = backend


def backends() -> list[Backend]:
    """Every known backend, available or not, in registration order.

    Example:
        >>> [b.name for b in backends()][:3]
        ['composite', 'function', 'op']
    """
    return list(_REGISTRY.values())


def _no_cuda() -> str | None:
    if not torch.cuda.is_available():
        return "no CUDA device (torch.cuda.is_available() is False)"
    return None


def _no_triton() -> str | None:
    if importlib.util.find_spec("triton") is None:
        return "Triton is not installed"
    return "no Triton kernels in this version of tanh-attention yet"


def _lean(
    q: Tensor, k: Tensor, v: Tensor, attn_mask: Tensor | None, scale: float, causal: bool
) -> tuple[Tensor]:
    return (torch.ops.tanh_attention.attn_lean(q, k, v, attn_mask, scale, causal),)


def _register_builtin() -> None:
    from .function import AttnFunction

    register_backend(
        Backend(
            "composite",
            "stage 3, torch.ops.tanh_attention.attn_composite: aten ops, autograd derives the "
            "backward (the oracle)",
            torch.ops.tanh_attention.attn_composite,
        )
    )
    register_backend(
        Backend(
            "function",
            "stage 2, tanh_attention.AttnFunction: autograd.Function with the derived "
            "backward, jvp and vmap",
            AttnFunction.apply,
        )
    )
    register_backend(
        Backend(
            "op",
            "stage 4, torch.ops.tanh_attention.attn: custom op with fake kernel, vmap rule and "
            "attn_backward op",
            torch.ops.tanh_attention.attn,
        )
    )
    register_backend(
        Backend(
            "lean",
            "memory-efficient op torch.ops.tanh_attention.attn_lean: o only, blockwise, "
            "nothing of size n x m in forward or backward",
            _lean,
        )
    )
    register_backend(
        Backend(
            "op-cuda",
            "stage 4 on CUDA tensors (the same registered op, PyTorch's CUDA kernels)",
            torch.ops.tanh_attention.attn,
            device="cuda",
            unavailable_reason=_no_cuda,
        )
    )
    register_backend(
        Backend("triton", "Triton GPU kernels", None, device="cuda", unavailable_reason=_no_triton)
    )


_register_builtin()
