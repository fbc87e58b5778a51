"""How the kernels get memory: a warm heap for block buffers.

:func:`warm_heap`: each block allocates a few block buffers (2 MiB) and frees them. glibc
hands freed memory at the top of its heap back to the kernel once more than its trim
threshold is free, twice its mmap threshold, which starts at 128 KiB and rises to the size
of the largest mmapped chunk freed so far. Until something frees a larger chunk, every
block's buffers are faulted in again: about 19,000 page faults and 60 ms in a forward and
backward at n = 4096 on the benchmark machine (2 cores, Linux, glibc). Freeing one untouched
16 MiB buffer raises both thresholds, as glibc does for any program that frees such a
buffer, and the block buffers stay in the heap. It is a hint: on other systems, or
allocators, it changes nothing.

The with-weights forward's ``a`` is a plain ``torch.empty``. Asking the kernel for 2 MiB pages
for it (``madvise(MADV_HUGEPAGE)``) was tried and dropped because its cost is erratic:
``benchmarks/hugepages.py`` measured a fresh 256 MiB buffer (n = 8192) at a steady ~105 ms
with plain pages, and at ~22 ms with huge pages except for one call in three to eight that
took 320-390 ms; in the whole forward at n = 8192, with the composite run between calls,
huge pages came out slower in the median (445 ms against 269 ms, one A/B run).
"""

from __future__ import annotations

import functools

import torch

__all__ = ["warm_heap"]


@functools.cache
def warm_heap() -> None:
    """Once per process: allocate and free an untouched 16 MiB buffer (see the module doc)."""
    torch.empty(16 * 2**20, dtype=torch.uint8)  # freed at once: it only moves the thresholds
