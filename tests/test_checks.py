"""Bad input: every entry point raises ValueError/TypeError naming the argument, before work."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch

import tanh_attention
from tanh_attention import AttnFunction

F = torch.float32


def _t(*shape: int, dtype: torch.dtype = F, device: str = "cpu") -> torch.Tensor:
    return torch.randn(shape, dtype=torch.float32).to(dtype=dtype, device=device)


def _public(q: Any, k: Any, v: Any, mask: Any = None, scale: Any = 1.0, causal: Any = False) -> Any:
    return tanh_attention.attn(q, k, v, attn_mask=mask, scale=scale, causal=causal)


# Each case: (id, args (q, k, v, mask, scale, causal), exception, words the message must contain)
CASES: list[tuple[str, tuple[Any, ...], type[Exception], list[str]]] = [
    ("q_rank_1", (_t(3), _t(2, 3), _t(2, 4)), ValueError, ["'q'", "at least 2", "(3,)"]),
    ("k_rank_0", (_t(2, 3), torch.tensor(1.0), _t(2, 4)), ValueError, ["'k'", "()"]),
    (
        "feature_mismatch",
        (_t(2, 3), _t(2, 5), _t(2, 4)),
        ValueError,
        ["feature", "(2, 3)", "(2, 5)"],
    ),
    (
        "key_count_mismatch",
        (_t(2, 3), _t(4, 3), _t(5, 4)),
        ValueError,
        ["keys", "(4, 3)", "(5, 4)"],
    ),
    (
        "batch_no_broadcast",
        (_t(2, 2, 3), _t(3, 2, 3), _t(2, 4)),
        ValueError,
        ["broadcast", "(2, 2, 3)", "(3, 2, 3)"],
    ),
    (
        "mixed_dtypes",
        (_t(2, 3), _t(2, 3, dtype=torch.float64), _t(2, 4)),
        TypeError,
        ["same dtype", "float32", "float64"],
    ),
    (
        "int_dtype",
        (torch.ones(2, 3, dtype=torch.int64), _t(2, 3), _t(2, 4)),
        TypeError,
        ["'q'", "int64"],
    ),
    (
        "bool_dtype",
        (_t(2, 3), _t(2, 3), torch.ones(2, 4, dtype=torch.bool)),
        TypeError,
        ["'v'", "bool"],
    ),
    (
        "complex_dtype",
        (_t(2, 3).to(torch.complex64), _t(2, 3), _t(2, 4)),
        TypeError,
        ["'q'", "complex64"],
    ),
    (
        "mixed_devices",
        (_t(2, 3), _t(2, 3, device="meta"), _t(2, 4)),
        ValueError,
        ["same device", "meta"],
    ),
    (
        "scale_inf",
        (_t(2, 3), _t(2, 3), _t(2, 4), None, float("inf")),
        ValueError,
        ["'scale'", "inf"],
    ),
    (
        "scale_nan",
        (_t(2, 3), _t(2, 3), _t(2, 4), None, float("nan")),
        ValueError,
        ["'scale'", "nan"],
    ),
    (
        "float_mask",
        (_t(2, 3), _t(2, 3), _t(2, 4), torch.zeros(2, 2)),
        TypeError,
        ["'attn_mask'", "tanh(-inf)"],
    ),
    (
        "mask_shape",
        (_t(2, 3), _t(2, 3), _t(2, 4), torch.ones(3, 2, dtype=torch.bool)),
        ValueError,
        ["'attn_mask'", "(3, 2)", "(2, 2)"],
    ),
    (
        "mask_grows_batch",
        (_t(2, 3), _t(2, 3), _t(2, 4), torch.ones(5, 2, 2, dtype=torch.bool)),
        ValueError,
        ["'attn_mask'", "(5, 2, 2)"],
    ),
]

# Wrong Python types. The registered ops' dispatcher checks these against the schema itself.
PYTHON_ONLY: list[tuple[str, tuple[Any, ...], type[Exception], list[str]]] = [
    ("q_list", ([[1.0, 2.0]], _t(2, 2), _t(2, 4)), TypeError, ["'q'", "list"]),
    ("v_none", (_t(2, 3), _t(2, 3), None), TypeError, ["'v'", "NoneType"]),
    ("scale_str", (_t(2, 3), _t(2, 3), _t(2, 4), None, "1"), TypeError, ["'scale'", "str"]),
    ("causal_int", (_t(2, 3), _t(2, 3), _t(2, 4), None, 1.0, 1), TypeError, ["'causal'", "int"]),
]

ENTRY_POINTS: dict[str, Callable[..., Any]] = {
    "public": _public,
    "function": AttnFunction.apply,
    "op": torch.ops.tanh_attention.attn,
    "composite": torch.ops.tanh_attention.attn_composite,
}


@pytest.mark.parametrize("entry", ENTRY_POINTS, ids=str)
@pytest.mark.parametrize(("case", "args", "exc", "words"), CASES, ids=[c[0] for c in CASES])
def test_bad_input(
    entry: str, case: str, args: tuple[Any, ...], exc: type[Exception], words: list[str]
) -> None:
    with pytest.raises(exc) as info:
        ENTRY_POINTS[entry](*args)
    for word in words:
        assert word in str(info.value), f"{word!r} not in: {info.value}"


@pytest.mark.parametrize("entry", ["public", "function"])
@pytest.mark.parametrize(
    ("case", "args", "exc", "words"), PYTHON_ONLY, ids=[c[0] for c in PYTHON_ONLY]
)
def test_bad_argument_types(
    entry: str, case: str, args: tuple[Any, ...], exc: type[Exception], words: list[str]
) -> None:
    with pytest.raises(exc) as info:
        ENTRY_POINTS[entry](*args)
    for word in words:
        assert word in str(info.value), f"{word!r} not in: {info.value}"


@pytest.mark.parametrize("entry", ["op", "composite"])
@pytest.mark.parametrize(
    ("case", "args", "name"),
    [(c[0], c[1], c[3][0]) for c in PYTHON_ONLY if c[0] != "causal_int"],  # int -> bool is fine
    ids=[c[0] for c in PYTHON_ONLY if c[0] != "causal_int"],
)
def test_registered_ops_refuse_bad_types(
    entry: str, case: str, args: tuple[Any, ...], name: str
) -> None:
    # A schema type mismatch is caught by PyTorch's dispatcher before our code runs; it raises
    # RuntimeError ("Expected a value of type 'float' for argument 'scale' ...").
    with pytest.raises((TypeError, RuntimeError)) as info:
        ENTRY_POINTS[entry](*args)
    assert f"argument {name}" in str(info.value)


def test_need_weights_must_be_bool() -> None:
    with pytest.raises(TypeError, match="'need_weights'"):
        tanh_attention.attn(_t(2, 3), _t(2, 3), _t(2, 4), need_weights="no")  # type: ignore[arg-type]


def test_error_before_any_work(monkeypatch: pytest.MonkeyPatch) -> None:
    """Validation runs before any formula: a bad call never reaches the math."""
    from tanh_attention import formulas

    def boom(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("work started before validation")

    monkeypatch.setattr(formulas, "forward", boom)
    for entry in ENTRY_POINTS.values():
        with pytest.raises(ValueError):
            entry(_t(2, 3), _t(2, 5), _t(2, 4))


def test_supported_dtypes_accepted() -> None:
    for dtype in tanh_attention.SUPPORTED_DTYPES:
        o, a = tanh_attention.attn(
            _t(2, 3, dtype=dtype), _t(2, 3, dtype=dtype), _t(2, 4, dtype=dtype)
        )
        assert o.dtype == a.dtype == dtype
