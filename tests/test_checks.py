"""Bad input: every entry point raises ValueError/TypeError naming the argument, before work.

The entry points are the public function (through the dispatcher, with and without a forced
backend), the autograd.Function, the three registered ops (``attn``, ``attn_lean``,
``attn_composite``) and, for what it validates itself, the layer. "Before work" is checked
with a ``TorchDispatchMode`` that records every op dispatched, including the aten ops inside
the registered ops' kernels.
"""

from __future__ import annotations

import dataclasses
import functools
import warnings
from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

import tanh_attention
from samples import reference
from tanh_attention import AttnFunction
from tanh_attention._checks import validate_attn_inputs
from tanh_attention.backends import Inputs
from tanh_attention.nn import MultiheadTanhAttention

F = torch.float32
B = torch.bool


def _t(*shape: int, dtype: torch.dtype = F, device: str = "cpu") -> torch.Tensor:
    return torch.randn(shape, dtype=torch.float32).to(dtype=dtype, device=device)


def _ones(*shape: int) -> torch.Tensor:
    return torch.ones(shape, dtype=B)


def _csr(t: torch.Tensor) -> torch.Tensor:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "Sparse CSR tensor support is in beta state"
        return t.to_sparse_csr()


def _nested(*tensors: torch.Tensor, layout: torch.layout = torch.strided) -> torch.Tensor:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "nested tensors are in prototype stage"
        return torch.nested.nested_tensor(list(tensors), layout=layout)


# --------------------------------------------------------------------------------------------
# Entry points: each takes (q, k, v, mask, scale, causal) with its own defaults
# --------------------------------------------------------------------------------------------


def _public(
    q: Any, k: Any, v: Any, mask: Any = None, scale: Any = 1.0, causal: Any = False, **kw: Any
) -> Any:
    return tanh_attention.attn(q, k, v, attn_mask=mask, scale=scale, causal=causal, **kw)


def _forced(backend: str, need_weights: bool) -> Callable[..., Any]:
    return functools.partial(_public, backend=backend, need_weights=need_weights)


def _raw(op: Any) -> Callable[..., Any]:
    def call(
        q: Any, k: Any, v: Any, mask: Any = None, scale: Any = 1.0, causal: Any = "none"
    ) -> Any:
        return op(q, k, v, mask, scale, causal)

    return call


def _function(
    q: Any, k: Any, v: Any, mask: Any = None, scale: Any = 1.0, causal: Any = False
) -> Any:
    return AttnFunction.apply(q, k, v, mask, scale, causal)


# The Python entry points: every argument reaches our validation.
PYTHON_ENTRIES: dict[str, Callable[..., Any]] = {
    "public": _public,
    "public_cpu_o_only": _forced("cpu", False),
    "public_composite": _forced("composite", True),
    "function": _function,
}
# The registered ops: PyTorch's dispatcher checks argument types against the schema first.
RAW_ENTRIES: dict[str, Callable[..., Any]] = {
    "op": _raw(torch.ops.tanh_attention.attn),
    "lean": _raw(torch.ops.tanh_attention.attn_lean),
    "composite": _raw(torch.ops.tanh_attention.attn_composite),
}
ENTRY_POINTS = {**PYTHON_ENTRIES, **RAW_ENTRIES}


# --------------------------------------------------------------------------------------------
# The cases
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, eq=False)
class Case:
    """A bad call: ``args`` override (q, k, v) = (2x3, 4x3, 4x5) and the defaults.

    ``raw``: what the registered ops do with it: ``"validate"`` (the tensor reaches our
    validation: the same error), ``"schema"`` (the dispatcher refuses the Python type with a
    RuntimeError naming the argument), ``"skip"`` (not a registered-op argument).
    """

    name: str
    args: dict[str, Any]
    exc: type[Exception]
    words: tuple[str, ...]
    raw: str = "validate"

    def __str__(self) -> str:
        return self.name

    def call(self, entry: Callable[..., Any]) -> Any:
        args = {"q": _t(2, 3), "k": _t(4, 3), "v": _t(4, 5), **self.args}
        return entry(**args)


def _c(name: str, exc: type[Exception], *words: str, raw: str = "validate", **args: Any) -> Case:
    return Case(name, args, exc, words, raw)


CASES: list[Case] = [
    # ranks, sizes, batch dims
    _c("q_rank_1", ValueError, "'q'", "at least 2", "(3,)", q=_t(3)),
    _c("k_rank_0", ValueError, "'k'", "()", k=torch.tensor(1.0)),
    _c("feature_mismatch", ValueError, "feature", "(2, 3)", "(4, 5)", k=_t(4, 5)),
    _c("key_count_mismatch", ValueError, "keys", "(4, 3)", "(5, 5)", v=_t(5, 5)),
    _c(
        "batch_no_broadcast",
        ValueError,
        "broadcast",
        "(2, 2, 3)",
        "(3, 4, 3)",
        q=_t(2, 2, 3),
        k=_t(3, 4, 3),
    ),
    _c("v_batch_no_broadcast", ValueError, "broadcast", "(3, 4, 5)", q=_t(2, 2, 3), v=_t(3, 4, 5)),
    # dtypes and devices
    _c(
        "mixed_dtypes",
        TypeError,
        "same dtype",
        "float32",
        "float64",
        k=_t(4, 3, dtype=torch.float64),
    ),
    _c("int_dtype", TypeError, "'q'", "int64", q=torch.ones(2, 3, dtype=torch.int64)),
    _c("bool_dtype", TypeError, "'v'", "bool", v=_ones(4, 5)),
    _c("complex_dtype", TypeError, "'q'", "complex64", q=_t(2, 3).to(torch.complex64)),
    _c("mixed_devices", ValueError, "same device", "meta", k=_t(4, 3, device="meta")),
    # layouts: sparse COO and CSR, nested (strided and jagged)
    _c("q_sparse_coo", TypeError, "'q'", "sparse_coo", q=_t(2, 3).to_sparse()),
    _c("k_sparse_coo", TypeError, "'k'", "sparse_coo", k=_t(4, 3).to_sparse()),
    _c("v_sparse_coo", TypeError, "'v'", "sparse_coo", v=_t(4, 5).to_sparse()),
    _c("q_sparse_csr", TypeError, "'q'", "sparse_csr", q=_csr(_t(2, 3))),
    _c("k_sparse_csr", TypeError, "'k'", "sparse_csr", k=_csr(_t(4, 3))),
    _c("v_sparse_csr", TypeError, "'v'", "sparse_csr", v=_csr(_t(4, 5))),
    _c("q_nested", TypeError, "'q'", "nested", q=_nested(_t(2, 3), _t(3, 3))),
    _c("k_nested", TypeError, "'k'", "nested", k=_nested(_t(4, 3), _t(4, 3))),
    _c("v_nested", TypeError, "'v'", "nested", v=_nested(_t(4, 5), _t(4, 5))),
    _c(
        "q_nested_jagged",
        TypeError,
        "'q'",
        "nested",
        q=_nested(_t(2, 3), _t(3, 3), layout=torch.jagged),
    ),
    # scale values (types are below: the registered ops take a float)
    _c("scale_inf", ValueError, "'scale'", "inf", scale=float("inf")),
    _c("scale_minus_inf", ValueError, "'scale'", "inf", scale=float("-inf")),
    _c("scale_nan", ValueError, "'scale'", "nan", scale=float("nan")),
    # causal variants that do not exist (the registered ops take a str)
    _c("causal_diagonal", ValueError, "'causal'", "'diagonal'", causal="diagonal"),
    _c("causal_empty", ValueError, "'causal'", "''", causal=""),
    _c("causal_upper_case", ValueError, "'causal'", "'TOP_LEFT'", causal="TOP_LEFT"),
    _c("causal_bool_name", ValueError, "'causal'", "'True'", causal="True"),
    # masks
    _c("float_mask", TypeError, "'attn_mask'", "tanh(-inf)", mask=torch.zeros(2, 4)),
    _c("int_mask", TypeError, "'attn_mask'", "int64", mask=torch.ones(2, 4, dtype=torch.int64)),
    _c("mask_rows", ValueError, "'attn_mask'", "(3, 4)", "(2, 4)", mask=_ones(3, 4)),
    _c("mask_cols", ValueError, "'attn_mask'", "(2, 5)", "(2, 4)", mask=_ones(2, 5)),
    _c("mask_transposed", ValueError, "'attn_mask'", "(4, 2)", mask=_ones(4, 2)),
    _c("mask_rows_of_1_cols", ValueError, "'attn_mask'", "(3, 1)", mask=_ones(3, 1)),
    _c("mask_1d_wrong_keys", ValueError, "'attn_mask'", "(3,)", mask=_ones(3)),
    _c(
        "mask_batch_no_broadcast",
        ValueError,
        "'attn_mask'",
        "(3, 2, 4)",
        q=_t(2, 2, 3),
        mask=_ones(3, 2, 4),
    ),
    _c(
        "mask_device",
        ValueError,
        "'attn_mask'",
        "meta",
        mask=torch.ones(2, 4, dtype=B, device="meta"),
    ),
    _c("mask_sparse_coo", TypeError, "'attn_mask'", "sparse_coo", mask=_ones(2, 4).to_sparse()),
    _c("mask_sparse_csr", TypeError, "'attn_mask'", "sparse_csr", mask=_csr(_ones(2, 4))),
    _c("mask_nested", TypeError, "'attn_mask'", "nested", mask=_nested(_ones(2, 4), _ones(2, 4))),
]

# Wrong Python types: our validation sees them on the Python entry points; the registered ops'
# schema refuses most of them first (RuntimeError "Expected a value of type ... for argument").
TYPE_CASES: list[Case] = [
    _c("q_list", TypeError, "'q'", "list", raw="schema", q=[[1.0, 2.0, 3.0]] * 2),
    _c("v_none", TypeError, "'v'", "NoneType", raw="schema", v=None),
    _c("mask_list", TypeError, "'attn_mask'", "list", raw="schema", mask=[[True] * 4] * 2),
    _c("scale_str", TypeError, "'scale'", "str", raw="schema", scale="1"),
    _c("scale_none", TypeError, "'scale'", "NoneType", raw="schema", scale=None),
    _c("scale_huge_int", ValueError, "'scale'", "overflows", raw="schema", scale=10**400),
    _c("scale_minus_huge_int", ValueError, "'scale'", "overflows", raw="schema", scale=-(10**400)),
    _c("scale_complex", TypeError, "'scale'", "complex", raw="schema", scale=1j),
    # The schema converts a bool and a one-element tensor to a float silently, so a registered
    # op cannot tell them from 1.0: only the Python entry points can refuse them.
    _c("scale_bool", TypeError, "'scale'", "bool", raw="skip", scale=True),
    _c("scale_tensor", TypeError, "'scale'", "Tensor", raw="skip", scale=torch.tensor(2.0)),
    _c("causal_int", TypeError, "'causal'", "int", raw="schema", causal=1),
    _c("causal_zero", TypeError, "'causal'", "int", raw="schema", causal=0),
    _c("causal_none", TypeError, "'causal'", "NoneType", raw="schema", causal=None),
    _c("causal_float", TypeError, "'causal'", "float", raw="schema", causal=1.0),
    _c("causal_list", TypeError, "'causal'", "list", raw="schema", causal=["top_left"]),
]
# Valid for the Python entry points, a type error for the registered ops (causal is a str).
RAW_ONLY_TYPE_CASES: list[Case] = [
    _c("causal_true", RuntimeError, "'causal'", "bool", raw="schema", causal=True),
    _c("causal_false", RuntimeError, "'causal'", "bool", raw="schema", causal=False),
]


def _triton_reason() -> str:
    (triton,) = [b for b in tanh_attention.backends() if b.name == "triton"]
    why = triton.unavailable_reason()
    assert why is not None  # no GPU here, and no interpreter in this process
    return why


# The public function's own arguments.
PUBLIC_ONLY: list[tuple[str, dict[str, Any], type[Exception], tuple[str, ...]]] = [
    ("need_weights_str", {"need_weights": "no"}, TypeError, ("'need_weights'", "str")),
    ("need_weights_int", {"need_weights": 1}, TypeError, ("'need_weights'", "int")),
    ("backend_unknown", {"backend": "fast"}, ValueError, ("'fast'", "'cpu'", "'composite'")),
    ("backend_empty", {"backend": ""}, ValueError, ("unknown backend ''",)),
    ("backend_case", {"backend": "CPU"}, ValueError, ("'CPU'", "'cpu'")),
    ("backend_int", {"backend": 1}, TypeError, ("'backend'", "int")),
    ("backend_bytes", {"backend": b"cpu"}, TypeError, ("'backend'", "bytes")),
    ("backend_list", {"backend": ["cpu"]}, TypeError, ("'backend'", "list")),
    (
        "backend_object",
        {"backend": tanh_attention.backends()[-1]},
        TypeError,
        ("'backend'", "Backend"),
    ),
    ("backend_triton_unavailable", {"backend": "triton"}, ValueError, ("backend='triton'",)),
    (
        "backend_cpu_meta",
        {
            "backend": "cpu",
            "q": _t(2, 3, device="meta"),
            "k": _t(4, 3, device="meta"),
            "v": _t(4, 5, device="meta"),
        },
        ValueError,
        ("backend='cpu'", "takes cpu tensors, got meta"),
    ),
]


def _check_message(err: BaseException, words: tuple[str, ...]) -> None:
    for word in words:
        assert word in str(err), f"{word!r} not in: {err}"


@pytest.mark.parametrize("entry", ENTRY_POINTS)
@pytest.mark.parametrize("case", CASES, ids=str)
def test_bad_input(entry: str, case: Case) -> None:
    assert issubclass(case.exc, (TypeError, ValueError))
    with pytest.raises(case.exc) as info:
        case.call(ENTRY_POINTS[entry])
    _check_message(info.value, case.words)


@pytest.mark.parametrize("entry", PYTHON_ENTRIES)
@pytest.mark.parametrize("case", TYPE_CASES, ids=str)
def test_bad_argument_types(entry: str, case: Case) -> None:
    with pytest.raises(case.exc) as info:
        case.call(PYTHON_ENTRIES[entry])
    _check_message(info.value, case.words)


@pytest.mark.parametrize("entry", RAW_ENTRIES)
@pytest.mark.parametrize(
    "case", [c for c in TYPE_CASES + RAW_ONLY_TYPE_CASES if c.raw == "schema"], ids=str
)
def test_registered_ops_refuse_bad_types(entry: str, case: Case) -> None:
    # A schema type mismatch is caught by PyTorch's dispatcher before our code runs; it raises
    # RuntimeError ("Expected a value of type 'float' for argument 'scale' ...").
    with pytest.raises((TypeError, ValueError, RuntimeError)) as info:
        case.call(RAW_ENTRIES[entry])
    assert f"argument {case.words[0]}" in str(info.value), str(info.value)


@pytest.mark.parametrize(
    ("case", "args", "exc", "words"), PUBLIC_ONLY, ids=[c[0] for c in PUBLIC_ONLY]
)
def test_bad_public_arguments(
    case: str, args: dict[str, Any], exc: type[Exception], words: tuple[str, ...]
) -> None:
    call = {"q": _t(2, 3), "k": _t(4, 3), "v": _t(4, 5), **args}
    with pytest.raises(exc) as info:
        _public(**call)
    _check_message(info.value, words)
    if case == "backend_triton_unavailable":
        assert _triton_reason() in str(info.value)


def test_forced_backend_lists_each_reason() -> None:
    """A forced backend that cannot run says every reason its not_supported_reasons gives."""
    q = _t(2, 3, device="meta")
    k, v = _t(4, 3, device="meta"), _t(4, 5, device="meta")
    shapes = validate_attn_inputs(q, k, v)
    inputs = Inputs(q, k, v, None, 1.0, "none", True, shapes)
    for backend in tanh_attention.backends():
        reasons = backend.not_supported_reasons(inputs)
        if not reasons:
            continue
        with pytest.raises(ValueError) as info:
            tanh_attention.attn(q, k, v, backend=backend.name)
        assert f"backend={backend.name!r}" in str(info.value)
        for reason in reasons:
            assert reason in str(info.value)


# --------------------------------------------------------------------------------------------
# The layer
# --------------------------------------------------------------------------------------------

LAYER_SCALES: list[tuple[str, Any, type[Exception]]] = [
    ("huge_int", 10**400, ValueError),
    ("minus_huge_int", -(10**400), ValueError),
    ("inf", float("inf"), ValueError),
    ("minus_inf", float("-inf"), ValueError),
    ("nan", float("nan"), ValueError),
    ("bool", True, TypeError),
    ("tensor", torch.tensor(1.0), TypeError),
    ("str", "1", TypeError),
]


@pytest.mark.parametrize(("case", "scale", "exc"), LAYER_SCALES, ids=[c[0] for c in LAYER_SCALES])
def test_layer_bad_scale(case: str, scale: Any, exc: type[Exception]) -> None:
    with pytest.raises(exc, match="'scale'"):
        MultiheadTanhAttention(8, 2, scale=scale)


def _x(*shape: int) -> torch.Tensor:
    return torch.randn(shape)


# (id, forward kwargs over query = key = value = (3, 5, 8) batch-first, exception, name)
LAYER_INPUTS: list[tuple[str, dict[str, Any], type[Exception], str]] = [
    ("query_sparse_coo", {"query": _x(3, 5, 8).to_sparse()}, TypeError, "'query'"),
    ("key_sparse_coo", {"key": _x(3, 5, 8).to_sparse()}, TypeError, "'key'"),
    ("value_sparse_coo", {"value": _x(3, 5, 8).to_sparse()}, TypeError, "'value'"),
    ("query_sparse_csr", {"query": _csr(_x(3, 5, 8))}, TypeError, "'query'"),
    ("key_sparse_csr", {"key": _csr(_x(3, 5, 8))}, TypeError, "'key'"),
    ("query_nested", {"query": _nested(_x(5, 8), _x(4, 8), _x(5, 8))}, TypeError, "'query'"),
    ("key_nested", {"key": _nested(_x(5, 8), _x(4, 8), _x(5, 8))}, TypeError, "'key'"),
    ("value_nested", {"value": _nested(_x(5, 8), _x(4, 8), _x(5, 8))}, TypeError, "'value'"),
    ("attn_mask_sparse_coo", {"attn_mask": _ones(5, 5).to_sparse()}, TypeError, "'attn_mask'"),
    (
        "attn_mask_sparse_csr",
        {"attn_mask": _csr(_ones(5, 5))},
        TypeError,
        "'attn_mask'",
    ),
    (
        "attn_mask_nested",
        {"attn_mask": _nested(_ones(5, 5), _ones(5, 5))},
        TypeError,
        "'attn_mask'",
    ),
    (
        "key_padding_mask_sparse_coo",
        {"key_padding_mask": _ones(3, 5).to_sparse()},
        TypeError,
        "'key_padding_mask'",
    ),
    ("attn_mask_shape", {"attn_mask": _ones(4, 5)}, ValueError, "'attn_mask'"),
    ("attn_mask_heads", {"attn_mask": _ones(3, 5, 5)}, ValueError, "'attn_mask'"),
    ("key_padding_mask_shape", {"key_padding_mask": _ones(3, 4)}, ValueError, "'key_padding_mask'"),
    ("is_causal_int", {"is_causal": 1}, TypeError, "'is_causal'"),
    ("is_causal_str", {"is_causal": "top_left"}, TypeError, "'is_causal'"),
    ("need_weights_str", {"need_weights": "no"}, TypeError, "'need_weights'"),
]


@pytest.mark.parametrize(
    ("case", "kwargs", "exc", "name"), LAYER_INPUTS, ids=[c[0] for c in LAYER_INPUTS]
)
def test_layer_bad_input(
    case: str, kwargs: dict[str, Any], exc: type[Exception], name: str
) -> None:
    layer = MultiheadTanhAttention(8, 2, batch_first=True)
    x = _x(3, 5, 8)
    call = {"query": x, "key": x, "value": x, **kwargs}
    with pytest.raises(exc) as info:
        layer(**call)
    assert name in str(info.value), str(info.value)


# --------------------------------------------------------------------------------------------
# Valid inputs that the old contract refused, and the dtypes
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("entry", ENTRY_POINTS)
def test_mask_with_batch_dims_of_its_own(entry: str) -> None:
    """A mask's batch dims broadcast into the batch of a and o (not an error any more)."""
    q, k, v = (
        _t(2, 3, dtype=torch.float64),
        _t(4, 3, dtype=torch.float64),
        _t(4, 5, dtype=torch.float64),
    )
    mask = torch.rand(5, 2, 4, generator=torch.Generator().manual_seed(1)) < 0.5
    out = ENTRY_POINTS[entry](q, k, v, mask)
    o, a = out if isinstance(out, tuple) else (out, None)
    o_ref, a_ref = reference(q, k, v, mask)
    assert o.shape == (5, 2, 5)
    torch.testing.assert_close(o, o_ref)
    if a is not None:
        assert a.shape == (5, 2, 4)
        torch.testing.assert_close(a, a_ref)


def test_supported_dtypes_accepted() -> None:
    for dtype in tanh_attention.SUPPORTED_DTYPES:
        o, a = tanh_attention.attn(
            _t(2, 3, dtype=dtype), _t(2, 3, dtype=dtype), _t(2, 4, dtype=dtype)
        )
        assert o.dtype == a.dtype == dtype


# --------------------------------------------------------------------------------------------
# No work before the error
# --------------------------------------------------------------------------------------------


class _Recorder(TorchDispatchMode):
    """Records every op dispatched while active, seeing through our registered ops.

    A TorchDispatchMode sees a registered op (``tanh_attention.*``) as one op, and runs it
    with the mode popped, so the aten ops of its kernel would go unseen. For our ops the mode
    re-enters itself and redispatches to the kernel the dispatcher would pick (the tensors'
    keys below Python), so those aten ops are recorded too.
    """

    def __init__(self) -> None:
        super().__init__()
        self.ops: list[str] = []

    def __torch_dispatch__(
        self, func: Any, types: Any, args: tuple[Any, ...] = (), kwargs: Any = None
    ) -> Any:
        kwargs = kwargs or {}
        self.ops.append(str(func))
        if func.namespace == "tanh_attention":
            keys = [
                torch._C._dispatch_keys(t)
                for t in tree_leaves((args, kwargs))
                if isinstance(t, torch.Tensor)
            ]
            below = torch._C._dispatch_keyset_full_after(torch._C.DispatchKey.Python)
            keyset = functools.reduce(lambda x, y: x | y, keys) & below
            with self:
                return func.redispatch(keyset, *args, **kwargs)
        return func(*args, **kwargs)

    @property
    def aten(self) -> list[str]:
        return [op for op in self.ops if not op.startswith("tanh_attention.")]


def _ops_before_error(entry: Callable[..., Any], case: Case) -> list[str]:
    """Every op dispatched by ``case`` on ``entry`` before it raised (the inputs are built
    outside the recorder). Any exception counts; its type is ``test_bad_input``'s job."""
    args = {"q": _t(2, 3), "k": _t(4, 3), "v": _t(4, 5), **case.args}
    recorder = _Recorder()
    with pytest.raises(Exception), recorder:  # noqa: B017
        entry(**args)
    return recorder.ops


NO_WORK_ENTRIES = {
    "public": _public,
    "public_cpu_o_only": _forced("cpu", False),
    "function": _function,
    **RAW_ENTRIES,
}


_RAW_ONLY = {c.name for c in RAW_ONLY_TYPE_CASES}
_NO_WORK_CASES = [
    (entry, case)
    for entry in NO_WORK_ENTRIES
    for case in CASES + [c for c in TYPE_CASES + RAW_ONLY_TYPE_CASES if c.raw != "skip"]
    # The raw-only cases are valid calls of the Python entry points.
    if entry in RAW_ENTRIES or case.name not in _RAW_ONLY
]


@pytest.mark.parametrize(
    ("entry", "case"), _NO_WORK_CASES, ids=[f"{e}-{c}" for e, c in _NO_WORK_CASES]
)
def test_error_before_any_work(entry: str, case: Case) -> None:
    """A bad call dispatches no aten op at all before its error."""
    ops = _ops_before_error(NO_WORK_ENTRIES[entry], case)
    if entry in RAW_ENTRIES:
        # The registered op itself is dispatched (it is the entry point); nothing inside it.
        assert all(op.startswith("tanh_attention.") for op in ops), ops
    else:
        assert ops == [], ops


@pytest.mark.parametrize(
    ("case", "args", "exc", "words"), PUBLIC_ONLY, ids=[c[0] for c in PUBLIC_ONLY]
)
def test_bad_public_arguments_before_any_work(
    case: str, args: dict[str, Any], exc: type[Exception], words: tuple[str, ...]
) -> None:
    assert _ops_before_error(_public, Case(case, args, exc, words)) == []


@pytest.mark.parametrize("entry", ENTRY_POINTS)
def test_recorder_sees_the_work_of_a_valid_call(entry: str) -> None:
    """Positive control: the recorder sees the aten ops of every entry point, including those
    inside the registered ops' kernels, so an empty record above means no work."""
    q, k, v = _t(2, 3), _t(4, 3), _t(4, 5)
    recorder = _Recorder()
    with recorder:
        ENTRY_POINTS[entry](q, k, v)
    assert recorder.aten, recorder.ops
    op = {"op": "tanh_attention.attn.default", "lean": "tanh_attention.attn_lean.default"}
    if entry in op:
        # Seen through: the kernel's aten ops come after the registered op itself.
        assert recorder.ops[0] == op[entry]
        assert len(recorder.aten) == len(recorder.ops) - 1


def test_recorder_catches_work_before_validation() -> None:
    """Negative control: an entry point that computes before validating is caught."""

    def sloppy(q: Any, k: Any, v: Any, mask: Any = None, **kw: Any) -> Any:
        scores = q @ k.mT  # work first
        del scores
        return _public(q, k, v, mask, **kw)

    ops = _ops_before_error(sloppy, CASES[[c.name for c in CASES].index("mask_rows")])
    assert ops and all(op.startswith("aten.") for op in ops)
