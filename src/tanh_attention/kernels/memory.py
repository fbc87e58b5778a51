"""Large fresh outputs backed by transparent huge pages.

Why: the with-weights forward returns a fresh ``n x m`` tensor ``a`` and writes it once.
The first write to each 4 KiB page of a fresh allocation is a page fault; on the benchmark
machine that costs about 25 ms per 64 MiB (n = m = 4096, float32), as much as the tanh.
Asking the kernel for 2 MiB pages (``madvise(MADV_HUGEPAGE)``, which PyTorch itself does only
under an environment variable) makes it one fault per 2 MiB: about 7 ms. It is a hint: on
other systems, or where transparent huge pages are off, :func:`empty` is ``torch.empty``.
"""

from __future__ import annotations

import ctypes
import functools
import os
import sys
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

__all__ = ["empty"]

_MADV_HUGEPAGE = 14  # from <sys/mman.h> on Linux
_HUGE_PAGE = 2 * 2**20
_MIN_BYTES = 2 * _HUGE_PAGE  # smaller buffers would not get a whole huge page


@functools.cache
def _madvise() -> Callable[[int, int, int], int] | None:
    if not sys.platform.startswith("linux"):
        return None
    libc = ctypes.CDLL(None, use_errno=True)
    madvise = libc.madvise
    madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    madvise.restype = ctypes.c_int
    return madvise  # type: ignore[no-any-return]


def empty(shape: Sequence[int], *, dtype: torch.dtype, device: torch.device) -> Tensor:
    """``torch.empty(shape)``, with huge pages requested for a large CPU buffer."""
    out = torch.empty(tuple(shape), dtype=dtype, device=device)
    nbytes = out.numel() * out.element_size()
    madvise = _madvise() if device.type == "cpu" and nbytes >= _MIN_BYTES else None
    if madvise is not None:
        page = os.sysconf("SC_PAGE_SIZE")
        start = -(-out.data_ptr() // page) * page  # madvise wants whole pages
        stop = (out.data_ptr() + nbytes) // page * page
        madvise(start, stop - start, _MADV_HUGEPAGE)  # a hint: a failure changes nothing
    return out
