"""Shared test setup: float64 by default, deterministic seeds."""

from __future__ import annotations

import pytest
import torch

import tanh_attention  # noqa: F401  (registers the ops)


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)
