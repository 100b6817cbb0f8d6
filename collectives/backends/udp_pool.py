"""Receive buffers of the ``udp`` backend's large message bodies, kept for the next message of
the same size.

Writing into fresh memory costs a page fault per 4 KiB.  Here a fault costs 2-6 us on an idle
host, so a 6 MB body landing in fresh memory spends 4-9 ms in faults before its first byte is
useful; with 4 ranks on 2 cores, and the same-host copy (``process_vm_readv``) taking the
faults in the kernel, 14-66 ms were measured, against 0.5-0.9 ms for the same copy into memory
touched before.  So:

* a buffer whose message was copied out (into the receive's own buffer) comes back here;
* a buffer handed over *in* its message (the caller decodes it zero-copy and keeps it: a
  ComfyUI follower's slice of a fan-out) is gone for good.  :meth:`BufferPool.gone` notes its
  size, and the IO thread replaces it while the rank is quiet (:meth:`BufferPool.refill_step`):
  a fresh buffer, its pages touched in slices of :data:`_REFILL_STEP` bytes with the GIL
  released, so the faults are paid between ops and not on the next message's path.

Bounded: at most ``per_size`` buffers of one size, :data:`POOL_BYTES` in all, the buffer being
refilled included.  Thread-safe.
"""

from __future__ import annotations

import ctypes
import threading

import numpy as np

from collectives.codec import alloc_buffer

POOL_BYTES = 256 << 20  # receive buffers kept for reuse, in all
_POOL_PER_SIZE = 2
_REFILL_STEP = 1 << 20  # bytes touched per refill step (~0.5-2 ms of page faults here)


class BufferPool:
    """Free receive buffers by size (see the module docstring).

    ``per_size`` buffers of each size are kept: a fan-in has every peer's body of one size in
    flight at once, so a rank with ``n`` peers wants ``n`` of them (with two, the third peer of
    a 4-rank fan-in wrote into fresh memory on every op)."""

    def __init__(self, per_size: int = _POOL_PER_SIZE) -> None:
        self._per_size = max(per_size, 1)
        self._free: dict[int, list[memoryview]] = {}
        self._bytes = 0  # free buffers and the one being refilled
        self._wanted: dict[int, int] = {}  # sizes given away, to replace
        self._filling: tuple[np.ndarray, int] | None = None  # (buffer, bytes touched so far)
        self._lock = threading.Lock()

    def get(self, nbytes: int) -> memoryview:
        with self._lock:
            free = self._free.get(nbytes)
            if free:
                self._bytes -= nbytes
                return free.pop()
        return alloc_buffer(nbytes)

    def put(self, buf: memoryview) -> None:
        nbytes = buf.nbytes
        with self._lock:
            if self._room(nbytes):
                self._free.setdefault(nbytes, []).append(buf)
                self._bytes += nbytes

    def gone(self, nbytes: int) -> None:
        """A buffer of ``nbytes`` left with its message: replace it ahead of the next one."""
        with self._lock:
            self._wanted[nbytes] = min(self._wanted.get(nbytes, 0) + 1, self._per_size)

    @property
    def wanted(self) -> bool:
        """Whether :meth:`refill_step` has work (read without the lock: a hint)."""
        return bool(self._wanted) or self._filling is not None

    def refill_step(self) -> bool:
        """Touch the next :data:`_REFILL_STEP` bytes of a replacement buffer (starting one for
        a wanted size if none is under way); whether one was finished (it joined the free
        buffers).  Called by one thread (the IO thread)."""
        with self._lock:
            if self._filling is None:
                self._filling = self._start()
                if self._filling is None:
                    return False
            arr, done = self._filling
        step = min(_REFILL_STEP, arr.nbytes - done)
        # ctypes.memset releases the GIL: the rank's other threads run while the kernel faults.
        ctypes.memset(arr.ctypes.data + done, 0, step)
        done += step
        with self._lock:
            if done < arr.nbytes:
                self._filling = (arr, done)
                return False
            self._filling = None
            self._bytes -= arr.nbytes  # reserved by _start; put() counts it again
        self.put(arr.data)
        return True

    def _start(self) -> tuple[np.ndarray, int] | None:
        """A fresh buffer for the first wanted size that still has room, reserved in
        ``_bytes`` (holding the lock); None when nothing is wanted or fits."""
        while self._wanted:
            nbytes = next(iter(self._wanted))
            count = self._wanted.pop(nbytes) - 1
            if count:
                self._wanted[nbytes] = count
            if self._room(nbytes):
                self._bytes += nbytes
                return np.empty(nbytes, dtype=np.uint8), 0
        return None

    def _room(self, nbytes: int) -> bool:
        return (
            len(self._free.get(nbytes, ())) < self._per_size and self._bytes + nbytes <= POOL_BYTES
        )


__all__ = ["POOL_BYTES", "BufferPool"]
