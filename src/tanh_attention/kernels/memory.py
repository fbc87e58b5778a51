"""How the kernels get memory: a warm heap for block buffers.

:func:`warm_heap`: each block allocates a few block buffers (2 MiB) and frees them. glibc
hands freed memory at the top of its heap back to the kernel once more than its trim
threshold is free, twice its mmap threshold, which starts at 128 KiB and rises to the size
of the largest mmapped chunk freed so far. Until something frees a larger chunk, every
block's buffers are faulted in again, block after block. Freeing one untouched
16 MiB buffer raises both thresholds, as glibc does for any program that frees such a
buffer, and the block buffers stay in the heap. It is a hint: on other systems, or
allocators, it changes nothing.

The with-weights forward's ``a`` is a plain ``torch.empty``. Asking the kernel for 2 MiB pages
for it (``madvise(MADV_HUGEPAGE)``) was tried and dropped because its cost is erratic
(``benchmarks/hugepages.py`` measures it; benchmarks/RESULTS.md has the figures).
"""

from __future__ import annotations

import functools

import torch

__all__ = ["warm_heap"]


@functools.cache
def warm_heap() -> None:
    """Once per process: allocate and free an untouched 16 MiB buffer (see the module doc)."""
    torch.empty(16 * 2**20, dtype=torch.uint8)  # freed at once: it only moves the thresholds
