"""Tests of ``tanh_attention.nn.MultiheadTanhAttention``.

The module is compared, forward and backward, with ``reference_mha`` below: a plain-PyTorch
re-implementation of the same layer written the way ``torch.nn.functional.
multi_head_attention_forward`` is (sequence-first, heads folded into the batch as
``N * num_heads``), sharing no code with the package. The reference's plumbing (projections,
bias_kv, zero_attn, head split, masks, averaging) is itself checked against
``torch.nn.MultiheadAttention`` by running it with softmax instead of tanh.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from typing import Any
from unittest import mock

import pytest
import torch
from torch import Tensor, nn

import tanh_attention.nn as tnn
from tanh_attention.nn import MultiheadTanhAttention

F64 = torch.float64


@pytest.fixture(autouse=True, scope="module")
def _one_thread() -> Any:
    """The shapes here are tiny: one thread is fastest, and on a busy machine torch's
    default thread pool makes these tests several times slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# --------------------------------------------------------------------------------------------
# The independent reference
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Config:
    batch_first: bool
    batched: bool
    kvdim: bool  # kdim/vdim different from embed_dim (separate projection weights)
    bias: bool
    add_bias_kv: bool
    add_zero_attn: bool
    embed_dim: int = 6
    num_heads: int = 2
    n: int = 2  # batch
    tgt_len: int = 3
    src_len: int = 4

    @property
    def kdim(self) -> int:
        return 5 if self.kvdim else self.embed_dim

    @property
    def vdim(self) -> int:
        return 7 if self.kvdim else self.embed_dim

    def module_kwargs(self) -> dict[str, Any]:
        return {
            "bias": self.bias,
            "add_bias_kv": self.add_bias_kv,
            "add_zero_attn": self.add_zero_attn,
            "kdim": self.kdim,
            "vdim": self.vdim,
            "batch_first": self.batch_first,
            "dtype": F64,
        }

    def inputs(self, gen: torch.Generator) -> tuple[Tensor, Tensor, Tensor]:
        def make(length: int, feat: int) -> Tensor:
            if not self.batched:
                shape: tuple[int, ...] = (length, feat)
            elif self.batch_first:
                shape = (self.n, length, feat)
            else:
                shape = (length, self.n, feat)
            return torch.randn(shape, generator=gen, dtype=F64).requires_grad_()

        return (
            make(self.tgt_len, self.embed_dim),
            make(self.src_len, self.kdim),
            make(self.src_len, self.vdim),
        )


def reference_mha(
    params: dict[str, Tensor],
    num_heads: int,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    *,
    batch_first: bool,
    add_zero_attn: bool,
    scale: float,
    key_padding_mask: Tensor | None = None,
    attn_mask: Tensor | None = None,
    is_causal: bool = False,
    average_attn_weights: bool = True,
    dropout_keep: Tensor | None = None,
    dropout_p: float = 0.0,
    kind: str = "tanh",
) -> tuple[Tensor, Tensor]:
    """Multi-head attention written out term by term (bool masks: True = not allowed).

    ``kind="tanh"``: weights ``tanh(scale * q k^T)`` with disallowed entries set to 0.
    ``kind="softmax"``: ``softmax`` of the scores with disallowed entries at -inf (what
    ``nn.MultiheadAttention`` computes, used to check this function's plumbing).
    ``dropout_keep``: optional ``(N, H, L, S')`` bool tensor of weights kept by dropout.
    """
    batched = query.dim() == 3
    if not batched:
        query, key, value = query.unsqueeze(1), key.unsqueeze(1), value.unsqueeze(1)
        if key_padding_mask is not None:
            key_padding_mask = key_padding_mask.unsqueeze(0)
    elif batch_first:
        query, key, value = query.transpose(0, 1), key.transpose(0, 1), value.transpose(0, 1)
    tgt_len, n, embed = query.shape
    src_len = key.shape[0]
    head_dim = embed // num_heads

    if "in_proj_weight" in params:
        w_q, w_k, w_v = params["in_proj_weight"].chunk(3)
    else:
        w_q, w_k, w_v = params["q_proj_weight"], params["k_proj_weight"], params["v_proj_weight"]
    q = query @ w_q.T
    k = key @ w_k.T
    v = value @ w_v.T
    if "in_proj_bias" in params:
        b_q, b_k, b_v = params["in_proj_bias"].chunk(3)
        q, k, v = q + b_q, k + b_k, v + b_v

    # disallowed pairs, (N * H, L, S), index n * H + h as in torch
    bad = torch.zeros(n * num_heads, tgt_len, src_len, dtype=torch.bool)
    if attn_mask is not None:
        bad = bad | attn_mask
    if key_padding_mask is not None:
        bad = bad | key_padding_mask.repeat_interleave(num_heads, dim=0)[:, None, :]
    if is_causal:
        bad = bad | torch.ones(tgt_len, src_len, dtype=torch.bool).triu(1)

    if "bias_k" in params:
        k = torch.cat([k, params["bias_k"].repeat(1, n, 1)])
        v = torch.cat([v, params["bias_v"].repeat(1, n, 1)])
        bad = torch.cat([bad, torch.zeros(n * num_heads, tgt_len, 1, dtype=torch.bool)], -1)
    q = q.reshape(tgt_len, n * num_heads, head_dim).transpose(0, 1)
    k = k.reshape(k.shape[0], n * num_heads, head_dim).transpose(0, 1)
    v = v.reshape(v.shape[0], n * num_heads, head_dim).transpose(0, 1)
    if add_zero_attn:
        k = torch.cat([k, torch.zeros(n * num_heads, 1, head_dim, dtype=k.dtype)], 1)
        v = torch.cat([v, torch.zeros(n * num_heads, 1, head_dim, dtype=v.dtype)], 1)
        bad = torch.cat([bad, torch.zeros(n * num_heads, tgt_len, 1, dtype=torch.bool)], -1)

    scores = torch.bmm(q, k.transpose(1, 2)) * scale
    if kind == "tanh":
        w = torch.where(bad, torch.zeros_like(scores), torch.tanh(scores))
    else:
        w = torch.softmax(scores.masked_fill(bad, float("-inf")), dim=-1)
    if dropout_keep is not None:
        w = w * dropout_keep.reshape(w.shape) / (1 - dropout_p)
    o = torch.bmm(w, v).transpose(0, 1).reshape(tgt_len, n, embed)
    out = o @ params["out_proj.weight"].T
    if "out_proj.bias" in params:
        out = out + params["out_proj.bias"]
    w = w.reshape(n, num_heads, tgt_len, w.shape[-1])
    if average_attn_weights:
        w = w.mean(dim=1)
    if not batched:
        out, w = out.squeeze(1), w.squeeze(0)
    elif batch_first:
        out = out.transpose(0, 1)
    return out, w


def _masks(
    cfg: Config, gen: torch.Generator, kpm: bool, mask_kind: str
) -> tuple[Tensor | None, Tensor | None]:
    """Random bool masks (True = not allowed) that never hide key 0 (no empty softmax row)."""
    key_padding_mask = None
    if kpm:
        shape = (cfg.n, cfg.src_len) if cfg.batched else (cfg.src_len,)
        key_padding_mask = torch.rand(shape, generator=gen) < 0.4
        key_padding_mask[..., 0] = False
    attn_mask = None
    if mask_kind != "none":
        heads = (cfg.n if cfg.batched else 1) * cfg.num_heads
        shape = (
            (cfg.tgt_len, cfg.src_len) if mask_kind == "2d" else (heads, cfg.tgt_len, cfg.src_len)
        )
        attn_mask = torch.rand(shape, generator=gen) < 0.4
        attn_mask[..., 0] = False
    return key_padding_mask, attn_mask


CONFIGS = [
    Config(*flags)
    for flags in itertools.product([False, True], repeat=6)
    if flags[1] or not flags[0]  # batch_first has no meaning for unbatched input
]
CALLS = [
    (kpm, mask_kind, is_causal, need_weights, average)
    for kpm, mask_kind, is_causal in itertools.product(
        [False, True], ["none", "2d", "3d"], [False, True]
    )
    for need_weights, average in [(False, True), (True, True), (True, False)]
]


def _grads(out: Tensor, w: Tensor | None, inputs: list[Tensor], gen: torch.Generator) -> list:
    """Gradients of a random linear function of the outputs (same draw for the same seed).

    ``torch.randn(shape)``, not ``randn_like``: the latter copies strides, so the same draw
    would land on other elements of a transposed output.
    """
    loss = (out * torch.randn(out.shape, generator=gen, dtype=out.dtype)).sum()
    if w is not None:
        loss = loss + (w * torch.randn(w.shape, generator=gen, dtype=w.dtype)).sum()
    return list(torch.autograd.grad(loss, inputs, allow_unused=True))


@pytest.mark.parametrize(
    "cfg",
    CONFIGS,
    ids=lambda c: "-".join(name for name, on in dataclasses.asdict(c).items() if on is True)
    or "plain",
)
def test_matches_reference_term_by_term(cfg: Config) -> None:
    """Forward and every gradient match the reference on every combination of arguments."""
    mha = MultiheadTanhAttention(cfg.embed_dim, cfg.num_heads, **cfg.module_kwargs())
    params = dict(mha.named_parameters())
    gen = torch.Generator().manual_seed(1234)
    for kpm, mask_kind, is_causal, need_weights, average in CALLS:
        query, key, value = cfg.inputs(gen)
        key_padding_mask, attn_mask = _masks(cfg, gen, kpm, mask_kind)
        call = f"{cfg} kpm={kpm} mask={mask_kind} causal={is_causal} need_weights={need_weights}"
        out, w = mha(
            query,
            key,
            value,
            key_padding_mask=key_padding_mask,
            need_weights=need_weights,
            attn_mask=attn_mask,
            average_attn_weights=average,
            is_causal=is_causal,
        )
        ref_out, ref_w = reference_mha(
            params,
            cfg.num_heads,
            query,
            key,
            value,
            batch_first=cfg.batch_first,
            add_zero_attn=cfg.add_zero_attn,
            scale=1 / math.sqrt(cfg.embed_dim // cfg.num_heads),
            key_padding_mask=key_padding_mask,
            attn_mask=attn_mask,
            is_causal=is_causal,
            average_attn_weights=average,
        )
        torch.testing.assert_close(out, ref_out, msg=lambda m, c=call: f"output, {c}: {m}")
        if need_weights:
            assert w is not None
            torch.testing.assert_close(w, ref_w, msg=lambda m, c=call: f"weights, {c}: {m}")
        else:
            assert w is None
        inputs = [query, key, value, *params.values()]
        seed = int(torch.randint(0, 2**31, (1,), generator=gen))
        got = _grads(out, w, inputs, torch.Generator().manual_seed(seed))
        want = _grads(
            ref_out, ref_w if need_weights else None, inputs, torch.Generator().manual_seed(seed)
        )
        names = ["query", "key", "value", *params]
        for name, g, r in zip(names, got, want, strict=True):
            assert g is not None and r is not None, name
            torch.testing.assert_close(g, r, msg=lambda m, c=call, n=name: f"grad {n}, {c}: {m}")


@pytest.mark.parametrize("cfg", CONFIGS[::3])
def test_reference_matches_torch_with_softmax(cfg: Config) -> None:
    """The reference's plumbing equals nn.MultiheadAttention's when it uses softmax."""
    torch_mha = nn.MultiheadAttention(cfg.embed_dim, cfg.num_heads, **cfg.module_kwargs())
    params = dict(torch_mha.named_parameters())
    gen = torch.Generator().manual_seed(99)
    for kpm, mask_kind, is_causal, need_weights, average in CALLS:
        query, key, value = cfg.inputs(gen)
        key_padding_mask, attn_mask = _masks(cfg, gen, kpm, mask_kind)
        torch_mask = attn_mask
        if is_causal:  # torch needs the causal mask itself; is_causal is only a hint there
            causal = torch.ones(cfg.tgt_len, cfg.src_len, dtype=torch.bool).triu(1)
            torch_mask = causal if attn_mask is None else attn_mask | causal
        out, w = torch_mha(
            query,
            key,
            value,
            key_padding_mask=key_padding_mask,
            need_weights=need_weights,
            attn_mask=torch_mask,
            average_attn_weights=average,
        )
        ref_out, ref_w = reference_mha(
            params,
            cfg.num_heads,
            query,
            key,
            value,
            batch_first=cfg.batch_first,
            add_zero_attn=cfg.add_zero_attn,
            scale=1 / math.sqrt(cfg.embed_dim // cfg.num_heads),
            key_padding_mask=key_padding_mask,
            attn_mask=attn_mask,
            is_causal=is_causal,
            average_attn_weights=average,
            kind="softmax",
        )
        torch.testing.assert_close(out, ref_out)
        if need_weights:
            torch.testing.assert_close(w, ref_w)


# --------------------------------------------------------------------------------------------
# Scale, float masks, dropout, the memory-efficient path
# --------------------------------------------------------------------------------------------


def _self_attn_setup(
    **kwargs: Any,
) -> tuple[MultiheadTanhAttention, Tensor]:
    mha = MultiheadTanhAttention(8, 2, batch_first=True, dtype=F64, **kwargs)
    x = torch.randn(2, 5, 8, dtype=F64, requires_grad=True)
    return mha, x


def test_scale_argument() -> None:
    mha, x = _self_attn_setup(scale=0.7)
    assert mha.scale == 0.7
    out, w = mha(x, x, x)
    ref_out, ref_w = reference_mha(
        dict(mha.named_parameters()),
        2,
        x,
        x,
        x,
        batch_first=True,
        add_zero_attn=False,
        scale=0.7,
    )
    torch.testing.assert_close(out, ref_out)
    torch.testing.assert_close(w, ref_w)
    default = MultiheadTanhAttention(12, 3)
    assert default.scale == pytest.approx(1 / math.sqrt(4))


def test_float_masks_of_zero_and_minus_inf_equal_bool_masks() -> None:
    mha, x = _self_attn_setup()
    bool_mask = torch.rand(5, 5) < 0.3
    bool_kpm = torch.tensor([[False, True, False, False, True], [False] * 5])
    inf = float("-inf")
    float_mask = torch.zeros(5, 5, dtype=F64).masked_fill(bool_mask, inf)
    float_kpm = torch.zeros(2, 5, dtype=torch.float32).masked_fill(bool_kpm, inf)
    got = mha(x, x, x, attn_mask=float_mask, key_padding_mask=float_kpm)
    want = mha(x, x, x, attn_mask=bool_mask, key_padding_mask=bool_kpm)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    ref = reference_mha(
        dict(mha.named_parameters()),
        2,
        x,
        x,
        x,
        batch_first=True,
        add_zero_attn=False,
        scale=0.5,
        attn_mask=bool_mask,
        key_padding_mask=bool_kpm,
    )
    torch.testing.assert_close(got, ref)


@pytest.mark.parametrize("name", ["attn_mask", "key_padding_mask"])
@pytest.mark.parametrize("bad_value", [-1e9, 1.0, float("nan")])
def test_other_float_masks_are_refused(name: str, bad_value: float) -> None:
    mha, x = _self_attn_setup()
    mask = torch.zeros((5, 5) if name == "attn_mask" else (2, 5), dtype=F64)
    mask[0, 1] = bad_value
    with pytest.raises(ValueError, match=rf"float '{name}'.*tanh\(-inf\) is -1"):
        mha(x, x, x, **{name: mask})


def test_dropout_zeroes_weights_and_rescales() -> None:
    p = 0.3
    mha = MultiheadTanhAttention(8, 2, dropout=p, batch_first=True, dtype=F64)
    x = torch.randn(2, 40, 8, dtype=F64)
    mask = torch.rand(40, 40) < 0.2
    params = dict(mha.named_parameters())

    torch.manual_seed(5)
    out, w = mha(x, x, x, attn_mask=mask, average_attn_weights=False)
    assert w is not None
    kept = w != 0  # tanh of a random score is never exactly 0
    allowed = ~mask.expand_as(kept)
    assert not (kept & ~allowed).any()
    dropped_fraction = (~kept & allowed).sum() / allowed.sum()
    assert abs(float(dropped_fraction) - p) < 0.03
    ref_out, ref_w = reference_mha(
        params,
        2,
        x,
        x,
        x,
        batch_first=True,
        add_zero_attn=False,
        scale=0.5,
        attn_mask=mask,
        average_attn_weights=False,
        dropout_keep=kept,
        dropout_p=p,
    )
    torch.testing.assert_close(out, ref_out)
    torch.testing.assert_close(w, ref_w)

    torch.manual_seed(5)  # same draw: the memory-efficient path drops the same weights
    out_no_w, none = mha(x, x, x, attn_mask=mask, need_weights=False)
    assert none is None
    torch.testing.assert_close(out_no_w, ref_out)

    mha.eval()  # no dropout in eval mode
    out_eval, _ = mha(x, x, x, attn_mask=mask)
    ref_eval, _ = reference_mha(
        params, 2, x, x, x, batch_first=True, add_zero_attn=False, scale=0.5, attn_mask=mask
    )
    torch.testing.assert_close(out_eval, ref_eval)


def test_need_weights_false_calls_the_memory_efficient_path(monkeypatch: Any) -> None:
    calls: list[dict[str, Any]] = []
    real = tnn.attn

    def spy(*args: Any, **kwargs: Any) -> Any:
        calls.append(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(tnn, "attn", spy)
    mha, x = _self_attn_setup()
    mha(x, x, x, need_weights=False)
    mha(x, x, x)
    assert [c["need_weights"] for c in calls] == [False, True]


def test_fully_masked_row_gives_bias_only_not_nan() -> None:
    mha, x = _self_attn_setup()
    mask = torch.zeros(5, 5, dtype=torch.bool)
    mask[2] = True
    out, w = mha(x, x, x, attn_mask=mask)
    assert w is not None and torch.isfinite(out).all()
    assert (w[:, 2] == 0).all()
    torch.testing.assert_close(out[:, 2], mha.out_proj.bias.expand(2, 8))


# --------------------------------------------------------------------------------------------
# State dict and the one-line swap
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs",
    [
        {},
        {"bias": False},
        {"kdim": 3, "vdim": 5},
        {"add_bias_kv": True, "add_zero_attn": True, "kdim": 3},
    ],
)
def test_state_dict_round_trips_with_torch(kwargs: dict[str, Any]) -> None:
    torch_mha = nn.MultiheadAttention(8, 2, **kwargs)
    ours = MultiheadTanhAttention(8, 2, **kwargs)
    theirs_sd = torch_mha.state_dict()
    ours_sd = ours.state_dict()
    assert {k: v.shape for k, v in ours_sd.items()} == {k: v.shape for k, v in theirs_sd.items()}
    ours.load_state_dict(theirs_sd)  # strict: raises on any missing or unexpected key
    for name, value in theirs_sd.items():
        assert torch.equal(ours.state_dict()[name], value)
    back = nn.MultiheadAttention(8, 2, **kwargs)
    back.load_state_dict(ours.state_dict())


class _TinyModel(nn.Module):
    """A user's model: embedding, one self-attention with a residual, a head."""

    def __init__(self, attention: type[nn.Module]) -> None:
        super().__init__()
        self.embed = nn.Embedding(10, 8)
        self.attn = attention(8, 2, batch_first=True)  # the line that is swapped
        self.head = nn.Linear(8, 10)

    def forward(self, tokens: Tensor, padding: Tensor) -> Tensor:
        x = self.embed(tokens)
        y, _ = self.attn(x, x, x, key_padding_mask=padding, need_weights=False)
        return self.head(x + y)


def test_one_line_swap_in_a_model() -> None:
    softmax_model = _TinyModel(nn.MultiheadAttention).double()
    tanh_model = _TinyModel(MultiheadTanhAttention).double()
    tanh_model.load_state_dict(softmax_model.state_dict())
    tokens = torch.randint(0, 10, (3, 6))
    padding = torch.zeros(3, 6, dtype=torch.bool)
    padding[0, 4:] = True
    logits = tanh_model(tokens, padding)
    x = tanh_model.embed(tokens)
    y, _ = reference_mha(
        dict(tanh_model.attn.named_parameters()),
        2,
        x,
        x,
        x,
        batch_first=True,
        add_zero_attn=False,
        scale=0.5,
        key_padding_mask=padding,
    )
    torch.testing.assert_close(logits, tanh_model.head(x + y))
    logits.sum().backward()
    assert all(p.grad is not None for p in tanh_model.parameters())


def test_torch_transformer_layer_does_not_bypass_the_module() -> None:
    """nn.TransformerEncoderLayer's fused softmax fast path must not run our weights."""
    layer = nn.TransformerEncoderLayer(8, 2, dim_feedforward=16, dropout=0.0, batch_first=True)
    layer.self_attn = MultiheadTanhAttention(8, 2, batch_first=True)
    layer.eval()
    x = torch.randn(2, 5, 8)
    padding = torch.zeros(2, 5, dtype=torch.bool)
    padding[1, 3:] = True
    with_grad = layer(x, src_key_padding_mask=padding)  # slow path: calls our forward
    with torch.no_grad():  # would be the fused fast path for nn.MultiheadAttention
        without_grad = layer(x, src_key_padding_mask=padding)
    torch.testing.assert_close(without_grad, with_grad)


# --------------------------------------------------------------------------------------------
# torch.compile
# --------------------------------------------------------------------------------------------


def _compile_check(backend: str) -> None:
    torch._dynamo.reset()
    mha = MultiheadTanhAttention(8, 2, add_bias_kv=True, batch_first=True, dtype=F64)
    compiled = torch.compile(mha, fullgraph=True, backend=backend)
    x = torch.randn(2, 5, 8, dtype=F64, requires_grad=True)
    padding = torch.zeros(2, 5, dtype=F64)
    padding[0, 3:] = float("-inf")  # a float mask: checked by a runtime assertion
    mask = torch.rand(5, 5) < 0.3
    for need_weights in (True, False):
        kwargs = {
            "key_padding_mask": padding,
            "attn_mask": mask,
            "is_causal": True,
            "need_weights": need_weights,
        }
        out, w = compiled(x, x, x, **kwargs)
        want_out, want_w = mha(x, x, x, **kwargs)
        torch.testing.assert_close(out, want_out)
        if need_weights:
            torch.testing.assert_close(w, want_w)
        (g,) = torch.autograd.grad(out.square().sum(), x)
        (want_g,) = torch.autograd.grad(want_out.square().sum(), x)
        torch.testing.assert_close(g, want_g)
    padding[0, 0] = -1e9
    with pytest.raises(RuntimeError, match="only 0 and -inf"):
        compiled(x, x, x, key_padding_mask=padding)


def test_compile_fullgraph_aot_eager() -> None:
    _compile_check("aot_eager")


@pytest.mark.slow
def test_compile_fullgraph_inductor() -> None:
    _compile_check("inductor")


# --------------------------------------------------------------------------------------------
# Clear errors
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"embed_dim": 0}, ValueError, "'embed_dim' must be positive"),
        ({"embed_dim": 8.0}, TypeError, "'embed_dim' must be an int"),
        ({"num_heads": 3}, ValueError, "'embed_dim' must be divisible by 'num_heads'"),
        ({"num_heads": -1}, ValueError, "'num_heads' must be positive"),
        ({"dropout": 1.0}, ValueError, "'dropout' must be in"),
        ({"dropout": "0.1"}, TypeError, "'dropout' must be a float"),
        ({"bias": 1}, TypeError, "'bias' must be a bool"),
        ({"batch_first": None}, TypeError, "'batch_first' must be a bool"),
        ({"kdim": 0}, ValueError, "'kdim' must be positive"),
        ({"vdim": 2.5}, TypeError, "'vdim' must be an int"),
        ({"scale": float("inf")}, ValueError, "'scale' must be finite"),
        ({"scale": "1"}, TypeError, "'scale' must be a real number"),
    ],
)
def test_constructor_errors(kwargs: dict[str, Any], error: type, match: str) -> None:
    args = {"embed_dim": 8, "num_heads": 2, **kwargs}
    with pytest.raises(error, match=match):
        MultiheadTanhAttention(**args)


def _bad_calls() -> list[tuple[dict[str, Any], type, str]]:
    x = torch.randn(2, 5, 8)
    return [
        ({"query": [[1.0]]}, TypeError, "'query' must be a torch.Tensor"),
        ({"query": torch.randn(8)}, ValueError, "'query' to be 2-D"),
        ({"key": torch.randn(5, 8)}, ValueError, "'key' to be 3-D"),
        ({"query": torch.randn(2, 5, 7)}, ValueError, "'query' to have 8 features"),
        ({"value": torch.randn(2, 4, 8)}, ValueError, "'key' and 'value' to have the same"),
        ({"query": torch.randn(3, 5, 8)}, ValueError, "same batch size"),
        ({"query": x.double()}, TypeError, "'query' to have the parameters' dtype"),
        ({"attn_mask": torch.zeros(4, 5, dtype=torch.bool)}, ValueError, "'attn_mask' of shape"),
        ({"attn_mask": torch.zeros(2, 5, 5, dtype=torch.bool)}, ValueError, "'attn_mask' of"),
        ({"attn_mask": torch.zeros(5, 5, dtype=torch.int64)}, TypeError, "'attn_mask' to be a"),
        ({"attn_mask": [[True]]}, TypeError, "'attn_mask' must be a torch.Tensor"),
        (
            {"key_padding_mask": torch.zeros(5, dtype=torch.bool)},
            ValueError,
            "'key_padding_mask' of shape",
        ),
        (
            {"key_padding_mask": torch.zeros(2, 5, dtype=torch.uint8)},
            TypeError,
            "'key_padding_mask' to be a",
        ),
        ({"need_weights": 1}, TypeError, "'need_weights' must be a bool"),
        ({"is_causal": None}, TypeError, "'is_causal' must be a bool"),
        ({"average_attn_weights": "yes"}, TypeError, "'average_attn_weights' must be a bool"),
    ]


@pytest.mark.parametrize(("kwargs", "error", "match"), _bad_calls())
def test_forward_errors(kwargs: dict[str, Any], error: type, match: str) -> None:
    mha = MultiheadTanhAttention(8, 2, batch_first=True)
    x = torch.randn(2, 5, 8)
    call = {"query": x, "key": x, "value": x, **kwargs}
    with pytest.raises(error, match=match):
        mha(**call)


def test_nested_tensor_is_refused() -> None:
    mha = MultiheadTanhAttention(8, 2, batch_first=True)
    nt = torch.nested.nested_tensor([torch.randn(3, 8), torch.randn(4, 8)], layout=torch.jagged)
    with pytest.raises(TypeError, match="'query' is a nested tensor"):
        mha(nt, nt, nt)


@pytest.mark.parametrize("is_causal", [False, True])
@pytest.mark.parametrize("batch_first", [False, True])
@pytest.mark.parametrize("mask_kind", ["none", "causal", "random"])
def test_self_attention_packed_projection(
    batch_first: bool, mask_kind: str, is_causal: bool
) -> None:
    """One tensor as query, key and value takes the packed projection (one product, one
    layout copy), and an attn_mask that is exactly the causal mask (with is_causal or not)
    is replaced by the causal flag: both give the reference's outputs and gradients."""
    torch.manual_seed(7)
    mha = MultiheadTanhAttention(8, 2, batch_first=batch_first, dtype=torch.float64)
    params = dict(mha.named_parameters())
    x = torch.randn(3, 5, 8, dtype=torch.float64, requires_grad=True)
    if not batch_first:
        x = x.detach().transpose(0, 1).requires_grad_()
    masks = {
        "none": None,
        "causal": torch.ones(5, 5, dtype=torch.bool).triu(1),
        "random": torch.rand(5, 5) < 0.3,
    }
    attn_mask = masks[mask_kind]
    seen: dict[str, list] = {"linear": [], "attn_mask": []}
    real_linear, real_attn = tnn.F.linear, tnn.attn

    def linear(*args: Any, **kwargs: Any) -> Tensor:
        seen["linear"].append(args[1].shape)
        return real_linear(*args, **kwargs)

    def attn(*args: Any, **kwargs: Any) -> Any:
        seen["attn_mask"].append(kwargs["attn_mask"])
        return real_attn(*args, **kwargs)

    with (
        mock.patch.object(tnn.F, "linear", linear),
        mock.patch.object(tnn, "attn", attn),
    ):
        out, _ = mha(x, x, x, attn_mask=attn_mask, is_causal=is_causal, need_weights=False)
    assert seen["linear"] == [(24, 8), (8, 8)]  # the packed in-projection, the out-projection
    assert (seen["attn_mask"][0] is None) == (mask_kind != "random")
    ref, _ = reference_mha(
        params,
        2,
        x,
        x,
        x,
        batch_first=batch_first,
        add_zero_attn=False,
        scale=0.5,
        attn_mask=attn_mask,
        is_causal=is_causal,
    )
    torch.testing.assert_close(out, ref)
    inputs = [x, *params.values()]
    cotangent = torch.randn(out.shape, dtype=out.dtype)
    got = torch.autograd.grad((out * cotangent).sum(), inputs)
    want = torch.autograd.grad((ref * cotangent).sum(), inputs)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w)
