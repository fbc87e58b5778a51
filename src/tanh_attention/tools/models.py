"""The task and the model behind ``tanh-attention train``.

- :class:`RecallTask`: multi-query associative recall, generated on the fly from a seed.
- :class:`RecallTransformer`: a small pre-norm causal Transformer whose attention module is a
  constructor argument, so the same model runs with tanh or softmax attention.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["AttentionFactory", "RecallTask", "RecallTransformer", "attention_factory"]

#: Builds an attention module from ``(embed_dim, num_heads)``; it is called like
#: ``nn.MultiheadAttention`` with ``batch_first=True`` inputs.
AttentionFactory = Callable[[int, int], nn.Module]

IGNORE = -100  # target of positions without a question (cross_entropy's ignore_index)


@dataclasses.dataclass(frozen=True)
class RecallTask:
    """Multi-query associative recall: read key-value pairs, then answer questions about them.

    A sequence is ``num_pairs`` pairs ``k_1 v_1 k_2 v_2 ...`` (distinct keys, values drawn
    with replacement), followed by ``seq_len - 2 * num_pairs`` query keys, each one of the
    sequence's keys. At a query position the target is the value paired with that key
    earlier in the same sequence. The pairs change with every sequence, so no weight can hold
    the answer: the model must find the matching key in its context, which takes attention
    (two layers in a causal model: one to attach each key to its value, one to look it up).

    Difficulty grows with ``num_pairs`` (more to store and more distractors) and with
    ``num_keys``/``num_values``; chance accuracy is ``1 / num_values``.

    Tokens: keys are ``0 .. num_keys - 1``, values ``num_keys .. num_keys + num_values - 1``.

    Args:
        seq_len: tokens per sequence ``L``.
        num_pairs: key-value pairs ``P`` per sequence, ``1 <= P`` and ``2P < L``
            (default ``L // 4``, which leaves ``L / 2`` questions).
        num_keys: size of the key alphabet (at least ``num_pairs``).
        num_values: size of the value alphabet.

    Raises:
        ValueError: sizes that do not fit as above.
    """

    seq_len: int = 32
    num_pairs: int = 0  # 0: seq_len // 4
    num_keys: int = 32
    num_values: int = 32

    def __post_init__(self) -> None:
        if self.num_pairs == 0:
            object.__setattr__(self, "num_pairs", self.seq_len // 4)
        for name in ("seq_len", "num_pairs", "num_keys", "num_values"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(
                    f"RecallTask: '{name}' must be a positive int, but got {name}={value!r}"
                    + (" (seq_len must be at least 3)." if name == "num_pairs" else ".")
                )
        if 2 * self.num_pairs >= self.seq_len:
            raise ValueError(
                f"RecallTask: 2 * num_pairs must be below seq_len to leave room for questions, "
                f"but got num_pairs={self.num_pairs} and seq_len={self.seq_len}."
            )
        if self.num_keys < self.num_pairs:
            raise ValueError(
                f"RecallTask: 'num_keys' must be at least num_pairs={self.num_pairs} "
                f"(keys are distinct in a sequence), but got num_keys={self.num_keys}."
            )

    @property
    def vocab_size(self) -> int:
        """Number of distinct tokens (keys then values)."""
        return self.num_keys + self.num_values

    @property
    def num_queries(self) -> int:
        """Questions per sequence."""
        return self.seq_len - 2 * self.num_pairs

    def sample(
        self, batch: int, generator: torch.Generator, device: torch.device | str = "cpu"
    ) -> tuple[Tensor, Tensor]:
        """Draw ``batch`` sequences with ``generator`` (a CPU generator; reproducible).

        Returns:
            ``(tokens, targets)``, both ``(batch, seq_len)`` int64 on ``device``: targets are
            the value tokens at query positions and ``-100`` (ignored) elsewhere.
        """
        p, q = self.num_pairs, self.num_queries
        keys = torch.rand(batch, self.num_keys, generator=generator).argsort(dim=1)[:, :p]
        values = torch.randint(self.num_values, (batch, p), generator=generator) + self.num_keys
        asked = torch.randint(p, (batch, q), generator=generator)
        tokens = torch.cat(
            [torch.stack([keys, values], dim=2).reshape(batch, 2 * p), keys.gather(1, asked)],
            dim=1,
        )
        targets = torch.cat(
            [torch.full((batch, 2 * p), IGNORE, dtype=torch.int64), values.gather(1, asked)],
            dim=1,
        )
        return tokens.to(device), targets.to(device)


class _Block(nn.Module):
    """Pre-norm block: ``x + attn(LN(x))``, then ``x + MLP(LN(x))``."""

    def __init__(self, d_model: int, num_heads: int, attention: AttentionFactory) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(d_model)
        self.attn = attention(d_model, num_heads)
        self.ln2 = nn.LayerNorm(d_model)
        self.mlp = nn.Sequential(
            nn.Linear(d_model, 4 * d_model), nn.GELU(), nn.Linear(4 * d_model, d_model)
        )

    def forward(self, x: Tensor, causal_mask: Tensor) -> Tensor:
        h = self.ln1(x)
        y, _ = self.attn(h, h, h, attn_mask=causal_mask, need_weights=False, is_causal=True)
        x = x + y
        return x + self.mlp(self.ln2(x))


class RecallTransformer(nn.Module):
    """A small pre-norm causal Transformer: embeddings, ``num_layers`` blocks, LayerNorm, head.

    The token shift (on by default) adds a learnt linear map of the previous position's
    embedding to each position's embedding, as the short convolutions of H3/Based or the
    token shift of RWKV do. It is the trick that lets tanh attention learn associative
    recall (``docs/training.md``): a tanh head cannot easily learn a purely positional
    "attend to the previous token only" pattern, because without softmax's normalisation
    every other position must get a score of exactly 0 to stay out; the shift hands each
    value its key, and attention is left with the content lookup, which it learns well.

    Args:
        vocab_size: number of tokens.
        seq_len: longest sequence (learnt absolute positions).
        attention: builds each block's attention from ``(d_model, num_heads)``; called with
            ``batch_first`` inputs like ``nn.MultiheadAttention`` (see :func:`attention_factory`).
        d_model: width.
        num_heads: heads per attention.
        num_layers: blocks.
        token_shift: add the learnt previous-token mix to the embeddings.

    Shapes:
        ``forward(tokens (N, L) int64) -> logits (N, L, vocab_size)``.
    """

    causal_mask: Tensor

    def __init__(
        self,
        vocab_size: int,
        seq_len: int,
        attention: AttentionFactory,
        *,
        d_model: int = 64,
        num_heads: int = 4,
        num_layers: int = 2,
        token_shift: bool = True,
    ) -> None:
        super().__init__()
        self.tok = nn.Embedding(vocab_size, d_model)
        self.pos = nn.Embedding(seq_len, d_model)
        self.shift = nn.Linear(d_model, d_model) if token_shift else None
        self.blocks = nn.ModuleList(
            _Block(d_model, num_heads, attention) for _ in range(num_layers)
        )
        self.ln = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, vocab_size)
        mask = torch.ones(seq_len, seq_len, dtype=torch.bool).triu(1)  # True = not allowed
        self.register_buffer("causal_mask", mask, persistent=False)

    def forward(self, tokens: Tensor) -> Tensor:
        n = tokens.shape[1]
        x = self.tok(tokens) + self.pos.weight[:n]
        if self.shift is not None:  # x_t += W x_{t-1} (+ b), with x_{-1} = 0
            x = x + self.shift(F.pad(x, (0, 0, 1, 0))[:, :-1])
        mask = self.causal_mask[:n, :n]
        for block in self.blocks:
            x = block(x, mask)
        return self.head(self.ln(x))


def attention_factory(kind: str, *, scale: float | None = None) -> AttentionFactory:
    """The attention module of one arm of the comparison.

    Args:
        kind: ``"tanh"`` (:class:`tanh_attention.nn.MultiheadTanhAttention`) or ``"softmax"``
            (``torch.nn.MultiheadAttention``).
        scale: score scale of the tanh attention (default ``1 / sqrt(head_dim)``).

    Raises:
        ValueError: an unknown ``kind``, or ``scale`` given with softmax.
    """
    if kind == "softmax":
        if scale is not None:
            raise ValueError("attention_factory: 'scale' applies to kind='tanh' only.")

        def softmax(d: int, h: int) -> nn.Module:
            return nn.MultiheadAttention(d, h, batch_first=True)

        return softmax
    if kind == "tanh":
        from ..nn import MultiheadTanhAttention

        def tanh(d: int, h: int) -> nn.Module:
            return MultiheadTanhAttention(d, h, batch_first=True, scale=scale)

        return tanh
    raise ValueError(f"attention_factory: 'kind' must be 'tanh' or 'softmax', but got {kind!r}.")
