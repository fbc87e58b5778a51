"""Stage 3: the composite operator ``torch.ops.tanh_attention.attn_composite``.

Registered as CompositeImplicitAutograd: it is built from differentiable aten ops
(``formulas.forward``), so autograd, forward AD, vmap and compile all derive its behaviour from
those parts. It runs on every device and in every context, which makes it the dispatcher's
fallback; the tests check it, like every other path, against an independent reference.
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import formulas
from ._checks import validate_attn_inputs

__all__ = ["attn_composite"]

NAMESPACE = "tanh_attention"

# One DEF library per namespace (ops.py's custom ops add to it). The Library object must stay
# referenced for the op to stay registered.
_lib = torch.library.Library(NAMESPACE, "DEF")
_lib.define(
    "attn_composite(Tensor q, Tensor k, Tensor v, Tensor? attn_mask=None, "
    "float scale=1.0, str causal='none', Tensor? bias=None, float dropout_p=0.0, "
    "Tensor? dropout_seed=None) -> (Tensor, Tensor)"
)


def attn_composite(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    attn_mask: Tensor | None = None,
    scale: float = 1.0,
    causal: str = "none",
    bias: Tensor | None = None,
    dropout_p: float = 0.0,
    dropout_seed: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """The composite tanh attention: ``a = M * tanh(scale * q @ k^T + bias)``, ``o = a @ v``.

    Args:
        q: ``(..., n, d)``.  k: ``(..., m, d)``.  v: ``(..., m, e)``.
        attn_mask: optional bool mask broadcastable to ``(*batch, n, m)``, True = takes part.
        scale: score multiplier.  causal: ``"none"``, ``"top_left"`` or ``"bottom_right"``.
        bias: optional float tensor added to the scores before tanh, shaped like the mask.
        dropout_p: dropout on the weights (unbiased).
        dropout_seed: the dropout mask's seed (``dropout.py``); None: drawn from torch's
            generator.

    Returns:
        ``(o, a)``: ``(*batch, n, e)`` and ``(*weights_batch, n, m)`` (the batch of q, k, the
        mask and the bias); ``a`` after dropout.

    Example:
        >>> q, v = torch.randn(2, 3, dtype=torch.float64), torch.randn(2, 4, dtype=torch.float64)
        >>> o, a = torch.ops.tanh_attention.attn_composite(q, q, v)
        >>> bool(torch.allclose(o, torch.tanh(q @ q.T) @ v))
        True
    """
    validate_attn_inputs(
        q, k, v, attn_mask, scale=scale, causal=causal, bias=bias, dropout_p=dropout_p
    )
    return formulas.forward(
        q,
        k,
        v,
        attn_mask,
        scale=scale,
        causal=causal,
        bias=bias,
        dropout_p=dropout_p,
        dropout_seed=dropout_seed,
    )


_lib.impl("attn_composite", attn_composite, "CompositeImplicitAutograd")
# Without a batched-decomposition kernel, vmap would run the op once per sample.
_lib.impl("attn_composite", attn_composite, "FuncTorchBatchedDecomposition")
