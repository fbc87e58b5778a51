"""Sequence layouts across the ranks of a group, and the helpers that shard and unshard them.

``load_balance=None``: rank ``r`` of ``W`` holds the ``r``-th of ``W`` contiguous chunks.
``load_balance="head_tail"``: the sequence is cut into ``2W`` chunks and rank ``r`` holds
chunks ``r`` and ``2W - 1 - r`` (in that order), the layout of torch's
``_HeadTailLoadBalancer``, so that causal attention gives every rank the same work.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from .. import _torch_private

__all__ = ["LOAD_BALANCES", "chunks", "shard_sequence", "unshard_sequence"]

LOAD_BALANCES = (None, "head_tail")


def check_load_balance(load_balance: object, where: str) -> None:
    """Raise ValueError unless ``load_balance`` is None or ``"head_tail"``."""
    if load_balance not in LOAD_BALANCES:
        raise ValueError(
            f"{where}: argument 'load_balance' must be None or 'head_tail', but got "
            f"{load_balance!r}."
        )


def world(group: Any) -> tuple[int, int]:
    """``(rank, world_size)`` of this process in ``group`` (None: the default group).

    Raises:
        RuntimeError: torch.distributed is not initialised.
    """
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError(
            "tanh_attention.distributed: torch.distributed is not initialised; call "
            "torch.distributed.init_process_group(...) first."
        )
    return dist.get_rank(group), dist.get_world_size(group)


def chunks(
    rank: int, world_size: int, local_len: int, load_balance: str | None
) -> list[tuple[int, int]]:
    """The pieces of the global sequence that ``rank`` holds, in its local order.

    Args:
        rank: the rank in the group.
        world_size: ``W``.
        local_len: the rank's local sequence length (even for ``"head_tail"``).
        load_balance: None or ``"head_tail"``.

    Returns:
        ``[(global_start, length), ...]``: one piece for None, two for ``"head_tail"``.
    """
    if load_balance is None:
        return [(rank * local_len, local_len)]
    c = local_len // 2
    return [(rank * c, c), ((2 * world_size - 1 - rank) * c, c)]


def positions(rank: int, world_size: int, local_len: int, load_balance: str | None) -> Tensor:
    """Global positions of the local rows, in local order (int64, ``(local_len,)``)."""
    return torch.cat(
        [torch.arange(s, s + n) for s, n in chunks(rank, world_size, local_len, load_balance)]
    )


def _check_dim(x: object, dim: object, where: str) -> int:
    if not isinstance(x, Tensor):
        raise TypeError(
            f"{where}: argument 'x' must be a torch.Tensor, but got {type(x).__name__}."
        )
    if isinstance(dim, bool) or not isinstance(dim, int):
        raise TypeError(f"{where}: argument 'dim' must be an int, but got {type(dim).__name__}.")
    if not -x.dim() <= dim < max(x.dim(), 1):
        raise ValueError(
            f"{where}: argument 'dim' is out of range for x.shape={tuple(x.shape)}, got dim={dim}."
        )
    return dim % x.dim()


def shard_sequence(
    x: Tensor, *, group: Any = None, dim: int = -2, load_balance: str | None = None
) -> Tensor:
    """This rank's shard of the full tensor ``x`` along ``dim``, in the layout ``load_balance``.

    Every rank passes the same full tensor; no communication happens. Differentiable (the
    gradient of the shard lands in its positions of ``x``).

    Args:
        x: the full tensor, ``(..., N, ...)`` with ``N = x.shape[dim]``.
        group: the process group (None: the default group); its size is ``W``.
        dim: the sequence dimension (default -2).
        load_balance: None (rank r gets the r-th of W contiguous chunks) or ``"head_tail"``
            (chunks r and 2W-1-r of 2W).

    Returns:
        ``x`` with ``dim`` of size ``N / W``: this rank's rows.

    Raises:
        TypeError: ``x`` not a tensor, ``dim`` not an int.
        ValueError: ``dim`` out of range, an unknown ``load_balance``, ``N`` not divisible by
            ``W`` (``2W`` for ``"head_tail"``).
        RuntimeError: torch.distributed not initialised.
    """
    where = "shard_sequence()"
    d = _check_dim(x, dim, where)
    check_load_balance(load_balance, where)
    rank, w = world(group)
    n = x.shape[d]
    parts = w if load_balance is None else 2 * w
    if n % parts:
        raise ValueError(
            f"{where}: the sequence length x.shape[{dim}]={n} must be divisible by "
            f"{parts} ({'W' if load_balance is None else '2W'}, W={w}, "
            f"load_balance={load_balance!r})."
        )
    pieces = [x.narrow(d, s, c) for s, c in chunks(rank, w, n // w, load_balance)]
    return pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim=d)


def global_order(rank_order: Tensor, dim: int, world_size: int, load_balance: str | None) -> Tensor:
    """Reorder a sequence gathered in rank order (rank 0's shard first) to global order."""
    if load_balance is None:
        return rank_order
    n_local = rank_order.shape[dim] // world_size
    perm = torch.cat([positions(r, world_size, n_local, load_balance) for r in range(world_size)])
    inverse = torch.empty_like(perm)
    inverse[perm] = torch.arange(perm.numel())
    return rank_order.index_select(dim, inverse.to(rank_order.device))


def rank_order(global_seq: Tensor, dim: int, world_size: int, load_balance: str | None) -> Tensor:
    """The inverse of :func:`global_order`: a global-order sequence in rank order."""
    if load_balance is None:
        return global_seq
    n_local = global_seq.shape[dim] // world_size
    perm = torch.cat([positions(r, world_size, n_local, load_balance) for r in range(world_size)])
    return global_seq.index_select(dim, perm.to(global_seq.device))


def process_group(group: Any) -> dist.ProcessGroup:
    """``group``, or the default group for None."""
    if group is None:
        return dist.distributed_c10d._get_default_group()
    return group  # type: ignore[no-any-return]


def all_gather_seq(x: Tensor, dim: int, group: Any) -> Tensor:
    """All-gather ``x`` along ``dim`` in rank order; the backward reduce-scatters (sums) the
    gradient, in float32 at least (float16/bfloat16 are gathered and reduced in float32)."""
    from torch.distributed import _functional_collectives as funcol

    dtype = x.dtype
    wide = torch.promote_types(dtype, torch.float32) if dtype.is_floating_point else dtype
    y = x.movedim(dim, 0).to(wide).contiguous()
    g = _torch_private.all_gather_autograd(y, process_group(group))
    g = funcol.wait_tensor(g)
    # contiguous: the kernels are much faster on row-major K/V than on this permuted view
    return g.to(dtype).movedim(0, dim).contiguous()


def unshard_sequence(
    x: Tensor, *, group: Any = None, dim: int = -2, load_balance: str | None = None
) -> Tensor:
    """The full tensor from every rank's shard along ``dim`` (the inverse of
    :func:`shard_sequence`); every rank gets the same result.

    Differentiable: the backward reduce-scatters the gradient (the gradient of the sum over
    ranks of each rank's loss, as ``torch.distributed.nn.functional.all_gather``).

    Args:
        x: this rank's shard, ``(..., N / W, ...)`` along ``dim`` (the same shape on every
            rank; even along ``dim`` for ``"head_tail"``).
        group: the process group (None: the default group).
        dim: the sequence dimension (default -2).
        load_balance: the layout of the shards (None or ``"head_tail"``).

    Returns:
        ``(..., N, ...)``: the sequence in global order.

    Raises:
        TypeError: ``x`` not a tensor, ``dim`` not an int.
        ValueError: ``dim`` out of range, an unknown ``load_balance``, an odd local length
            with ``"head_tail"``.
        RuntimeError: torch.distributed not initialised.
    """
    where = "unshard_sequence()"
    d = _check_dim(x, dim, where)
    check_load_balance(load_balance, where)
    _, w = world(group)
    if load_balance == "head_tail" and x.shape[d] % 2:
        raise ValueError(
            f"{where}: with load_balance='head_tail' the local length x.shape[{dim}]="
            f"{x.shape[d]} must be even (two chunks per rank)."
        )
    return global_order(all_gather_seq(x, d, group), d, w, load_balance)
