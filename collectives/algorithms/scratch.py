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
"""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import torch

MIN_BYTES = 1 << 20
MAX_BYTES = 64 << 20
"""The most one slot keeps (two per thread that ran a large reduction)."""

_local = threading.local()


def partial_buffer(slot: int, numel: int, like: torch.Tensor) -> torch.Tensor:
    """``numel`` elements of ``like``'s dtype: slot 0 or 1 of this thread's scratch memory, or a
    fresh tensor when the size or device does not qualify."""
    import torch

    nbytes = numel * like.element_size()
    if like.device.type != "cpu" or not MIN_BYTES <= nbytes <= MAX_BYTES:
        return torch.empty(numel, dtype=like.dtype, device=like.device)
    slots: list[torch.Tensor | None] | None = getattr(_local, "slots", None)
    if slots is None:
        slots = _local.slots = [None, None]
    buf = slots[slot]
    if buf is None or buf.numel() < nbytes:
        # numpy's memory, not torch's: numpy asks for transparent huge pages (arrays of 4 MiB up),
        # and a same-host peer copies a partial out of this memory (process_vm_readv pins
        # every page it reads: 16 MiB out of huge pages at 15-23 GB/s, out of 4 KiB pages at
        # 5.5-10 here; python -m benchmarks.cma_pages).
        buf = slots[slot] = torch.from_numpy(np.empty(nbytes, dtype=np.uint8))
    return buf[:nbytes].view(like.dtype)
