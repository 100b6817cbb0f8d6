"""Output batches in recycled memory: a fan-in's output without fresh page faults every prompt.

ComfyUI keeps a node's output until the node runs again in a later prompt, and the leader's
fan-in allocates its whole output batch every prompt.  Fresh memory costs a page fault per page
on first touch: 6,000+ for a 25 MB batch, 4-16 ms on the reference VM and far more while its
host reclaims guest memory.  glibc does not help here: torch allocates with ``posix_memalign``,
and a freed block of exactly the same size is a few bytes too small for the next aligned
request, so each prompt's batch lands in fresh pages.

So large CPU batches come from a small pool of anonymous mappings.  A mapping goes back into use
once every tensor on it is gone: the numpy array that backs them (the tensors' storage keeps it
alive, views included, and so does a transport's byte view of a batch it still receives into,
even after a timeout) is tracked by a weak reference.  At most :data:`IDLE_LIMIT_BYTES` of
mappings are kept while not in use, least recently used dropped first; :func:`release_idle`
(ClusterFreeNow) unmaps them all.  Memory in use belongs to whoever holds the tensors, as with
``torch.empty``.
"""

from __future__ import annotations

import math
import mmap
import threading
import weakref
from collections.abc import Sequence

import numpy as np
import torch

MIN_BYTES = 1 << 20  # below this malloc's own reuse is good enough
IDLE_LIMIT_BYTES = 512 << 20


class _Mapping:
    __slots__ = ("array", "memory", "size")

    def __init__(self, size: int) -> None:
        self.memory = mmap.mmap(-1, size)
        self.size = size
        self.array: weakref.ref[np.ndarray] | None = None  # the array on it while in use

    @property
    def idle(self) -> bool:
        return self.array is None or self.array() is None


class _Pool:
    def __init__(self, idle_limit: int) -> None:
        self._lock = threading.Lock()
        self._mappings: list[_Mapping] = []  # least recently handed out first
        self.idle_limit = idle_limit

    def take(self, nbytes: int) -> np.ndarray:
        """A uint8 array of ``nbytes`` on a mapping nobody else uses (its old bytes remain)."""
        size = -(-nbytes // mmap.PAGESIZE) * mmap.PAGESIZE
        with self._lock:
            found = next((m for m in self._mappings if m.size == size and m.idle), None)
            if found is None:
                found = _Mapping(size)
            else:
                self._mappings.remove(found)
            self._mappings.append(found)
            array = np.frombuffer(found.memory, dtype=np.uint8, count=nbytes)
            found.array = weakref.ref(array)
            self._trim(self.idle_limit)
            return array

    def release_idle(self) -> int:
        """Unmap every mapping not in use; the bytes released."""
        with self._lock:
            return self._trim(0)

    def stats(self) -> tuple[int, int]:
        """(bytes in use, bytes idle)."""
        with self._lock:
            idle = sum(m.size for m in self._mappings if m.idle)
            return sum(m.size for m in self._mappings) - idle, idle

    def _trim(self, limit: int) -> int:
        idle = [m for m in self._mappings if m.idle]  # least recently used first
        excess = sum(m.size for m in idle) - limit
        released = 0
        for mapping in idle:
            if excess <= 0:
                break
            try:
                mapping.memory.close()
            except BufferError:  # still exported after all (a view outlived its array): keep
                continue
            self._mappings.remove(mapping)
            excess -= mapping.size
            released += mapping.size
        return released


_pool = _Pool(IDLE_LIMIT_BYTES)


def empty(shape: Sequence[int], dtype: torch.dtype) -> torch.Tensor:
    """``torch.empty(shape, dtype=dtype)`` on the CPU, in recycled memory when it is large."""
    nbytes = math.prod(shape) * dtype.itemsize
    if nbytes < MIN_BYTES:
        return torch.empty(tuple(shape), dtype=dtype)
    flat = torch.from_numpy(_pool.take(nbytes))
    return flat.view(dtype).view(tuple(shape))


def release_idle() -> int:
    """Unmap the recycled memory no tensor uses any more; the bytes released."""
    return _pool.release_idle()


def stats() -> tuple[int, int]:
    """Recycled memory: (bytes under live tensors, bytes kept idle for the next batch)."""
    return _pool.stats()
