"""Per-thread scratch memory for the ring reduction's partials, where the tensor must not change.

A reduce's non-root keeps its tensor unchanged, so it receives and combines each partial in
memory of its own.  A fresh allocation over glibc's mmap threshold (32 MiB at most) is fresh
pages every time, a page fault per 4 KiB written: a 2-rank 128 MiB reduce's non-root took
17,000 faults and 46 ms of system CPU per op for its 64 MiB partial (the root: 13 ms).

Each thread keeps two byte buffers (a ring step receives its partial while the previous one is
still being sent), grown to the largest partial asked for, each at most :data:`MAX_BYTES`.  Only
CPU partials of at least :data:`MIN_BYTES` use them (smaller allocations come from the heap, and
CUDA's caching allocator already reuses memory).  A buffer is handed out again by the next
reduction on the same thread, so its partial must be done with by then: only links that are done
with a message when ``send`` returns may use it (``ring_reduce.sends_copies``).

The slots are anonymous memory mapped for them, starting on a 2 MiB boundary and advised for
transparent huge pages (:func:`_huge_page_memory`): a same-host peer copies a partial out of
this memory, and ``process_vm_readv`` pins every page it reads (16 MiB out of huge pages at
15-23 GB/s, out of 4 KiB pages at 5.5-10 here: ``python -m benchmarks.cma_pages``).  Not
malloc's memory: below its mmap threshold (raised as a process frees large blocks, and set to
32 MiB in the ComfyUI launch mode) that is heap memory faulted in on 4 KiB pages long before.
"""

from __future__ import annotations

import contextlib
import mmap
import threading
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

MIN_BYTES = 1 << 20
MAX_BYTES = 128 << 20
"""The most one slot keeps (two per thread that ran a large reduction).  A 128 MiB tree-reduce
partial over the cap was fresh memory every op: a 2-rank 128 MiB reduce's median went from
16-18 ms to 23-150 ms over runs, as the kernel found huge pages to fault in quickly or not."""
HUGE_PAGE = 2 << 20  # x86-64's and arm64's (4 KiB base pages) transparent huge page

_local = threading.local()


def partial_buffer(
    slot: int, numel: int, like: torch.Tensor, *, reuse: bool = True
) -> torch.Tensor:
    """``numel`` elements of ``like``'s dtype: slot 0 or 1 of this thread's scratch memory, or a
    fresh tensor when the size or device does not qualify, or without ``reuse`` (the caller's
    link may still hold the partial after ``send``: see the module docstring)."""
    import torch

    nbytes = numel * like.element_size()
    if not reuse or like.device.type != "cpu" or not MIN_BYTES <= nbytes <= MAX_BYTES:
        return torch.empty(numel, dtype=like.dtype, device=like.device)
    slots: list[torch.Tensor | None] | None = getattr(_local, "slots", None)
    if slots is None:
        slots = _local.slots = [None, None]
    buf = slots[slot]
    if buf is None or buf.numel() < nbytes:
        buf = slots[slot] = _huge_page_memory(nbytes)
    return buf[:nbytes].view(like.dtype)


def _huge_page_memory(nbytes: int) -> torch.Tensor:
    """``nbytes`` of fresh anonymous memory as a uint8 tensor, starting on a
    :data:`HUGE_PAGE` boundary and advised for transparent huge pages where the platform has
    them (the tensor keeps the mapping alive)."""
    import torch

    private = getattr(mmap, "MAP_PRIVATE", None)
    if private is None:  # Windows: no such mapping, and no same-host copies either
        return torch.empty(nbytes, dtype=torch.uint8)
    # Private: an anonymous mmap is shared by default, and shared memory gets no huge pages.
    area = mmap.mmap(-1, nbytes + HUGE_PAGE, flags=private | mmap.MAP_ANONYMOUS)
    with contextlib.suppress(AttributeError, OSError):  # no madvise, or no THP: plain pages
        area.madvise(mmap.MADV_HUGEPAGE)
    whole = torch.frombuffer(area, dtype=torch.uint8)
    start = -whole.data_ptr() % HUGE_PAGE
    return whole[start : start + nbytes]
