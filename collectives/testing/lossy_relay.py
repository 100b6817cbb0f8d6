"""A user-space UDP relay on loopback that loses, delays and rate-limits datagrams, seeded.

Why: the simulated network (:mod:`collectives.testing.simnet`) proves the transport's logic under
a virtual clock; this shows the same behaviour on real sockets, with a real clock, real socket
buffers and real scheduling noise, without root or network namespaces (``tc netem`` needs both).

Topology: a client sends to :attr:`LossyRelay.address`; the relay forwards each datagram to
``target`` from a second socket of its own, so the target sees the relay's :attr:`back_address`
as the client's address, and forwards what the target sends back there to the client (the last
address the front socket heard from)::

    client  <-->  [front] relay [back]  <-->  target

Each direction has its own :class:`RelayLink`: a datagram waits for the link to be free
(serialisation at ``bandwidth`` bits/s: a token bucket one datagram deep, so a burst leaves at the
link rate; a backlog above ``queue_bytes`` is tail-dropped), is lost with probability ``loss``,
and leaves ``delay`` plus up to ``jitter`` seconds after its serialisation ends (FIFO per
direction).  Time starts at the datagram's kernel receive timestamp where Linux gives one, not
when the relay thread got round to reading it, so the relay's own scheduling delays do not slow
the emulated link down.  Random choices come from ``random.Random(seed)``; which datagram is lost
still depends on arrival order, which the kernel decides, so runs repeat statistically, not
exactly.

One thread per relay (:meth:`LossyRelay.start`).  A relay in the same process as a Python
sender competes with it for the GIL; :class:`RelayProcess` runs one in a child process instead,
which is what the ``wan --relay`` benchmark does.
"""

from __future__ import annotations

import contextlib
import heapq
import itertools
import multiprocessing
import random
import selectors
import socket
import struct
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from multiprocessing.connection import Connection
from types import TracebackType
from typing import Any

from collectives.backends.udp_socket import fine_timer_slack

Address = tuple[str, int]

_SOCKET_BUFFER = 4 << 20  # rmem_max/wmem_max on the machines we run on; the kernel caps it
_RECV_BATCH = 256  # datagrams read per wake-up before looking at the clock again
_IDLE_WAIT = 0.05  # s: how often an idle relay checks whether it should stop
# Kernel receive timestamps (struct timespec of two 64-bit fields): Linux on 64-bit machines,
# where SO_TIMESTAMPNS is 35 (the socket module does not name it).
_KERNEL_TIMESTAMPS = sys.platform.startswith("linux") and struct.calcsize("@l") == 8
_SO_TIMESTAMPNS = 35
_TIMESPEC = struct.Struct("@qq")
_ANCILLARY = socket.CMSG_SPACE(_TIMESPEC.size) if _KERNEL_TIMESTAMPS else 0


@dataclass(frozen=True)
class RelayLink:
    """One direction of the relay.  Times in seconds, bandwidth in bits/s (None: unlimited)."""

    loss: float = 0.0
    delay: float = 0.0
    jitter: float = 0.0
    bandwidth: float | None = None
    queue_bytes: int = 1 << 20

    def __post_init__(self) -> None:
        if not 0.0 <= self.loss <= 1.0:
            raise ValueError(f"RelayLink.loss is a probability, got {self.loss}")
        if self.delay < 0 or self.jitter < 0:
            raise ValueError("RelayLink delays must not be negative")
        if self.bandwidth is not None and self.bandwidth <= 0:
            raise ValueError(f"RelayLink.bandwidth must be positive, got {self.bandwidth}")


@dataclass
class DirectionStats:
    """What one direction did.  ``late_*``: lateness of a forward against its due time;
    ``read_late_*``: of a read against the datagram's kernel arrival time (0 without one)."""

    received: int = 0
    forwarded: int = 0
    lost: int = 0
    queue_dropped: int = 0
    send_failed: int = 0  # the kernel refused (socket buffer full): a loss the relay did not choose
    bytes_forwarded: int = 0
    late_max: float = 0.0
    late_sum: float = 0.0
    read_late_max: float = 0.0  # how long after its arrival the relay read a datagram
    read_late_sum: float = 0.0

    @property
    def loss_rate(self) -> float:
        return self.lost / self.received if self.received else 0.0


@dataclass
class _Direction:
    link: RelayLink
    out: socket.socket
    stats: DirectionStats = field(default_factory=DirectionStats)
    busy_until: float = 0.0
    last_due: float = 0.0


def _arrival(ancdata: list[tuple[int, int, bytes]], read_at: float) -> float:
    """When the kernel received the datagram, on the ``time.monotonic`` clock: the link model
    serialises from there, so a relay thread that was descheduled or busy does not leave the
    emulated link idle meanwhile (which would make it slower than configured)."""
    for level, kind, raw in ancdata:
        if level == socket.SOL_SOCKET and kind == _SO_TIMESTAMPNS and len(raw) >= _TIMESPEC.size:
            seconds, nanoseconds = _TIMESPEC.unpack_from(raw)
            # The stamp is CLOCK_REALTIME; the offset to monotonic is taken now, in integer ns.
            offset = time.time_ns() - time.monotonic_ns()
            stamp: float = (seconds * 1_000_000_000 + nanoseconds - offset) / 1e9
            return min(stamp, read_at)  # a clock step must not date a datagram in the future
    return read_at


def _udp_socket(host: str) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    for option in (socket.SO_RCVBUF, socket.SO_SNDBUF):
        sock.setsockopt(socket.SOL_SOCKET, option, _SOCKET_BUFFER)
    if _KERNEL_TIMESTAMPS:
        with contextlib.suppress(OSError):  # without them, a datagram arrives when it is read
            sock.setsockopt(socket.SOL_SOCKET, _SO_TIMESTAMPNS, 1)
    sock.bind((host, 0))
    sock.setblocking(False)
    return sock


class LossyRelay:
    """The relay; see the module docstring.  Use as a context manager, or start()/stop()."""

    def __init__(
        self,
        target: Address,
        forward: RelayLink,
        backward: RelayLink | None = None,
        *,
        seed: int = 0,
        host: str = "127.0.0.1",
    ) -> None:
        self.target = target
        self._rng = random.Random(seed)
        self._front = _udp_socket(host)
        self._back = _udp_socket(host)
        self._client: Address | None = None
        self._forward = _Direction(forward, self._back)
        self._backward = _Direction(backward if backward is not None else forward, self._front)
        # (due time, tie-breaker, direction, destination, datagram)
        self._due: list[tuple[float, int, _Direction, Address, bytes]] = []
        self._seq = itertools.count()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()  # stats() from another thread while the relay runs

    @property
    def address(self) -> Address:
        """Where the client sends to reach the target."""
        host, port = self._front.getsockname()[:2]
        return (host, port)

    @property
    def back_address(self) -> Address:
        """The source address the target sees for the client."""
        host, port = self._back.getsockname()[:2]
        return (host, port)

    def start(self) -> LossyRelay:
        self._thread = threading.Thread(target=self.serve, name="lossy-relay", daemon=True)
        self._thread.start()
        return self

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None
        self._front.close()
        self._back.close()

    def __enter__(self) -> LossyRelay:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def stats(self) -> dict[str, DirectionStats]:
        """A copy of the counters: ``forward`` (client to target) and ``backward``."""
        with self._lock:
            return {
                "forward": DirectionStats(**asdict(self._forward.stats)),
                "backward": DirectionStats(**asdict(self._backward.stats)),
            }

    def serve(self) -> None:
        """The relay loop; runs until :meth:`stop` (the thread of :meth:`start` runs it)."""
        # select(2) with fine timer slack, not the default epoll: epoll rounds a wait up to a
        # whole millisecond, so every datagram would leave ~0.5 ms after its due time on average
        # (up to 1 ms and more): extra delay and jitter that the link was not configured with.
        fine_timer_slack()
        selector = selectors.SelectSelector()
        selector.register(self._front, selectors.EVENT_READ, "front")
        selector.register(self._back, selectors.EVENT_READ, "back")
        try:
            while not self._stop.is_set():
                now = time.monotonic()
                wait = _IDLE_WAIT if not self._due else max(0.0, self._due[0][0] - now)
                for key, _ in selector.select(min(wait, _IDLE_WAIT)):
                    self._read(key.data == "front")
                self._send_due()
        finally:
            selector.close()

    def _read(self, from_client: bool) -> None:
        sock = self._front if from_client else self._back
        for _ in range(_RECV_BATCH):
            try:
                data, ancdata, _, addr = sock.recvmsg(65536, _ANCILLARY)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:  # e.g. ICMP port unreachable reported on a later read
                continue
            now = time.monotonic()
            arrived = _arrival(ancdata, now)
            with self._lock:
                if from_client:
                    self._client = (addr[0], addr[1])
                    self._admit(self._forward, self.target, data, arrived, now)
                elif self._client is not None and (addr[0], addr[1]) == self.target:
                    self._admit(self._backward, self._client, data, arrived, now)

    def _admit(
        self, direction: _Direction, dst: Address, data: bytes, now: float, read_at: float
    ) -> None:
        """Queue ``data`` that reached the relay's socket at ``now`` (read at ``read_at``)."""
        link, stats = direction.link, direction.stats
        stats.received += 1
        stats.read_late_sum += read_at - now
        stats.read_late_max = max(stats.read_late_max, read_at - now)
        done = now
        if link.bandwidth is not None:
            backlog = max(0.0, direction.busy_until - now) * link.bandwidth / 8
            if backlog + len(data) > link.queue_bytes:
                stats.queue_dropped += 1
                return
            done = max(now, direction.busy_until) + len(data) * 8 / link.bandwidth
            direction.busy_until = done
        if link.loss and self._rng.random() < link.loss:
            stats.lost += 1
            return
        due = done + link.delay + (self._rng.uniform(0.0, link.jitter) if link.jitter else 0.0)
        due = max(due, direction.last_due)
        direction.last_due = due
        heapq.heappush(self._due, (due, next(self._seq), direction, dst, data))

    def _send_due(self) -> None:
        now = time.monotonic()
        while self._due and self._due[0][0] <= now:
            due, _, direction, dst, data = heapq.heappop(self._due)
            try:
                direction.out.sendto(data, dst)
            except OSError:  # full socket buffer or unreachable: the datagram is gone
                with self._lock:
                    direction.stats.send_failed += 1
                continue
            with self._lock:
                stats = direction.stats
                stats.forwarded += 1
                stats.bytes_forwarded += len(data)
                late = now - due
                stats.late_sum += late
                stats.late_max = max(stats.late_max, late)


def _relay_child(
    conn: Connection,
    target: Address,
    forward: RelayLink,
    backward: RelayLink | None,
    seed: int,
) -> None:
    relay = LossyRelay(target, forward, backward, seed=seed).start()
    cpu = time.process_time()
    conn.send((relay.address, relay.back_address))
    conn.recv()  # any message: stop
    relay.stop()
    # The relay's own CPU seconds: a Python relay on a small machine can be what limits a
    # transfer through it, and a benchmark must be able to tell that from the transport.
    conn.send(({k: asdict(v) for k, v in relay.stats().items()}, time.process_time() - cpu))


class RelayProcess:
    """A :class:`LossyRelay` in a child process, so it does not share the GIL with the sender."""

    def __init__(
        self,
        target: Address,
        forward: RelayLink,
        backward: RelayLink | None = None,
        *,
        seed: int = 0,
        start_timeout: float = 20.0,
    ) -> None:
        context = multiprocessing.get_context("spawn")
        self._conn, child = context.Pipe()
        self._process = context.Process(
            target=_relay_child, args=(child, target, forward, backward, seed), daemon=True
        )
        self._process.start()
        if not self._conn.poll(start_timeout):
            self._process.kill()
            raise RuntimeError(f"the relay process did not start within {start_timeout} s")
        self.address, self.back_address = self._conn.recv()
        self._final: dict[str, DirectionStats] | None = None
        #: CPU seconds the relay process spent between its start and :meth:`stop`.
        self.cpu_seconds: float | None = None

    def stop(self, timeout: float = 10.0) -> dict[str, DirectionStats]:
        """Stop the relay; returns its final counters (see :meth:`LossyRelay.stats`)."""
        if self._final is None:
            self._conn.send("stop")
            raw: dict[str, dict[str, Any]] = {}
            if self._conn.poll(timeout):
                raw, self.cpu_seconds = self._conn.recv()
            self._process.join(timeout)
            if self._process.is_alive():
                self._process.kill()
            self._final = {k: DirectionStats(**v) for k, v in raw.items()}
        return self._final


__all__ = ["DirectionStats", "LossyRelay", "RelayLink", "RelayProcess"]
