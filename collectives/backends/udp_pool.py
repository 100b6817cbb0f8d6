"""Receive buffers of the ``udp`` backend's large message bodies, kept for the next message of
the same size.

Writing into fresh memory costs a page fault per 4 KiB.  Here a fault costs 2-6 us on an idle
host, so a 6 MB body landing in fresh memory spends 4-9 ms in faults before its first byte is
useful; with 4 ranks on 2 cores, and the same-host copy (``process_vm_readv``) taking the
faults in the kernel, 14-66 ms were measured, against 0.5-0.9 ms for the same copy into memory
touched before.  So no body should land in fresh memory twice:

* a buffer whose message was copied out (into the receive's own buffer) comes back at once
  (:meth:`BufferPool.put`);
* a buffer handed over *in* its message (the caller decodes it zero-copy and keeps it: a
  ComfyUI follower's fan-out slice) is *lent* (:meth:`BufferPool.gone`).  Each buffer handed
  out is a fresh numpy view of a *master* array the pool keeps; the view is what every tensor
  and memoryview made from the buffer holds on to, so once the pool's weak reference to it is
  dead, nobody uses the master any more and it serves the next message of its size, its pages
  touched already.  A ComfyUI follower keeps its slice until its nodes run again in the next
  prompt, so two or three masters take turns.
* until a lent master comes back, the IO thread replaces it while the rank is quiet
  (:meth:`BufferPool.refill_step`): first with a lent master that came back, else with a new
  one, its pages touched :data:`_REFILL_STEP` bytes at a time with the GIL released, so the
  faults are paid between ops and not on the next message's path.

Bounded: at most ``per_size`` free buffers of one size, and at most :data:`POOL_BYTES` kept
alive by the pool in all (free, lent, and the one being touched; the oldest lent ones are
forgotten first: their memory is then their holder's alone).  Thread-safe.
"""

from __future__ import annotations

import ctypes
import threading
import weakref
from collections import deque

import numpy as np

POOL_BYTES = 256 << 20  # memory the pool keeps alive, in all
_POOL_PER_SIZE = 2
_REFILL_STEP = 1 << 20  # bytes touched per refill step (~0.5-2 ms of page faults here)
_LENT_MAX = 64  # lent buffers remembered (each take looks through them)

_Lent = tuple[int, "weakref.ref[np.ndarray]", np.ndarray]  # (size, the view handed out, master)


class BufferPool:
    """Free receive buffers by size (see the module docstring).

    ``per_size`` buffers of each size are kept: a fan-in has every peer's body of one size in
    flight at once, so a rank with ``n`` peers wants ``n`` of them (with two, the third peer of
    a 4-rank fan-in wrote into fresh memory on every op)."""

    def __init__(self, per_size: int = _POOL_PER_SIZE) -> None:
        self._per_size = max(per_size, 1)
        self._free: dict[int, list[np.ndarray]] = {}
        self._lent: deque[_Lent] = deque()  # oldest first
        self._bytes = 0  # free, lent and the buffer being refilled
        self._wanted: dict[int, int] = {}  # sizes lent and not yet replaced
        self._filling: tuple[np.ndarray, int] | None = None  # (master, bytes touched so far)
        self._lock = threading.Lock()

    def get(self, nbytes: int) -> memoryview:
        """A buffer of ``nbytes``: a free one, a lent one back, or fresh memory."""
        master: np.ndarray | None
        with self._lock:
            free = self._free.get(nbytes)
            if free:
                self._bytes -= nbytes
                master = free.pop()
            else:
                master = self._reclaim(nbytes)
        if master is None:
            master = np.empty(nbytes, dtype=np.uint8)
        return master[:].data  # a new view: its life tells whether the buffer is in use

    def has_free(self, nbytes: int) -> bool:
        """Whether :meth:`get` would hand out a free buffer of ``nbytes`` now (not fresh
        memory; a lent one that came back is not looked for)."""
        with self._lock:
            return bool(self._free.get(nbytes))

    def put(self, buf: memoryview) -> None:
        """``buf`` (from :meth:`get`) is not used any more."""
        master = _master(_view(buf))
        with self._lock:
            self._keep(master)

    def gone(self, buf: memoryview) -> None:
        """``buf`` (from :meth:`get`) left with its message: it comes back once its holder drops
        it, and is replaced meanwhile."""
        view = _view(buf)
        master = _master(view)
        nbytes = master.nbytes
        with self._lock:
            self._lent.append((nbytes, weakref.ref(view), master))
            self._bytes += nbytes
            self._trim()
            self._wanted[nbytes] = min(self._wanted.get(nbytes, 0) + 1, self._per_size)

    @property
    def wanted(self) -> bool:
        """Whether :meth:`refill_step` has work (read without the lock: a hint)."""
        return bool(self._wanted) or self._filling is not None

    def refill_step(self) -> bool:
        """Replace one lent buffer with one that came back, or touch the next
        :data:`_REFILL_STEP` bytes of a new one; whether a buffer joined the free ones.
        Called by one thread (the IO thread)."""
        with self._lock:
            if self._filling is None:
                nbytes = self._next_wanted()
                if nbytes is None:
                    return False
                back = self._reclaim(nbytes)
                if back is not None:
                    self._keep(back)
                    return True
                if not self._room(nbytes):
                    return False
                self._bytes += nbytes
                self._filling = (np.empty(nbytes, dtype=np.uint8), 0)
            master, done = self._filling
        step = min(_REFILL_STEP, master.nbytes - done)
        # ctypes.memset releases the GIL: the rank's other threads run while the kernel faults.
        ctypes.memset(master.ctypes.data + done, 0, step)
        done += step
        with self._lock:
            if done < master.nbytes:
                self._filling = (master, done)
                return False
            self._filling = None
            self._bytes -= master.nbytes  # reserved above; _keep counts it again
            self._keep(master)
        return True

    # -- holding the lock ----------------------------------------------------------------------
    def _keep(self, master: np.ndarray) -> None:
        nbytes = master.nbytes
        if self._room(nbytes):
            self._free.setdefault(nbytes, []).append(master)
            self._bytes += nbytes

    def _reclaim(self, nbytes: int) -> np.ndarray | None:
        """A lent master of ``nbytes`` nobody uses any more, no longer lent; or None."""
        for i, (size, view, master) in enumerate(self._lent):
            if size == nbytes and view() is None:
                del self._lent[i]
                self._bytes -= nbytes
                return master
        return None

    def _next_wanted(self) -> int | None:
        """The first wanted size, counted off; None when nothing is wanted."""
        if not self._wanted:
            return None
        nbytes = next(iter(self._wanted))
        count = self._wanted.pop(nbytes) - 1
        if count:
            self._wanted[nbytes] = count
        return nbytes

    def _room(self, nbytes: int) -> bool:
        return (
            len(self._free.get(nbytes, ())) < self._per_size and self._bytes + nbytes <= POOL_BYTES
        )

    def _trim(self) -> None:
        """Forget the oldest lent buffers while the pool keeps more than :data:`POOL_BYTES`, or
        remembers more than :data:`_LENT_MAX` of them."""
        while self._lent and (self._bytes > POOL_BYTES or len(self._lent) > _LENT_MAX):
            size, _, _ = self._lent.popleft()
            self._bytes -= size


def _view(buf: memoryview) -> np.ndarray:
    """The view of a master that ``buf`` (from :meth:`BufferPool.get`) exposes."""
    view = buf.obj
    assert isinstance(view, np.ndarray)
    return view


def _master(view: np.ndarray) -> np.ndarray:
    """The array whose memory ``view`` is."""
    base = view.base
    return base if isinstance(base, np.ndarray) else view


__all__ = ["POOL_BYTES", "BufferPool"]
