"""The documents match the code: the derivation's worked example and the docstring examples."""

from __future__ import annotations

import ast
import doctest
import re
from pathlib import Path

import pytest
import torch

import tanh_attention
from samples import reference
from tanh_attention import formulas

DERIVATION = Path(__file__).resolve().parents[1] / "docs" / "derivation.md"


def _section(text: str, heading: str) -> str:
    return text.split(heading, 1)[1]


def _worked_example() -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(inputs, documented values) from section 7 of docs/derivation.md."""
    text = _section(DERIVATION.read_text(), "## 7. Worked example")
    code = re.search(r"```python\n(.*?)```", text, re.S)
    assert code is not None
    inputs: dict[str, torch.Tensor] = {}
    exec(code.group(1), {"torch": torch}, inputs)
    values = {}
    for block in re.findall(r"```text\n(.*?)```", text, re.S):
        for line in block.strip().splitlines():
            name, value = (part.strip() for part in line.split("=", 1))
            values[name] = torch.tensor(ast.literal_eval(value), dtype=torch.float64)
    return inputs, values


def test_worked_example_matches_operator_and_reference() -> None:
    inputs, doc = _worked_example()
    q, k, v = (inputs[name].clone().requires_grad_() for name in "qkv")
    g_o, g_a = inputs["g_o"], inputs["g_a"]
    o, a = tanh_attention.attn(q, k, v)
    grads = torch.autograd.grad((o, a), (q, k, v), (g_o, g_a))
    ref_grads = torch.autograd.grad(reference(q, k, v), (q, k, v), (g_o, g_a))
    big_g = g_o @ v.detach().T + g_a
    computed = {
        "x": q.detach() @ k.detach().T,
        "a": a.detach(),
        "o": o.detach(),
        "G": big_g,
        "g_x": big_g * (1 - a.detach() ** 2),
        "g_q": grads[0],
        "g_k": grads[1],
        "g_v": grads[2],
    }
    _, a_causal = reference(q.detach(), k.detach(), v.detach(), None, 1.0, True)
    computed["causal g_x"] = formulas.keep(
        torch.ops.aten.tanh_backward(big_g, a_causal), causal=True, attn_mask=None
    )
    assert set(doc) == set(computed)
    for name, value in doc.items():
        torch.testing.assert_close(computed[name], value, atol=1e-6, rtol=0, msg=name)
    for g, w in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(g, w)


def test_every_formula_named_in_derivation_exists() -> None:
    text = DERIVATION.read_text()
    for name in set(re.findall(r"`formulas\.(\w+)`", text)):
        assert hasattr(formulas, name), f"docs/derivation.md names formulas.{name}"
    for name in formulas.__all__:
        assert f"formulas.{name}" in text, f"formulas.{name} is not in docs/derivation.md"


def _documented_objects(module: object) -> list[object]:
    """Module-level functions and classes, unwrapping registered custom ops to their function."""
    out = []
    for name in getattr(module, "__all__", []):
        obj = getattr(module, name)
        out.append(getattr(obj, "_init_fn", obj))  # torch.library.custom_op keeps it there
    return out


@pytest.mark.parametrize(
    "module",
    [
        "tanh_attention.api",
        "tanh_attention.function",
        "tanh_attention.ops",
        "tanh_attention.reference",
        "tanh_attention.registry",
        "tanh_attention.nn",
    ],
)
def test_docstring_examples(module: str) -> None:
    """Every example in a public docstring runs and asserts its own result."""
    mod = __import__(module, fromlist=["_"])
    finder, runner = doctest.DocTestFinder(), doctest.DocTestRunner(optionflags=doctest.ELLIPSIS)
    attempted = 0
    for obj in _documented_objects(mod):
        for test in finder.find(obj, globs={"torch": torch, **vars(mod)}):
            result = runner.run(test)
            attempted += result.attempted
            assert result.failed == 0, f"docstring example of {test.name} failed"
    assert attempted > 0
