"""How the kernels get memory: huge pages for the large output, a warm heap for block buffers.

Both address page faults, which on the benchmark machine (2 cores, Linux, glibc) cost as
much as the arithmetic they wrap:

- :func:`empty`: the with-weights forward returns a fresh ``n x m`` tensor ``a`` and writes
  it once. The first write to each 4 KiB page of a fresh allocation is a page fault: about
  25 ms per 64 MiB (n = m = 4096, float32), as much as the tanh. Asking the kernel for 2 MiB
  pages (``madvise(MADV_HUGEPAGE)``, which PyTorch itself does only under an environment
  variable) makes it one fault per 2 MiB: about 7 ms.
- :func:`warm_heap`: each block allocates a few block buffers (2 MiB) and frees them. glibc
  hands freed memory at the top of its heap back to the kernel once more than its trim
  threshold is free, twice its mmap threshold, which starts at 128 KiB and rises to the size
  of the largest mmapped chunk freed so far. Until something frees a larger chunk, every
  block's buffers are faulted in again: about 19,000 faults and 60 ms in a forward and
  backward at n = 4096. Freeing one untouched 16 MiB buffer raises both thresholds, as glibc
  does for any program that frees such a buffer, and the block buffers stay in the heap.

Both are hints: on other systems, or allocators, they change nothing.
"""

from __future__ import annotations

import ctypes
import functools
import os
import sys
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

__all__ = ["empty", "warm_heap"]

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


@functools.cache
def warm_heap() -> None:
    """Once per process: allocate and free an untouched 16 MiB buffer (see the module doc)."""
    torch.empty(16 * 2**20, dtype=torch.uint8)  # freed at once: it only moves the thresholds
