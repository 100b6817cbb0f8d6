"""Single-copy transfers between processes of one host (Linux cross-memory attach).

Over TCP loopback every byte is copied twice (into the kernel and out again) and moves through
one socket at 1.5-2.5 GB/s; with ``process_vm_readv`` the receiver copies straight out of the
sender's memory once, at memcpy speed (9-10 GB/s measured here).  MPI libraries do the same
for large messages (MPICH and Open MPI call it CMA).  The sender announces where the bytes are;
the receiver reads them and acknowledges, after which the sender may reuse its memory.

Whether a peer may read this process is decided per pair by trying it once, when a world forms
(:func:`probe_descriptor`, :func:`can_read`): the kernel refuses when ptrace rules forbid it
(another user, Yama's ``ptrace_scope``, a container without ``CAP_SYS_PTRACE``), and processes
on different hosts or in different PID namespaces are told apart by :func:`host_identity`
before anything is tried.  ``COMFY_CLUSTER_CMA=0`` turns it off.

Nothing is imported or allocated at module import beyond the standard library.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import functools
import hashlib
import os
import secrets
import struct
import sys
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    import torch

ENV = "COMFY_CLUSTER_CMA"
MIN_BYTES = 256 << 10  # smaller parts go through the engine: the acknowledgement costs a round trip

_DESCRIPTOR = struct.Struct("<16sIQ16s")  # host identity, pid, token address, token
DESCRIPTOR_BYTES = _DESCRIPTOR.size


class _IoVec(ctypes.Structure):
    _fields_ = [("iov_base", ctypes.c_void_p), ("iov_len", ctypes.c_size_t)]


_readv: Any = None


def _load() -> Any:
    global _readv
    if _readv is None:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
        fn = libc.process_vm_readv
        fn.restype = ctypes.c_ssize_t
        fn.argtypes = [
            ctypes.c_int,
            ctypes.POINTER(_IoVec),
            ctypes.c_ulong,
            ctypes.POINTER(_IoVec),
            ctypes.c_ulong,
            ctypes.c_ulong,
        ]
        _readv = fn
    return _readv


def _turned_off() -> bool:
    return os.environ.get(ENV, "1").strip() in ("0", "off")


def enabled() -> bool:
    """Linux, a libc with ``process_vm_readv``, and not turned off by ``COMFY_CLUSTER_CMA``."""
    if not sys.platform.startswith("linux") or _turned_off():
        return False
    try:
        _load()
    except (OSError, AttributeError):
        return False
    return True


_YAMA = "/proc/sys/kernel/yama/ptrace_scope"
_CAP_SYS_PTRACE = 19
_YAMA_HINTS = {
    1: "sysctl kernel.yama.ptrace_scope=0, or run the ranks as root or with CAP_SYS_PTRACE",
    2: "run the ranks with CAP_SYS_PTRACE",
}


def host_policy() -> tuple[bool, str]:
    """Whether ranks of this host started side by side (siblings, same user) may copy out of
    each other here, and why, for ``comfycluster doctor``.  What the kernel allows is decided
    per pair when a world forms; this reads the settings that decide it."""
    if not enabled():
        if sys.platform.startswith("linux") and _turned_off():
            return False, f"off ({ENV}=0): ranks of this host send bodies through the socket"
        return False, "no process_vm_readv here (it is Linux's): ranks of this host use the socket"
    try:
        with open(_YAMA) as f:
            scope = int(f.read().strip() or 0)
    except (OSError, ValueError):
        scope = 0  # no Yama: ordinary ptrace rules (same user) apply
    privileged = os.geteuid() == 0 or _has_cap_sys_ptrace()
    if scope == 0 or (scope in (1, 2) and privileged):
        why = "same user" if scope == 0 else "root or CAP_SYS_PTRACE"
        return True, f"ranks of this host copy large bodies out of each other's memory ({why})"
    hint = _YAMA_HINTS.get(scope, "not while Yama's scope is 3")
    return False, (
        f"Yama ptrace_scope {scope} refuses it between sibling ranks: they send through the "
        f"socket (copies need {hint})"
    )


def _has_cap_sys_ptrace() -> bool:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("CapEff:"):
                    return bool(int(line.split()[1], 16) >> _CAP_SYS_PTRACE & 1)
    except (OSError, ValueError, IndexError):
        pass
    return False


@functools.cache
def host_identity() -> bytes:
    """16 bytes equal for two processes exactly when one can name the other by its pid."""
    parts = [os.uname().nodename.encode()]
    try:
        with open("/proc/sys/kernel/random/boot_id", "rb") as f:
            parts.append(f.read().strip())
    except OSError:
        parts.append(b"?")
    try:
        parts.append(str(os.stat("/proc/self/ns/pid").st_ino).encode())
    except OSError:
        parts.append(b"?")
    return hashlib.sha256(b"\0".join(parts)).digest()[:16]


def read(pid: int, address: int, into: int, nbytes: int) -> None:
    """Copy ``nbytes`` at ``address`` in process ``pid`` to ``into`` in this one.

    Raises ``OSError`` with the kernel's errno: ``ESRCH`` when the process is gone, ``EPERM``
    when reading it is not allowed, ``EFAULT`` when the range is not mapped there.
    """
    fn = _load()
    done = 0
    while done < nbytes:
        local = _IoVec(into + done, nbytes - done)
        remote = _IoVec(address + done, nbytes - done)
        got = fn(pid, ctypes.byref(local), 1, ctypes.byref(remote), 1, 0)
        if got < 0:
            code = ctypes.get_errno()
            raise OSError(code, f"process_vm_readv from pid {pid}: {os.strerror(code)}")
        if got == 0:
            raise OSError(errno.EFAULT, f"process_vm_readv from pid {pid} read nothing")
        done += got


def address_of(view: memoryview) -> int:
    """The address of a contiguous byte view's first byte (read-only views too; 0 when empty):
    what a peer reads with :func:`read`."""
    if view.nbytes == 0:
        return 0
    import numpy as np

    return int(np.frombuffer(view, dtype=np.uint8).ctypes.data)


class Probe:
    """A token in this process's memory that peers try to read, and its description."""

    def __init__(self) -> None:
        self.token = secrets.token_bytes(16)
        self._buf = ctypes.create_string_buffer(self.token, 16)

    def descriptor(self) -> bytes:
        return _DESCRIPTOR.pack(
            host_identity(), os.getpid(), ctypes.addressof(self._buf), self.token
        )


def no_descriptor() -> bytes:
    """What a process that cannot take part sends in place of a probe descriptor."""
    return bytes(DESCRIPTOR_BYTES)


def descriptor_pid(descriptor: bytes) -> int:
    """The pid a probe descriptor names (0 for an empty or malformed one)."""
    try:
        return int(_DESCRIPTOR.unpack(bytes(descriptor))[1])
    except struct.error:
        return 0


def can_read(descriptor: bytes) -> bool:
    """Whether this process can read the peer that sent ``descriptor`` (tries it)."""
    try:
        identity, pid, address, token = _DESCRIPTOR.unpack(bytes(descriptor))
    except struct.error:
        return False
    if pid == 0 or identity != host_identity() or pid == os.getpid():
        return False
    got = ctypes.create_string_buffer(16)
    try:
        read(pid, address, ctypes.addressof(got), 16)
    except OSError:
        return False
    return bool(got.raw == token)


class _Gathers(Protocol):
    """What :func:`probe_world` needs of a backend: its rank, size and an allgather."""

    rank: int
    size: int

    def allgather_into(self, out: torch.Tensor, tensor: torch.Tensor, ctx: Any) -> None: ...


class _Peers(Protocol):
    """Where :func:`probe_world` puts what it found (a backend's engine)."""

    cma_sources: dict[int, int]
    cma_readers: frozenset[int]


def probe_world(backend: _Gathers, timeout: float, engine: _Peers) -> None:
    """Find who can read whose memory when a world forms: every rank tries every other once.

    Two small allgathers over ``backend`` (which must already move messages): probe
    descriptors, then who could read whom.  A rank with cross-memory attach off or unavailable
    takes part with an empty descriptor.  Sets ``engine.cma_sources`` (peer -> the pid this
    process may read; a message naming any other pid is refused) and ``engine.cma_readers``
    (the peers that may read this process).  Every rank must call it, at the same point.

    The sources are set before this rank's verdicts leave.  A peer that learns from them that
    this rank can read it sends it same-host messages as soon as its own probe returns, which
    can be before this one's (the verdicts' ring ends at different times on different ranks),
    and the udp driver checks the sources the moment such a message arrives: set after the
    probe, a 3-rank world under load refused a broadcast's first message now and then.
    """
    import torch

    from collectives.backends.base import OpContext
    from collectives.deadline import Deadline

    rank, size = backend.rank, backend.size
    ctx = OpContext("cma probe", 0, Deadline.start(timeout, "cma probe", rank))
    use = enabled()
    probe = Probe() if use else None
    desc = probe.descriptor() if probe is not None else no_descriptor()
    every = torch.empty((size, DESCRIPTOR_BYTES), dtype=torch.uint8)
    backend.allgather_into(every, torch.frombuffer(bytearray(desc), dtype=torch.uint8), ctx)
    readable = {
        r: descriptor_pid(every[r].numpy().tobytes())
        for r in range(size)
        if use and r != rank and can_read(every[r].numpy().tobytes())
    }
    engine.cma_sources = readable  # before the verdicts leave (see above)
    mine = torch.tensor([r in readable for r in range(size)], dtype=torch.uint8)
    verdicts = torch.empty((size, size), dtype=torch.uint8)
    backend.allgather_into(verdicts, mine, ctx)
    del probe  # every peer has tried it
    engine.cma_readers = frozenset(r for r in range(size) if r != rank and verdicts[r, rank])


__all__ = [
    "DESCRIPTOR_BYTES",
    "ENV",
    "MIN_BYTES",
    "Probe",
    "address_of",
    "can_read",
    "descriptor_pid",
    "enabled",
    "host_identity",
    "no_descriptor",
    "probe_world",
    "read",
]
