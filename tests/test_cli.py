"""``tanh-attention check``: the main job, and proof that it catches a wrong implementation."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from tanh_attention.tools import check, cli

CASES = {"lab", "batched causal mask", "bottom-right causal mask"}


def test_check_json_all_pass(capsys: pytest.CaptureFixture[str]) -> None:
    status = cli.main(["check", "--json", "--only", "cpu", "--only", "attn-func"])
    report = json.loads(capsys.readouterr().out)
    assert status == 0 and report["passed"] is True
    assert {row["implementation"] for row in report["rows"]} == {"cpu", "attn-func"}
    seen = {(row["implementation"], row["weights"], row["case"]) for row in report["rows"]}
    assert seen == {(i, w, c) for i in ("cpu", "attn-func") for w in (True, False) for c in CASES}
    for row in report["rows"]:
        assert set(row["results"]) == set(check.CHECKS)
        assert all(r["status"] == "pass" for r in row["results"].values())
    assert "triton" in report["unavailable"]


def test_check_table(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["check", "--only", "composite"]) == 0
    out = capsys.readouterr().out
    assert "composite" in out and "o only" in out and "all checks passed" in out


def test_check_unknown_name(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["check", "--only", "nope"]) == 2


def test_reference_is_the_definition() -> None:
    """The oracle itself, on a case small enough to write out: bottom-right causal with
    n = 2, m = 3 keeps j <= i + 1, and the mask drops (1, 0)."""
    q = torch.tensor([[1.0], [2.0]], dtype=torch.float64)
    k = torch.tensor([[0.5], [-1.0], [0.25]], dtype=torch.float64)
    v = torch.eye(3, dtype=torch.float64)
    mask = torch.tensor([[True, True, True], [False, True, True]])
    o, a = check._reference(q, k, v, mask, 2.0, "bottom_right")
    want = torch.tensor(
        [[1.0, -2.0, 0.5], [2.0, -4.0, 1.0]], dtype=torch.float64
    ).tanh() * torch.tensor([[1.0, 1.0, 0.0], [0.0, 1.0, 1.0]], dtype=torch.float64)
    torch.testing.assert_close(a, want, rtol=0, atol=0)
    torch.testing.assert_close(o, want, rtol=0, atol=0)  # v = I
    _, top_left = check._reference(q, k, v, None, 2.0, True)
    assert top_left.ne(0).tolist() == [[True, False, False], [True, True, False]]


def _keep(n: int, m: int, mask: torch.Tensor | None, causal: bool | str) -> torch.Tensor:
    keep = torch.ones(n, m, dtype=torch.bool)
    if causal in (True, "top_left"):
        keep = keep.tril()
    elif causal == "bottom_right":
        keep = keep.tril(m - n)
    return keep if mask is None else keep & mask


def _leaky(q, k, v, mask, scale, causal, need_weights):  # type: ignore[no-untyped-def]
    """A plausible wrong implementation: its backward forgets the keep-mask M in g_x, so
    masked entries (where 1 - a^2 = 1) leak gradient into q and k."""
    keep = _keep(q.shape[-2], k.shape[-2], mask, causal)

    class Leaky(torch.autograd.Function):
        @staticmethod
        def forward(ctx, q, k, v):  # type: ignore[no-untyped-def]
            a = torch.where(keep, torch.tanh(scale * q @ k.mT), 0.0)
            ctx.save_for_backward(q, k, v, a)
            return a @ v, a

        @staticmethod
        def backward(ctx, g_o, g_a):  # type: ignore[no-untyped-def]
            q, k, v, a = ctx.saved_tensors
            g_x = (g_o @ v.mT + g_a) * (1 - a * a)  # no M: leaks through masked entries
            return (
                (scale * g_x @ k).sum_to_size(q.shape),
                (scale * g_x.mT @ q).sum_to_size(k.shape),
                (a.mT @ g_o).sum_to_size(v.shape),
            )

    o, a = Leaky.apply(q, k, v)
    return o, (a if need_weights else None)


def test_check_catches_a_gradient_leak(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    implementations = check._implementations
    monkeypatch.setattr(check, "_implementations", lambda: [*implementations(), ("leaky", _leaky)])
    assert cli.main(["check", "--json", "--no-compile", "--only", "leaky"]) == 1
    report = json.loads(capsys.readouterr().out)
    assert report["passed"] is False
    for row in report["rows"]:
        assert row["implementation"] == "leaky"
        results = row["results"]
        assert results["forward"]["status"] == "pass"  # the forward is right
        # no mask and not causal: nothing to leak; otherwise the backward is wrong
        want = "pass" if row["case"] == "lab" else "fail"
        assert results["gradcheck"]["status"] == want, (row["weights"], row["case"])
    assert {row["weights"] for row in report["rows"]} == {True, False}

    assert cli.main(["check", "--no-compile", "--only", "leaky"]) == 1
    out = capsys.readouterr().out
    assert "leaky" in out and "fail" in out and "FAILED" in out


def test_the_library_core_never_imports_the_tools() -> None:
    code = (
        "import sys, tanh_attention, tanh_attention.nn; "
        "print(sorted(m for m in sys.modules if m.startswith('tanh_attention.tools')))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout
    assert out.strip() == "[]"
