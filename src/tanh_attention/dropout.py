"""Dropout on the attention weights as a function of a seed and each weight's position.

Whether weight ``(w, i, j)`` is kept (``w`` its flat index in the weights' batch, ``i`` its
row, ``j`` its column) depends only on the call's seed and those three numbers: a 32-bit
integer hash, counter-based as FlashAttention's Philox offsets are. So a kernel that works
block by block regenerates any block's mask in the backward from the seed alone and stores
nothing of size ``n x m``; the mask does not depend on block sizes, threads, the causal
skipping or the path (the composite materializes the same mask whole), and the same
``torch.manual_seed`` gives the same weights on every CPU path.

The hash is ``lowbias32`` (Chris Wellons' integer hash: two rounds of xor-shift and multiply)
on int32 tensors, whose multiplication wraps modulo 2^32; shifts are made logical by masking.
Row keys chain the seed, ``w`` and ``i`` through it; each weight hashes its row key xor its
column's key (without the last xor-shift, which mixes only the low bits), and is kept iff
the hash, read as a signed integer, is at least ``p * 2^32 - 2^31``: probability ``1 - p``
up to ``2^-32``. Kept weights are scaled by
``1 / (1 - p)``, so dropout is unbiased.
"""

from __future__ import annotations

import dataclasses
import math

import torch
from torch import Tensor

__all__ = ["Dropout", "draw_seed", "keep_mask"]

_M1 = 0x7FEB352D
_M2 = 0x846CA68B - (1 << 32)  # the int32 with the same bits: products wrap modulo 2^32


def _shift16(x: Tensor) -> Tensor:
    """``x ^ (x >>> 16)``, the first step of ``lowbias32`` (a new tensor). ``>>`` is arithmetic
    on int32: the mask makes it logical."""
    return x ^ ((x >> 16) & 0xFFFF)


def _rest(x: Tensor) -> Tensor:
    """The steps of ``lowbias32`` after the first, but the last xor-shift, in place on ``x``:
    the high bits, which decide the threshold, are mixed by then."""
    x.mul_(_M1)
    x ^= (x >> 15) & 0x1FFFF
    return x.mul_(_M2)


def _mix(x: Tensor) -> Tensor:
    """``lowbias32`` of each element of the int32 tensor ``x`` (a new tensor)."""
    x = _rest(_shift16(x))
    x ^= (x >> 16) & 0xFFFF
    return x


def _int32(values: Tensor | range, device: torch.device) -> Tensor:
    if isinstance(values, range):
        return torch.arange(values.start, values.stop, dtype=torch.int32, device=device)
    return values.to(device=device, dtype=torch.int32)


def draw_seed() -> Tensor:
    """A 0-dim int64 seed from torch's default CPU generator (``torch.manual_seed`` fixes
    it), drawn once per call; under ``torch.compile`` it is a traced random op."""
    return torch.randint(0, 2**31 - 1, (), dtype=torch.int64)


@dataclasses.dataclass(frozen=True)
class Dropout:
    """The dropout of one call: probability ``p`` in (0, 1] and its ``seed``.

    Example:
        >>> drop = Dropout(0.5, torch.tensor(7))
        >>> keep = drop.keep(torch.tensor([0]), range(0, 4), range(0, 4), torch.device("cpu"))
        >>> keep.shape, keep.dtype
        (torch.Size([1, 4, 4]), torch.bool)
    """

    p: float
    seed: Tensor

    @property
    def scale(self) -> float:
        """The factor of the kept weights (0 when everything is dropped)."""
        return 0.0 if self.p >= 1.0 else 1.0 / (1.0 - self.p)

    def row_keys(
        self, weights: Tensor | range, rows: Tensor | range, device: torch.device
    ) -> Tensor:
        """The keys of rows ``rows`` of problems ``weights`` (flat indices in the weights'
        batch): int32 ``(G, rows)``, to be sliced by :meth:`keep_block`."""
        seed = _mix(self.seed.to(device=device, dtype=torch.int32).reshape(1))
        keys = _mix(_mix(seed ^ _int32(weights, device))[:, None] ^ _int32(rows, device))
        # The first xor-shift distributes over the xor of a row's and a column's key.
        return _shift16(keys)

    def col_keys(self, cols: Tensor | range, device: torch.device) -> Tensor:
        """The keys of columns ``cols``: int32 ``(cols,)`` (a stream of their own, apart from
        the rows')."""
        return _shift16(_mix(_int32(cols, device) ^ 0x3C6EF372))

    def keep_block(
        self,
        row_keys: Tensor,
        col_keys: Tensor,
        *,
        transposed: bool = False,
        dtype: torch.dtype = torch.bool,
    ) -> Tensor:
        """Which weights of a block are kept, from its rows' and columns' keys: ``(G, rows,
        cols)``, or ``(G, cols, rows)`` with ``transposed`` (the same entries, laid out as the
        block's transpose); bool, or 1/0 in ``dtype`` (a float mask multiplies a block
        several times faster than a bool one, and the comparison writes it directly)."""
        if transposed:
            x = row_keys[:, None, :] ^ col_keys[None, :, None]
        else:
            x = row_keys[:, :, None] ^ col_keys[None, None, :]
        if self.p >= 1.0:
            return torch.zeros_like(x, dtype=dtype)
        threshold = round(self.p * 2**32) - 2**31
        if dtype == torch.bool:
            return _rest(x) >= threshold  # (no out=: the composite may run under vmap)
        return torch.ge(_rest(x), threshold, out=torch.empty_like(x, dtype=dtype))

    def keep(
        self,
        weights: Tensor | range,
        rows: Tensor | range,
        cols: Tensor | range,
        device: torch.device,
        *,
        transposed: bool = False,
    ) -> Tensor:
        """Which weights of a block are kept: bool ``(G, rows, cols)`` (``(G, cols, rows)``
        with ``transposed``).

        Args:
            weights: the G flat indices in the weights' batch of the block's problems.
            rows, cols: the block's row and column indices.
            device: where the mask is made.
        """
        return self.keep_block(
            self.row_keys(weights, rows, device), self.col_keys(cols, device), transposed=transposed
        )


def keep_mask(
    p: float, seed: Tensor, shape: torch.Size | tuple[int, ...], device: torch.device
) -> Tensor:
    """The whole keep-mask of weights of ``shape`` ``(*weights_batch, n, m)``: the blocks of
    :meth:`Dropout.keep` side by side (the composite's dropout)."""
    *batch, n, m = shape
    keep = Dropout(p, seed).keep(range(math.prod(batch)), range(n), range(m), device)
    return keep.reshape(shape)
