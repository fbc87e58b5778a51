"""HuggingFace transformers with ``attn_implementation="tanh"``: tiny models from configs
(random weights, no downloads) against a plain float64 reference attention registered the
same way, written here from the definition."""

from __future__ import annotations

from typing import Any

import pytest
import torch
import transformers  # pinned in requirements-dev.txt (the [transformers] extra)

from tanh_attention.integrations.transformers import register

F64 = torch.float64
NAME = register("tanh")


def _reference_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    is_causal: bool | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, torch.Tensor]:
    groups = getattr(module, "num_key_value_groups", 1)
    k, v = key.repeat_interleave(groups, 1), value.repeat_interleave(groups, 1)
    scale = query.shape[-1] ** -0.5 if scaling is None else scaling
    s = query @ k.mT * scale
    n, m = s.shape[-2:]
    keep = torch.ones(n, m, dtype=torch.bool)
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    if n > 1 and attention_mask is None and causal:
        keep = keep.tril()
    if attention_mask is not None:
        if attention_mask.dtype == torch.bool:
            keep = keep & attention_mask
        else:
            taking = attention_mask > torch.finfo(attention_mask.dtype).min
            keep = keep & taking
            s = s + torch.where(taking, attention_mask, torch.zeros((), dtype=s.dtype))
    a = torch.tanh(torch.where(keep, s, torch.zeros((), dtype=s.dtype)))
    if dropout > 0:
        a = torch.nn.functional.dropout(a, dropout)
    return (a @ v).transpose(1, 2).contiguous(), a


transformers.AttentionInterface.register("tanh_reference", _reference_attention)
transformers.masking_utils.AttentionMaskInterface.register(
    "tanh_reference", transformers.masking_utils.sdpa_mask
)


def _llama(kv_heads: int = 2, impl: str = NAME) -> Any:
    config = transformers.LlamaConfig(
        vocab_size=97,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=kv_heads,
        max_position_embeddings=64,
        attn_implementation=impl,
    )
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(config).to(F64).eval()


def _pair(make: Any, **kwargs: Any) -> tuple[Any, Any]:
    ours = make(impl=NAME, **kwargs)
    ref = make(impl="tanh_reference", **kwargs)
    ref.load_state_dict(ours.state_dict())
    return ours, ref


def _close(got: Any, want: Any) -> None:
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("kv_heads", [4, 2, 1], ids=["mha", "gqa", "mqa"])
def test_llama_logits_with_left_padding(kv_heads: int) -> None:
    ours, ref = _pair(_llama, kv_heads=kv_heads)
    ids = torch.randint(0, 97, (2, 7))
    mask = torch.ones(2, 7, dtype=torch.long)
    mask[0, :3] = 0  # left padding
    got = ours(input_ids=ids, attention_mask=mask).logits
    want = ref(input_ids=ids, attention_mask=mask).logits
    _close(got[mask.bool()], want[mask.bool()])
    _close(ours(input_ids=ids).logits, ref(input_ids=ids).logits)


def test_llama_output_attentions() -> None:
    ours, ref = _pair(_llama)
    ids = torch.randint(0, 97, (2, 6))
    got = ours(input_ids=ids, output_attentions=True).attentions
    want = ref(input_ids=ids, output_attentions=True).attentions
    assert len(got) == 2 and got[0].shape == (2, 4, 6, 6)
    _close(got, want)


def test_user_4d_additive_mask() -> None:
    ours, ref = _pair(_llama)
    ids = torch.randint(0, 97, (1, 5))
    low = torch.finfo(F64).min
    bias = torch.randn(1, 1, 5, 5, dtype=F64).masked_fill(torch.ones(5, 5).triu(1).bool(), low)
    _close(
        ours(input_ids=ids, attention_mask=bias).logits,
        ref(input_ids=ids, attention_mask=bias).logits,
    )


@pytest.mark.parametrize("cache", ["dynamic", "static"])
def test_generate_with_cache_equals_recomputation(cache: str) -> None:
    model = _llama()
    ids = torch.randint(0, 97, (2, 4))
    out = model.generate(
        ids,
        max_new_tokens=5,
        do_sample=False,
        cache_implementation=cache,
        pad_token_id=0,
    )
    seq = ids
    for _ in range(5):  # no cache: the whole sequence again for every token
        logits = model(input_ids=seq, use_cache=False).logits[:, -1]
        seq = torch.cat([seq, logits.argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(out, seq)


def test_gradients_of_every_parameter_and_training() -> None:
    ours, ref = _pair(_llama)
    ours.train()
    ref.train()
    ids = torch.randint(0, 97, (2, 6))
    for model in (ours, ref):
        model(input_ids=ids, labels=ids).loss.backward()
    for (name, p), (_, p_ref) in zip(ours.named_parameters(), ref.named_parameters(), strict=True):
        assert p.grad is not None, name
        _close(p.grad, p_ref.grad)
    opt = torch.optim.SGD(ours.parameters(), lr=0.5)
    losses = []
    for _ in range(5):
        opt.zero_grad()
        loss = ours(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]


def test_dropout_in_train_mode() -> None:
    config = transformers.LlamaConfig(
        vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
        num_attention_heads=4, num_key_value_heads=2, attention_dropout=0.5,
        attn_implementation=NAME,
    )  # fmt: skip
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).to(F64)
    ids = torch.randint(0, 97, (1, 6))
    model.train()
    torch.manual_seed(1)
    a = model(input_ids=ids).logits
    torch.manual_seed(1)
    b = model(input_ids=ids).logits
    c = model(input_ids=ids).logits
    assert torch.equal(a, b) and not torch.equal(a, c)
    model.eval()
    assert torch.equal(model(input_ids=ids).logits, model(input_ids=ids).logits)


def _gpt2(impl: str) -> Any:
    config = transformers.GPT2Config(
        vocab_size=97, n_positions=32, n_embd=32, n_layer=2, n_head=4, attn_implementation=impl
    )
    torch.manual_seed(0)
    return transformers.GPT2LMHeadModel(config).to(F64).eval()


def _bert(impl: str) -> Any:
    config = transformers.BertConfig(
        vocab_size=97, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=64, max_position_embeddings=32, attn_implementation=impl,
    )  # fmt: skip
    torch.manual_seed(0)
    return transformers.BertModel(config).to(F64).eval()


@pytest.mark.parametrize("make", [_gpt2, _bert], ids=["gpt2", "bert"])
def test_gpt2_and_bert(make: Any) -> None:
    ours, ref = make(NAME), make("tanh_reference")
    ref.load_state_dict(ours.state_dict())
    ids = torch.randint(0, 97, (2, 6))
    mask = torch.ones(2, 6, dtype=torch.long)
    mask[1, 4:] = 0  # right padding
    got = ours(input_ids=ids, attention_mask=mask)
    want = ref(input_ids=ids, attention_mask=mask)
    key = "logits" if "logits" in got else "last_hidden_state"
    _close(got[key][mask.bool()], want[key][mask.bool()])


def test_register_refuses_bad_names() -> None:
    with pytest.raises(TypeError, match="name"):
        register("")


def test_models_really_call_tanh_attention(monkeypatch: pytest.MonkeyPatch) -> None:
    import tanh_attention.integrations.transformers as integration

    calls: list[tuple[int, ...]] = []
    real = integration._sdpa

    def counting(query: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        calls.append(tuple(query.shape))
        return real(query, *args, **kwargs)

    monkeypatch.setattr(integration, "_sdpa", counting)
    model = _llama()
    ids = torch.randint(0, 97, (2, 5))
    tanh_logits = model(input_ids=ids).logits
    assert calls == [(2, 4, 5, 8)] * 2  # two layers, (b, h, n, d)
    model.set_attn_implementation("sdpa")
    assert not torch.allclose(model(input_ids=ids).logits, tanh_logits)
