"""``tanh-attention bench --decode``: decoding steps, a few queries against a long KV cache.

Inference calls attention with n in {1, 16} new queries against m cached keys: B x H = 32,
d = e = 128, bottom-right causal (the queries are the last n positions), o only, forward
only, float32 and bfloat16. Ours (``tanh_attention.attn``) against the eager composite
(``torch.ops.tanh_attention.attn_composite``) and the memory limit: the bytes of K and V
read once, at the rate ``torch.Tensor.copy_`` reaches on a 256 MiB tensor in the same run
(a copy reads and writes, so reading alone counts half of its time). Medians of at least 5
runs after a warm-up (``bench.median_ms``), both implementations taking turns.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

from .bench import median_ms

__all__ = ["DecodeConfig", "copy_rate", "decode_sweep", "markdown", "run_decode"]

BATCH, HEADS, HEAD_DIM = 4, 8, 128


@dataclasses.dataclass(frozen=True)
class DecodeConfig:
    """``q (4, 8, n, 128)`` against ``k, v (4, 8, m, 128)``, bottom-right causal, o only."""

    n: int
    m: int
    dtype: str = "float32"

    @property
    def name(self) -> str:
        return f"n={self.n} m={self.m} {'f32' if self.dtype == 'float32' else 'bf16'}"

    def kv_bytes(self) -> int:
        """Bytes of K and V."""
        return 2 * BATCH * HEADS * self.m * HEAD_DIM * (4 if self.dtype == "float32" else 2)


def decode_sweep(quick: bool = False) -> list[DecodeConfig]:
    """n in {1, 16}, m from 1024 to 32768 (to 4096 with ``quick``), float32 and bfloat16."""
    ms = (1024, 4096) if quick else (1024, 2048, 4096, 8192, 16384, 32768)
    return [DecodeConfig(n, m, dt) for dt in ("float32", "bfloat16") for n in (1, 16) for m in ms]


def copy_rate(repeats: int = 5) -> float:
    """Bytes per second ``torch.Tensor.copy_`` moves (read + write) on a 256 MiB tensor."""
    import torch

    src = torch.empty(64 * 2**20, dtype=torch.float32).normal_()
    dst = torch.empty_like(src)
    ms, _ = median_ms(lambda: dst.copy_(src), repeats)
    return 2 * src.numel() * 4 / (ms / 1e3)


def _runners(config: DecodeConfig) -> dict[str, Callable[[], Any]]:
    import torch

    import tanh_attention

    dtype = getattr(torch, config.dtype)
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(BATCH, HEADS, config.n, HEAD_DIM, generator=gen).to(dtype)
    k = torch.randn(BATCH, HEADS, config.m, HEAD_DIM, generator=gen).to(dtype)
    v = torch.randn(BATCH, HEADS, config.m, HEAD_DIM, generator=gen).to(dtype)
    scale = HEAD_DIM**-0.5

    def ours() -> Any:
        with torch.no_grad():
            return tanh_attention.attn(
                q, k, v, scale=scale, causal="bottom_right", need_weights=False
            )[0]

    def composite() -> Any:
        with torch.no_grad():
            return torch.ops.tanh_attention.attn_composite(q, k, v, None, scale, "bottom_right")[0]

    return {"ours": ours, "composite": composite}


def run_decode(
    configs: Sequence[DecodeConfig],
    repeats: int = 5,
    progress: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Time every config; returns ``{"copy_rate": B/s, "rows": [...], "goals": {...}}``.

    Each row has the medians (ms) of ours and the composite, the memory limit (ms) and the
    ratios ``ours / composite`` (goal <= 1.0) and ``ours / limit`` (goal <= 1.5).
    """
    rate = copy_rate(repeats)
    rows: list[dict[str, Any]] = []
    for config in configs:
        if progress:
            progress(config.name)
        runners = _runners(config)
        times: dict[str, list[float]] = {name: [] for name in runners}
        for _ in range(2):  # taking turns: two rounds of medians, keep the best of each
            for name, fn in runners.items():
                times[name].append(median_ms(fn, repeats)[0])
        ours, composite = min(times["ours"]), min(times["composite"])
        limit = config.kv_bytes() / (rate / 2) * 1e3
        rows.append(
            {
                "config": dataclasses.asdict(config),
                "name": config.name,
                "ours_ms": ours,
                "composite_ms": composite,
                "limit_ms": limit,
                "vs_composite": ours / composite,
                "vs_limit": ours / limit,
            }
        )
    goals = {
        "at most 1.0x the eager composite everywhere": all(r["vs_composite"] <= 1.0 for r in rows),
        "within 1.5x of the memory limit everywhere": all(r["vs_limit"] <= 1.5 for r in rows),
    }
    return {"copy_rate": rate, "rows": rows, "goals": goals}


def markdown(report: dict[str, Any]) -> str:
    """The decode table as Markdown."""
    lines = [
        f"copy rate {report['copy_rate'] / 1e9:.1f} GB/s (read + write)",
        "",
        "| case | ours ms | composite ms | limit ms | / composite | / limit |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for r in report["rows"]:
        lines.append(
            f"| {r['name']} | {r['ours_ms']:.2f} | {r['composite_ms']:.2f} | "
            f"{r['limit_ms']:.2f} | {r['vs_composite']:.2f}x | {r['vs_limit']:.2f}x |"
        )
    lines += [
        "",
        *(f"- {goal}: {'met' if ok else 'not met'}" for goal, ok in report["goals"].items()),
    ]
    return "\n".join(lines)
