"""``tanh-attention bench`` on tiny sizes: it runs, and its JSON has the promised shape.

Speed and memory goals live in the benchmark itself (benchmarks/RESULTS.md), not here.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tanh_attention.tools import bench, cli


def test_tiny_run_writes_json_markdown_and_table(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "bench.json"
    status = cli.main(
        [
            "bench",
            "--sizes",
            "32,48",
            "--impls",
            "ours,composite",
            "--memory",
            "none",
            "--json",
            str(out),
            "--markdown",
            str(tmp_path / "bench.md"),
        ]
    )
    assert status == 0
    report = json.loads(out.read_text())
    assert {"machine", "matmul_gflops", "repeats", "results", "goals", "command"} <= set(report)
    assert report["matmul_gflops"]["float32"] > 0
    assert report["machine"]["torch"] and report["machine"]["cpu_count"] >= 1
    # 2 sizes x (fwd, fwd+bwd) x ((o, a), o-only)
    assert len(report["results"]) == 8
    for entry in report["results"]:
        assert entry["limit_ms"] > 0 and entry["flops"] > 0
        for impl in ("ours", "composite"):
            result = entry["impls"][impl]
            assert len(result["times_ms"]) == 5
            assert min(result["times_ms"]) <= result["time_ms"] <= max(result["times_ms"])
    assert len(report["goals"]) == 5 and all(g["met"] is None for g in report["goals"])
    assert "ours ms" in capsys.readouterr().out
    assert "| configuration |" in (tmp_path / "bench.md").read_text()


def test_memory_probe_in_a_fresh_process() -> None:
    report = bench.run_benchmarks(
        [bench.Config(64, backward=True, weights=False)], impls=["ours"], memory="all"
    )
    (entry,) = report["results"]
    assert entry["impls"]["ours"]["peak_mib"] >= 0


def test_flops_and_causal_fraction() -> None:
    n, d = 4096, 64
    assert bench.Config(n).flops() == 4 * n * n * d
    assert bench.Config(n, backward=True).flops() == 12 * n * n * d
    assert bench.Config(n, backward=True, weights=False).flops() == 14 * n * n * d
    assert bench.Config(n, batch=(2, 8)).flops() == 16 * 4 * n * n * d
    causal = bench.Config(n, causal=True).flops()
    assert causal == pytest.approx(4 * d * n * (n + 1) / 2)


def test_goals_from_results() -> None:
    """Goals are read off the results they name, as ours / baseline."""

    def entry(**config: object) -> dict[str, object]:
        full = {"d": 64, "batch": [], "dtype": "float32", "causal": False, **config}
        return {"config": full, "limit_ms": 100.0, "impls": {}}

    results = [entry(n=4096, backward=True, weights=True)]
    results[0]["impls"] = {"ours": {"time_ms": 120.0}, "compile": {"time_ms": 200.0}}
    (goal1, goal2, *_) = bench.goals(results)
    assert goal1["ratios"] == {"compile": 0.6, "limit": 1.2} and goal1["met"] is True
    assert goal2["met"] is None


def test_sweep_covers_the_issue() -> None:
    configs = bench.sweep()
    sizes = {c.n for c in configs}
    assert min(sizes) == 256 and 16384 in sizes
    assert max(c.n for c in configs if c.weights) == 16384
    assert max(c.n for c in configs if not c.weights) == 32768
    assert {c.d for c in configs} == {64, 128}
    assert {c.dtype for c in configs} == {"float32", "bfloat16"}
    assert any(c.batch == (2, 8) for c in configs) and any(c.causal for c in configs)
    assert len(bench.sweep(quick=True)) < len(configs)


def test_bad_arguments_raise() -> None:
    with pytest.raises(ValueError, match="unknown implementation"):
        cli.main(["bench", "--impls", "ours,nope", "--sizes", "8"])
    with pytest.raises(ValueError, match="at least 5"):
        cli.main(["bench", "--repeats", "3", "--sizes", "8"])


@pytest.mark.parametrize("weights", [True, False])
@pytest.mark.parametrize("causal", [False, True])
def test_jax_baseline_computes_the_same_thing(weights: bool, causal: bool) -> None:
    """The JAX column times tanh attention, not something cheaper: its outputs and
    gradients match a float64 composite computed independently here."""
    pytest.importorskip("jax", reason="the JAX baseline is optional (pip install jax)")
    import numpy as np
    import torch

    config = bench.Config(24, d=8, causal=causal, backward=True, weights=weights)
    x = bench._torch_inputs(config)
    outputs, grads = bench._runner("jax", config, x)()

    q, k, v = (x[name].detach().double().requires_grad_() for name in "qkv")
    s = x["scale"] * q @ k.mT
    if causal:
        s = s.masked_fill(~torch.ones(24, 24, dtype=torch.bool).tril(), 0.0)
    a = torch.tanh(s)
    o = a @ v
    ref = (o, a) if weights else (o,)
    cot = (x["g_o"], x["g_a"]) if weights else (x["g_o"],)
    ref_grads = torch.autograd.grad(ref, (q, k, v), tuple(c.double() for c in cot))
    for got, want in zip((*outputs, *grads), (*ref, *ref_grads), strict=True):
        np.testing.assert_allclose(np.asarray(got), want.detach().numpy(), rtol=1e-4, atol=1e-4)


def test_decode_bench_runs_and_times_the_same_computation() -> None:
    from tanh_attention.tools import bench_decode

    config = bench_decode.DecodeConfig(n=16, m=64)
    runners = bench_decode._runners(config)
    torch.testing.assert_close(runners["ours"](), runners["composite"](), rtol=1e-5, atol=1e-5)
    report = bench_decode.run_decode([config, bench_decode.DecodeConfig(1, 64, "bfloat16")])
    assert report["copy_rate"] > 0 and len(report["rows"]) == 2
    for row in report["rows"]:
        assert row["ours_ms"] > 0 and row["vs_limit"] > 0 and row["vs_composite"] > 0
    assert "| n=16 m=64 f32 |" in bench_decode.markdown(report)
    sweep = bench_decode.decode_sweep()
    assert {c.n for c in sweep} == {1, 16} and {c.m for c in sweep} >= {1024, 32768}
    assert {c.dtype for c in sweep} == {"float32", "bfloat16"}
