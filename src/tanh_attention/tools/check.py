"""``tanh-attention check``: verify every implementation available on this machine.

For each backend that can run here (``tanh_attention.backends()``, each forced with
``attn(..., backend=name)``), and for the public function with the dispatcher's choice in
each of its modes (``attn-eager``, ``attn-func`` for ``torch.func``, ``attn-compiled``), with
``need_weights=True`` (``(o, a)``) and ``need_weights=False`` (``(o, None)``, o compared
only), on the lab's example, on a batched causal case with a mask and on a bottom-right
causal case with a mask, in float64: forward error against :func:`_reference`, gradcheck,
gradgradcheck and forward AD. Prints a table (or JSON), lists the backends that cannot run
here and why, and exits 1 if any check fails.

The oracle, :func:`_reference`, is written here from the definition and shares no code with
the package, so no implementation is compared with itself. The finite-difference checks
(gradcheck, gradgradcheck, forward AD) are independent of the package by construction;
``attn-func`` compares ``torch.func`` transforms of ``attn`` with the same transforms of
:func:`_reference`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from torch import Tensor

__all__ = ["add_arguments", "run", "run_checks"]

CHECKS = ("forward", "gradcheck", "gradgradcheck", "forward_ad")
HEADERS = ("forward err", "gradcheck", "gradgradcheck", "forward AD")
TOL = 1e-10

#: ``call(q, k, v, attn_mask, scale, causal, need_weights) -> (o, a)``, ``a`` None when
#: ``need_weights`` is False.
Call = Callable[..., "tuple[Tensor, Tensor | None]"]


@dataclasses.dataclass
class Result:
    """One cell of the table: status is "pass", "fail" or "n/a"."""

    status: str
    error: float | None = None
    detail: str = ""


@dataclasses.dataclass
class Row:
    implementation: str
    weights: bool  # need_weights: (o, a) checked, else (o, None) with o checked only
    case: str
    results: dict[str, Result]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of ``tanh-attention check``."""
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    parser.add_argument(
        "--no-compile",
        action="store_true",
        help="skip the attn-compiled rows (their first compile takes a few seconds)",
    )
    parser.add_argument(
        "--only",
        action="append",
        metavar="NAME",
        help="check only this implementation (repeatable): a backend name from "
        "tanh_attention.backends(), or attn-eager, attn-func, attn-compiled",
    )


# --------------------------------------------------------------------------------------------
# The oracle: float64, from the definition, no code shared with the package
# --------------------------------------------------------------------------------------------


def _reference(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    attn_mask: Tensor | None,
    scale: float,
    causal: bool | str,
) -> tuple[Tensor, Tensor]:
    """``a = M * tanh(scale * q @ k^T)``, ``o = a @ v``; ``M`` keeps what the causal
    alignment (top-left ``j <= i`` or bottom-right ``j <= i + m - n``) and the mask (True =
    takes part) both keep."""
    import torch

    x = torch.matmul(q, k.transpose(-1, -2)) * scale
    n, m = x.shape[-2:]
    rows = torch.arange(n, device=x.device)[:, None]
    cols = torch.arange(m, device=x.device)
    keep = torch.ones(n, m, dtype=torch.bool, device=x.device)
    if causal in (True, "top_left"):
        keep &= cols <= rows
    if causal == "bottom_right":
        keep &= cols <= rows + (m - n)
    if attn_mask is not None:
        keep = keep & attn_mask
    # Masked before tanh: a masked entry's gradient is then 0 even where its score is NaN.
    a = torch.tanh(torch.where(keep, x, torch.zeros((), dtype=x.dtype, device=x.device)))
    return a @ v, a


# --------------------------------------------------------------------------------------------
# What is checked
# --------------------------------------------------------------------------------------------


def _on_device(call: Call, device: str) -> Call:
    """``call`` with the (CPU) case moved to ``device`` and its outputs moved back; the moves
    are differentiable, so every check still runs on the CPU tensors."""
    if device == "cpu":
        return call

    def moved(q: Any, k: Any, v: Any, mask: Any, *rest: Any) -> Any:
        m = None if mask is None else mask.to(device)
        o, a = call(q.to(device), k.to(device), v.to(device), m, *rest)
        return o.cpu(), (None if a is None else a.cpu())

    return moved


def _implementations() -> list[tuple[str, Call]]:
    """The eager rows: every backend that can run here, forced by name, then ``attn-eager``
    (the dispatcher's choice). Each is ``(name, call)`` with ``call(q, k, v, attn_mask,
    scale, causal, need_weights) -> (o, a or None)``."""
    from .. import attn, backends

    def forced(name: str | None) -> Call:
        def call(q: Any, k: Any, v: Any, m: Any, s: float, c: Any, w: bool) -> Any:
            return attn(q, k, v, attn_mask=m, scale=s, causal=c, need_weights=w, backend=name)

        return call

    def device(b: Any) -> str:  # CPU where the backend takes it, else its (first) device
        types = sorted(getattr(b, "device_types", None) or {"cpu"})
        return "cpu" if "cpu" in types else types[0]

    rows = [(b.name, _on_device(forced(b.name), device(b))) for b in backends() if b.available]
    rows.append(("attn-eager", forced(None)))
    return rows


def _cases() -> dict[str, dict[str, Any]]:
    import torch

    gen = torch.Generator().manual_seed(0)

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(shape, generator=gen, dtype=torch.float64)

    mask = torch.rand(3, 4, generator=gen) < 0.7
    mask_br = torch.rand(2, 1, 3, 5, generator=gen) < 0.7
    return {
        "lab": {
            "q": randn(2, 3), "k": randn(2, 3), "v": randn(2, 4),
            "attn_mask": None, "scale": 1.0, "causal": False,
        },
        "batched causal mask": {
            "q": randn(2, 2, 3, 2), "k": randn(2, 1, 4, 2), "v": randn(4, 2),
            "attn_mask": mask, "scale": 0.5, "causal": True,
        },
        "bottom-right causal mask": {
            "q": randn(2, 3, 2), "k": randn(5, 2), "v": randn(2, 1, 5, 3),
            "attn_mask": mask_br, "scale": 0.7, "causal": "bottom_right",
        },
    }  # fmt: skip


def _failure(exc: Exception) -> Result:
    return Result("fail", detail=f"{type(exc).__name__}: {exc}".splitlines()[0])


def _gradchecks(
    fn: Callable[..., Any],
    inputs: tuple[Any, ...],
    checks: Sequence[str] = ("gradcheck", "gradgradcheck", "forward_ad"),
) -> dict[str, Result]:
    from torch.autograd import gradcheck, gradgradcheck

    runs = {
        "gradcheck": lambda: gradcheck(fn, inputs, check_undefined_grad=True),
        "gradgradcheck": lambda: gradgradcheck(fn, inputs),
        "forward_ad": lambda: gradcheck(fn, inputs, check_forward_ad=True, check_backward_ad=False),
    }
    out = {}
    for name in checks:
        try:
            out[name] = Result("pass" if runs[name]() else "fail")
        except Exception as exc:  # gradcheck reports a mismatch as GradcheckError
            out[name] = _failure(exc)
    return out


def _max_error(got: Sequence[Any], want: Sequence[Any]) -> float:
    import torch

    if len(got) != len(want):
        raise ValueError(f"expected {len(want)} outputs, got {len(got)}")
    errors = []
    for g, w in zip(got, want, strict=True):
        if not isinstance(g, torch.Tensor):
            raise TypeError(f"expected a tensor, got {type(g).__name__}")
        if g.shape != w.shape:
            raise ValueError(f"expected shape {tuple(w.shape)}, got {tuple(g.shape)}")
        if g.numel():
            errors.append((g.detach() - w.detach()).abs().max().item())
    return max(errors, default=0.0)


def _forward(fn: Callable[..., Any], want: Sequence[Any], inputs: tuple[Any, ...]) -> Result:
    try:
        error = _max_error(fn(*inputs), want)
    except Exception as exc:  # report, don't stop the table
        return _failure(exc)
    return Result("pass" if error <= TOL else "fail", error)


def _outputs(call: Call, rest: tuple[Any, ...], weights: bool) -> Callable[..., Any]:
    """``call`` bound to the case's (attn_mask, scale, causal) and ``need_weights``, returning
    ``(o, a)``, or ``(o,)`` without weights (an ``a`` that is not None is an error)."""

    def fn(*x: Any) -> tuple[Any, ...]:
        o, a = call(*x, *rest, weights)
        if weights:
            return o, a
        if a is not None:
            raise RuntimeError(f"need_weights=False returned weights ({type(a).__name__})")
        return (o,)

    return fn


def _func_mode(case: dict[str, Any], weights: bool) -> dict[str, Result]:
    """The public function under torch.func: vmap, jacrev, hessian and jacfwd against the
    same transforms of :func:`_reference`."""
    import torch
    from torch.utils._pytree import tree_leaves

    from .. import attn

    mask, scale, causal = case["attn_mask"], case["scale"], case["causal"]
    inputs = (case["q"], case["k"], case["v"])

    def ours(*x: torch.Tensor) -> torch.Tensor:
        o, a = attn(*x, attn_mask=mask, scale=scale, causal=causal, need_weights=weights)
        if not weights:
            if a is not None:
                raise RuntimeError("need_weights=False returned weights")
            return o.sin().sum()
        if a is None:
            raise RuntimeError("need_weights=True returned no weights")
        return o.sin().sum() + a.square().sum()

    def theirs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        o, a = _reference(q, k, v, mask, scale, causal)
        return o.sin().sum() + (a.square().sum() if weights else 0)

    argnums = (0, 1, 2)
    transforms: dict[str, Callable[[Callable[..., Any]], Callable[..., Any]]] = {
        "forward": torch.func.vmap,
        "gradcheck": lambda f: torch.func.jacrev(f, argnums),
        "gradgradcheck": lambda f: torch.func.hessian(f, 0),
        "forward_ad": lambda f: torch.func.jacfwd(f, argnums),
    }
    out = {}
    for name, transform in transforms.items():
        args = tuple(x.unsqueeze(0) for x in inputs) if name == "forward" else inputs
        want = tree_leaves(transform(theirs)(*args))
        f = transform(ours)
        out[name] = _forward(lambda *x, f=f: tree_leaves(f(*x)), want, args)
    return out


# --------------------------------------------------------------------------------------------
# Running
# --------------------------------------------------------------------------------------------


def run_checks(
    *,
    compile: bool = True,
    only: Sequence[str] | None = None,
    progress: Callable[[str], None] | None = None,
) -> list[Row]:
    """Run every check; returns one row per (implementation, need_weights, case).

    Args:
        compile: include the public function compiled with ``torch.compile(backend="aot_eager")``.
        only: names of the implementations to check (default: all available).
        progress: called with a label before each row.

    Raises:
        ValueError: ``only`` names an implementation that does not exist or cannot run here.
    """
    import torch

    from .. import attn

    def public(q: Any, k: Any, v: Any, m: Any, s: float, c: Any, w: bool) -> Any:
        return attn(q, k, v, attn_mask=m, scale=s, causal=c, need_weights=w)

    plan: list[tuple[str, Call | None]] = list(_implementations())
    plan.append(("attn-func", None))
    if compile:
        plan.append(("attn-compiled", torch.compile(public, backend="aot_eager")))
    if only is not None:
        known = {name for name, _ in plan}
        unknown = sorted(set(only) - known)
        if unknown:
            raise ValueError(
                f"check: unknown or unavailable implementation(s) {unknown}; "
                f"choose from {sorted(known)}"
            )
        plan = [step for step in plan if step[0] in only]

    rows = []
    for name, call in plan:
        for weights in (True, False):
            for case_name, case in _cases().items():
                if progress:
                    progress(f"{name}{'' if weights else ' (o only)'} / {case_name}")
                if call is None:
                    rows.append(Row(name, weights, case_name, _func_mode(case, weights)))
                    continue
                rest = (case["attn_mask"], case["scale"], case["causal"])
                inputs = tuple(case[x].clone().requires_grad_() for x in "qkv")
                o, a = _reference(case["q"], case["k"], case["v"], *rest)
                want = (o, a) if weights else (o,)
                fn = _outputs(call, rest, weights)
                if name != "attn-compiled":
                    results = {"forward": _forward(fn, want, inputs), **_gradchecks(fn, inputs)}
                    rows.append(Row(name, weights, case_name, results))
                    continue
                # A fresh cache for each row, and an error rather than a silent fall back to
                # eager if the row recompiles too often: every row is checked compiled.
                torch._dynamo.reset()
                with torch._dynamo.config.patch(fail_on_recompile_limit_hit=True):
                    results = {
                        "forward": _forward(fn, want, inputs),
                        **_gradchecks(fn, inputs, ["gradcheck"]),
                    }
                na = "torch.compile has no double backward or forward AD; first order only"
                results["gradgradcheck"] = Result("n/a", detail=na)
                results["forward_ad"] = Result("n/a", detail=na)
                rows.append(Row(name, weights, case_name, results))
    return rows


def _cell(result: Result) -> str:
    if result.status == "n/a":
        return "[dim]n/a[/dim]"
    color = "green" if result.status == "pass" else "bold red"
    error = "" if result.error is None else f" {result.error:.1e}"
    return f"[{color}]{result.status}[/{color}]{error}"


def _weights_label(weights: bool) -> str:
    return "(o, a)" if weights else "o only"


def run(args: argparse.Namespace) -> int:
    """Run ``tanh-attention check``; returns 0 if everything passes, else 1."""
    import torch
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    from .. import __version__, backends

    # A log or pipe gets a fixed width wide enough for the table (rich would use 80).
    stream = sys.stderr if args.json else sys.stdout
    console = Console(stderr=args.json, width=None if stream.isatty() else 150)
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
        f"forward error vs an independent float64 reference, tolerance {TOL:g})"
    )
    table.add_column("implementation", no_wrap=True)
    table.add_column("weights", no_wrap=True)
    table.add_column("case", no_wrap=True)
    for header in HEADERS:
        table.add_column(header, no_wrap=True)
    for row in rows:
        table.add_row(
            row.implementation,
            _weights_label(row.weights),
            row.case,
            *(_cell(row.results[c]) for c in CHECKS),
        )
    console.print(table)
    console.print(
        "weights: (o, a) is need_weights=True; o only is need_weights=False, which must "
        "return (o, None). attn-func compares torch.func transforms with the reference's: "
        "vmap (forward), jacrev (gradcheck), hessian (gradgradcheck), jacfwd (forward AD)."
    )
    for row in rows:
        for check, result in row.results.items():
            if result.status == "fail" and result.detail:
                where = f"{row.implementation} {_weights_label(row.weights)} / {row.case}"
                console.print(f"[red]{escape(where)} / {check}:[/red] {escape(result.detail)}")
    console.print("Backends not available on this machine:")
    for name, reason in missing.items():
        console.print(f"  {name}: {reason}")
    console.print(
        "[bold red]FAILED[/bold red]" if failed else "[bold green]all checks passed[/bold green]"
    )
    return 1 if failed else 0
