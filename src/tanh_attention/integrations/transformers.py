"""Tanh attention in HuggingFace transformers models: ``attn_implementation="tanh"``.

One call, :func:`register`, adds tanh attention to transformers' ``AttentionInterface`` and
the same name to its ``AttentionMaskInterface``, so that models built with
``attn_implementation="tanh"`` (or switched with ``model.set_attn_implementation("tanh")``)
call :func:`attention_forward`. A name registered in the first registry only would receive
``attention_mask=None`` and lose padding silently; here the mask function is SDPA's, which
builds bool masks (True = takes part) or returns None where ``is_causal`` alone is right.

What differs from softmax attention: the weights are ``tanh(scores)``, not normalised over
the keys, so a model trained with softmax attention does not keep its behaviour when
switched; train (or fine-tune) with tanh attention.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ..api import _sdpa

__all__ = ["attention_forward", "register"]


def attention_forward(
    module: torch.nn.Module,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attention_mask: Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    is_causal: bool | None = None,
    **kwargs: Any,
) -> tuple[Tensor, Tensor | None]:
    """The attention function transformers calls (its ``sdpa_attention_forward`` contract).

    Args:
        module: the model's attention module (``num_key_value_groups``, ``is_causal``).
        query: ``(b, h, n, d)``.  key, value: ``(b, h_kv, m, d)``, not repeated for GQA.
        attention_mask: None, a bool mask (True = takes part) or an additive float mask
            (``finfo.min`` = masked), broadcastable to ``(b, h, n, m)``.
        dropout: dropout on the weights (transformers passes 0 in eval mode).
        scaling: the score scale (None: ``1 / sqrt(d)``).
        is_causal: overrides ``module.is_causal``.
        **kwargs: ``output_attentions`` (return the weights), ``position_bias`` (an additive
            bias, T5-style); ``softcap`` is refused.

    Returns:
        ``(out, weights)``: ``out`` ``(b, n, h, e)`` contiguous, ``weights`` ``(b, h, n, m)``
        when ``output_attentions`` is set, else None.
    """
    if kwargs.get("softcap") is not None:
        raise ValueError("tanh attention does not support 'softcap' (tanh is bounded already).")
    groups = getattr(module, "num_key_value_groups", 1)
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    # As transformers' SDPA path: top-left causal only for a prefill without a mask; a
    # single decoding query attends to every cached key (the mask function returns None
    # exactly where that is right).
    causal = bool(query.shape[2] > 1 and attention_mask is None and causal)
    position_bias = kwargs.get("position_bias")
    if position_bias is not None:
        if attention_mask is None:
            attention_mask = position_bias
        elif attention_mask.dtype == torch.bool:
            low = torch.finfo(position_bias.dtype).min
            attention_mask = position_bias.masked_fill(attention_mask.logical_not(), low)
        else:
            attention_mask = position_bias + attention_mask
    if attention_mask is not None and attention_mask.is_floating_point():
        attention_mask = attention_mask.to(query.dtype)
    out, weights = _sdpa(
        query,
        key,
        value,
        attention_mask,
        dropout,
        causal,
        scaling,
        enable_gqa=groups > 1,
        need_weights=bool(kwargs.get("output_attentions", False)),
    )
    return out.transpose(1, 2).contiguous(), weights


def register(name: str = "tanh") -> str:
    """Make ``attn_implementation=name`` run tanh attention in transformers models.

    Args:
        name: the implementation's name in both of transformers' registries.

    Returns:
        ``name``.

    Raises:
        ImportError: transformers is not installed (``pip install 'tanh-attention[transformers]'``).
        TypeError: ``name`` is not a non-empty string.

    Example (needs transformers)::

        from tanh_attention.integrations.transformers import register
        register()                                     # once
        model = LlamaForCausalLM(config)               # config._attn_implementation = "tanh"
        model.set_attn_implementation("tanh")          # or switch an existing model
    """
    if not isinstance(name, str) or not name:
        raise TypeError(f"register(): 'name' must be a non-empty string, but got {name!r}.")
    try:
        from transformers import AttentionInterface
        from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
    except ImportError as err:
        raise ImportError(
            "tanh_attention.integrations.transformers needs transformers: "
            "pip install 'tanh-attention[transformers]'"
        ) from err
    AttentionInterface.register(name, attention_forward)
    AttentionMaskInterface.register(name, sdpa_mask)
    return name
