"""Stage 4: the explicit operators, each declared once as an op pair by :func:`declare_op_pair`.

An op pair is a forward op and its backward op, both ``torch.library.custom_op``\\ s, with
fake kernels, vmap rules, autocast and autograd formulas:

    forward op   name(q, k, v, attn_mask=None, scale=1.0, causal="none", dropout_p=0.0,
                      dropout_seed=None) -> (o, a)  or  o
    backward op  name_backward(grad_o, grad_a, q, k, v, a, attn_mask, scale, causal, needs,
                               dropout_p=0.0, dropout_seed=None) -> (g_q, g_k, g_v)

The forward op's autograd formula calls the backward op (the hand-derived VJP); the backward
op's own autograd formula is ``formulas.vjp_of_vjp``, plain torch code, so double backward and
beyond work and the backward stays one opaque node under ``torch.compile`` and ``torch.export``.
A pair "with weights" returns ``(o, a)`` and saves ``a``; a pair without returns ``o`` only,
saves nothing of size ``n x m``, and its backward recomputes each block of ``a`` (plain
eager calls run the same kernels without the op's dispatch, see :class:`_Eager`, and the
very smallest of them that may be differentiated are recorded as aten ops instead,
``Kernels.graph``). The op bodies are :class:`Kernels` (pure functions, ``kernels/``)
registered per device type.

Dropout (``dropout_p > 0``) needs ``dropout_seed`` (``dropout.draw_seed()``): the backward
makes each block's mask again from it (``dropout.py``), so the o-only pair stores no mask.
Its first derivatives come from the kernels; higher orders and forward AD through dropout
are refused with a clear error (the composite op, which the dispatcher picks for them,
has them).

Two uses follow: ``torch.ops.tanh_attention.attn`` (with weights) and
``torch.ops.tanh_attention.attn_lean`` (o only), both on the blocked CPU kernels.

Where a transform must see through an op (``torch.func`` reverse mode; forward AD over the
backward) it gets the same formulas as plain torch code instead: torch 2.13's ``custom_op``
drops forward-AD tangents silently and fails under ``torch.func.grad``, so each op's Autograd
kernel is replaced (``_torch_private.install_autograd_kernel``) by one that routes those
contexts. The routing reads only the call's own tensors and per-thread state.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
import torch.autograd.forward_ad as fwAD
from torch import Tensor

from . import _torch_private, formulas
from ._checks import validate_attn_inputs
from .composite import NAMESPACE
from .dropout import Dropout
from .function import AttnFunction
from .kernels import blockwise

__all__ = ["Kernels", "OpPair", "attn", "attn_lean", "declare_op_pair", "plain_eager"]


@dataclasses.dataclass(frozen=True)
class Kernels:
    """The pure functions behind an op pair on one device type (see ``kernels/blockwise.py``).

    Attributes:
        forward: ``(q, k, v, attn_mask, scale, causal, *, need_weights) -> (o, a or None)``.
        backward: ``(grad_o, grad_a, q, k, v, a or None, attn_mask, scale, causal, needs)
            -> (g_q, g_k, g_v)``, each None where not needed; ``a`` None: recompute it.
        jvp: ``(t_q, t_k, t_v, q, k, v, attn_mask, scale, causal) -> t_o``.
        dropout: whether forward and backward take ``dropout=`` (a ``dropout.Dropout``).
        graph: optional ``(q, k, v, attn_mask, scale, causal, *, need_weights) -> (o, a or
            None) or None``: the forward as differentiable aten ops for calls so small that
            autograd's own nodes cost less than an autograd.Function (None: not this call);
            plain eager calls that may be differentiated try it first (no dropout).
    """

    forward: Callable[..., tuple[Tensor, Tensor | None]]
    backward: Callable[..., tuple[Tensor | None, Tensor | None, Tensor | None]]
    jvp: Callable[..., Tensor]
    dropout: bool = False
    graph: Callable[..., tuple[Tensor, Tensor | None] | None] | None = None


@dataclasses.dataclass(frozen=True)
class OpPair:
    """The two ops of a pair; ``weights``: whether the forward returns ``(o, a)``;
    ``kernels``: the op bodies per device type."""

    forward: Any  # torch._library.custom_ops.CustomOpDef
    backward: Any
    weights: bool
    kernels: Mapping[str, Kernels]

    def __call__(
        self,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        attn_mask: Tensor | None,
        scale: float,
        causal: str,
        dropout_p: float = 0.0,
        dropout_seed: Tensor | None = None,
    ) -> Any:
        """The forward op on validated inputs: in plain eager mode straight to the kernels
        (see :class:`_Eager`), else through the registered op."""
        device_type = q.device.type
        kernels = self.kernels.get(device_type)
        if kernels is None or not plain_eager((q, k, v, attn_mask), device_type):
            return self.forward(q, k, v, attn_mask, scale, causal, dropout_p, dropout_seed)
        return self.eager(kernels, q, k, v, attn_mask, scale, causal, dropout_p, dropout_seed)

    def eager(
        self,
        kernels: Kernels,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        attn_mask: Tensor | None,
        scale: float,
        causal: str,
        dropout_p: float = 0.0,
        dropout_seed: Tensor | None = None,
    ) -> Any:
        """The forward op's result for a call :func:`plain_eager` accepted, from ``kernels``
        (the op's own for the inputs' device type) without the op's dispatch."""
        # Whether a backward may follow (Function.forward itself runs with grad off).
        backward = torch.is_grad_enabled() and (
            q.requires_grad or k.requires_grad or v.requires_grad
        )
        if not backward:
            # Inference: no graph to record, so the kernels alone (an autograd.Function
            # costs tens of microseconds a call, as much as a small attention).
            drop = _kernel_dropout(kernels, self.forward._name, dropout_p, dropout_seed)
            o, a = kernels.forward(
                q, k, v, attn_mask, scale, causal, need_weights=self.weights, **drop
            )
            return (o, a) if self.weights else o
        if kernels.graph is not None and dropout_p == 0.0:
            # A very small call: autograd's C++ nodes over aten ops cost less than the
            # Function's Python forward and backward (see Kernels.graph).
            out = kernels.graph(q, k, v, attn_mask, scale, causal, need_weights=self.weights)
            if out is not None:
                return out if self.weights else out[0]
        args = (q, k, v, attn_mask, scale, causal, dropout_p, dropout_seed)
        return _Eager.apply(self, kernels, backward, *args)


_FORWARD_ARGS = (
    "Tensor q, Tensor k, Tensor v, Tensor? attn_mask=None, float scale=1.0, str causal='none', "
    "float dropout_p=0.0, Tensor? dropout_seed=None"
)
_BACKWARD_SCHEMA = (
    "(Tensor? grad_o, Tensor? grad_a, Tensor q, Tensor k, Tensor v, Tensor? a, "
    "Tensor? attn_mask, float scale, str causal, bool[] needs, float dropout_p=0.0, "
    "Tensor? dropout_seed=None) -> (Tensor, Tensor, Tensor)"
)
_BACKWARD_TENSORS = 7  # grad_o, grad_a, q, k, v, a, attn_mask
_FORWARD_INPUTS = 8  # q, k, v, attn_mask, scale, causal, dropout_p, dropout_seed
_BACKWARD_INPUTS = 12  # grad_o, ..., needs, dropout_p, dropout_seed


def _forward_extras(rest: Sequence[Any]) -> tuple[Any, ...]:
    """``(attn_mask, scale, causal, dropout_p, dropout_seed)`` from the arguments after q, k,
    v, defaults filled in."""
    defaults = (None, 1.0, "none", 0.0, None)
    return (*rest, *defaults[len(rest) :])


def _backward_extras(args: Sequence[Any]) -> tuple[Any, ...]:
    """A backward op's arguments, ``dropout_p`` and ``dropout_seed`` filled in."""
    return (*args, *(0.0, None)[len(args) - 10 :])


def _dropout(dropout_p: float, dropout_seed: Tensor | None) -> Dropout | None:
    """The kernels' dropout argument (None without dropout)."""
    if dropout_p == 0.0:
        return None
    assert dropout_seed is not None  # _validate checked it
    return Dropout(dropout_p, dropout_seed)


def _no_dropout_here(what: str, dropout_p: float) -> None:
    if dropout_p != 0.0:
        raise NotImplementedError(
            f"tanh_attention: {what} through dropout is not supported by the explicit ops "
            f"(dropout_p={dropout_p}). tanh_attention.attn(...) runs such calls on the "
            "composite backend, which has it; or pass dropout_p=0."
        )


def _placeholders(
    grads: Sequence[Tensor | None], inputs: Sequence[Tensor], needs: Sequence[bool]
) -> tuple[Tensor, Tensor, Tensor]:
    """A backward op's outputs: a custom op cannot return None, so a needed gradient without
    a contributing term is zeros and one not asked for is an empty ``(0,)`` tensor.

    Gradients are contiguous whatever the inputs' strides, as the fake kernels say (a
    compiled graph relies on the fake kernel's strides)."""
    g_q, g_k, g_v = (
        (x.new_zeros(x.shape) if g is None else g.contiguous()) if need else x.new_empty(0)
        for g, x, need in zip(grads, inputs, needs, strict=True)
    )
    return g_q, g_k, g_v


# --------------------------------------------------------------------------------------------
# The op bodies: kernels, fake kernels, and the same as plain differentiable torch code
# --------------------------------------------------------------------------------------------


# The op bodies receive every argument of their schema, positionally: forward
# (q, k, v, attn_mask, scale, causal, dropout_p, dropout_seed); backward (grad_o, grad_a, q,
# k, v, a, attn_mask, scale, causal, needs, dropout_p, dropout_seed).


def _validate(args: Sequence[Any]) -> Any:
    q, k, v, *rest = args
    attn_mask, scale, causal, dropout_p, dropout_seed = _forward_extras(rest)
    shapes = validate_attn_inputs(
        q, k, v, attn_mask, scale=scale, causal=causal, dropout_p=dropout_p
    )
    if dropout_p != 0.0 and dropout_seed is None:
        raise ValueError(
            f"tanh_attention: dropout_p={dropout_p} needs a 'dropout_seed' (an int64 tensor, "
            "e.g. tanh_attention.dropout.draw_seed()), from which the backward makes the "
            "same mask again."
        )
    if dropout_seed is not None and (
        dropout_seed.numel() != 1 or dropout_seed.dtype not in (torch.int64, torch.int32)
    ):
        raise TypeError(
            "tanh_attention: 'dropout_seed' must be a one-element int64 tensor, but got "
            f"shape {tuple(dropout_seed.shape)} and dtype {dropout_seed.dtype}."
        )
    return shapes


def _validate_backward(args: Sequence[Any]) -> None:
    """The backward op's arguments: the forward's, and output gradients of the outputs'
    shapes (a caller of the raw op may pass anything)."""
    grad_o, grad_a, q, k, v, a, attn_mask, scale, causal, needs, p, seed = _backward_extras(args)
    s = _validate((q, k, v, attn_mask, scale, causal, p, seed))
    expected = {
        "grad_o": (*s.batch, s.n, s.e),
        "grad_a": (*s.weights_batch, s.n, s.m),
        "a": (*s.weights_batch, s.n, s.m),
    }
    for name, t in (("grad_o", grad_o), ("grad_a", grad_a), ("a", a)):
        if t is not None and tuple(t.shape) != expected[name]:
            raise ValueError(
                f"attn_backward(): expected '{name}' of shape {expected[name]}, but got "
                f"{name}.shape={tuple(t.shape)}."
            )
    if grad_a is not None and a is None:
        raise ValueError("attn_backward(): grad_a needs the saved weights 'a'.")
    if len(needs) != 3:
        raise ValueError(f"attn_backward(): 'needs' must have 3 entries, but got {len(needs)}.")


def _kernel_dropout(kernels: Kernels, name: str, dropout_p: float, seed: Any) -> dict[str, Any]:
    """The kernels' keyword for the call's dropout: none without it."""
    if dropout_p == 0.0:
        return {}
    if not kernels.dropout:
        raise NotImplementedError(
            f"torch.ops.{NAMESPACE}.{name} does not do dropout (dropout_p={dropout_p}); "
            "tanh_attention.attn(...) picks a backend that does."
        )
    return {"dropout": _dropout(dropout_p, seed)}


def _forward_body(kernels: Kernels, name: str, weights: bool) -> Callable[..., Any]:
    def body(*args: Any) -> Any:
        _validate(args)
        *extras, dropout_p, seed = _forward_extras(args[3:])
        drop = _kernel_dropout(kernels, name, dropout_p, seed)
        o, a = kernels.forward(*args[:3], *extras, need_weights=weights, **drop)
        return (o, a) if weights else o

    return body


def _backward_body(kernels: Kernels, name: str) -> Callable[..., tuple[Tensor, Tensor, Tensor]]:
    def body(*args: Any) -> tuple[Tensor, Tensor, Tensor]:
        _validate_backward(args)
        *rest, dropout_p, seed = _backward_extras(args)
        drop = _kernel_dropout(kernels, name, dropout_p, seed)
        return _placeholders(kernels.backward(*rest, **drop), args[2:5], args[9])

    return body


def _no_kernel(name: str, forward: bool) -> Callable[..., Any]:
    def body(*args: Any) -> Any:
        # A sparse or nested tensor lands here: name it.
        _validate(args) if forward else _validate_backward(args)
        device = next(a.device.type for a in args if isinstance(a, Tensor))
        raise NotImplementedError(
            f"torch.ops.{NAMESPACE}.{name} has no kernel for {device} tensors. "
            f"tanh_attention.attn(...) picks a backend that runs there (see "
            f"tanh_attention.backends())."
        )

    return body


def _forward_fake(weights: bool) -> Callable[..., Any]:
    def fake(*args: Any) -> Any:
        s = _validate(args)
        o = args[0].new_empty((*s.batch, s.n, s.e))
        return (o, args[0].new_empty((*s.weights_batch, s.n, s.m))) if weights else o

    return fake


def _backward_fake(*args: Any) -> tuple[Tensor, Tensor, Tensor]:
    _validate_backward(args)
    g_q, g_k, g_v = (
        x.new_empty(x.shape) if need else x.new_empty(0)  # contiguous, as the kernel's
        for x, need in zip(args[2:5], args[9], strict=True)
    )
    return g_q, g_k, g_v


def _forward_formulas(weights: bool) -> Callable[..., Any]:
    """The forward op as plain differentiable torch code, for transforms that trace through."""

    def forward(*args: Any) -> Any:
        _validate(args)
        q, k, v, *rest = args
        attn_mask, scale, causal, dropout_p, seed = _forward_extras(rest)
        o, a = formulas.forward(
            q,
            k,
            v,
            attn_mask,
            scale=scale,
            causal=causal,
            dropout_p=dropout_p,
            dropout_seed=seed,
        )
        return (o, a) if weights else o

    return forward


def _backward_formulas(*args: Any) -> tuple[Tensor, Tensor, Tensor]:
    """The backward op as plain differentiable torch code (``formulas.vjp``)."""
    grad_o, grad_a, q, k, v, a, attn_mask, scale, causal, needs, p, _ = _backward_extras(args)
    _no_dropout_here("torch.func or forward AD over the backward", p)
    if a is None:
        a = formulas.forward(q, k, v, attn_mask, scale=scale, causal=causal)[1]
    grads = formulas.vjp(
        grad_o, grad_a, q, k, v, a, attn_mask, scale=scale, causal=causal, needs=needs
    )
    return _placeholders(grads, (q, k, v), needs)


# --------------------------------------------------------------------------------------------
# Autograd: forward op -> backward op -> formulas.vjp_of_vjp (plain torch, so it goes on)
# --------------------------------------------------------------------------------------------


def _needs(
    needs_input_grad: Sequence[bool], grad_o: Tensor | None, grad_a: Tensor | None
) -> list[bool]:
    """Which of (q, k, v) get a gradient: asked for, and some output gradient reaches it."""
    some = grad_o is not None or grad_a is not None
    need_q, need_k, need_v = (bool(x) for x in needs_input_grad[:3])
    return [need_q and some, need_k and some, need_v and grad_o is not None]


def _forward_autograd(pair: OpPair) -> None:
    weights = pair.weights

    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: Any) -> None:
        q, k, v, *rest = inputs
        attn_mask, scale, causal, dropout_p, seed = _forward_extras(rest)
        # The weights pair saves a, never x: the derivative needs only 1 - a^2.
        ctx.save_for_backward(q, k, v, attn_mask, output[1] if weights else None, seed)
        ctx.scale, ctx.causal, ctx.dropout_p = scale, causal, dropout_p
        ctx.set_materialize_grads(False)  # an unused output's grad arrives as None, not zeros

    def backward(ctx: Any, *grads: Tensor | None) -> tuple[Any, ...]:
        grad_o, grad_a = grads if weights else (grads[0], None)
        needs = _needs(ctx.needs_input_grad, grad_o, grad_a)
        if not any(needs):
            return (None,) * _FORWARD_INPUTS
        q, k, v, attn_mask, a, seed = ctx.saved_tensors
        out = pair.backward(
            grad_o, grad_a, q, k, v, a, attn_mask, ctx.scale, ctx.causal, needs, ctx.dropout_p, seed
        )
        g_q, g_k, g_v = (g if need else None for g, need in zip(out, needs, strict=True))
        return g_q, g_k, g_v, *(None,) * (_FORWARD_INPUTS - 3)

    pair.forward.register_autograd(backward, setup_context=setup_context)


def _backward_setup_context(ctx: Any, inputs: tuple[Any, ...], output: Any) -> None:
    grad_o, grad_a, q, k, v, a, attn_mask, scale, causal, needs, p, _ = _backward_extras(inputs)
    ctx.save_for_backward(grad_o, grad_a, q, k, v, a, attn_mask)
    ctx.scale, ctx.causal, ctx.needs, ctx.dropout_p = scale, causal, list(needs), p
    ctx.set_materialize_grads(False)


def _backward_backward(
    ctx: Any, xi_q: Tensor | None, xi_k: Tensor | None, xi_v: Tensor | None
) -> tuple[Any, ...]:
    """Double backward, from the differentiable formulas.

    With saved weights, the cotangent ``d_a`` of ``a`` goes to the input ``a`` (the forward
    op's output, whose own backward carries it on). Without (``a`` None), ``a`` is recomputed
    here (n x m) and ``d_a`` is carried to q and k by ``formulas.vjp`` with ``grad_a = d_a``.
    """
    _no_dropout_here("double backward", ctx.dropout_p)
    grad_o, grad_a, q, k, v, a, attn_mask = ctx.saved_tensors
    scale, causal = ctx.scale, ctx.causal
    # A placeholder output's cotangent carries nothing.
    xi_q, xi_k, xi_v = (
        xi if need else None for xi, need in zip((xi_q, xi_k, xi_v), ctx.needs, strict=True)
    )
    recomputed = a is None
    if recomputed:
        a = formulas.forward(q, k, v, attn_mask, scale=scale, causal=causal)[1]
    d_g_o, d_g_a, d_q, d_k, d_v, d_a = formulas.vjp_of_vjp(
        xi_q, xi_k, xi_v, grad_o, grad_a, q, k, v, a, attn_mask, scale=scale, causal=causal
    )
    if recomputed and d_a is not None:
        via_q, via_k, _ = formulas.vjp(
            None, d_a, q, k, v, a, attn_mask, scale=scale, causal=causal, needs=(True, True, False)
        )
        assert via_q is not None and via_k is not None
        d_q = via_q if d_q is None else d_q + via_q
        d_k = via_k if d_k is None else d_k + via_k
        d_a = None
    return d_g_o, d_g_a, d_q, d_k, d_v, d_a, *(None,) * (_BACKWARD_INPUTS - 6)


# --------------------------------------------------------------------------------------------
# Plain eager calls: the kernels under one autograd.Function, without the op's dispatch
# --------------------------------------------------------------------------------------------


def plain_eager(tensors: Sequence[Tensor | None], device_type: str | None = None) -> bool:
    """Whether nothing but plain autograd sees this call: no compiler or tracer, no
    ``torch.func`` transform or legacy vmap, no torch function or dispatch mode (fake
    tensors, export, flop counters), no autocast, no tensor subclass, no forward-AD tangent.
    Each of those needs the registered op (its fake kernel, vmap rule, autocast rule,
    Autograd kernel); all are per-thread or per-tensor state.

    ``tensors``: the call's tensors (None for those it lacks), on one device, whose type
    ``device_type`` is, where the caller knows it (else read from the first tensor)."""
    if (
        torch.compiler.is_compiling()
        or torch.jit.is_tracing()
        or _torch_private.functorch_active()
        or _torch_private.modes_active()
    ):
        return False
    for t in tensors:
        if t is not None and (type(t) not in _PLAIN_TYPES or _torch_private.is_legacy_batched(t)):
            return False
    if device_type is None:
        first = next((t for t in tensors if t is not None), None)
        if first is None:
            return False
        device_type = first.device.type
    if torch.is_autocast_enabled(device_type):
        return False
    return _torch_private.tangents(tuple(tensors[:3])) is None


_PLAIN_TYPES = (Tensor, torch.nn.Parameter)


# The o-only pair keeps an ``a`` of at most this many entries for its backward (see _Eager).
_KEEP_ENTRIES = 65536


class _Eager(torch.autograd.Function):
    """An op pair's forward and backward kernels as one ``autograd.Function``, for plain
    eager calls (:func:`plain_eager`), where the registered op would add only dispatch cost:
    a few hundred microseconds a call, more than the whole attention of a small batch. The
    same kernels and the same VJP run either way. A backward that is itself differentiated
    (``create_graph=True``) goes through the backward op, whose autograd formula is
    ``formulas.vjp_of_vjp``.

    The o-only pair keeps ``a`` where a backward may follow and ``a`` is at most twice the size
    of q, k and v together (``n * m <= 2 * (n * d + m * (d + e))``: short sequences), since
    recomputing it costs more than the composite's whole backward there (benchmarks/
    small_problems.py; on the AVX2 AMD EPYC of benchmarks/RESULTS.md, 4 x 8 x 256 x 64, o-only
    forward+backward: 43.6 ms recomputing, 36.1 keeping ``a``, 43.2 the composite; at n = 512
    the two are within 8%); saved
    memory then stays within three times the inputs'. So does a call whose ``a`` has at most
    ``_KEEP_ENTRIES`` entries in all, whatever its shape (at most 256 KiB in float32: on the
    same machine, 1 x 1 x 256 x 16, d = 16, recomputing it made the o-only forward+backward
    1.3-1.5x the composite's time). Longer sequences save nothing of size ``n x m``."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        pair: OpPair,
        kernels: Kernels,
        backward: bool,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        attn_mask: Tensor | None,
        scale: float,
        causal: str,
        dropout_p: float,
        dropout_seed: Tensor | None,
    ) -> Any:
        n, m, d, e = q.shape[-2], k.shape[-2], q.shape[-1], v.shape[-1]
        short = n * m <= 2 * (n * d + m * (d + e))
        if backward and not short:
            batch = max(math.prod(t.shape[:-2]) for t in (q, k, v))
            short = batch * n * m <= _KEEP_ENTRIES
        keep = pair.weights or (short and backward)
        drop = _kernel_dropout(kernels, pair.forward._name, dropout_p, dropout_seed)
        o, a = kernels.forward(q, k, v, attn_mask, scale, causal, need_weights=keep, **drop)
        ctx.save_for_backward(q, k, v, attn_mask, a, dropout_seed)
        ctx.pair, ctx.kernels, ctx.scale, ctx.causal = pair, kernels, scale, causal
        ctx.dropout_p = dropout_p
        ctx.set_materialize_grads(False)
        return (o, a) if pair.weights else o

    @staticmethod
    def backward(ctx: Any, *grads: Tensor | None) -> tuple[Any, ...]:  # type: ignore[override]
        grad_o, grad_a = grads if ctx.pair.weights else (grads[0], None)
        needs = _needs(ctx.needs_input_grad[3:6], grad_o, grad_a)
        if not any(needs):
            return (None,) * (3 + _FORWARD_INPUTS)
        q, k, v, attn_mask, a, seed = ctx.saved_tensors
        args = (grad_o, grad_a, q, k, v, a, attn_mask, ctx.scale, ctx.causal, needs)
        if torch.is_grad_enabled() or not plain_eager((grad_o, grad_a)):
            # create_graph (the differentiable backward op), or the backward itself
            # transformed (gradcheck's batched gradients vmap it): the registered op.
            if not ctx.pair.weights:
                # A kept a is no output here, so no gradient could reach q and k through it:
                # the backward op recomputes it, differentiably.
                args = (*args[:5], None, *args[6:])
            out = ctx.pair.backward(*args, ctx.dropout_p, seed)
            g_q, g_k, g_v = (g if need else None for g, need in zip(out, needs, strict=True))
        else:
            drop = _kernel_dropout(ctx.kernels, ctx.pair.forward._name, ctx.dropout_p, seed)
            g_q, g_k, g_v = ctx.kernels.backward(*args, **drop)
        return None, None, None, g_q, g_k, g_v, *(None,) * (_FORWARD_INPUTS - 3)


# --------------------------------------------------------------------------------------------
# vmap rules and autocast
# --------------------------------------------------------------------------------------------


def _to_batched(
    size: int, tensors: Sequence[Tensor | None], in_dims: Sequence[int | None]
) -> list[Tensor | None]:
    """Align tensors for a vmap rule: the vmapped dim first and one logical batch rank.

    The ops' own broadcasting then handles the batch; unbatched inputs are expanded
    (stride 0) so that per-sample gradients are not summed over the vmapped dim.
    """
    logical = [
        t.dim() - (bd is not None) for t, bd in zip(tensors, in_dims, strict=True) if t is not None
    ]
    rank = max(logical)
    out: list[Tensor | None] = []
    for t, bd in zip(tensors, in_dims, strict=True):
        if t is None:
            out.append(None)
            continue
        t = t.expand(size, *t.shape) if bd is None else t.movedim(bd, 0)
        out.append(t.reshape(size, *([1] * (rank - t.dim() + 1)), *t.shape[1:]))
    return out


def _forward_vmap_rule(pair: OpPair) -> Callable[..., Any]:
    out_dims = (0, 0) if pair.weights else 0

    def rule(
        info: Any, in_dims: Sequence[int | None], q: Tensor, k: Tensor, v: Tensor, *rest: Any
    ) -> Any:
        attn_mask, scale, causal, dropout_p, seed = _forward_extras(rest)
        dims = (*in_dims, None)[:4]  # in_dims covers only the arguments actually passed
        q_, k_, v_, m_ = _to_batched(info.batch_size, (q, k, v, attn_mask), dims)
        # With dropout, each sample's mask is keyed by its place in the batched call: the
        # samples get different masks (vmap's randomness="different").
        return pair.forward(q_, k_, v_, m_, scale, causal, dropout_p, seed), out_dims

    return rule


def _backward_vmap_rule(pair: OpPair) -> Callable[..., Any]:
    def rule(info: Any, in_dims: Sequence[int | None], *args: Any) -> Any:
        args = _backward_extras(args)
        tensors, (scale, causal, needs, dropout_p, seed) = args[:7], args[7:]
        size = info.batch_size
        dims = in_dims[:_BACKWARD_TENSORS]
        batched = _to_batched(size, tensors, dims)
        grads = pair.backward(*batched, scale, causal, needs, dropout_p, seed)
        # Each gradient comes back shaped like its padded input: drop the padding.
        # Placeholders (gradients not asked for) are not batched.
        out = tuple(
            g.reshape(size, *(x.shape if bd is None else x.movedim(bd, 0).shape[1:])) if need else g
            for g, x, bd, need in zip(grads, tensors[2:5], dims[2:5], needs, strict=True)
        )
        return out, tuple(0 if need else None for need in needs)

    return rule


def _register_autocast(op: Any) -> None:
    """Under autocast the op runs in the autocast dtype, like the matmuls of the composite."""
    op.register_autocast("cpu", torch.bfloat16)
    if torch.amp.is_autocast_available("cuda"):
        op.register_autocast("cuda", torch.float16)


# --------------------------------------------------------------------------------------------
# Autograd kernels that serve every autograd context, not only plain reverse mode
# --------------------------------------------------------------------------------------------


def _forward_autograd_kernel(pair: OpPair, kernels_jvp: Callable[..., Tensor]) -> Any:
    """The forward op's Autograd kernel: plain reverse mode as generated; ``torch.func``
    reverse mode through the plain formulas; forward-over-reverse through ``AttnFunction``
    (its backward carries tangents); plain forward AD with the tangents of ``formulas.jvp``
    (weights) or of the blocked JVP kernel (o only, nothing of size n x m)."""
    weights = pair.weights
    forward_formulas = _forward_formulas(weights)

    def kernel(generated: Any, keyset: Any, *args: Any) -> Any:
        # First, so that a nested or sparse tensor (which has no kernel) is refused by name.
        _validate(args)
        q, k, v = args[:3]
        attn_mask, scale, causal, dropout_p, seed = _forward_extras(args[3:])
        if _torch_private.under_functorch_grad():
            return forward_formulas(q, k, v, attn_mask, scale, causal, dropout_p, seed)
        tangent = _torch_private.tangents((q, k, v))
        if tangent is None:
            return generated(keyset, *args)
        _no_dropout_here("forward AD", dropout_p)
        if torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v)):
            o, a = AttnFunction.apply(q, k, v, attn_mask, scale, causal)
            return (o, a) if weights else o
        primals = [fwAD.unpack_dual(t).primal for t in (q, k, v)]
        outputs = generated(keyset, *primals, *args[3:])
        t_q, t_k, t_v = tangent
        p_q, p_k, p_v = primals
        if weights:
            o, a = outputs
            t_o, t_a = formulas.jvp(
                t_q, t_k, t_v, p_q, p_k, p_v, a, attn_mask, scale=scale, causal=causal
            )
            assert t_o is not None
            return fwAD.make_dual(o, t_o), fwAD.make_dual(a, t_a)
        if _torch_private.functorch_active():
            # Under torch.func (jacfwd = vmap of jvp) the tensors may be batched, which the
            # in-place block kernels cannot take: the plain formulas can (they build a).
            a = formulas.forward(p_q, p_k, p_v, attn_mask, scale=scale, causal=causal)[1]
            t_o = formulas.jvp(
                t_q, t_k, t_v, p_q, p_k, p_v, a, attn_mask, scale=scale, causal=causal
            )[0]
        else:
            t_o = kernels_jvp(t_q, t_k, t_v, p_q, p_k, p_v, attn_mask, scale, causal)
        return fwAD.make_dual(outputs, t_o)

    return kernel


def _backward_autograd_kernel(generated: Any, keyset: Any, *args: Any) -> Any:
    """The backward op's Autograd kernel: forward AD over it (forward-over-reverse, jvp of
    grad) and ``torch.func`` reverse mode get the plain formulas, which they see through."""
    if (
        _torch_private.under_functorch_grad()
        or _torch_private.tangents(args[:_BACKWARD_TENSORS]) is not None
    ):
        return _backward_formulas(*args)
    return generated(keyset, *args)


# --------------------------------------------------------------------------------------------
# The factory
# --------------------------------------------------------------------------------------------


def declare_op_pair(name: str, *, weights: bool, kernels: Mapping[str, Kernels]) -> OpPair:
    """Register ``torch.ops.tanh_attention.<name>`` and ``<name>_backward``.

    Args:
        name: the forward op's name in the ``tanh_attention`` namespace.
        weights: the forward returns ``(o, a)`` and saves ``a``; else ``o`` only, recomputing
            ``a`` block by block in the backward.
        kernels: the op bodies per device type (``"cpu"``, ``"cuda"``, ...); other device
            types get a clear error.

    Returns:
        The :class:`OpPair`, whose ops are also reachable as ``torch.ops.tanh_attention.*``.
    """
    out = "(Tensor, Tensor)" if weights else "Tensor"
    forward = torch.library.custom_op(
        f"{NAMESPACE}::{name}",
        _no_kernel(name, forward=True),
        mutates_args=(),
        schema=f"({_FORWARD_ARGS}) -> {out}",
    )
    backward = torch.library.custom_op(
        f"{NAMESPACE}::{name}_backward",
        _no_kernel(f"{name}_backward", forward=False),
        mutates_args=(),
        schema=_BACKWARD_SCHEMA,
    )
    for device_type, body in kernels.items():
        forward.register_kernel(device_type, _forward_body(body, name, weights))
        backward.register_kernel(device_type, _backward_body(body, f"{name}_backward"))
    forward.register_fake(_forward_fake(weights))
    backward.register_fake(_backward_fake)
    pair = OpPair(forward, backward, weights, dict(kernels))

    _forward_autograd(pair)
    backward.register_autograd(_backward_backward, setup_context=_backward_setup_context)
    forward.register_vmap(_forward_vmap_rule(pair))
    backward.register_vmap(_backward_vmap_rule(pair))
    _register_autocast(forward)
    # One jvp kernel for forward AD: every device type's kernels compute the same formulas.
    jvp_kernel = next(iter(kernels.values())).jvp
    _torch_private.install_autograd_kernel(forward, _forward_autograd_kernel(pair, jvp_kernel))
    _torch_private.install_autograd_kernel(backward, _backward_autograd_kernel)
    return pair


# --------------------------------------------------------------------------------------------
# The two uses: the explicit op and the memory-efficient op, on the blocked CPU kernels
# --------------------------------------------------------------------------------------------

# The blocked kernels are torch code: they run on any device, fastest on CPU (oneDNN's fused
# tanh); on CUDA the triton backend is the fast one, this is the always-correct fallback.
BLOCKED = Kernels(
    blockwise.forward, blockwise.backward, blockwise.jvp, dropout=True, graph=blockwise.graph
)

attn = declare_op_pair("attn", weights=True, kernels={"cpu": BLOCKED, "cuda": BLOCKED})
"""``torch.ops.tanh_attention.attn(q, k, v, attn_mask=None, scale=1.0, causal="none") -> (o, a)``:
``a = M * tanh(scale * q @ k^T)``, ``o = a @ v``; with three tensors, the lab's function."""

attn_lean = declare_op_pair("attn_lean", weights=False, kernels={"cpu": BLOCKED, "cuda": BLOCKED})
"""``torch.ops.tanh_attention.attn_lean(q, k, v, attn_mask=None, scale=1.0, causal="none") -> o``:
the output only, never building ``a`` (n x m) in forward or backward."""
