"""``ContextParallel``: a ParallelStyle that makes ``MultiheadTanhAttention`` context parallel.

``parallelize_module(model, mesh, {"blocks.*.attn": ContextParallel()})`` gives each matched
layer a forward (on that instance; torch is not patched) that takes this rank's shard of the
sequence of query, key and value, projects it, and runs :func:`context_parallel_attn` over
the mesh's group. Masks passed to the layer are the global ones (``attn_mask`` ``(L, S)`` or
``(N * num_heads, L, S)``, ``key_padding_mask`` ``(N, S)``), the same on every rank.
"""

from __future__ import annotations

import types
from typing import Any

from torch import Tensor, nn
from torch.distributed.tensor.parallel import ParallelStyle

from . import _context, _layout

__all__ = ["ContextParallel"]

_FWD = "MultiheadTanhAttention.forward() under ContextParallel"


class ContextParallel(ParallelStyle):
    """Context parallelism for :class:`tanh_attention.nn.MultiheadTanhAttention`.

    Args:
        method: ``"allgather"``, ``"alltoall"`` or ``"ring"`` (see
            :func:`context_parallel_attn`).
        load_balance: None or ``"head_tail"``: the layout of the sequence shards that the
            model passes to the layer (make them with :func:`shard_sequence`).

    The layer's inputs are then ``(N, L / W, E)`` (``batch_first``) or ``(L / W, N, E)``; the
    output has the same layout. The attention weights are not assembled: the layer returns
    ``(output, None)``. Not supported under it: ``add_bias_kv``, ``add_zero_attn``, dropout in
    training, unbatched inputs (each raises ValueError at the call).

    Example (on every rank of a 1-D mesh)::

        parallelize_module(model, mesh, {"blocks.0.attn": ContextParallel()})
        out = model(shard_sequence(x, dim=1))   # this rank's rows of the output

    Raises:
        ValueError: an unknown method or layout; when applied, a mesh that is not 1-D.
        TypeError: when applied, a module that is not a MultiheadTanhAttention.
    """

    def __init__(self, *, method: str = "allgather", load_balance: str | None = None) -> None:
        super().__init__()
        if method not in _context.METHODS:
            raise ValueError(
                f"ContextParallel: argument 'method' must be one of {_context.METHODS}, but got "
                f"{method!r}."
            )
        _layout.check_load_balance(load_balance, "ContextParallel")
        self.method = method
        self.load_balance = load_balance

    def _apply(self, module: nn.Module, device_mesh: Any) -> nn.Module:
        from ..nn import MultiheadTanhAttention

        if not isinstance(module, MultiheadTanhAttention):
            raise TypeError(
                "ContextParallel applies to tanh_attention.nn.MultiheadTanhAttention, but got "
                f"{type(module).__name__}."
            )
        if device_mesh.ndim != 1:
            raise ValueError(
                f"ContextParallel: expected a 1-D device mesh (the context-parallel dim), but got "
                f"a {device_mesh.ndim}-D mesh; pass mesh['cp']."
            )
        group = device_mesh.get_group()
        style = self

        def forward(
            self: MultiheadTanhAttention,
            query: Tensor,
            key: Tensor,
            value: Tensor,
            key_padding_mask: Tensor | None = None,
            need_weights: bool = True,
            attn_mask: Tensor | None = None,
            average_attn_weights: bool = True,
            is_causal: bool = False,
        ) -> tuple[Tensor, None]:
            return _forward(
                self, style, group, query, key, value, key_padding_mask, attn_mask, is_causal
            )

        module.forward = types.MethodType(forward, module)  # type: ignore[method-assign]
        return module


def _forward(
    m: Any,
    style: ContextParallel,
    group: Any,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    key_padding_mask: Tensor | None,
    attn_mask: Tensor | None,
    is_causal: bool,
) -> tuple[Tensor, None]:
    batched = m._validate_inputs(query, key, value)
    if not batched:
        raise ValueError(
            f"{_FWD}: expected batched (3-D) inputs, but got query of shape {tuple(query.shape)}."
        )
    if m.bias_k is not None or m.add_zero_attn:
        raise ValueError(f"{_FWD}: add_bias_kv and add_zero_attn are not supported.")
    if m.training and m.dropout > 0:
        raise ValueError(f"{_FWD}: dropout={m.dropout} in training is not supported.")
    attn_mask = m._validate_mask_dtype("attn_mask", attn_mask)
    key_padding_mask = m._validate_mask_dtype("key_padding_mask", key_padding_mask)
    if not m.batch_first:
        query, key, value = query.transpose(0, 1), key.transpose(0, 1), value.transpose(0, 1)
    _, w = _layout.world(group)
    n_batch, l_local, _ = query.shape
    s_local = key.shape[1]
    keep, mask_is_causal = m._keep_mask(
        attn_mask, key_padding_mask, True, n_batch, l_local * w, s_local * w
    )
    q, k, v = m._in_projection(query, key, value)
    h, hd = m.num_heads, m.head_dim
    q = q.view(n_batch, l_local, h, hd).transpose(1, 2).contiguous()
    k = k.view(n_batch, s_local, h, hd).transpose(1, 2).contiguous()
    v = v.view(n_batch, s_local, h, hd).transpose(1, 2).contiguous()
    o = _context.context_parallel_attn(
        q,
        k,
        v,
        group=group,
        scale=m.scale,
        causal=bool(is_causal) or mask_is_causal,
        attn_mask=keep,
        method=style.method,
        load_balance=style.load_balance,
    )
    out = m.out_proj(o.transpose(1, 2).reshape(n_batch, l_local, m.embed_dim))
    if not m.batch_first:
        out = out.transpose(0, 1)
    return out, None
