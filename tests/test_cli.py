"""``tanh-attention check``: the main job, and proof that it catches a wrong implementation."""

from __future__ import annotations

import json

import pytest
import torch

from tanh_attention import check, cli, registry


def test_check_json_all_pass(capsys: pytest.CaptureFixture[str]) -> None:
    status = cli.main(["check", "--json", "--only", "op", "--only", "attn-func"])
    report = json.loads(capsys.readouterr().out)
    assert status == 0 and report["passed"] is True
    assert {row["implementation"] for row in report["rows"]} == {"op", "attn-func"}
    for row in report["rows"]:
        assert set(row["results"]) == set(check.CHECKS)
        assert all(r["status"] == "pass" for r in row["results"].values())
    assert "triton" in report["unavailable"]


def test_check_table(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["check", "--only", "function"]) == 0
    out = capsys.readouterr().out
    assert "function" in out and "all checks passed" in out


def test_check_unknown_name(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["check", "--only", "nope"]) == 2


def _leaky(q, k, v, mask, scale, causal):  # type: ignore[no-untyped-def]
    """A plausible wrong implementation: its backward forgets the keep-mask M in g_x, so
    masked entries (where 1 - a^2 = 1) leak gradient into q and k."""

    class Leaky(torch.autograd.Function):
        @staticmethod
        def forward(ctx, q, k, v):  # type: ignore[no-untyped-def]
            o, a = torch.ops.tanh_attention.attn_composite(q, k, v, mask, scale, causal)
            ctx.save_for_backward(q, k, v, a)
            return o, a

        @staticmethod
        def backward(ctx, g_o, g_a):  # type: ignore[no-untyped-def]
            q, k, v, a = ctx.saved_tensors
            g_x = (g_o @ v.mT + g_a) * (1 - a * a)  # no M: leaks through masked entries
            return (
                scale * g_x @ k,
                (scale * g_x.mT @ q).sum_to_size(k.shape),
                (a.mT @ g_o).sum_to_size(v.shape),
            )

    return Leaky.apply(q, k, v)


def test_check_catches_a_gradient_leak() -> None:
    registry.register_backend(registry.Backend("leaky", "deliberately wrong", _leaky))
    try:
        rows = check.run_checks(compile=False, only=["leaky"])
    finally:
        registry._REGISTRY.pop("leaky")
    by_case = {row.case: row.results for row in rows}
    assert by_case["lab"]["gradcheck"].status == "pass"  # no mask: nothing to leak
    assert by_case["batched causal mask"]["gradcheck"].status == "fail"
