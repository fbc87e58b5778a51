"""Backends: the ways to compute tanh attention, each declaring what it supports.

A backend is a small object (learnt from xformers' ``ops/fmha``): its class attributes say
which device types, dtypes, head dims, masks, causal variants and outputs it handles;
:meth:`Backend.unavailable_reason` says whether it can run on this machine at all, and
:meth:`Backend.not_supported_reasons` why it cannot run one call. ``tanh_attention.attn``
takes the first registered backend with no reasons (``dispatch.py``); ``backend="name"``
forces one through the same checks; ``tanh_attention.backends()`` and ``tanh-attention check``
walk this registry. A new backend is one new module that subclasses :class:`Backend` and
calls :func:`register`.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import torch
from torch import Tensor

from .. import _torch_private
from .._checks import CAUSAL_VARIANTS, SUPPORTED_DTYPES, Causal, Shapes

__all__ = ["Backend", "Inputs", "backends", "first_for", "get", "register"]


@dataclasses.dataclass(frozen=True)
class Inputs:
    """One validated call of ``attn``: what a backend judges and computes.

    Attributes:
        q, k, v: ``(..., n, d)``, ``(..., m, d)``, ``(..., m, e)``.
        attn_mask: None or a bool mask broadcastable to ``(..., n, m)``.
        scale: the score multiplier (a float, or symbolic while compiling).
        causal: ``"none"``, ``"top_left"`` or ``"bottom_right"``.
        need_weights: whether the call wants ``a``.
        shapes: the call's sizes (``_checks.Shapes``).
        bias: None or a float tensor added to the scores before tanh.
        dropout_p: dropout probability on the weights.
        dropout_seed: with dropout, the seed of its mask (``dropout.py``), drawn once per
            call, so every backend drops the same weights for the same ``torch.manual_seed``.
    """

    q: Tensor
    k: Tensor
    v: Tensor
    attn_mask: Tensor | None
    scale: float
    causal: Causal
    need_weights: bool
    shapes: Shapes
    bias: Tensor | None = None
    dropout_p: float = 0.0
    dropout_seed: Tensor | None = None

    @property
    def device_type(self) -> str:
        return self.q.device.type

    @property
    def dtype(self) -> torch.dtype:
        return self.q.dtype


class Backend:
    """One way to compute tanh attention; subclasses declare what they support.

    Attributes:
        name: the name ``attn(..., backend=name)`` takes.
        description: what it is and where it lives.
        device_types: the device types of the tensors it takes.
        dtypes: the dtypes it takes.
        max_head_dim: the largest ``d`` and ``e`` it takes (None: any).
        supports_mask: whether it takes ``attn_mask``.
        causal_variants: the causal variants it takes (``"none"`` included).
        returns_weights: whether it can return ``a`` (``need_weights=True``).
        memory_efficient: whether ``need_weights=False`` keeps memory linear in n: nothing
            of size ``n x m`` is kept (but for short sequences and small calls, see ``ops._Eager``).
        max_grad_order: the highest order of derivative it gives (None: any).
        supports_bias: whether it takes an additive ``bias`` on the scores.
        supports_dropout: whether it takes ``dropout_p > 0``.
        explicit_ops: it runs ``ops.declare_op_pair`` ops, whose forward AD and ``torch.func``
            support needs private torch API (``_torch_private``); where that is missing,
            such calls are declined with the reason.
        forced_only_on: device types it takes only when forced: its
            :meth:`dispatch_reasons` declines every call on them.
    """

    name: ClassVar[str]
    description: ClassVar[str]
    device_types: ClassVar[frozenset[str]]
    dtypes: ClassVar[frozenset[torch.dtype]] = frozenset(SUPPORTED_DTYPES)
    max_head_dim: ClassVar[int | None] = None
    supports_mask: ClassVar[bool] = True
    causal_variants: ClassVar[frozenset[str]] = frozenset(CAUSAL_VARIANTS)
    returns_weights: ClassVar[bool] = True
    memory_efficient: ClassVar[bool] = False
    max_grad_order: ClassVar[int | None] = None
    supports_bias: ClassVar[bool] = False
    supports_dropout: ClassVar[bool] = False
    explicit_ops: ClassVar[bool] = False
    forced_only_on: ClassVar[frozenset[str]] = frozenset()

    def unavailable_reason(self) -> str | None:
        """Why this backend cannot run on this machine at all, or None if it can."""
        return None

    @property
    def available(self) -> bool:
        """Whether this backend can run on this machine."""
        return self.unavailable_reason() is None

    def not_supported_reasons(self, inputs: Inputs) -> list[str]:
        """Why this backend cannot run ``inputs`` (empty: it can).

        Checks the declared attributes; a subclass extends it with what they cannot say.
        """
        reasons = []
        why = self.unavailable_reason()
        if why is not None:
            reasons.append(why)
        if inputs.device_type not in self.device_types:
            reasons.append(
                f"takes {'/'.join(sorted(self.device_types))} tensors, got {inputs.device_type}"
            )
        if inputs.dtype not in self.dtypes:
            reasons.append(f"does not take {inputs.dtype}")
        head = max(inputs.shapes.d, inputs.shapes.e)
        if self.max_head_dim is not None and head > self.max_head_dim:
            reasons.append(f"head dims up to {self.max_head_dim}, got d={inputs.shapes.d}, "
                           f"e={inputs.shapes.e}")  # fmt: skip
        if inputs.attn_mask is not None and not self.supports_mask:
            reasons.append("does not take attn_mask")
        if inputs.causal not in self.causal_variants:
            reasons.append(f"does not take causal={inputs.causal!r}")
        if inputs.need_weights and not self.returns_weights:
            reasons.append("returns o only (need_weights=False)")
        if inputs.bias is not None and not self.supports_bias:
            reasons.append("does not take an additive bias (a float attn_mask)")
        if inputs.dropout_p > 0.0 and not self.supports_dropout:
            reasons.append("does not do dropout")
        why = _torch_private.AUTOGRAD_KERNEL_REASON
        if (
            self.explicit_ops
            and why is not None
            and (
                _torch_private.functorch_active()
                or _torch_private.tangents((inputs.q, inputs.k, inputs.v)) is not None
            )
        ):
            reasons.append(f"forward AD and torch.func need private torch API here: {why}")
        return reasons

    def dispatch_reasons(self, inputs: Inputs) -> list[str]:
        """Why the dispatcher should not pick this backend by itself for ``inputs``, although
        it can run them when forced (e.g. Triton's interpreter on CPU tensors: right, but
        slow). Empty by default."""
        return []

    def __call__(self, inputs: Inputs) -> tuple[Tensor, Tensor | None]:
        """Compute ``(o, a)``, or ``(o, None)`` when ``inputs.need_weights`` is False."""
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"<tanh_attention backend {self.name!r}>"


_REGISTRY: list[Backend] = []


def register(backend: Backend) -> None:
    """Add ``backend`` to the registry (after those already there: the dispatcher prefers the
    earlier ones), or replace the one of the same name in its place."""
    for i, known in enumerate(_REGISTRY):
        if known.name == backend.name:
            _REGISTRY[i] = backend
            return
    _REGISTRY.append(backend)


def backends() -> list[Backend]:
    """Every known backend, available or not, in the order the dispatcher tries them.

    Example:
        >>> [b.name for b in backends()]
        ['triton', 'cpu', 'composite']
    """
    return list(_REGISTRY)


def first_for(device_type: str) -> Backend | None:
    """The registered backend the dispatcher tries first for calls on ``device_type`` (the
    first that takes it and is not ``forced_only_on`` it), or None: it runs every call on
    that device type that it has no reasons against."""
    for backend in _REGISTRY:
        if device_type in backend.device_types and device_type not in backend.forced_only_on:
            return backend
    return None


def get(name: str) -> Backend:
    """The backend called ``name``.

    Raises:
        ValueError: no backend has that name.
    """
    for backend in _REGISTRY:
        if backend.name == name:
            return backend
    raise ValueError(
        f"attn(): unknown backend {name!r}; choose from {[b.name for b in _REGISTRY]} "
        "(or None to let the dispatcher pick)."
    )


def _register_builtin() -> None:
    # Preference order: the fused GPU kernels, the blocked CPU kernels, then the composite,
    # which runs everywhere.
    from .composite import CompositeBackend
    from .cpu import CpuBackend
    from .triton import TritonBackend

    for backend in (TritonBackend(), CpuBackend(), CompositeBackend()):
        register(backend)


_register_builtin()
