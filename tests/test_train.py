"""Tests of ``tanh-attention train``: the task, a short training run, the command's output."""

from __future__ import annotations

import argparse
import importlib.util
import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from tanh_attention.nn import MultiheadTanhAttention
from tanh_attention.tools import cli, train
from tanh_attention.tools.models import IGNORE, RecallTask, RecallTransformer, attention_factory


@pytest.fixture
def one_thread() -> Iterator[None]:
    """Tiny models run fastest on one thread (and do not suffer from a busy machine)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# --------------------------------------------------------------------------------------------
# The task
# --------------------------------------------------------------------------------------------


def test_task_targets_are_the_values_paired_with_the_asked_keys() -> None:
    task = RecallTask(seq_len=20, num_pairs=5, num_keys=7, num_values=6)
    tokens, targets = task.sample(50, torch.Generator().manual_seed(3))
    assert tokens.shape == targets.shape == (50, 20)
    for seq, tgt in zip(tokens.tolist(), targets.tolist(), strict=True):
        keys, values = seq[0:10:2], seq[1:10:2]
        assert len(set(keys)) == 5 and all(0 <= k < 7 for k in keys)
        assert all(7 <= v < 13 for v in values)
        assert tgt[:10] == [IGNORE] * 10
        for pos in range(10, 20):
            asked = seq[pos]
            assert asked in keys
            assert tgt[pos] == values[keys.index(asked)]


def test_task_is_reproducible_and_varies() -> None:
    task = RecallTask()
    a = task.sample(4, torch.Generator().manual_seed(0))
    b = task.sample(4, torch.Generator().manual_seed(0))
    c = task.sample(4, torch.Generator().manual_seed(1))
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    assert not torch.equal(a[0], c[0])
    assert task.num_pairs == 8 and task.num_queries == 16 and task.vocab_size == 64


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"seq_len": 8, "num_pairs": 4}, "2 \\* num_pairs must be below seq_len"),
        ({"seq_len": 16, "num_pairs": 5, "num_keys": 4}, "'num_keys' must be at least"),
        ({"seq_len": 0}, "'seq_len' must be a positive int"),
        ({"num_values": -1}, "'num_values' must be a positive int"),
    ],
)
def test_task_errors(kwargs: dict[str, int], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        RecallTask(**kwargs)


def test_model_swaps_the_attention_module() -> None:
    tanh = RecallTransformer(16, 8, attention_factory("tanh"), d_model=16, num_heads=2)
    soft = RecallTransformer(16, 8, attention_factory("softmax"), d_model=16, num_heads=2)
    assert isinstance(tanh.blocks[0].attn, MultiheadTanhAttention)
    assert type(soft.blocks[0].attn) is torch.nn.MultiheadAttention
    assert tanh.state_dict().keys() == soft.state_dict().keys()
    assert tanh(torch.randint(0, 16, (3, 8))).shape == (3, 8, 16)
    with pytest.raises(ValueError, match="'kind' must be"):
        attention_factory("relu")


def test_model_is_causal() -> None:
    """Changing a later token leaves the logits of earlier positions unchanged."""
    model = RecallTransformer(16, 8, attention_factory("tanh"), d_model=16, num_heads=2)
    tokens = torch.randint(0, 16, (2, 8))
    changed = tokens.clone()
    changed[:, 5] = (changed[:, 5] + 1) % 16
    a, b = model(tokens), model(changed)
    torch.testing.assert_close(a[:, :5], b[:, :5])
    assert not torch.allclose(a[:, 5:], b[:, 5:])


# --------------------------------------------------------------------------------------------
# Short training runs
# --------------------------------------------------------------------------------------------

_TINY = train.TrainConfig(
    steps=40,
    seq_len=12,
    num_keys=8,
    num_values=8,
    d_model=16,
    num_heads=2,
    lr=1e-2,
    warmup=5,
    eval_size=250,
    threads=1,
)


@pytest.mark.parametrize("kind", train.KINDS)
def test_loss_falls_clearly_in_a_short_run(kind: str, one_thread: None) -> None:
    seen: list[tuple[int, float]] = []
    result = train.train_one(_TINY, kind, lambda step, loss: seen.append((step, loss)))
    losses = result["losses"]
    assert len(losses) == _TINY.steps
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < 0.8 * first, (first, last)
    assert result["final_loss"] == pytest.approx(sum(losses[-2:]) / 2)
    assert 1 / 8 <= result["eval_accuracy"] <= 1  # at least chance on held-out sequences
    assert seen and seen[-1] == (_TINY.steps, losses[-1])


def test_same_seed_same_run(one_thread: None) -> None:
    config = train.TrainConfig(**{**_TINY.__dict__, "steps": 5})
    a = train.train_one(config, "tanh")
    b = train.train_one(config, "tanh")
    assert a["losses"] == b["losses"]


# --------------------------------------------------------------------------------------------
# The command
# --------------------------------------------------------------------------------------------

_TINY_ARGS = [
    "--steps", "12", "--seq-len", "12", "--d-model", "16", "--heads", "2", "--layers", "1",
    "--threads", "1",
]  # fmt: skip


def _run(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="tanh-attention train")
    train.add_arguments(parser)
    return train.run(parser.parse_args(argv))


def test_json_output(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    status = _run([*_TINY_ARGS, "--json", "--out", str(tmp_path)])
    out = capsys.readouterr().out
    assert status == 0
    report = json.loads(out)  # stdout holds the JSON only
    assert set(report) >= {"config", "models", "total_seconds", "plot", "torch"}
    assert report["config"]["steps"] == 12 and report["config"]["seq_len"] == 12
    assert set(report["models"]) == {"tanh", "softmax"}
    for kind, r in report["models"].items():
        assert r["kind"] == kind
        assert len(r["losses"]) == 12 and all(isinstance(x, float) for x in r["losses"])
        assert 0.0 <= r["eval_accuracy"] <= 1.0
        assert r["eval_loss"] > 0 and r["final_loss"] > 0 and r["train_seconds"] > 0
        if sys.platform.startswith("linux"):
            assert r["peak_memory_bytes"] >= r["baseline_memory_bytes"] > 0
    # both models started from the same sizes and seed: same parameter count, and their
    # different attention gives different losses from the same data
    assert report["models"]["tanh"]["parameters"] == report["models"]["softmax"]["parameters"]
    assert report["models"]["tanh"]["losses"] != report["models"]["softmax"]["losses"]
    assert json.loads((tmp_path / "train_results.json").read_text()) == report
    if importlib.util.find_spec("matplotlib") is not None:
        assert report["plot"] == str(tmp_path / "train_loss.png")
        assert (tmp_path / "train_loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_missing_matplotlib_skips_the_plot(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    results = {k: {"losses": [2.0, 1.0], "eval_accuracy": 0.5} for k in train.KINDS}
    problem = train._plot(results, train.TrainConfig(steps=2), tmp_path / "p.png")
    assert problem is not None and "matplotlib is not installed" in problem
    assert not (tmp_path / "p.png").exists()


@pytest.mark.parametrize(
    ("argv", "match"),
    [
        (["--seq-len", "8", "--pairs", "4"], "--seq-len/--pairs"),
        (["--d-model", "10", "--heads", "4"], "--d-model must be divisible by --heads"),
        (["--device", "nonsense"], "--device"),
        (["--context-parallel"], "--context-parallel needs --nproc"),
        (["--nproc", "2", "--batch-size", "3"], "--batch-size must be divisible by --nproc"),
        (
            ["--nproc", "2", "--context-parallel", "--seq-len", "13"],
            "--seq-len must be divisible by --nproc",
        ),
        (["--nproc", "2", "--context-parallel", "--compile"], "--compile does not combine"),
        *(
            [(["--device", "cuda"], "CUDA is not available")]
            if not torch.cuda.is_available()
            else []
        ),
    ],
)
def test_bad_options_exit_2_before_training(
    argv: list[str], match: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert _run([*argv, "--out", str(tmp_path / "o")]) == 2
    assert match in capsys.readouterr().err.replace("\n", " ")
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("argv", [["--steps", "0"], ["--lr", "-1"], ["--seq-len", "x"]])
def test_option_types_are_checked_by_the_parser(argv: list[str]) -> None:
    parser = argparse.ArgumentParser()
    train.add_arguments(parser)
    with pytest.raises(SystemExit):
        parser.parse_args(argv)


def test_every_subcommand_module_imports() -> None:
    """The parser imports every subcommand's module: a missing or broken one is a packaging
    failure, so it fails here rather than being skipped."""
    for name, (module, _) in cli._SUBCOMMANDS.items():
        loaded = importlib.import_module(module)
        assert callable(loaded.add_arguments) and callable(loaded.run), name
    assert cli._SUBCOMMANDS["train"][0] == train.__name__ == "tanh_attention.tools.train"


def test_cli_wires_the_subcommand(tmp_path: Path) -> None:
    """``tanh-attention train`` through the real entry point."""
    proc = subprocess.run(
        [sys.executable, "-m", "tanh_attention.tools.cli", "train", *_TINY_ARGS, "--steps", "3",
         "--json", "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert set(json.loads(proc.stdout)["models"]) == {"tanh", "softmax"}


def test_importing_the_command_is_cheap() -> None:
    code = (
        "import sys, tanh_attention.tools.train; "
        "print(sorted(m for m in ('matplotlib', 'rich', 'tanh_attention.tools.models') "
        "if m in sys.modules))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout
    assert out.strip() == "[]"


# --------------------------------------------------------------------------------------------
# Across processes: --nproc (DDP) and --context-parallel
# --------------------------------------------------------------------------------------------

_NPROC_ARGS = [
    "--steps", "6", "--seq-len", "16", "--d-model", "16", "--heads", "2", "--layers", "2",
    "--batch-size", "8", "--threads", "1",
]  # fmt: skip


def _one_process_losses(argv: list[str]) -> dict[str, list[float]]:
    parser = argparse.ArgumentParser()
    train.add_arguments(parser)
    config = train._config_from_args(parser.parse_args(argv))
    before = torch.get_num_threads()
    try:
        return {k: train.train_one(config, k)["losses"] for k in train.KINDS}
    finally:
        torch.set_num_threads(before)


def _two_process_report(argv: list[str], tmp_path: Path, capsys: Any) -> dict[str, Any]:
    assert _run([*argv, "--json", "--out", str(tmp_path)]) == 0
    return json.loads(capsys.readouterr().out)


def test_context_parallel_across_two_processes_matches_one_process(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """--nproc 2 --context-parallel: the tanh model's sequence is sharded across 2 gloo
    processes, the softmax model's batch (DDP); both loss curves equal one process's."""
    reference = _one_process_losses(_NPROC_ARGS)
    argv = [*_NPROC_ARGS, "--nproc", "2", "--context-parallel"]
    report = _two_process_report(argv, tmp_path, capsys)
    assert report["config"]["nproc"] == 2 and report["config"]["context_parallel"]
    for kind in train.KINDS:
        assert report["models"][kind]["losses"] == pytest.approx(reference[kind], rel=1e-5)


@pytest.mark.slow
def test_data_parallel_across_two_processes_matches_one_process(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    reference = _one_process_losses(_NPROC_ARGS)
    report = _two_process_report([*_NPROC_ARGS, "--nproc", "2"], tmp_path, capsys)
    for kind in train.KINDS:
        assert report["models"][kind]["losses"] == pytest.approx(reference[kind], rel=1e-5)
