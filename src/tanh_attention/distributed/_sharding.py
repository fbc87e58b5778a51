"""DTensor sharding rules of the registered ops (registered on import of the package).

For every op (``attn``, ``attn_lean`` and their backward ops), on each mesh dimension:

- **batch / head sharding**: every input that has the batch dimension (not broadcast there)
  is sharded on it, the outputs too; an input broadcast there is replicated and its gradient
  is ``Partial`` (a sum over the batch). Heads are a batch dimension: this is head-parallel
  tensor parallelism. Masks shard on their own dims (or are replicated where they broadcast).
- **query rows** (non-causal only): q, the mask's rows, o and a sharded on dim -2, K and V
  replicated; in the backward the gradients of K and V are ``Partial``. Causal masks use row
  indices, so a causal call never takes this rule.
- **replicate**.

The rule cache of torch's sharding propagator keys on the op's int arguments only, and our
ops have none: a causal call after a non-causal one on the same shapes would reuse the old
plan silently. Each op's schema info is therefore set with ``static_argnum`` at its first
non-tensor argument (``scale``), so that ``scale``, ``causal`` and ``needs`` are part of the
key.
"""

from __future__ import annotations

from typing import Any

import torch

__all__ = ["OPS", "register"]

# the tensor arguments of the forward and backward ops, in schema order
_FORWARD_ROLES = ("q", "k", "v", "mask")
_BACKWARD_ROLES = ("grad_o", "grad_a", "q", "k", "v", "a", "mask")
OPS = ("attn", "attn_lean", "attn_backward", "attn_lean_backward")
_registered = False


def _ndim(spec: Any) -> int:
    return len(spec.shape)


def _size(spec: Any, p: int) -> int:
    """Size of ``spec`` at batch position ``p`` (negative, from the end); 1 where absent."""
    shape = tuple(spec.shape)
    return shape[p] if len(shape) >= -p else 1


def _strategies(roles: dict[str, Any], outputs: list[tuple[str, tuple[str, ...]]], causal: str):
    """The single-mesh-dim strategies: ``(output placements, input placements)`` pairs.

    ``roles``: role -> spec (None where the argument is None). ``outputs``: for each output,
    its kind (``"o"``, ``"a"``, ``"grad:<role>"``, ``"empty"``) and, for ``a``, the roles whose
    batch it has.
    """
    from torch.distributed.tensor import Partial, Replicate, Shard

    present = {r: s for r, s in roles.items() if s is not None}
    rank = max(_ndim(s) for s in present.values())
    out: list[tuple[list[Any], list[Any]]] = []

    def inputs(place: dict[str, Any]) -> list[Any]:
        return [place.get(r) if roles[r] is not None else None for r in roles]

    # replicate
    rep_in = {r: Replicate() for r in present}
    out.append(([Replicate() for _ in outputs], inputs(rep_in)))

    # batch / head dims
    for p in range(-3, -rank - 1, -1):
        place: dict[str, Any] = {}
        sharded = set()
        for r, s in present.items():
            if _size(s, p) != 1:
                place[r] = Shard(_ndim(s) + p)
                sharded.add(r)
            else:
                place[r] = Replicate()
        if not sharded:
            continue
        outs: list[Any] = []
        ok = True
        for kind, batch_of in outputs:
            if kind == "empty":
                outs.append(Replicate())
            elif kind.startswith("grad:"):
                r = kind[5:]
                outs.append(Shard(_ndim(present[r]) + p) if r in sharded else Partial())
            else:  # o or a: sharded if any of the roles it broadcasts over is
                if any(b in sharded for b in batch_of):
                    outs.append(Shard((rank if kind == "o" else _a_rank(present, batch_of)) + p))
                else:
                    ok = False
        if ok:
            out.append((outs, inputs(place)))

    # query rows, non-causal only
    if causal == "none":
        place = {}
        for r, s in present.items():
            if r in ("q", "grad_o", "grad_a", "a"):
                place[r] = Shard(_ndim(s) - 2)
            elif r == "mask":
                place[r] = Shard(_ndim(s) - 2) if s.shape[-2] != 1 else Replicate()
            else:
                place[r] = Replicate()
        outs = []
        for kind, batch_of in outputs:
            if kind == "empty":
                outs.append(Replicate())
            elif kind == "grad:q":
                outs.append(Shard(_ndim(present["q"]) - 2))
            elif kind.startswith("grad:"):
                outs.append(Partial())
            else:
                outs.append(Shard((rank if kind == "o" else _a_rank(present, batch_of)) - 2))
        out.append((outs, inputs(place)))
    return out


def _a_rank(present: dict[str, Any], batch_of: tuple[str, ...]) -> int:
    return max(_ndim(present[b]) for b in batch_of if b in present)


def _forward_rule(weights: bool):
    def rule(
        q: Any, k: Any, v: Any, attn_mask: Any = None, scale: float = 1.0, causal: str = "none"
    ) -> Any:
        roles = dict(zip(_FORWARD_ROLES, (q, k, v, attn_mask), strict=True))
        outputs: list[tuple[str, tuple[str, ...]]] = [("o", ("q", "k", "v", "mask"))]
        if weights:
            outputs.append(("a", ("q", "k", "mask")))
        strategies = _strategies(roles, outputs, causal)
        return [(o, [*i, None, None]) for o, i in strategies]

    return rule


def _backward_rule(
    grad_o: Any,
    grad_a: Any,
    q: Any,
    k: Any,
    v: Any,
    a: Any,
    attn_mask: Any,
    scale: float,
    causal: str,
    needs: Any,
) -> Any:
    roles = dict(zip(_BACKWARD_ROLES, (grad_o, grad_a, q, k, v, a, attn_mask), strict=True))
    outputs: list[tuple[str, tuple[str, ...]]] = [
        (f"grad:{r}" if need else "empty", ())
        for r, need in zip(("q", "k", "v"), needs, strict=True)
    ]
    return [(o, [*i, None, None, None]) for o, i in _strategies(roles, outputs, causal)]


def register() -> None:
    """Register the rules (once) and close the propagator's cache trap (see the module doc)."""
    global _registered
    if _registered:
        return
    from torch.distributed.tensor import DTensor
    from torch.distributed.tensor._op_schema import RuntimeSchemaInfo
    from torch.distributed.tensor.experimental import register_sharding

    ops = torch.ops.tanh_attention
    propagator = DTensor._op_dispatcher.sharding_propagator
    for name, rule, static in (
        ("attn", _forward_rule(True), 4),
        ("attn_lean", _forward_rule(False), 4),
        ("attn_backward", _backward_rule, 7),
        ("attn_lean_backward", _backward_rule, 7),
    ):
        op = getattr(ops, name).default
        register_sharding(op)(rule)
        # the cache trap: key the plan on scale, causal (and needs), not on tensors alone
        propagator.op_to_schema_info[op] = RuntimeSchemaInfo(
            static_argnum=static, needs_pytree=True
        )
        propagator.propagate_op_sharding.cache_clear()
    _registered = True
