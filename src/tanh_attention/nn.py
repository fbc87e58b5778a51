"""Layers: :class:`MultiheadTanhAttention`, a drop-in for ``torch.nn.MultiheadAttention``.

The layer does what ``nn.MultiheadAttention`` does around the attention itself (input
projections, ``bias_k``/``bias_v``, ``add_zero_attn``, the head split and merge, the output
projection, its mask conventions, dropout on the attention weights) and calls
:func:`tanh_attention.attn` for the attention: ``a = M * tanh(scale * q @ k^T)``, ``o = a @ v``
per head, where ``M`` is the keep-mask built from the layer's masks.

Swap one line::

    attn = torch.nn.MultiheadAttention(64, 4, batch_first=True)        # before
    attn = tanh_attention.nn.MultiheadTanhAttention(64, 4, batch_first=True)  # after

Parameters have the names and shapes of ``nn.MultiheadAttention``, so a state dict moves in
either direction with ``load_state_dict``.
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import _torch_private
from ._checks import validate_layout, validate_scale
from .api import attn
from .linear import linear

__all__ = ["MultiheadTanhAttention"]


def _check_positive_int(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(
            f"MultiheadTanhAttention: argument '{name}' must be an int, "
            f"but got {type(value).__name__} ({value!r})."
        )
    if value <= 0:
        raise ValueError(
            f"MultiheadTanhAttention: argument '{name}' must be positive, but got {name}={value}."
        )
    return value


def _check_bool(where: str, name: str, value: object) -> bool:
    if not isinstance(value, bool):
        raise TypeError(
            f"{where}: argument '{name}' must be a bool, but got {type(value).__name__} "
            f"({value!r})."
        )
    return value


_FWD = "MultiheadTanhAttention.forward()"


class MultiheadTanhAttention(nn.Module):
    r"""Multi-head tanh attention with the interface of ``torch.nn.MultiheadAttention``.

    Per head ``h``, with ``q_h, k_h, v_h`` the projected inputs split into heads::

        a_h = M * tanh(scale * q_h @ k_h^T)      (L, S)   M: 0/1 keep-mask from the masks
        o_h = a_h @ v_h                          (L, head_dim)
        output = concat_h(o_h) @ out_proj.weight^T + out_proj.bias

    The weights ``a`` are not normalised over the keys (there is no softmax); masked entries
    are exactly 0 (``tanh(-inf)`` would be -1, which is why the masks become a keep-mask rather
    than a -inf added to the scores).

    Args:
        embed_dim: total dimension ``E`` of the model (query features and output features).
        num_heads: number of heads; ``embed_dim`` must be divisible by it
            (``head_dim = embed_dim // num_heads``).
        dropout: probability of zeroing an attention weight in training (the kept weights are
            scaled by ``1 / (1 - dropout)``). Default 0.
        bias: add biases to the input and output projections. Default True.
        add_bias_kv: append a learnt key ``bias_k`` and value ``bias_v`` to the key and value
            sequences (every query may attend to it). Default False.
        add_zero_attn: append a key and a value of zeros after the head split. Default False.
        kdim: features of ``key``; default ``embed_dim``.
        vdim: features of ``value``; default ``embed_dim``. When ``kdim`` or ``vdim`` differ
            from ``embed_dim`` the input projections are ``q_proj_weight``, ``k_proj_weight``,
            ``v_proj_weight`` instead of the packed ``in_proj_weight`` (as in torch).
        batch_first: inputs and outputs are ``(N, L, E)`` instead of ``(L, N, E)``.
        device: device of the parameters.
        dtype: dtype of the parameters (float64, float32, bfloat16 or float16).
        scale: keyword only; multiplies the scores ``q_h @ k_h^T``. Default
            ``1 / sqrt(head_dim)``, as softmax attention.

    Parameters (names and shapes of ``nn.MultiheadAttention``):
        ``in_proj_weight (3E, E)`` or ``q_proj_weight (E, E)``, ``k_proj_weight (E, kdim)``,
        ``v_proj_weight (E, vdim)``; ``in_proj_bias (3E,)`` when ``bias``;
        ``bias_k (1, 1, E)``, ``bias_v (1, 1, E)`` when ``add_bias_kv``;
        ``out_proj.weight (E, E)``, ``out_proj.bias (E,)`` when ``bias``.

    Raises:
        TypeError: a non-int size, a non-bool flag, a non-number ``dropout`` or ``scale``.
        ValueError: a size that is not positive, ``embed_dim`` not divisible by
            ``num_heads``, ``dropout`` outside ``[0, 1)``, a non-finite ``scale``.

    Example:
        >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
        <...>
        >>> mha = MultiheadTanhAttention(8, 2, batch_first=True)
        >>> x = torch.randn(3, 5, 8)
        >>> out, w = mha(x, x, x)
        >>> out.shape, w.shape
        (torch.Size([3, 5, 8]), torch.Size([3, 5, 5]))
        >>> mha.load_state_dict(torch.nn.MultiheadAttention(8, 2).state_dict())
        <All keys matched successfully>
    """

    __constants__: ClassVar[list[str]] = ["batch_first"]
    bias_k: Tensor | None
    bias_v: Tensor | None
    in_proj_weight: Tensor | None
    q_proj_weight: Tensor | None
    k_proj_weight: Tensor | None
    v_proj_weight: Tensor | None
    in_proj_bias: Tensor | None

    # torch's TransformerEncoderLayer and TransformerEncoder read this private attribute of the
    # module in their ``self_attn`` slot: when it is True (and the layer is in eval mode without
    # grad, batch_first, ...) they call a fused *softmax* kernel with this module's weights and
    # never call its forward. False keeps them off that fast path. Whether the projection is
    # packed is ``self.packed_in_proj``.
    _qkv_same_embed_dim = False

    def __init__(
        self,
        embed_dim: int,
        num_heads: int,
        dropout: float = 0.0,
        bias: bool = True,
        add_bias_kv: bool = False,
        add_zero_attn: bool = False,
        kdim: int | None = None,
        vdim: int | None = None,
        batch_first: bool = False,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        *,
        scale: float | None = None,
    ) -> None:
        _check_positive_int("embed_dim", embed_dim)
        _check_positive_int("num_heads", num_heads)
        if embed_dim % num_heads != 0:
            raise ValueError(
                "MultiheadTanhAttention: 'embed_dim' must be divisible by 'num_heads', but got "
                f"embed_dim={embed_dim} and num_heads={num_heads}."
            )
        if isinstance(dropout, bool) or not isinstance(dropout, (int, float)):
            raise TypeError(
                "MultiheadTanhAttention: argument 'dropout' must be a float, "
                f"but got {type(dropout).__name__}."
            )
        if not 0.0 <= dropout < 1.0:
            raise ValueError(
                f"MultiheadTanhAttention: argument 'dropout' must be in [0, 1), but got "
                f"dropout={dropout}."
            )
        for name, flag in (
            ("bias", bias),
            ("add_bias_kv", add_bias_kv),
            ("add_zero_attn", add_zero_attn),
            ("batch_first", batch_first),
        ):
            _check_bool("MultiheadTanhAttention", name, flag)
        kdim = embed_dim if kdim is None else _check_positive_int("kdim", kdim)
        vdim = embed_dim if vdim is None else _check_positive_int("vdim", vdim)
        head_dim = embed_dim // num_heads
        if scale is None:
            scale = 1.0 / math.sqrt(head_dim)
        validate_scale(scale, "MultiheadTanhAttention")

        super().__init__()
        factory: dict[str, Any] = {"device": device, "dtype": dtype}
        self.embed_dim = embed_dim
        self.num_heads = num_heads
        self.head_dim = head_dim
        self.kdim = kdim
        self.vdim = vdim
        self.dropout = float(dropout)
        self.batch_first = batch_first
        self.add_zero_attn = add_zero_attn
        self.scale = float(scale)
        self.packed_in_proj = kdim == embed_dim and vdim == embed_dim

        if self.packed_in_proj:
            self.in_proj_weight = nn.Parameter(torch.empty((3 * embed_dim, embed_dim), **factory))
            self.register_parameter("q_proj_weight", None)
            self.register_parameter("k_proj_weight", None)
            self.register_parameter("v_proj_weight", None)
        else:
            self.q_proj_weight = nn.Parameter(torch.empty((embed_dim, embed_dim), **factory))
            self.k_proj_weight = nn.Parameter(torch.empty((embed_dim, kdim), **factory))
            self.v_proj_weight = nn.Parameter(torch.empty((embed_dim, vdim), **factory))
            self.register_parameter("in_proj_weight", None)
        if bias:
            self.in_proj_bias = nn.Parameter(torch.empty(3 * embed_dim, **factory))
        else:
            self.register_parameter("in_proj_bias", None)
        self.out_proj = nn.Linear(embed_dim, embed_dim, bias=bias, **factory)
        if add_bias_kv:
            self.bias_k = nn.Parameter(torch.empty((1, 1, embed_dim), **factory))
            self.bias_v = nn.Parameter(torch.empty((1, 1, embed_dim), **factory))
        else:
            self.bias_k = self.bias_v = None
        self._reset_parameters()

    def _reset_parameters(self) -> None:
        """The initialisation of ``nn.MultiheadAttention`` (Xavier, zero biases)."""
        if self.in_proj_weight is not None:
            nn.init.xavier_uniform_(self.in_proj_weight)
        else:
            for w in (self.q_proj_weight, self.k_proj_weight, self.v_proj_weight):
                assert w is not None  # the constructor registered all three
                nn.init.xavier_uniform_(w)
        if self.in_proj_bias is not None:
            nn.init.constant_(self.in_proj_bias, 0.0)
            nn.init.constant_(self.out_proj.bias, 0.0)
        if self.bias_k is not None and self.bias_v is not None:
            nn.init.xavier_normal_(self.bias_k)
            nn.init.xavier_normal_(self.bias_v)

    def extra_repr(self) -> str:
        return (
            f"embed_dim={self.embed_dim}, num_heads={self.num_heads}, scale={self.scale:.4g}, "
            f"dropout={self.dropout}, batch_first={self.batch_first}"
        )

    # ----------------------------------------------------------------------------------------
    # Validation (shapes, dtypes and flags only; the one data check is the float-mask values)
    # ----------------------------------------------------------------------------------------

    def _validate_inputs(self, query: object, key: object, value: object) -> bool:
        """Check query/key/value; return whether the input is batched (3-D)."""
        tensors = {"query": query, "key": key, "value": value}
        for name, t in tensors.items():
            if not isinstance(t, Tensor):
                raise TypeError(
                    f"{_FWD}: argument '{name}' must be a torch.Tensor, but got {type(t).__name__}."
                )
            validate_layout(name, t, _FWD)
        assert isinstance(query, Tensor) and isinstance(key, Tensor) and isinstance(value, Tensor)
        if query.dim() not in (2, 3):
            raise ValueError(
                f"{_FWD}: expected 'query' to be 2-D (unbatched, (L, E)) or 3-D (batched), "
                f"but got query.shape={tuple(query.shape)}."
            )
        batched = query.dim() == 3
        for name, t in (("key", key), ("value", value)):
            if t.dim() != query.dim():
                raise ValueError(
                    f"{_FWD}: for a {query.dim()}-D 'query', expected '{name}' to be "
                    f"{query.dim()}-D too, but got {name}.shape={tuple(t.shape)}."
                )
        for name, t, size, what in (
            ("query", query, self.embed_dim, "embed_dim"),
            ("key", key, self.kdim, "kdim"),
            ("value", value, self.vdim, "vdim"),
        ):
            if t.shape[-1] != size:
                raise ValueError(
                    f"{_FWD}: expected '{name}' to have {size} features ({what}) in its last "
                    f"dimension, but got {name}.shape={tuple(t.shape)}."
                )
        if key.shape[:-1] != value.shape[:-1]:
            raise ValueError(
                f"{_FWD}: expected 'key' and 'value' to have the same sequence and batch "
                f"dimensions, but got key.shape={tuple(key.shape)} and "
                f"value.shape={tuple(value.shape)}."
            )
        if batched:
            bdim = 0 if self.batch_first else 1
            if query.shape[bdim] != key.shape[bdim]:
                raise ValueError(
                    f"{_FWD}: expected 'query' and 'key' to have the same batch size "
                    f"(dimension {bdim}, batch_first={self.batch_first}), but got "
                    f"query.shape={tuple(query.shape)} and key.shape={tuple(key.shape)}."
                )
        weight = self.out_proj.weight
        for name, t in tensors.items():
            assert isinstance(t, Tensor)
            if t.dtype != weight.dtype:
                raise TypeError(
                    f"{_FWD}: expected '{name}' to have the parameters' dtype {weight.dtype}, "
                    f"but got {name}.dtype={t.dtype}. Cast the input or call .to({t.dtype}) "
                    "on the module."
                )
        return batched

    @staticmethod
    def _validate_mask_dtype(name: str, mask: object) -> Tensor | None:
        if mask is None:
            return None
        if not isinstance(mask, Tensor):
            raise TypeError(
                f"{_FWD}: argument '{name}' must be a torch.Tensor or None, "
                f"but got {type(mask).__name__}."
            )
        validate_layout(name, mask, _FWD)
        if mask.dtype != torch.bool and not mask.is_floating_point():
            raise TypeError(
                f"{_FWD}: expected '{name}' to be a bool mask (True = not allowed) or a float "
                f"mask of 0 and -inf, but got {name}.dtype={mask.dtype}."
            )
        return mask

    @staticmethod
    def _to_keep(name: str, mask: Tensor) -> Tensor:
        """Turn one of the layer's masks into a keep-mask (True = takes part).

        A bool mask means True = not allowed (``nn.MultiheadAttention``'s convention). A float
        mask is added to the scores in softmax attention; tanh attention has no such thing
        (``tanh(-inf)`` is -1, not 0), so only a float mask of 0 and -inf, which means the
        same as a bool mask, is accepted.
        """
        if mask.dtype == torch.bool:
            return mask.logical_not()
        keep = mask == 0
        valid = (keep | (mask == float("-inf"))).all()
        message = (
            f"{_FWD}: a float '{name}' must contain only 0 and -inf for tanh attention. "
            "Softmax attention adds a float mask to the scores, but tanh attention cannot: "
            "tanh(-inf) is -1, not 0, so a large negative score still contributes. "
            "Pass a bool mask (True = not allowed) instead."
        )
        if torch.compiler.is_compiling():
            # No data-dependent Python branch in a graph: a runtime assertion instead
            # (it raises RuntimeError with the same message).
            _torch_private.assert_async(valid, message)
        elif not bool(valid):
            raise ValueError(message)
        return keep

    def _keep_mask(
        self,
        attn_mask: Tensor | None,
        key_padding_mask: Tensor | None,
        batched: bool,
        n_batch: int,
        tgt_len: int,
        src_len: int,
    ) -> tuple[Tensor | None, bool]:
        """The combined keep-mask, broadcastable to ``(N, H, L, S)``, or None; and whether the
        attn_mask was exactly the causal mask.

        An ``(L, S)`` attn_mask that is exactly the (top-left) causal mask, the usual one,
        with or without ``is_causal``, is replaced by the operator's causal flag: the same
        keep-mask, but the kernels then skip the masked blocks instead of masking every
        entry."""
        keep: Tensor | None = None
        mask_is_causal = False
        if attn_mask is not None:
            if attn_mask.dim() == 2:
                expected: tuple[int, ...] = (tgt_len, src_len)
            elif attn_mask.dim() == 3:
                expected = (n_batch * self.num_heads, tgt_len, src_len)
            else:
                expected = ()
            if tuple(attn_mask.shape) != expected:
                raise ValueError(
                    f"{_FWD}: expected 'attn_mask' of shape (L, S) = {(tgt_len, src_len)} or "
                    f"(N * num_heads, L, S) = {(n_batch * self.num_heads, tgt_len, src_len)}, "
                    f"but got attn_mask.shape={tuple(attn_mask.shape)}."
                )
            keep = self._to_keep("attn_mask", attn_mask)
            if (
                keep.dim() == 2
                and not torch.compiler.is_compiling()
                and torch.equal(keep, torch.ones_like(keep).tril_())
            ):
                keep, mask_is_causal = None, True
            if keep is not None and keep.dim() == 3:
                keep = keep.reshape(-1, self.num_heads, tgt_len, src_len)
        if key_padding_mask is not None:
            expected = (n_batch, src_len) if batched else (src_len,)
            if tuple(key_padding_mask.shape) != expected:
                raise ValueError(
                    f"{_FWD}: expected 'key_padding_mask' of shape "
                    f"{'(N, S)' if batched else '(S,)'} = {expected}, "
                    f"but got key_padding_mask.shape={tuple(key_padding_mask.shape)}."
                )
            kp = self._to_keep("key_padding_mask", key_padding_mask)
            kp = kp.view(n_batch, 1, 1, src_len)
            keep = kp if keep is None else keep & kp
        return keep, mask_is_causal

    # ----------------------------------------------------------------------------------------
    # Forward
    # ----------------------------------------------------------------------------------------

    def _in_projection(
        self, query: Tensor, key: Tensor, value: Tensor
    ) -> tuple[Tensor, Tensor, Tensor]:
        e = self.embed_dim
        if self.in_proj_weight is not None:
            w_q, w_k, w_v = self.in_proj_weight.split(e)
        else:
            assert self.q_proj_weight is not None
            assert self.k_proj_weight is not None
            assert self.v_proj_weight is not None
            w_q, w_k, w_v = self.q_proj_weight, self.k_proj_weight, self.v_proj_weight
        if self.in_proj_bias is not None:
            b_q, b_k, b_v = self.in_proj_bias.split(e)
            return linear(query, w_q, b_q), linear(key, w_k, b_k), linear(value, w_v, b_v)
        return linear(query, w_q), linear(key, w_k), linear(value, w_v)

    def _packed(self, self_attention: bool) -> bool:
        """Self-attention (one tensor as query, key and value) with the packed projection
        weight and no extra keys: one product and one layout copy serve q, k and v."""
        return (
            self_attention
            and self.in_proj_weight is not None
            and self.bias_k is None
            and not self.add_zero_attn
        )

    def _packed_heads(self, x: Tensor, n_batch: int, length: int) -> tuple[Tensor, ...]:
        """q, k, v as contiguous ``(N, H, L, hd)`` from one product with the packed weight, as
        ``nn.MultiheadAttention`` projects self-attention."""
        qkv = linear(x, self.in_proj_weight, self.in_proj_bias)  # type: ignore[arg-type]
        qkv = qkv.view(n_batch, length, 3, self.num_heads, self.head_dim)
        return tuple(qkv.permute(2, 0, 3, 1, 4).contiguous().unbind(0))

    def _heads(
        self, q: Tensor, k: Tensor, v: Tensor, n_batch: int, tgt_len: int
    ) -> tuple[Tensor, ...]:
        """The projections as contiguous ``(N, H, L, hd)`` and ``(N, H, S', hd)``, with the key
        and value that ``add_bias_kv`` adds (``add_zero_attn``'s comes later, per head)."""
        if self.bias_k is not None and self.bias_v is not None:
            k = torch.cat([k, self.bias_k.expand(n_batch, 1, self.embed_dim)], dim=1)
            v = torch.cat([v, self.bias_v.expand(n_batch, 1, self.embed_dim)], dim=1)
        h, hd = self.num_heads, self.head_dim
        # contiguous(): the op's backward returns contiguous gradients while its fake kernel
        # promises the inputs' strides, so under torch.compile a transposed (non-contiguous)
        # input breaks the compiled backward.
        q = q.view(n_batch, tgt_len, h, hd).transpose(1, 2).contiguous()
        k = k.view(n_batch, k.shape[1], h, hd).transpose(1, 2).contiguous()
        v = v.view(n_batch, v.shape[1], h, hd).transpose(1, 2).contiguous()
        return q, k, v

    def forward(
        self,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        key_padding_mask: Tensor | None = None,
        need_weights: bool = True,
        attn_mask: Tensor | None = None,
        average_attn_weights: bool = True,
        is_causal: bool = False,
    ) -> tuple[Tensor, Tensor | None]:
        r"""Multi-head tanh attention; the signature and shapes of ``nn.MultiheadAttention``.

        ``N`` is the batch size, ``L`` the target (query) length, ``S`` the source (key)
        length, ``E`` = ``embed_dim``.

        Args:
            query: ``(L, E)`` unbatched, ``(L, N, E)``, or ``(N, L, E)`` with ``batch_first``.
            key: ``(S, kdim)``, ``(S, N, kdim)`` or ``(N, S, kdim)``.
            value: ``(S, vdim)``, ``(S, N, vdim)`` or ``(N, S, vdim)``.
            key_padding_mask: ``(N, S)`` (``(S,)`` unbatched); True (bool) or -inf (float)
                marks a key to ignore.
            need_weights: also return the attention weights. With False the attention runs
                ``tanh_attention.attn(..., need_weights=False)``, the memory-efficient path.
            attn_mask: ``(L, S)`` or ``(N * num_heads, L, S)``; True (bool) or -inf (float)
                marks a pair that may not attend. A float mask must contain only 0 and -inf:
                tanh attention cannot add arbitrary values to its scores. Combined with
                ``key_padding_mask`` (and ``is_causal``) the allowed pairs intersect.
            average_attn_weights: return the weights averaged over heads, else per head.
            is_causal: apply the causal mask (query ``i`` attends to keys ``j <= i``, top-left
                aligned). Unlike ``nn.MultiheadAttention``, ``attn_mask`` is not required; if
                it is given too, the two intersect (equal to either when it is the causal
                mask). The key added by ``add_bias_kv`` / ``add_zero_attn`` stays visible.

        Returns:
            ``(output, weights)``: ``output`` shaped like ``query`` with ``E`` features;
            ``weights`` (dropout applied, as in torch) of shape ``(N, L, S')`` averaged or
            ``(N, num_heads, L, S')`` per head (no ``N`` when unbatched), where ``S'`` counts
            the keys added by ``add_bias_kv`` and ``add_zero_attn``; None when
            ``need_weights`` is False. Masked weights are exactly 0.

        Raises:
            TypeError: a non-tensor or NestedTensor input, a dtype other than the
                parameters', a mask that is neither bool nor float, a non-bool flag.
            ValueError: wrong ranks or feature sizes, mismatched batch or sequence sizes,
                a mask of the wrong shape, a float mask with values other than 0 and -inf
                (under ``torch.compile`` that last check is a runtime assertion that raises
                RuntimeError).
        """
        # --- validate everything before any work
        batched = self._validate_inputs(query, key, value)
        self_attention = query is key and key is value  # before the layout changes below
        _check_bool(_FWD, "need_weights", need_weights)
        _check_bool(_FWD, "average_attn_weights", average_attn_weights)
        _check_bool(_FWD, "is_causal", is_causal)
        attn_mask = self._validate_mask_dtype("attn_mask", attn_mask)
        key_padding_mask = self._validate_mask_dtype("key_padding_mask", key_padding_mask)

        # --- work batch-first: (N, L, E)
        if not batched:
            query, key, value = query.unsqueeze(0), key.unsqueeze(0), value.unsqueeze(0)
        elif not self.batch_first:
            query, key, value = query.transpose(0, 1), key.transpose(0, 1), value.transpose(0, 1)
        n_batch, tgt_len, _ = query.shape
        src_len = key.shape[1]
        keep, mask_is_causal = self._keep_mask(
            attn_mask, key_padding_mask, batched, n_batch, tgt_len, src_len
        )
        is_causal = is_causal or mask_is_causal

        # --- projections, extra keys, heads
        h, hd = self.num_heads, self.head_dim
        if self._packed(self_attention):
            q, k, v = self._packed_heads(query, n_batch, tgt_len)
        else:
            q, k, v = self._heads(*self._in_projection(query, key, value), n_batch, tgt_len)
        if self.add_zero_attn:
            k = torch.cat([k, k.new_zeros(n_batch, h, 1, hd)], dim=2)
            v = torch.cat([v, v.new_zeros(n_batch, h, 1, hd)], dim=2)
        total_len = k.shape[2]
        extra = total_len - src_len  # keys added by bias_kv / zero_attn: always visible
        if keep is not None and extra:
            keep = F.pad(keep, (0, extra), value=True)

        causal = False
        if is_causal:
            if extra == 0:
                causal = True  # the operator's own causal flag
            else:
                rows = torch.arange(tgt_len, device=q.device).unsqueeze(1)
                cols = torch.arange(total_len, device=q.device)
                causal_keep = (cols <= rows) | (cols >= src_len)
                keep = causal_keep if keep is None else keep & causal_keep

        # Dropout runs inside the operator: its mask is made from a seed, block by block, so
        # the memory-efficient path (need_weights=False) stores nothing of L x S.
        o, a = attn(
            q,
            k,
            v,
            scale=self.scale,
            causal=causal,
            need_weights=need_weights,
            attn_mask=keep,
            dropout_p=self.dropout if self.training else 0.0,
        )

        # --- merge heads, output projection, back to the input layout
        # As nn.MultiheadAttention, the output projection's parameters, not its module.
        merged = o.transpose(1, 2).reshape(n_batch, tgt_len, self.embed_dim)
        out = linear(merged, self.out_proj.weight, self.out_proj.bias)
        if not batched:
            out = out.squeeze(0)
        elif not self.batch_first:
            out = out.transpose(0, 1)
        if a is None:
            return out, None
        if average_attn_weights:
            a = a.mean(dim=1)
        if not batched:
            a = a.squeeze(0)
        return out, a
