"""How the ``udp`` backend's threads wait for the socket (a mixin of the IO driver's ``Engine``).

A waiting caller first polls the socket for a bounded while, the engine's lock released (a
receiver that is not asleep costs its sender no wakeup inside ``sendto`` and itself no scheduler
round trip), then blocks in ``select`` on the socket and a wake pipe, which posters write to
when the core's timer moved earlier than the sleeper's.  ``select``, not ``poll``: microsecond
timeouts, where ``poll`` counts milliseconds.
"""

from __future__ import annotations

import contextlib
import os
import select
import threading
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from collectives.backends.udp_socket import Address

# How long a waiting caller polls the socket without sleeping before it blocks in select.  A
# sleeping receiver costs the sender a wakeup inside its sendto and itself a scheduler round
# trip (tens of us each, more under a hypervisor); a small op's answer usually comes sooner.
# Bounded per wait (see spin_budget).
_SPIN_S = 200e-6
# Where ranks of this host outnumber its CPUs, a waiting caller still polls, but gives its CPU
# away between polls (sched_yield): a peer that is runnable gets it at once, and the answer is
# read without a sleep and a wakeup.  4 ranks on 2 cores, 1 KiB broadcast: 1.02-1.07 ms
# blocking in select, 0.60-0.86 ms polling with yields, 1.39-2.07 ms polling without.
_YIELD_SPIN_S = 500e-6


class Waits:
    """The socket waits (see the module docstring); :meth:`_init_waits` sets them up."""

    lock: threading.Lock
    clock: Callable[[], float]
    counters: dict[str, int]
    _unsent: deque[tuple[Address, memoryview, int]]
    # The same-host rings (udp_shm): polled with the socket, flagged while asleep.
    shm_readable: Callable[[], bool]
    _shm_sleep: Callable[[int], bool]
    _shm_awake: Callable[[int], None]

    def _init_waits(self, sock_fd: int, host: str, size: int) -> None:
        self._sock_fd = sock_fd
        self._spin_s, self._spin_yields = spin_budget(host, size)
        self._spin_poll = select.poll()
        self._spin_poll.register(sock_fd, select.POLLIN)
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)

    def _close_waits(self) -> None:
        for fd in (self._wake_r, self._wake_w):
            with contextlib.suppress(OSError):
                os.close(fd)

    def wake(self) -> None:
        with contextlib.suppress(OSError):
            os.write(self._wake_w, b"\0")

    def _spin(self, until: float) -> bool:
        """Poll the socket (lock released, no sleep) until it is readable or ``until``; whether
        it is.  Posters from other threads get the lock between polls."""
        clock, poll, yields = self.clock, self._spin_poll.poll, self._spin_yields
        rings = self.shm_readable
        if clock() >= until:
            return False
        self.lock.release()
        try:
            while True:
                if rings() or poll(0):
                    return True
                if clock() >= until:
                    return False
                if yields:
                    os.sched_yield()
        finally:
            self.lock.acquire()

    def _block(self, until: float) -> None:
        """:meth:`_select` for a waiting caller, the lock released meanwhile."""
        self.lock.release()
        try:
            self._select(until, 1)
        finally:
            self.lock.acquire()

    def _select(self, until: float, slot: int) -> None:
        """Wait until the socket is readable (writable, when sends wait for room), a wakeup
        comes, or ``until`` (not holding the lock).  ``slot``: the sleeper's flag in the rings
        (0: the IO thread, 1: a waiting caller; udp_shm), whose writers ring the socket."""
        if self._shm_sleep(slot):
            self._shm_awake(slot)
            return  # a ring has bytes: no sleep
        timeout = max(until - self.clock(), 0.0)
        fd, wake_r = self._sock_fd, self._wake_r
        try:
            ready, _, _ = select.select([fd, wake_r], [fd] if self._unsent else [], [], timeout)
        finally:
            self._shm_awake(slot)
        if wake_r in ready:
            self.counters["wakeups"] += 1
            with contextlib.suppress(OSError):
                os.read(wake_r, 4096)


def spin_budget(host: str, size: int) -> tuple[float, bool]:
    """How long a waiting caller polls before it blocks, and whether it yields its CPU between
    polls: :data:`_SPIN_S` where each rank can have a CPU of its own; where they share CPUs (on
    loopback every rank is on this host), :data:`_YIELD_SPIN_S` with yields, since a rank that
    polls without yielding takes the CPU its peer needs to answer."""
    from collectives.auth import is_loopback

    if is_loopback(host) and size > len(os.sched_getaffinity(0)):
        return _YIELD_SPIN_S, True
    return _SPIN_S, False


__all__ = ["Waits", "spin_budget"]
