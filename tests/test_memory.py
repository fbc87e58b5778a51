"""Memory claims, proved by recording every tensor created.

- The o-only path (``attn_lean``, and ``attn(..., need_weights=False)``) never allocates a
  tensor of ``n * m`` elements or more, in forward or in backward.
- The with-weights op's backward allocates at most one ``n x m`` temporary.

A TorchDispatchMode sees every aten op, also those run by the autograd engine. The ops' own
bodies run below the mode (a mode handles a custom op as one call), so for our ops the mode
runs the body itself (the CPU kernel registered for the op, i.e. the blockwise kernels) with
the mode still active, and sees its aten ops too.

The kernels' one-off heap hint (``kernels.memory.warm_heap``: an untouched 16 MiB buffer,
once per process, whatever the problem) runs before the recording, so that what is recorded
is what the call itself allocates.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch.autograd import forward_ad as fwAD
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

import tanh_attention
from tanh_attention import ops
from tanh_attention.kernels import blockwise, memory
from tanh_attention.kernels import cpu as cpu_kernels

# Large relative to the blocks, and not multiples of them.
N = 3 * blockwise.BLOCK_ROWS + 37
M = 3 * blockwise.BLOCK_COLS + 101
D, E = 8, 4

# The Python bodies of our ops' CPU kernels (a custom op's body is not dispatched through the
# mode): both op pairs, forward and backward.
_BODIES = {
    op._opoverload: op._backend_fns["cpu"]
    for pair in (ops.attn, ops.attn_lean)
    for op in (pair.forward, pair.backward)
}
assert torch.ops.tanh_attention.attn_lean_backward.default in _BODIES


@pytest.fixture(autouse=True)
def _warm_heap() -> None:
    memory.warm_heap()


def _storages(tree: Any) -> set[int]:
    return {
        t.untyped_storage().data_ptr() for t in tree_leaves(tree) if isinstance(t, torch.Tensor)
    }


class _Allocations(TorchDispatchMode):
    """Records the element count of every tensor an aten op creates.

    A tensor is created when its storage is none of the op's inputs' storages: views, in-place
    and ``out=`` results are not new memory.
    """

    def __init__(self) -> None:
        super().__init__()
        self.sizes: list[tuple[str, int]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        kwargs = kwargs or {}
        if func in _BODIES:
            with self:  # records the body's ops; its outputs are among them
                return _BODIES[func](*args, **kwargs)
        out = func(*args, **kwargs)
        old = _storages((args, kwargs))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in old:
                self.sizes.append((str(func), t.untyped_storage().nbytes() // t.element_size()))
        return out

    def at_least(self, count: int) -> list[tuple[str, int]]:
        return [(name, size) for name, size in self.sizes if size >= count]


def _inputs(dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, ...]:
    # q batched over heads, k and v shared (broadcast): (2, N, D), (M, D), (1, M, E)
    return (
        torch.randn(2, N, D, dtype=dtype).div_(4).requires_grad_(),
        torch.randn(M, D, dtype=dtype).requires_grad_(),
        torch.randn(1, M, E, dtype=dtype).requires_grad_(),
    )


def _lean_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, **kw: Any) -> torch.Tensor:
    return torch.ops.tanh_attention.attn_lean(q, k, v, kw.get("attn_mask"), 0.5, kw["causal"])


def _public(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, **kw: Any) -> torch.Tensor:
    o, a = tanh_attention.attn(q, k, v, scale=0.5, need_weights=False, **kw)
    assert a is None
    return o


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("causal", ["none", "top_left", "bottom_right"])
@pytest.mark.parametrize("entry", [_lean_op, _public], ids=["attn_lean", "public"])
def test_o_only_never_allocates_n_by_m(entry: Any, causal: str, dtype: torch.dtype) -> None:
    q, k, v = _inputs(dtype)
    key_padding = torch.rand(1, M) < 0.9  # a mask broadcast over queries: (1, M)
    with _Allocations() as forward:
        o = entry(q, k, v, causal=causal, attn_mask=key_padding)
    with _Allocations() as backward:
        o.backward(torch.randn_like(o))
    assert len(forward.sizes) > 10 and len(backward.sizes) > 10  # the mode saw the kernels
    assert forward.at_least(N * M) == []
    assert backward.at_least(N * M) == []
    assert q.grad is not None and k.grad is not None and v.grad is not None


@pytest.mark.parametrize("causal", ["none", "bottom_right"])
def test_o_only_dropout_never_allocates_n_by_m(causal: str) -> None:
    """Dropout's mask is made block by block from the seed, in forward and again in
    backward: never stored whole."""
    q, k, v = _inputs()
    with _Allocations() as forward:
        o = _public(q, k, v, causal=causal, dropout_p=0.3)
    with _Allocations() as backward:
        o.backward(torch.randn_like(o))
    assert len(forward.sizes) > 10 and len(backward.sizes) > 10
    assert forward.at_least(N * M) == []
    assert backward.at_least(N * M) == []
    with _Allocations() as composite:  # the check has teeth: the composite's mask is whole
        tanh_attention.attn(q, k, v, need_weights=False, dropout_p=0.3, backend="composite")
    assert composite.at_least(N * M) != []


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_half_decoding_step_never_converts_the_cache_whole(
    dtype: torch.dtype, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A half-precision decoding step whose products convert to float32 converts its keys
    and values block by block, at most ``_CONVERTED_ENTRIES`` at a time, never the whole
    cache (which would read and write it again): on the aten path, and in the compiled
    decoding step (bfloat16), which reads the cache in place (and widens at most a piece)."""
    monkeypatch.setattr(cpu_kernels, "_half_products_speed", lambda dtype: (False, "forced"))
    # (and no bfloat16 blocks: a CPU that multiplies bfloat16 natively keeps them so)
    monkeypatch.setattr(blockwise, "method_name", lambda *args: "torch")
    limit = blockwise._CONVERTED_ENTRIES
    cache = (2, 4, 2 * limit // (4 * 64), 64)  # k and v: twice the limit each
    q = torch.randn(2, 4, 3, 64, dtype=dtype)
    k, v = torch.randn(cache, dtype=dtype), torch.randn(cache, dtype=dtype)
    with _Allocations() as compiled:
        _public(q, k, v, causal="bottom_right")
    assert compiled.at_least(limit + 1) == []
    monkeypatch.setattr(blockwise, "try_decode", lambda *args: None)  # the aten path
    with _Allocations() as step:
        _public(q, k, v, causal="bottom_right")
    assert len(step.sizes) > 10  # the mode saw the kernels
    assert step.at_least(limit + 1) == []
    monkeypatch.setattr(blockwise, "_FEW_ROWS", 0)  # the check has teeth: whole conversion
    with _Allocations() as whole:
        _public(q, k, v, causal="bottom_right")
    assert whole.at_least(limit + 1) != []


def test_recording_catches_an_n_by_m_tensor() -> None:
    """The check has teeth: the with-weights forward returns a, which it records."""
    q, k, v = _inputs()
    with _Allocations() as forward:
        torch.ops.tanh_attention.attn(q, k, v, None, 0.5, "none")
    assert len(forward.at_least(N * M)) >= 1


def test_with_weights_backward_allocates_at_most_one_n_by_m_temporary() -> None:
    q, k, v = _inputs()
    o, a = torch.ops.tanh_attention.attn(q, k, v, None, 0.5, "top_left")
    g_o, g_a = torch.randn_like(o), torch.randn_like(a)
    with _Allocations() as backward:
        torch.autograd.backward((o, a), (g_o, g_a))
    assert len(backward.at_least(N * M)) <= 1


@pytest.mark.parametrize("causal", ["none", "bottom_right"])
def test_o_only_forward_ad_never_allocates_n_by_m(causal: str) -> None:
    """Forward AD through attn_lean runs the blocked JVP: nothing of n x m either."""
    q, k, v = (x.detach() for x in _inputs())
    with fwAD.dual_level(), _Allocations() as forward:
        duals = [fwAD.make_dual(x, torch.randn_like(x)) for x in (q, k, v)]
        o = torch.ops.tanh_attention.attn_lean(*duals, None, 0.5, causal)
        tangent = fwAD.unpack_dual(o).tangent
    assert tangent is not None and tangent.shape == o.shape
    assert len(forward.sizes) > 10
    assert forward.at_least(N * M) == []


@pytest.mark.parametrize("weights", [False, True], ids=["o_only", "with_weights"])
def test_gqa_never_copies_keys_or_values_per_head(weights: bool) -> None:
    """SDPA's enable_gqa (and attn with keys shared by heads): no tensor as large as the keys
    or values repeated over the query heads is made, in forward or in backward. (Problems
    with fewer than 16384 scores are grouped several per block, which copies the grouped
    blocks' keys; a KV cache is larger than that.)"""
    groups, kv_heads, m, d = 4, 2, 4000, 16
    q = torch.randn(1, kv_heads * groups, 5, d, requires_grad=True)
    k = torch.randn(1, kv_heads, m, d, requires_grad=True)
    v = torch.randn(1, kv_heads, m, d, requires_grad=True)
    repeated = groups * k.numel()
    with _Allocations() as seen:
        if weights:
            o, _ = tanh_attention.attn(q.unflatten(1, (kv_heads, groups)), k[:, :, None],
                                       v[:, :, None])  # fmt: skip
        else:
            o = tanh_attention.scaled_dot_product_attention(q, k, v, enable_gqa=True)
        o.sum().backward()
    copies = [(name, size) for name, size in seen.sizes if size >= repeated]
    # The n x m weights (5 x 4000 per head) stay below k repeated (4000 x 16 per head); the
    # gradients of k and v are accumulated over the batch (zeros, or empty where one block
    # per problem writes them) and summed per group.
    allowed = {
        "aten.zeros.default",
        "aten.empty.memory_format",
        "aten.sum.dim_IntList",
        "aten.sum.default",
    }
    assert all(name in allowed for name, _ in copies), copies
    accumulators = [name for name, _ in copies if name.split(".")[1] in ("zeros", "empty")]
    assert len(accumulators) <= 2, copies  # g_k's and g_v's, nothing else made that large
