"""A reference flow through the lossy relay: raw UDP paced at a fixed rate, no transport.

Why: an emulator slower than the link it emulates under-reports whatever runs through it.  Before
a transport's goodput through :class:`~collectives.testing.lossy_relay.LossyRelay` is read as the
transport's own, the relay has to show that a flow with no congestion control, no ACKs and no
resends gets ``bandwidth * (1 - loss)`` out of it.  The flow is paced a little above the link
rate (``offered``), so the relay's queue never runs dry however the sender's wake-ups jitter:
whatever the receiver gets below the ceiling is the relay's fault, not the sender's::

    result = reference_flow(RelayLink(loss=0.01, delay=0.025, bandwidth=100e6), seconds=5.0)
    assert result.ratio > 0.98
"""

from __future__ import annotations

import selectors
import socket
import time
from dataclasses import dataclass

from collectives.backends.udp_socket import fine_timer_slack
from collectives.testing.lossy_relay import DirectionStats, LossyRelay, RelayLink, RelayProcess

_SOCKET_BUFFER = 4 << 20
_QUIET = 0.2  # s after the last possible arrival: the flow is over


@dataclass(frozen=True)
class ReferenceResult:
    """What the paced flow got through the relay; rates are UDP payload bits/s."""

    offered_bps: float
    delivered_bps: float
    ceiling_bps: float  # bandwidth * (1 - loss)
    datagram: int  # bytes each
    sent: int
    received: int
    seconds: float  # first to last arrival
    relay: dict[str, DirectionStats]
    relay_cpu_seconds: float | None

    @property
    def ratio(self) -> float:
        """Delivered over the ceiling: ~1.0 for an honest relay."""
        return self.delivered_bps / self.ceiling_bps


def reference_flow(
    link: RelayLink,
    seconds: float,
    *,
    offered: float = 1.05,
    datagram: int = 1200,
    seed: int = 0,
    in_process: bool = False,
) -> ReferenceResult:
    """Pace ``datagram``-byte datagrams at ``offered * link.bandwidth`` through a relay for
    ``seconds``; the relay runs in a child process (:class:`RelayProcess`, as the ``wan``
    benchmark runs it) unless ``in_process``, where it shares this process's GIL."""
    if link.bandwidth is None:
        raise ValueError("reference_flow needs RelayLink.bandwidth: an unlimited link has no rate")
    if seconds <= 0 or offered <= 0:
        raise ValueError(f"seconds ({seconds}) and offered ({offered}) must be positive")
    rx = _socket()
    tx = _socket()
    try:
        target = rx.getsockname()[:2]
        if in_process:
            local = LossyRelay(target, link, seed=seed).start()
            try:
                sent, arrivals = _pace(
                    tx, rx, local.address, link, seconds=seconds, offered=offered, datagram=datagram
                )
            finally:
                local.stop()
            stats, cpu = local.stats(), None
        else:
            child = RelayProcess(target, link, seed=seed)
            try:
                sent, arrivals = _pace(
                    tx, rx, child.address, link, seconds=seconds, offered=offered, datagram=datagram
                )
            finally:
                stats = child.stop()
            cpu = child.cpu_seconds
    finally:
        rx.close()
        tx.close()
    span = arrivals[-1] - arrivals[0] if len(arrivals) > 1 else 0.0
    # Bytes after the first arrival over the time since it: the first one opens the interval.
    delivered = (len(arrivals) - 1) * datagram * 8 / span if span > 0 else 0.0
    return ReferenceResult(
        offered_bps=offered * link.bandwidth,
        delivered_bps=delivered,
        ceiling_bps=link.bandwidth * (1 - link.loss),
        datagram=datagram,
        sent=sent,
        received=len(arrivals),
        seconds=span,
        relay=stats,
        relay_cpu_seconds=cpu,
    )


def _socket() -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    for option in (socket.SO_RCVBUF, socket.SO_SNDBUF):
        sock.setsockopt(socket.SOL_SOCKET, option, _SOCKET_BUFFER)
    sock.bind(("127.0.0.1", 0))
    sock.setblocking(False)
    return sock


def _pace(
    tx: socket.socket,
    rx: socket.socket,
    relay: tuple[str, int],
    link: RelayLink,
    *,
    seconds: float,
    offered: float,
    datagram: int,
) -> tuple[int, list[float]]:
    """Send on a fixed schedule (a late sender catches up at once), receive what comes back;
    returns the number sent and the arrival times."""
    assert link.bandwidth is not None
    fine_timer_slack()
    gap = datagram * 8 / (link.bandwidth * offered)
    payload = bytes(datagram)
    arrivals: list[float] = []
    selector = selectors.SelectSelector()  # microsecond waits (see simnet_udp)
    selector.register(rx, selectors.EVENT_READ)
    start = time.monotonic()
    stop_sending = start + seconds
    # The queue may hold queue_bytes when sending stops: the last datagram is out after that
    # drains, plus the delay and jitter.
    drain = link.queue_bytes * 8 / link.bandwidth + link.delay + link.jitter
    give_up = stop_sending + drain + _QUIET + 5.0
    sent = 0
    try:
        while True:
            now = time.monotonic()
            while now < stop_sending and start + sent * gap <= now:
                try:
                    tx.sendto(payload, relay)
                except BlockingIOError:
                    break  # our own socket buffer is full: try again at the next wake-up
                sent += 1
            while True:
                try:
                    rx.recv(65536)
                except (BlockingIOError, InterruptedError):
                    break
                arrivals.append(time.monotonic())
            if now >= stop_sending:
                last = arrivals[-1] if arrivals else stop_sending
                if now >= max(last, stop_sending + drain) + _QUIET or now >= give_up:
                    return sent, arrivals
                wait = _QUIET
            else:
                wait = max(0.0, start + sent * gap - time.monotonic())
            selector.select(min(wait, 0.05))
    finally:
        selector.close()


__all__ = ["ReferenceResult", "reference_flow"]
