"""``tanh-attention bench --models`` / ``--layer`` on tiny shapes: it runs, its JSON has the
promised shape, its baselines compute what ours computes, bad flags are refused.

Speed goals are the benchmark's output, not asserted here.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import threading
from pathlib import Path

import numpy as np
import pytest
import torch

from tanh_attention.tools import bench_models, cli

TINY = [bench_models.ModelShape(2, 2, 16, 8), bench_models.ModelShape(1, 2, 24, 8, causal=True)]
HAS_JAX = importlib.util.find_spec("jax") is not None


@pytest.fixture
def tiny_sweep(monkeypatch: pytest.MonkeyPatch) -> None:
    """The CLI on two tiny cases and one tiny layer, with 1 ms samples."""
    monkeypatch.setattr(bench_models, "model_sweep", lambda quick=False: (TINY, []))
    layer = [bench_models.LayerShape(2, 8, 16, 2)]
    monkeypatch.setattr(bench_models, "layer_shapes", lambda: layer)
    monkeypatch.setattr(bench_models, "_TARGET_MS", 1.0)
    monkeypatch.setattr(bench_models, "_WARM_UP_S", 0.0)


def test_models_cli_writes_json_markdown_table_and_goals(
    tiny_sweep: None, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "models.json"
    impls = "ours,composite,jax" if HAS_JAX else "ours,composite"
    argv = ["bench", "--models", "--impls", impls, "--json", str(out)]
    argv += ["--markdown", str(tmp_path / "models.md"), "--plot", str(tmp_path / "models.png")]
    assert cli.main(argv) == 0
    report = json.loads(out.read_text())
    assert {"machine", "rows", "layer", "goals", "command", "threads", "repeats"} <= set(report)
    assert report["command"].startswith("tanh-attention bench --models")
    assert report["threads"] == [1] and report["repeats"] == 5
    # 2 cases x 2 paths x 2 passes
    assert len(report["rows"]) == 8
    assert {(r["path"], r["pass"]) for r in report["rows"]} == {
        (p, s) for p in ("weights", "o-only") for s in ("fwd+bwd", "fwd")
    }
    baselines = ["composite", "jax"] if HAS_JAX else ["composite"]
    for row in report["rows"]:
        assert row["threads"] == 1 and row["shape"]["n"] == row["shape"]["m"]
        assert set(row["ms"]) == {"ours", *baselines}
        assert sorted(row["ratios"]) == sorted(baselines)
        for value in (*row["ms"].values(), *row["ratios"].values()):
            assert math.isfinite(value) and value > 0
        assert all(len(s) == 5 for s in row["samples_ms"].values())
    assert len(report["layer"]) == 2  # causal o-only, weights
    for row in report["layer"]:
        assert math.isfinite(row["ratio"]) and row["ratio"] > 0
    assert len(report["goals"]) == 7
    for goal in report["goals"]:
        assert {"goal", "limit", "met", "worst", "rows"} <= set(goal)
        if goal["met"] is not None:
            assert goal["worst"]["ratio"] > 0 and goal["worst"]["row"]
    printed = capsys.readouterr().out
    assert "goals:" in printed and "/ composite" in printed and "/ softmax" in printed
    assert "| shape | causal |" in (tmp_path / "models.md").read_text()
    if importlib.util.find_spec("matplotlib") is not None:
        assert (tmp_path / "models.png").stat().st_size > 0


def test_layer_alone_with_two_thread_counts(tiny_sweep: None, tmp_path: Path) -> None:
    out = tmp_path / "layer.json"
    assert cli.main(["bench", "--layer", "--threads", "1,2", "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["rows"] == [] and {r["threads"] for r in report["layer"]} == {1, 2}
    assert "--layer --threads 1,2" in report["command"]
    assert torch.get_num_threads() >= 1


@pytest.mark.parametrize("weights", [True, False])
def test_every_implementation_computes_the_same_thing(weights: bool) -> None:
    """The baselines time tanh attention, not something cheaper: outputs and gradients of
    ours, the composite, compile (one case, to keep the test fast) and JAX agree."""
    shape = bench_models.ModelShape(1, 2, 24, 8, causal=True)
    config = shape.config("weights" if weights else "o-only", backward=True)
    x = bench_models._torch_inputs(config)
    impls = ["ours", "composite"] + (["compile"] if not weights else [])
    impls += ["jax"] if HAS_JAX else []
    results = {impl: bench_models._runner(impl, config, x)() for impl in impls}
    outputs, grads = results.pop("ours")
    assert len(outputs) == (2 if weights else 1)
    for impl, (other_outputs, other_grads) in results.items():
        for got, want in zip((*other_outputs, *other_grads), (*outputs, *grads), strict=True):
            got = torch.from_numpy(np.array(got)) if impl == "jax" else got
            torch.testing.assert_close(got, want.detach(), rtol=1e-4, atol=1e-4, msg=impl)


def test_layer_runners_step_both_modules() -> None:
    for variant in bench_models.LAYER_VARIANTS:
        runners = bench_models._layer_runners(bench_models.LayerShape(2, 8, 16, 2), variant)
        assert set(runners) == {"ours", "softmax"}
        for fn in runners.values():
            assert fn().shape == (2, 8, 16)


def test_sweep_shapes() -> None:
    full, skipped = bench_models.model_sweep()
    assert {(s.B, s.H) for s in full} == {(1, 1), (4, 4), (64, 4)}
    assert {s.n for s in full} == {16, 64, 256, 1024} and {s.d for s in full} == {16, 64, 128}
    assert all(s.a_bytes() <= 512 * 2**20 for s in full)
    assert {(s.B, s.H, s.n) for s in skipped} == {(64, 4, 1024)}
    assert len(full) == 2 * (3 * 4 * 3 - 3)
    quick, _ = bench_models.model_sweep(quick=True)
    assert len(quick) == 10 and {s.causal for s in quick} == {False, True}
    assert (1, 8, 1024, 64) in {(s.B, s.H, s.n, s.d) for s in quick}


def test_goals_report_the_worst_ratio_and_its_row() -> None:
    def row(n: int, path: str, pass_: str, **ratios: float) -> dict[str, object]:
        shape = {"B": 1, "H": 1, "n": n, "m": n, "d": 16, "causal": False}
        name = f"1x1 n={n} d=16"
        return {"shape": shape, "name": name, "causal": False, "path": path, "pass": pass_,
                "threads": 1, "ratios": ratios}  # fmt: skip

    rows = [
        row(64, "weights", "fwd+bwd", composite=0.8, compile=0.9),
        row(256, "weights", "fwd+bwd", composite=1.2, compile=0.5),
        row(1024, "o-only", "fwd+bwd", composite=0.6, compile=0.65),
        row(256, "o-only", "fwd", composite=0.8, jax=0.9),
    ]
    layer = [{"name": "batch=1", "variant": "weights", "threads": 1, "ratio": 0.9}]
    goals = {g["goal"]: g for g in bench_models.goals(rows, layer)}
    weights = goals["weights fwd+bwd <= 1.0x composite"]
    assert weights["met"] is False and weights["rows"] == 2
    assert weights["worst"] == {"ratio": 1.2, "row": "1x1 n=256 d=16 weights fwd+bwd threads=1"}
    assert goals["weights fwd+bwd <= 1.0x compile"]["met"] is True
    assert goals["o-only fwd+bwd at n >= 512 <= 0.7x compile"]["met"] is True
    assert goals["forward <= 0.9x composite"]["met"] is True
    assert goals["forward at n >= 256 <= 1.0x jax"]["rows"] == 1
    assert goals["layer training step <= 1.0x nn.MultiheadAttention"]["met"] is True
    assert bench_models.goals([], [])[0]["met"] is None


@pytest.mark.parametrize("value", ["0", "abc", "1,-2", ""])
def test_bad_threads_is_an_argparse_error(value: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as error:
        cli.main(["bench", "--models", "--threads", value])
    assert error.value.code == 2
    assert "argument --threads" in capsys.readouterr().err


def test_bad_arguments_raise() -> None:
    with pytest.raises(ValueError, match="'threads'"):
        bench_models.run_models(TINY, threads=[0])
    with pytest.raises(ValueError, match="'repeats'"):
        bench_models.run_models(TINY, repeats=0)
    with pytest.raises(ValueError, match="unknown implementation"):
        bench_models.run_models(TINY, impls=["ours", "nope"])
    with pytest.raises(ValueError, match="--threads applies to --models"):
        cli.main(["bench", "--threads", "2", "--sizes", "8"])
    with pytest.raises(ValueError, match="--decode and --models"):
        cli.main(["bench", "--models", "--decode"])


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity"), reason="CPU affinity is Linux's")
def test_one_cpu_pins_every_thread_and_restores_each() -> None:
    """JAX's one-thread rows run with every thread of the process on one CPU (XLA's pool
    ignores its thread flags), and each thread gets its own CPU set back afterwards."""
    started, stop = threading.Event(), threading.Event()
    seen: dict[str, set[int]] = {}

    def worker() -> None:  # a thread started before, as XLA's pool is
        seen["before"] = os.sched_getaffinity(0)
        started.set()
        stop.wait(10)
        seen["after"] = os.sched_getaffinity(0)

    thread = threading.Thread(target=worker)
    thread.start()
    started.wait(10)
    main_before = os.sched_getaffinity(0)
    assert thread.native_id is not None
    with bench_models._one_cpu():
        inside = {
            os.sched_getaffinity(int(t)) == {min(main_before)}
            for t in os.listdir("/proc/self/task")
        }
        assert inside == {True}
    stop.set()
    thread.join(10)
    assert os.sched_getaffinity(0) == main_before
    assert seen["after"] == seen["before"]
