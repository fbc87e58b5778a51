"""The ``tanh-attention`` command line: ``check``, ``bench`` and ``train``.

Each subcommand lives in its own module, which provides ``add_arguments(parser)`` and
``run(args) -> int`` (the exit status). Those modules keep their heavy imports (matplotlib,
JAX, the model code) inside ``run``, so building the parser stays cheap.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

__all__ = ["main"]

_SUBCOMMANDS = {
    "check": (
        "tanh_attention.tools.check",
        "verify every implementation available on this machine",
    ),
    "bench": ("tanh_attention.tools.bench", "benchmark against the composite, compile and JAX"),
    "train": (
        "tanh_attention.tools.train",
        "train a small Transformer with tanh vs softmax attention",
    ),
}


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tanh-attention",
        description="Element-wise tanh attention for PyTorch: verify, benchmark, train.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (module, help_text) in _SUBCOMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        importlib.import_module(module).add_arguments(p)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``tanh-attention`` console script; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = _parser().parse_args(argv)
    module = importlib.import_module(_SUBCOMMANDS[args.command][0])
    return int(module.run(args))


if __name__ == "__main__":
    sys.exit(main())
