"""``tanh-attention check``: verify every implementation available on this machine.

For each backend in the registry that can run here, and for the public function in each of
its modes (``attn-eager``, ``attn-func`` for ``torch.func``, ``attn-compiled``), on the lab's
example and on a batched causal case with a mask, in float64: forward error against the
composite, gradcheck, gradgradcheck and forward AD. Prints a table (or JSON), lists the
backends that cannot run here and why, and exits 1 if any check fails.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from collections.abc import Callable, Sequence
from typing import Any

__all__ = ["add_arguments", "run", "run_checks"]

CHECKS = ("forward", "gradcheck", "gradgradcheck", "forward_ad")
HEADERS = ("forward err", "gradcheck", "gradgradcheck", "forward AD")
TOL = 1e-10


@dataclasses.dataclass
class Result:
    """One cell of the table: status is "pass", "fail" or "n/a"."""

    status: str
    error: float | None = None
    detail: str = ""


@dataclasses.dataclass
class Row:
    implementation: str
    case: str
    results: dict[str, Result]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of ``tanh-attention check``."""
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    parser.add_argument(
        "--no-compile",
        action="store_true",
        help="skip the attn-compiled row (its first compile takes a few seconds)",
    )
    parser.add_argument(
        "--only",
        action="append",
        metavar="NAME",
        help="check only this implementation (repeatable): a backend name from the registry, "
        "or attn-eager, attn-func, attn-compiled",
    )


def _cases(device: str) -> dict[str, dict[str, Any]]:
    import torch

    gen = torch.Generator().manual_seed(0)

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(shape, generator=gen, dtype=torch.float64).to(device)

    mask = (torch.rand(3, 4, generator=gen) < 0.7).to(device)
    return {
        "lab": {
            "q": randn(2, 3), "k": randn(2, 3), "v": randn(2, 4),
            "attn_mask": None, "scale": 1.0, "causal": False,
        },
        "batched causal mask": {
            "q": randn(2, 2, 3, 2), "k": randn(2, 1, 4, 2), "v": randn(4, 2),
            "attn_mask": mask, "scale": 0.5, "causal": True,
        },
    }  # fmt: skip


def _gradchecks(fn: Callable[..., Any], inputs: tuple[Any, ...]) -> dict[str, Result]:
    from torch.autograd import gradcheck, gradgradcheck

    out = {}
    for name, run in (
        ("gradcheck", lambda: gradcheck(fn, inputs, check_undefined_grad=True)),
        ("gradgradcheck", lambda: gradgradcheck(fn, inputs)),
        (
            "forward_ad",
            lambda: gradcheck(fn, inputs, check_forward_ad=True, check_backward_ad=False),
        ),
    ):
        try:
            out[name] = Result("pass" if run() else "fail")
        except Exception as exc:  # gradcheck reports a mismatch as GradcheckError
            out[name] = Result("fail", detail=f"{type(exc).__name__}: {exc}".splitlines()[0])
    return out


def _max_error(got: Any, want: Any) -> float:
    import torch

    # A backend without weights (the memory-efficient one) returns (o,): compare what it has.
    errors = [
        (g.detach() - w.detach()).abs().max().item()
        for g, w in zip(got, want, strict=False)
        if isinstance(g, torch.Tensor) and g.numel()
    ]
    return max(errors, default=0.0)


def _forward(fn: Callable[..., Any], want: Any, inputs: tuple[Any, ...]) -> Result:
    try:
        error = _max_error(fn(*inputs), want)
    except Exception as exc:  # report, don't stop the table
        return Result("fail", detail=f"{type(exc).__name__}: {exc}".splitlines()[0])
    return Result("pass" if error <= TOL else "fail", error)


def _func_mode(case: dict[str, Any]) -> dict[str, Result]:
    """The public function under torch.func: jacrev, jacfwd and hessian against the composite's."""
    import torch

    from .api import attn

    rest = (case["attn_mask"], case["scale"], case["causal"])
    inputs = (case["q"], case["k"], case["v"])

    def ours(*x: torch.Tensor) -> torch.Tensor:
        o, a = attn(*x, attn_mask=rest[0], scale=rest[1], causal=rest[2])
        assert a is not None  # need_weights defaults to True
        return o.sin().sum() + a.square().sum()

    def theirs(*x: torch.Tensor) -> torch.Tensor:
        o, a = torch.ops.tanh_attention.attn_composite(*x, *rest)
        return o.sin().sum() + a.square().sum()

    argnums = (0, 1, 2)
    pairs: dict[str, tuple[Callable[..., Any], Callable[..., Any]]] = {
        "forward": (torch.func.vmap(ours), torch.func.vmap(theirs)),
        "gradcheck": (torch.func.jacrev(ours, argnums), torch.func.jacrev(theirs, argnums)),
        "gradgradcheck": (torch.func.hessian(ours, 0), torch.func.hessian(theirs, 0)),
        "forward_ad": (torch.func.jacfwd(ours, argnums), torch.func.jacrev(theirs, argnums)),
    }
    out = {}
    for name, (f, g) in pairs.items():
        args = tuple(x.unsqueeze(0) for x in inputs) if name == "forward" else inputs
        want = torch.utils._pytree.tree_leaves(g(*args))
        out[name] = _forward(lambda *x, f=f: torch.utils._pytree.tree_leaves(f(*x)), want, args)
    return out


def _bind(call: Callable[..., Any], rest: tuple[Any, ...]) -> Callable[..., Any]:
    """``call`` with the case's (attn_mask, scale, causal) after the three tensors."""
    return lambda *x: call(*x, *rest)


def run_checks(
    *,
    compile: bool = True,
    only: Sequence[str] | None = None,
    progress: Callable[[str], None] | None = None,
) -> list[Row]:
    """Run every check; returns one row per (implementation, case).

    Args:
        compile: include the public function compiled with ``torch.compile(backend="aot_eager")``.
        only: names of the implementations to check (default: all available).
        progress: called with a label before each row.

    Raises:
        ValueError: ``only`` names an implementation that does not exist or cannot run here.
    """
    import torch

    from .api import attn
    from .registry import backends

    def public(q: Any, k: Any, v: Any, m: Any, s: float, c: bool) -> Any:
        return attn(q, k, v, attn_mask=m, scale=s, causal=c)

    rows = []
    plan: list[tuple[str, Callable[..., Any] | None, str]] = [
        (b.name, b.call, b.device) for b in backends() if b.available and b.call is not None
    ]
    plan.append(("attn-eager", public, "cpu"))
    plan.append(("attn-func", None, "cpu"))
    if compile:
        plan.append(("attn-compiled", torch.compile(public, backend="aot_eager"), "cpu"))
    if only is not None:
        known = {name for name, _, _ in plan}
        unknown = sorted(set(only) - known)
        if unknown:
            raise ValueError(
                f"check: unknown or unavailable implementation(s) {unknown}; "
                f"choose from {sorted(known)}"
            )
        plan = [step for step in plan if step[0] in only]
    for name, call, device in plan:
        for case_name, case in _cases(device).items():
            if progress:
                progress(f"{name} / {case_name}")
            rest = (case["attn_mask"], case["scale"], case["causal"])
            inputs = tuple(case[x].clone().requires_grad_() for x in "qkv")
            want = torch.ops.tanh_attention.attn_composite(*inputs, *rest)
            if call is None:
                rows.append(Row(name, case_name, _func_mode(case)))
                continue

            fn = _bind(call, rest)
            results = {"forward": _forward(fn, want, inputs)}
            if name == "attn-compiled":
                na = "torch.compile has no double backward or forward AD; first order only"
                grads = _gradchecks(fn, inputs)
                results |= {
                    "gradcheck": grads["gradcheck"],
                    "gradgradcheck": Result("n/a", detail=na),
                    "forward_ad": Result("n/a", detail=na),
                }
            else:
                results |= _gradchecks(fn, inputs)
            rows.append(Row(name, case_name, results))
    return rows


def _cell(result: Result) -> str:
    if result.status == "n/a":
        return "[dim]n/a[/dim]"
    color = "green" if result.status == "pass" else "bold red"
    error = "" if result.error is None else f" {result.error:.1e}"
    return f"[{color}]{result.status}[/{color}]{error}"


def run(args: argparse.Namespace) -> int:
    """Run ``tanh-attention check``; returns 0 if everything passes, else 1."""
    import torch
    from rich.console import Console
    from rich.table import Table

    from . import __version__
    from .registry import backends

    # A log or pipe gets a fixed width wide enough for the table (rich would use 80).
    stream = sys.stderr if args.json else sys.stdout
    console = Console(stderr=args.json, width=None if stream.isatty() else 130)
    try:
        with console.status("checking implementations...") as status:
            rows = run_checks(
                compile=not args.no_compile,
                only=args.only,
                progress=lambda label: status.update(f"checking {label}..."),
            )
    except ValueError as exc:
        console.print(f"[red]{exc}[/red]")
        return 2
    missing = {b.name: b.unavailable_reason() for b in backends() if not b.available}
    failed = any(r.status == "fail" for row in rows for r in row.results.values())

    if args.json:
        payload = {
            "version": __version__,
            "torch": torch.__version__,
            "passed": not failed,
            "rows": [dataclasses.asdict(row) for row in rows],
            "unavailable": missing,
        }
        json.dump(payload, sys.stdout, indent=2)
        sys.stdout.write("\n")
        return 1 if failed else 0

    table = Table(
        title=f"tanh-attention {__version__} check (torch {torch.__version__}, float64; "
        f"forward error vs composite, tolerance {TOL:g})"
    )
    table.add_column("implementation", no_wrap=True)
    table.add_column("case", no_wrap=True)
    for header in HEADERS:
        table.add_column(header, no_wrap=True)
    for row in rows:
        table.add_row(row.implementation, row.case, *(_cell(row.results[c]) for c in CHECKS))
    console.print(table)
    console.print(
        "attn-func compares torch.func transforms with the composite's: vmap (forward), jacrev "
        "(gradcheck), hessian (gradgradcheck), jacfwd (forward AD)."
    )
    for row in rows:
        for check, result in row.results.items():
            if result.status == "fail" and result.detail:
                console.print(
                    f"[red]{row.implementation} / {row.case} / {check}:[/red] {result.detail}"
                )
    console.print("Backends not available on this machine:")
    for name, reason in missing.items():
        console.print(f"  {name}: {reason}")
    console.print(
        "[bold red]FAILED[/bold red]" if failed else "[bold green]all checks passed[/bold green]"
    )
    return 1 if failed else 0
