"""Linux futexes on shared memory, through ``ctypes``: how a rank sleeps until another rank of
its host stores a word of the arena (``shm_arena``), and how that rank wakes it.

Why: four ranks on two CPUs waiting for each other's arena slots by polling (with
``sched_yield`` between polls) keep every CPU busy with waiters, and the rank whose store they
wait for runs late.  A waiter asleep on a futex takes no CPU, and the store's owner wakes it
with one system call.  No library wraps the system call (``os`` has none), so this does, in a
few lines: ``futex(2)``'s ``FUTEX_WAIT`` and ``FUTEX_WAKE`` on a 32-bit word, shared (not
``FUTEX_PRIVATE``: the waiter and the waker are different processes mapping the same memfd).

``ctypes`` releases the GIL around the call, so a waiter asleep here holds up no other thread
of its process (the udp IO thread goes on serving the socket).
"""

from __future__ import annotations

import ctypes
import errno
import os
import platform
import sys

_SYS_FUTEX = {"x86_64": 202, "AMD64": 202}
_FUTEX_WAIT, _FUTEX_WAKE = 0, 1
_WAKE_ALL = 0x7FFFFFFF


class _Timespec(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long)]


_syscall = None
if sys.platform.startswith("linux") and platform.machine() in _SYS_FUTEX:
    try:
        _syscall = ctypes.CDLL(None, use_errno=True).syscall
    except (OSError, AttributeError):  # pragma: no cover - a libc without syscall()
        _syscall = None
    else:
        _syscall.restype = ctypes.c_long
        _NR = _SYS_FUTEX[platform.machine()]


def available() -> bool:
    """Whether this platform has futexes here (Linux on x86-64, as the arena itself needs)."""
    return _syscall is not None


def address_of(area: object) -> int:
    """The address of a writable buffer's first byte (an ``mmap``'s, say).  The buffer must
    outlive every use of the address: the arena keeps views of its mapping, which keep it
    mapped."""
    anchor = ctypes.c_char.from_buffer(area)  # type: ignore[arg-type]
    try:
        return ctypes.addressof(anchor)
    finally:
        del anchor  # releases the export: the mapping may still be closed later


def wait(address: int, expected: int, timeout_s: float) -> bool:
    """Sleep while the 32-bit word at ``address`` holds ``expected``, for up to ``timeout_s``
    (a wake, a signal, or a value that already differs end it early); False when it timed out.
    The caller checks its condition again either way: a futex wake is a hint, not a promise."""
    assert _syscall is not None
    timeout_s = max(timeout_s, 0.0)
    sec = int(timeout_s)
    spec = _Timespec(sec, int((timeout_s - sec) * 1e9))
    got = _syscall(
        _NR,
        ctypes.c_void_p(address),
        _FUTEX_WAIT,
        ctypes.c_uint32(expected & 0xFFFFFFFF),
        ctypes.byref(spec),
        None,
        0,
    )
    if got == 0:
        return True
    err = ctypes.get_errno()
    if err == errno.ETIMEDOUT:
        return False
    if err in (errno.EAGAIN, errno.EINTR):
        return True
    raise OSError(err, f"futex wait: {os.strerror(err)}")


def wake(address: int) -> int:
    """Wake every process asleep on the word at ``address``; how many woke."""
    assert _syscall is not None
    got = _syscall(_NR, ctypes.c_void_p(address), _FUTEX_WAKE, _WAKE_ALL, None, None, 0)
    if got < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"futex wake: {os.strerror(err)}")
    return int(got)


__all__ = ["address_of", "available", "wait", "wake"]
