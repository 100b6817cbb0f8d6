"""A byte stream from one process to another of the same host, in shared memory.

Why: a small message through the socket costs each end a syscall, an AEAD seal or open and the
transport core's bookkeeping (~30 us per message in all on this class of machine), and on a
host with more ranks than CPUs the ranks' hops of a 1 KiB collective add up to most of its
time.  Ranks of one host that may already read each other's memory (cross-memory attach, see
:mod:`collectives.backends.cma`) put their small messages in a ring instead, as MPI libraries
and NCCL do on one node: a copy in, a copy out, no syscall while the reader is awake.

The ring is one sealed ``memfd`` per direction, made by its writer: nothing is named in the
file system, so nothing is left behind by a crash, and the reader maps it through
``/proc/<writer pid>/fd/<fd>``, which the kernel allows only to a process that may ptrace the
writer (the check cross-memory attach passes already; the pid is the one the probe verified).
Its size is sealed before it is handed out, so neither side can shrink it under the other's
mapping (an access past the end would be ``SIGBUS``).

Layout: a header of positions and flags, each on its own cache line, then :data:`CAPACITY`
bytes of data used as a circular byte stream, like a pipe's buffer.  Positions count bytes
since the start and only grow (no wrap-around ambiguity, no torn flag bits); each is written by
one side only: ``written`` by the writer, ``read`` by the reader.  The writer copies bytes in,
then stores ``written``; the reader loads ``written``, copies out, then stores ``read``.

Memory order: this relies on x86-64's (TSO: stores are seen in program order, loads are not
reordered with older loads, nor stores with older loads), so rings are offered only there
(:func:`available`).  The one exchange TSO does not order, a store followed by a load of
another location (the sleep flag and the position, see :func:`fence`), takes a full fence.
Each 8-byte position is one aligned store (a native ``Q`` memoryview item).
"""

from __future__ import annotations

import contextlib
import mmap
import os
import platform
import sys
import threading

ENV = "COMFY_CLUSTER_SHM"
CAPACITY = 1 << 20
"""Data bytes per ring (one per direction between two ranks of one host; touched lazily)."""
HEADER_BYTES = 256
TOTAL_BYTES = HEADER_BYTES + CAPACITY
NAME = "comfy-cluster-ring"
"""The memfd's name (``/proc/<pid>/fd/<fd>`` reads ``/memfd:comfy-cluster-ring (deleted)``)."""

# Slots of the header, as 8-byte items (each written by one side only; one per cache line but
# the reader's two sleep flags, written by its two waiting threads).
WRITTEN = 0  # bytes written since the start (the writer)
READ = 8  # bytes read since the start (the reader)
ASLEEP = 16  # the reader's threads (16: its IO thread, 17: a waiting caller) sleep in select
WAITING = 24  # the writer has bytes that did not fit (the reader rings it after reading)

_SEALS = ("F_SEAL_SHRINK", "F_SEAL_GROW", "F_SEAL_SEAL")
_fence_lock = threading.Lock()


def available() -> bool:
    """Linux on x86-64 (see the module docstring), ``memfd_create`` and file seals, and not
    turned off with ``COMFY_CLUSTER_SHM=0``."""
    if os.environ.get(ENV, "1").strip() in ("0", "off"):
        return False
    if not sys.platform.startswith("linux") or platform.machine() not in ("x86_64", "AMD64"):
        return False
    import fcntl

    return hasattr(os, "memfd_create") and all(hasattr(fcntl, s) for s in _SEALS)


def fence() -> None:
    """A full memory barrier: taking a lock is an atomic read-modify-write (``lock cmpxchg``),
    which x86 orders against every earlier store and later load.  Between a sleeper's flag
    store and its check of the position, and between a writer's position store and its check
    of the flag: without it each could miss the other (a lost wakeup)."""
    with _fence_lock:
        pass


class Ring:
    """One mapping of a ring (either side); see the module docstring."""

    def __init__(self, area: mmap.mmap) -> None:
        self._area = area
        self._view = memoryview(area)
        self.slots = self._view[:HEADER_BYTES].cast("Q")
        self._data = self._view[HEADER_BYTES:TOTAL_BYTES]

    # -- the writer --------------------------------------------------------------------------
    def room(self) -> int:
        slots = self.slots
        return CAPACITY - (slots[WRITTEN] - slots[READ])

    def write(self, src: memoryview) -> int:
        """Copy as much of ``src`` (flat bytes) as fits; how much."""
        slots = self.slots
        written = slots[WRITTEN]
        n = min(src.nbytes, CAPACITY - (written - slots[READ]))
        if n <= 0:
            return 0
        at = written % CAPACITY
        first = min(n, CAPACITY - at)
        self._data[at : at + first] = src[:first]
        if first < n:
            self._data[: n - first] = src[first:n]
        slots[WRITTEN] = written + n  # after the bytes: a reader that sees it sees them
        return n

    # -- the reader --------------------------------------------------------------------------
    def readable(self) -> int:
        slots = self.slots
        return slots[WRITTEN] - slots[READ]

    def read_into(self, dest: memoryview) -> int:
        """Copy up to ``dest.nbytes`` readable bytes into ``dest``; how many."""
        slots = self.slots
        done = slots[READ]
        n = min(dest.nbytes, slots[WRITTEN] - done)
        if n <= 0:
            return 0
        at = done % CAPACITY
        first = min(n, CAPACITY - at)
        dest[:first] = self._data[at : at + first]
        if first < n:
            dest[first:n] = self._data[: n - first]
        slots[READ] = done + n  # after the copy: the writer may then reuse the bytes
        return n

    def skip(self, nbytes: int) -> int:
        """Drop up to ``nbytes`` readable bytes; how many."""
        slots = self.slots
        n = min(nbytes, slots[WRITTEN] - slots[READ])
        if n > 0:
            slots[READ] += n
        return max(n, 0)

    def close(self) -> None:
        for view in (self._data, self.slots, self._view):
            view.release()
        with contextlib.suppress(BufferError, ValueError):
            self._area.close()


def create() -> tuple[int, Ring]:
    """A new ring for this process to write: its sealed memfd (close it once the reader
    attached: the mapping keeps the memory) and the writer's mapping."""
    fd, area = make_shared(TOTAL_BYTES, NAME)
    return fd, Ring(area)


def attach(pid: int, fd: int) -> Ring:
    """Map the ring that process ``pid`` made as its descriptor ``fd``, for reading.  Raises
    ``OSError`` when the kernel refuses, or when the descriptor is not a sealed ring of ours of
    the right size (a stale or reused descriptor number)."""
    return Ring(map_shared(pid, fd, TOTAL_BYTES, NAME))


def make_shared(nbytes: int, name: str) -> tuple[int, mmap.mmap]:
    """``nbytes`` of shared memory named ``name`` (a memfd, sealed at that size) and this
    process's mapping of it."""
    import fcntl

    fd = os.memfd_create(name, os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    try:
        os.ftruncate(fd, nbytes)
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, _seal_bits())
        area = mmap.mmap(fd, nbytes)
    except BaseException:
        os.close(fd)
        raise
    return fd, area


def map_shared(pid: int, fd: int, nbytes: int, name: str) -> mmap.mmap:
    """Map what :func:`make_shared` made in process ``pid`` as its descriptor ``fd``; raises
    ``OSError`` unless it is a sealed memfd named ``name`` of ``nbytes``."""
    import fcntl

    if pid <= 0 or fd < 0:
        raise OSError(f"no shared memory: pid {pid}, descriptor {fd}")
    path = f"/proc/{pid}/fd/{fd}"
    if not os.readlink(path).startswith(f"/memfd:{name}"):
        raise OSError(f"{path} is not a {name}")
    local = os.open(path, os.O_RDWR | os.O_CLOEXEC)
    try:
        seals = fcntl.fcntl(local, fcntl.F_GET_SEALS)
        if seals & _seal_bits() != _seal_bits() or os.fstat(local).st_size != nbytes:
            raise OSError(f"{path} is not a sealed {name} of {nbytes} bytes")
        return mmap.mmap(local, nbytes)
    finally:
        os.close(local)


def _seal_bits() -> int:
    import fcntl

    bits = 0
    for name in _SEALS:
        bits |= int(getattr(fcntl, name))
    return bits


__all__ = [
    "CAPACITY",
    "ENV",
    "Ring",
    "attach",
    "available",
    "create",
    "fence",
    "make_shared",
    "map_shared",
]
