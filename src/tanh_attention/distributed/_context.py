"""Context parallelism: tanh attention over a sequence sharded across the ranks of a group.

Tanh attention has no normaliser: ``o = sum_b (M_b * tanh(scale q K_b^T)) @ V_b`` over any
split of the keys into blocks ``b``, so a sharded sequence needs no log-sum-exp merge. Each
method computes every local query row against all keys, with the causal and bool masks built
from global positions:

- ``"allgather"``: all-gather K and V (in global order), attend; the backward reduce-scatters
  the gradients of K and V (float32 at least).
- ``"alltoall"`` (Ulysses): all-to-all from sequence shards to head shards, full-sequence
  attention on ``H / W`` heads, all-to-all back.
- ``"ring"``: K/V blocks travel around the ring by point-to-point sends (double-buffered), each
  block attended with the memory-efficient op; in the backward the blocks travel again with
  their gradient accumulators. No rank holds all of K/V.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from ..api import attn
from . import _layout

__all__ = ["METHODS", "context_parallel_attn"]

METHODS = ("allgather", "alltoall", "ring")
_WHERE = "context_parallel_attn()"
_CAUSAL = {False: "none", True: "top_left", "top_left": "top_left", "bottom_right": "bottom_right"}


# --------------------------------------------------------------------------------------------
# Planning one (rows, keys) block pair from global positions
# --------------------------------------------------------------------------------------------


def _plan(
    rs: int, rc: int, ks: int, kc: int, n: int, m: int, causal: str
) -> tuple[int, int, str] | None:
    """How the rows ``[rs, rs + rc)`` attend to the keys ``[ks, ks + kc)`` (global positions).

    Returns None when causal masking drops the whole block, else ``(lo, hi, mode)``: the keys
    ``[lo, hi)`` that may be kept and the op's causal variant on that sub-block (``"none"``,
    ``"top_left"``, ``"bottom_right"``) or ``"explicit"`` (a keep-mask from positions).
    """
    hi = ks + kc
    if causal == "none":
        return ks, hi, "none"
    off = 0 if causal == "top_left" else m - n  # global row i keeps keys j <= i + off
    hi = min(hi, rs + rc + off)
    if hi <= ks:
        return None
    if hi - 1 <= rs + off:
        return ks, hi, "none"
    d = rs + off - ks  # local row i' keeps local key j' <= i' + d
    if d == 0:
        return ks, hi, "top_left"
    if d == (hi - ks) - rc:
        return ks, hi, "bottom_right"
    return ks, hi, "explicit"


def _block_mask(
    attn_mask: Tensor | None,
    rs: int,
    rc: int,
    lo: int,
    hi: int,
    mode: str,
    n: int,
    m: int,
    causal: str,
    device: torch.device,
) -> tuple[Tensor | None, str]:
    """The keep-mask and causal variant of the block ``rows [rs, rs+rc) x keys [lo, hi)``."""
    mask = None
    if attn_mask is not None:
        mask = attn_mask
        if mask.shape[-2] != 1:
            mask = mask.narrow(-2, rs, rc)
        if mask.shape[-1] != 1:
            mask = mask.narrow(-1, lo, hi - lo)
    if mode != "explicit":
        return mask, mode
    off = 0 if causal == "top_left" else m - n
    rows = torch.arange(rs, rs + rc, device=device).unsqueeze(1)
    keep = torch.arange(lo, hi, device=device) <= rows + off
    return (keep if mask is None else mask & keep), "none"


# --------------------------------------------------------------------------------------------
# Checks, agreed on by every rank (so a rank's bad input fails every rank, never hangs)
# --------------------------------------------------------------------------------------------


def _local_checks(
    q: object,
    k: object,
    v: object,
    attn_mask: object,
    method: object,
    load_balance: object,
    causal: object,
    scale: object,
) -> str:
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, Tensor):
            raise TypeError(
                f"{_WHERE}: argument '{name}' must be a torch.Tensor, but got {type(t).__name__}."
            )
        if t.dim() < 2:
            raise ValueError(
                f"{_WHERE}: expected '{name}' with at least 2 dims (..., seq, features), but "
                f"got {name}.shape={tuple(t.shape)}."
            )
    assert isinstance(q, Tensor) and isinstance(k, Tensor) and isinstance(v, Tensor)
    if method not in METHODS:
        raise ValueError(
            f"{_WHERE}: argument 'method' must be one of {METHODS}, but got {method!r}."
        )
    _layout.check_load_balance(load_balance, _WHERE)
    normalized = _CAUSAL.get(causal) if isinstance(causal, (str, bool)) else None  # type: ignore[call-overload]
    if normalized is None:
        raise ValueError(
            f"{_WHERE}: argument 'causal' must be False, True, 'top_left' or 'bottom_right', "
            f"but got {causal!r}."
        )
    if isinstance(scale, bool) or not isinstance(scale, (int, float)):
        raise TypeError(
            f"{_WHERE}: argument 'scale' must be a float, but got {type(scale).__name__}."
        )
    if attn_mask is not None:
        if not isinstance(attn_mask, Tensor) or attn_mask.dtype != torch.bool:
            raise TypeError(
                f"{_WHERE}: argument 'attn_mask' must be None or a bool tensor (the global "
                f"(..., N, M) mask, True = takes part), but got "
                f"{getattr(attn_mask, 'dtype', type(attn_mask).__name__)}."
            )
        if attn_mask.dim() < 2:
            raise ValueError(
                f"{_WHERE}: expected 'attn_mask' of shape (..., N, M), but got "
                f"attn_mask.shape={tuple(attn_mask.shape)}."
            )
    if k.shape[-2] != v.shape[-2]:
        raise ValueError(
            f"{_WHERE}: expected 'k' and 'v' with the same local sequence length, but got "
            f"k.shape={tuple(k.shape)} and v.shape={tuple(v.shape)}."
        )
    if load_balance == "head_tail":
        for name, t in (("q", q), ("k", k)):
            if t.shape[-2] % 2:
                raise ValueError(
                    f"{_WHERE}: with load_balance='head_tail' each rank holds two equal chunks, "
                    f"so the local length must be even, but got {name}.shape={tuple(t.shape)}."
                )
    if method == "alltoall":
        if q.dim() < 3 or k.dim() < 3 or v.dim() < 3:
            raise ValueError(
                f"{_WHERE}: method='alltoall' shards heads (dim -3): q, k and v need at least 3 "
                f"dims, but got q.shape={tuple(q.shape)}, k.shape={tuple(k.shape)}, "
                f"v.shape={tuple(v.shape)}."
            )
        if not q.shape[-3] == k.shape[-3] == v.shape[-3]:
            raise ValueError(
                f"{_WHERE}: method='alltoall' needs the same number of heads (dim -3) in q, k "
                f"and v, but got q.shape={tuple(q.shape)}, k.shape={tuple(k.shape)}, "
                f"v.shape={tuple(v.shape)}."
            )
    return normalized


def _agree(
    group: Any, error: BaseException | None, sizes: list[int], w: int, device: torch.device
) -> None:
    """Exchange ``[ok, *sizes]`` among the ranks; raise on every rank if any rank failed or the
    local sizes differ between ranks (the same error on every rank: no rank is left waiting).
    ``device``: where the collective runs (the inputs' device: CPU for gloo, CUDA for NCCL)."""
    row = torch.tensor([0 if error else 1, *sizes], dtype=torch.int64, device=device)
    flat = torch.empty(w * row.numel(), dtype=torch.int64, device=device)
    dist.all_gather_into_tensor(flat, row, group=group)
    table = flat.view(w, row.numel()).cpu()
    if error is not None:
        raise error
    failed = [r for r in range(w) if table[r, 0] == 0]
    if failed:
        raise RuntimeError(
            f"{_WHERE}: rank(s) {failed} of the group failed their input checks (their error "
            "says why); every rank stops here."
        )
    names = ("q local length", "k local length", "heads")
    for col, name in enumerate(names[: len(sizes)], start=1):
        values = table[:, col].tolist()
        if len(set(values)) > 1:
            raise ValueError(
                f"{_WHERE}: every rank must hold an equal shard; the {name} per rank is "
                f"{values}. Pad the sequence to a multiple of the world size (2W for "
                "load_balance='head_tail') or use shard_sequence()."
            )


# --------------------------------------------------------------------------------------------
# The methods
# --------------------------------------------------------------------------------------------


def _full_keys(
    q: Tensor,
    k_glob: Tensor,
    v_glob: Tensor,
    pieces: list[tuple[int, int]],
    n: int,
    attn_mask: Tensor | None,
    scale: float,
    causal: str,
) -> Tensor:
    """Local rows (pieces at global ``pieces``) against all keys in global order."""
    m = k_glob.shape[-2]
    outs: list[Tensor] = []
    dead = False
    local = 0
    for rs, rc in pieces:
        qc = q.narrow(-2, local, rc)
        local += rc
        plan = _plan(rs, rc, 0, m, n, m, causal)
        if plan is None:
            shape = torch.broadcast_shapes(q.shape[:-2], k_glob.shape[:-2], v_glob.shape[:-2])
            outs.append(q.new_zeros((*shape, rc, v_glob.shape[-1])))
            dead = True
            continue
        lo, hi, mode = plan
        mask, mode = _block_mask(attn_mask, rs, rc, lo, hi, mode, n, m, causal, q.device)
        o, _ = attn(
            qc,
            k_glob.narrow(-2, lo, hi - lo),
            v_glob.narrow(-2, lo, hi - lo),
            scale=scale,
            causal=False if mode == "none" else mode,  # type: ignore[arg-type]
            attn_mask=mask,
            need_weights=False,
        )
        outs.append(o)
    shape = torch.broadcast_shapes(*(o.shape[:-2] for o in outs))
    out = torch.cat([o.expand(*shape, *o.shape[-2:]) for o in outs], dim=-2)
    if dead:  # keep K/V in the graph, so every rank runs the backward's collectives
        out = out + (k_glob.narrow(-2, 0, 0).sum() + v_glob.narrow(-2, 0, 0).sum())
    return out


def _allgather(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    group: Any,
    rank: int,
    w: int,
    lb: str | None,
    attn_mask: Tensor | None,
    scale: float,
    causal: str,
) -> Tensor:
    k_glob = _layout.global_order(_layout.all_gather_seq(k, k.dim() - 2, group), -2, w, lb)
    v_glob = _layout.global_order(_layout.all_gather_seq(v, v.dim() - 2, group), -2, w, lb)
    n = q.shape[-2] * w
    pieces = _layout.chunks(rank, w, q.shape[-2], lb)
    return _full_keys(q, k_glob, v_glob, pieces, n, attn_mask, scale, causal)


def _seq_to_heads(x: Tensor, group: Any, w: int) -> Tensor:
    """``(..., H, L, d)`` sequence-sharded -> ``(..., H / W, W * L, d)`` head-sharded, the
    sequence in rank order."""
    from torch.distributed import _functional_collectives as funcol

    h, length = x.shape[-3], x.shape[-2]
    y = x.unflatten(-3, (w, h // w)).movedim(-4, 0).contiguous()
    y = funcol.wait_tensor(funcol.all_to_all_single(y, None, None, group))
    y = y.movedim(0, -3).flatten(-3, -2)
    return y.reshape(*x.shape[:-3], h // w, w * length, x.shape[-1]).contiguous()


def _heads_to_seq(x: Tensor, group: Any, w: int) -> Tensor:
    """The inverse of :func:`_seq_to_heads`."""
    from torch.distributed import _functional_collectives as funcol

    total = x.shape[-2]
    y = x.unflatten(-2, (w, total // w)).movedim(-3, 0).contiguous()
    y = funcol.wait_tensor(funcol.all_to_all_single(y, None, None, group))
    return y.movedim(0, -4).flatten(-4, -3).contiguous()


def _alltoall(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    group: Any,
    rank: int,
    w: int,
    lb: str | None,
    attn_mask: Tensor | None,
    scale: float,
    causal: str,
) -> Tensor:
    h = q.shape[-3]
    if h % w:
        raise ValueError(
            f"{_WHERE}: method='alltoall' needs the heads (dim -3) divisible by the world size "
            f"{w}, but got q.shape={tuple(q.shape)}."
        )
    g = _layout.process_group(group)
    qh, kh, vh = (_layout.global_order(_seq_to_heads(t, g, w), -2, w, lb) for t in (q, k, v))
    mask = attn_mask
    if mask is not None and mask.dim() >= 3 and mask.shape[-3] != 1:
        if mask.shape[-3] != h:
            raise ValueError(
                f"{_WHERE}: 'attn_mask' dim -3 must be 1 or the number of heads {h}, but got "
                f"attn_mask.shape={tuple(mask.shape)}."
            )
        mask = mask.narrow(-3, rank * (h // w), h // w)
    o, _ = attn(
        qh,
        kh,
        vh,
        scale=scale,
        causal=False if causal == "none" else causal,  # type: ignore[arg-type]
        attn_mask=mask,
        need_weights=False,
    )
    return _heads_to_seq(_layout.rank_order(o, -2, w, lb), g, w)


def _exchange(tensors: list[Tensor], group: Any, rank: int, w: int) -> list[Tensor]:
    """Send ``tensors`` to the next rank and receive the previous rank's (same shapes).

    Every rank posts the same ops in the same order (gloo hangs otherwise); buffers are
    contiguous."""
    return _finish_exchange(_start_exchange(tensors, group, rank, w))


class _RingAttn(torch.autograd.Function):
    """Ring attention: K/V blocks pass around the ring; each block with the lean op."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        attn_mask: Tensor | None,
        scale: float,
        causal: str,
        group: Any,
        rank: int,
        w: int,
        lb: str | None,
    ) -> Tensor:
        n, m = q.shape[-2] * w, k.shape[-2] * w
        rows = _layout.chunks(rank, w, q.shape[-2], lb)
        batch = torch.broadcast_shapes(q.shape[:-2], k.shape[:-2], v.shape[:-2])
        if attn_mask is not None:
            batch = torch.broadcast_shapes(batch, attn_mask.shape[:-2])
        o = q.new_zeros((*batch, q.shape[-2], v.shape[-1]))
        blk = [k.contiguous(), v.contiguous()]
        for step in range(w):
            owner = (rank - step) % w
            # double buffering: the next block is in flight while this one is attended
            pending = None
            if step < w - 1:
                pending = _start_exchange(blk, group, rank, w)
            for qc, oc, pair in _pairs(q, o, rows, owner, w, k.shape[-2], lb, n, m, causal):
                (rs, rc, lo, hi, kl, mode) = pair
                mask, mode = _block_mask(attn_mask, rs, rc, lo, hi, mode, n, m, causal, q.device)
                oc.add_(
                    torch.ops.tanh_attention.attn_lean(
                        qc,
                        blk[0].narrow(-2, kl, hi - lo),
                        blk[1].narrow(-2, kl, hi - lo),
                        mask,
                        scale,
                        mode,
                    ).expand_as(oc)
                )
            if pending is not None:
                blk = _finish_exchange(pending)
        ctx.save_for_backward(q, k, v, attn_mask)
        ctx.args = (scale, causal, group, rank, w, lb)
        return o

    @staticmethod
    def backward(ctx: Any, grad_o: Tensor) -> tuple[Any, ...]:  # type: ignore[override]
        q, k, v, attn_mask = ctx.saved_tensors
        scale, causal, group, rank, w, lb = ctx.args
        n, m = q.shape[-2] * w, k.shape[-2] * w
        rows = _layout.chunks(rank, w, q.shape[-2], lb)
        wide = torch.promote_types(q.dtype, torch.float32)
        g_q = torch.zeros(q.shape, dtype=wide, device=q.device)
        blk = [k.contiguous(), v.contiguous()]
        acc = [
            torch.zeros(k.shape, dtype=wide, device=k.device),
            torch.zeros(v.shape, dtype=wide, device=v.device),
        ]
        grad_o = grad_o.contiguous()
        for step in range(w):
            owner = (rank - step) % w
            pending = _start_exchange(blk, group, rank, w) if step < w - 1 else None
            for qc, gqc, pair in _pairs(q, g_q, rows, owner, w, k.shape[-2], lb, n, m, causal):
                (rs, rc, lo, hi, kl, mode) = pair
                mask, mode = _block_mask(attn_mask, rs, rc, lo, hi, mode, n, m, causal, q.device)
                local = sum(c for s, c in rows if s < rs)
                go = grad_o.narrow(-2, local, rc)
                kb, vb = blk[0].narrow(-2, kl, hi - lo), blk[1].narrow(-2, kl, hi - lo)
                gq, gk, gv = torch.ops.tanh_attention.attn_lean_backward(
                    go, None, qc, kb, vb, None, mask, scale, mode, [True, True, True]
                )
                gqc.add_(gq)
                acc[0].narrow(-2, kl, hi - lo).add_(gk)
                acc[1].narrow(-2, kl, hi - lo).add_(gv)
            acc = _exchange(acc, group, rank, w)  # the accumulators follow their block
            if pending is not None:
                blk = _finish_exchange(pending)
        g_k, g_v = acc
        return (
            g_q.to(q.dtype),
            g_k.to(k.dtype),
            g_v.to(v.dtype),
            None,
            None,
            None,
            None,
            None,
            None,
            None,
        )


def _start_exchange(tensors: list[Tensor], group: Any, rank: int, w: int) -> Any:
    g = _layout.process_group(group)
    nxt = dist.get_global_rank(g, (rank + 1) % w)
    prv = dist.get_global_rank(g, (rank - 1) % w)
    out = [torch.empty_like(t, memory_format=torch.contiguous_format) for t in tensors]
    ops = [dist.P2POp(dist.isend, t.contiguous(), nxt, g) for t in tensors]
    ops += [dist.P2POp(dist.irecv, t, prv, g) for t in out]
    return dist.batch_isend_irecv(ops), out


def _finish_exchange(pending: Any) -> list[Tensor]:
    reqs, out = pending
    for req in reqs:
        req.wait()
    return out


def _pairs(
    q: Tensor,
    o: Tensor,
    rows: list[tuple[int, int]],
    owner: int,
    w: int,
    kl: int,
    lb: str | None,
    n: int,
    m: int,
    causal: str,
) -> Any:
    """Yield ``(q rows, o rows, (rs, rc, lo, hi, local key start, mode))`` for each kept block
    pair of this rank's row pieces and ``owner``'s key pieces."""
    local = 0
    for rs, rc in rows:
        qc, oc = q.narrow(-2, local, rc), o.narrow(-2, local, rc)
        local += rc
        kbase = 0
        for ks, kc in _layout.chunks(owner, w, kl, lb):
            plan = _plan(rs, rc, ks, kc, n, m, causal)
            if plan is not None:
                lo, hi, mode = plan
                yield qc, oc, (rs, rc, lo, hi, kbase + lo - ks, mode)
            kbase += kc


def context_parallel_attn(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    group: Any = None,
    scale: float = 1.0,
    causal: bool | str = False,
    attn_mask: Tensor | None = None,
    method: str = "allgather",
    load_balance: str | None = None,
) -> Tensor:
    """Tanh attention over a sequence sharded across the ranks of ``group``.

    Each rank passes its shard of the sequence dimension (-2) of q, k and v, in the layout
    ``load_balance``, and gets its rows of ``o = (M * tanh(scale * Q @ K^T)) @ V`` over the
    global sequence, where ``M`` combines ``causal`` and ``attn_mask`` at global positions.
    Call it on every rank of the group with the same arguments (shapes, flags, mask).
    Differentiable in q, k and v.

    Args:
        q: ``(..., N / W, d)``, this rank's query rows.
        k: ``(..., M / W, d)``, this rank's keys.
        v: ``(..., M / W, e)``, this rank's values. Batch dims broadcast as in
            :func:`tanh_attention.attn`.
        group: the process group (None: the default group); ``W`` is its size.
        scale: multiplies the scores.
        causal: False, True / ``"top_left"`` (global row i keeps keys j <= i) or
            ``"bottom_right"`` (j <= i + M - N).
        attn_mask: None or the global bool mask ``(..., N | 1, M | 1)``, True = takes part,
            the same on every rank.
        method: ``"allgather"`` (default), ``"alltoall"`` (heads, dim -3, divisible by W) or
            ``"ring"`` (no rank holds all of K/V).
        load_balance: None (rank r holds the r-th contiguous chunk) or ``"head_tail"`` (rank r
            holds chunks r and 2W-1-r of 2W; local lengths even).

    Returns:
        ``(*batch, N / W, e)``: this rank's rows of ``o``, in its local order.

    Raises:
        TypeError: a non-tensor q/k/v, a non-bool mask, a non-number scale.
        ValueError: an unknown method, layout or causal variant; ranks below 2; shards of
            unequal length across ranks (raised on every rank); heads not divisible by W
            for ``"alltoall"``; an odd local length with ``"head_tail"``.
        RuntimeError: torch.distributed is not initialised, or another rank of the group
            failed its input checks (raised on every rank, never a hang).
    """
    rank, w = _layout.world(group)
    error: BaseException | None = None
    causal_s = "none"
    try:
        causal_s = _local_checks(q, k, v, attn_mask, method, load_balance, causal, scale)
        sizes = [q.shape[-2], k.shape[-2], q.shape[-3] if q.dim() >= 3 else 1]
    except (TypeError, ValueError) as e:
        error, sizes = e, [0, 0, 0]
    if not torch.compiler.is_compiling():
        device = q.device if isinstance(q, Tensor) else torch.device("cpu")
        _agree(group, error, sizes, w, device)
    elif error is not None:
        raise error
    n, m = q.shape[-2] * w, k.shape[-2] * w
    if attn_mask is not None and (
        attn_mask.shape[-2] not in (1, n) or attn_mask.shape[-1] not in (1, m)
    ):
        raise ValueError(
            f"{_WHERE}: 'attn_mask' must be the global mask (..., N, M) = (..., {n}, {m}) (or "
            f"broadcast there), but got attn_mask.shape={tuple(attn_mask.shape)}."
        )
    scale = float(scale)
    if method == "allgather":
        return _allgather(q, k, v, group, rank, w, load_balance, attn_mask, scale, causal_s)
    if method == "alltoall":
        return _alltoall(q, k, v, group, rank, w, load_balance, attn_mask, scale, causal_s)
    out: Tensor = _RingAttn.apply(q, k, v, attn_mask, scale, causal_s, group, rank, w, load_balance)
    return out
