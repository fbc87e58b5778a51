"""Stage 2: ``AttnFunction``, tanh attention as a ``torch.autograd.Function``.

It uses the hand-derived formulas for every rule: ``formulas.vjp`` for backward (plain torch
code, so double backward differentiates it), ``formulas.jvp`` for forward-mode AD, and a
generated vmap rule. It works under every ``torch.func`` transform; Dynamo refuses Functions
that define ``jvp``, which is why the public function always uses registered ops. The
explicit ops use it for forward-over-reverse, where the backward must carry tangents.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from . import formulas
from ._checks import normalize_causal, validate_attn_inputs

__all__ = ["AttnFunction"]


class AttnFunction(torch.autograd.Function):
    """``AttnFunction.apply(q, k, v, attn_mask=None, scale=1.0, causal="none") -> (o, a)``.

    Args:
        q: ``(..., n, d)``.  k: ``(..., m, d)``.  v: ``(..., m, e)``.
        attn_mask: optional bool mask broadcastable to ``(*batch, n, m)``, True = takes part.
        scale: score multiplier.  causal: a bool, ``"none"``, ``"top_left"`` or
            ``"bottom_right"``.

    Returns:
        ``(o, a)``: ``(*batch, n, e)`` and ``(*weights_batch, n, m)`` (the batch of q, k and
        the mask).

    Example:
        >>> q = torch.randn(2, 3, dtype=torch.float64)
        >>> o, a = AttnFunction.apply(q, q, torch.randn(2, 4, dtype=torch.float64))
        >>> bool(torch.allclose(a, torch.tanh(q @ q.T)))
        True
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(  # type: ignore[override]
        q: Tensor,
        k: Tensor,
        v: Tensor,
        attn_mask: Tensor | None = None,
        scale: float = 1.0,
        causal: bool | str = False,
    ) -> tuple[Tensor, Tensor]:
        validate_attn_inputs(q, k, v, attn_mask, scale=scale, causal=causal)
        return formulas.forward(q, k, v, attn_mask, scale=scale, causal=normalize_causal(causal))

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: tuple[Tensor, Tensor]) -> None:
        q, k, v, attn_mask, scale, causal = _fill_defaults(inputs)
        a = output[1]
        ctx.save_for_backward(q, k, v, a, attn_mask)
        ctx.save_for_forward(q, k, v, a, attn_mask)
        ctx.scale, ctx.causal = scale, normalize_causal(causal)
        # An output nobody used arrives as None instead of a tensor of zeros.
        ctx.set_materialize_grads(False)

    @staticmethod
    def backward(ctx: Any, g_o: Tensor | None, g_a: Tensor | None) -> tuple[Any, ...]:  # type: ignore[override]
        q, k, v, a, attn_mask = ctx.saved_tensors
        grads = formulas.vjp(
            g_o,
            g_a,
            q,
            k,
            v,
            a,
            attn_mask,
            scale=ctx.scale,
            causal=ctx.causal,
            needs=ctx.needs_input_grad[:3],
        )
        return (*grads, None, None, None)

    @staticmethod
    def jvp(  # type: ignore[override]
        ctx: Any,
        t_q: Tensor | None,
        t_k: Tensor | None,
        t_v: Tensor | None,
        *_: Any,
    ) -> tuple[Tensor | None, Tensor | None]:
        q, k, v, a, attn_mask = ctx.saved_tensors
        return formulas.jvp(
            t_q, t_k, t_v, q, k, v, a, attn_mask, scale=ctx.scale, causal=ctx.causal
        )


def _fill_defaults(inputs: tuple[Any, ...]) -> tuple[Any, ...]:
    defaults = (None, 1.0, False)
    return (*inputs, *defaults[len(inputs) - 3 :])
