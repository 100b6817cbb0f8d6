"""Connection state and health of the udp backend's IO driver: waiting for the world's
handshakes, the error a new op gets, the counters, and the (rate-limited) log line about
refused datagrams.
A mixin of :class:`~collectives.backends.udp_io.Engine` (split from it); everything here runs
holding the engine's lock unless it takes it itself."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from collectives.errors import (
    CommunicatorAbortedError,
    ConnectionLostError,
    RendezvousTimeoutError,
)

if TYPE_CHECKING:
    from collectives.backends.udp_nat import NatDriver
    from collectives.backends.udp_socket import UdpSocket
    from collectives.transport.endpoint import Endpoint

log = logging.getLogger("collectives.backends.udp_io")

PEER_CLOSED = "peer closed"  # the core's PeerLost reason of a CLOSE (not an ABORT)

_DROP_LOG_S = 10.0  # at most one log line per this many seconds about refused datagrams
# Refusals that mean someone sent this rank datagrams it must not accept (duplicates and
# overload are the network's doing and stay in comm.stats() only).
_SUSPECT_DROPS = ("malformed", "wrong_cluster", "foreign", "unknown_session", "auth", "replay")


class Health:
    """See the module docstring."""

    rank: int
    lock: threading.Lock
    cond: threading.Condition
    ep: Endpoint
    sock: UdpSocket
    nat: NatDriver | None
    counters: dict[str, int]
    clock: Callable[[], float]
    outstanding: dict[int, set[int]]
    connected: set[int]
    lost: dict[int, str]
    aborted: str | None
    closed: bool
    _drops_logged: int
    _drops_next: float

    def wait_connected(self, deadline: float, timeout: float) -> None:
        """Wait until the handshake with every peer is done; name the ones that never answer."""
        peers = set(self.outstanding)
        with self.lock:
            while not peers <= self.connected:
                if self.lost:
                    peer, reason = next(iter(self.lost.items()))
                    raise ConnectionLostError(
                        f"udp backend on rank {self.rank}: rank {peer} was lost while connecting "
                        f"({reason})",
                        ranks=self.lost,
                    )
                remaining = deadline - self.clock()
                if remaining <= 0:
                    missing = sorted(peers - self.connected)
                    raise RendezvousTimeoutError(
                        f"udp backend on rank {self.rank}: no handshake with rank(s) "
                        f"{', '.join(map(str, missing))} after {timeout:g} s: are they running, "
                        "with the same cluster key (COMFY_CLUSTER_KEY), and is UDP open between "
                        "the hosts?"
                    )
                self.cond.wait(min(remaining, 0.25))

    def stats(self) -> dict[str, Any]:
        """The core's counters, the driver's, the NAT layer's, and the socket's settings."""
        with self.lock:
            out: dict[str, Any] = dict(self.ep.stats())
            out.update(self.counters)
            if self.nat is not None:
                out.update(self.nat.stats())
        info = self.sock.info
        out.update(
            rcvbuf=info.rcvbuf, sndbuf=info.sndbuf, gso=info.gso, gro=info.gro,
            max_datagram=info.max_datagram,
        )  # fmt: skip
        return out

    def check_usable(self, peer: int, op: str) -> None:
        """Raise the error a new op towards ``peer`` gets now (call holding the lock)."""
        if self.aborted is not None:
            raise CommunicatorAbortedError(f"rank {self.rank} was aborted: {self.aborted}")
        if self.closed:
            raise CommunicatorAbortedError(f"rank {self.rank}: the udp communicator is closed")
        if peer in self.lost:
            raise ConnectionLostError(
                f"{op} on rank {self.rank}: rank {peer} is gone ({self.lost[peer]})", ranks=(peer,)
            )

    def _log_drops(self) -> None:
        """Say in the log (rate-limited) that datagrams failed the core's checks: the counters
        in ``comm.stats()`` tell how many, this tells an operator to look (holding the lock)."""
        now = self.clock()
        if now < self._drops_next:
            return
        self._drops_next = now + _DROP_LOG_S
        stats = self.ep.stats()
        drops = {name: stats.get(f"dropped_{name}", 0) for name in _SUSPECT_DROPS}
        total = sum(drops.values())
        if total > self._drops_logged:
            detail = ", ".join(f"{name} {n}" for name, n in drops.items() if n)
            log.warning(
                "udp rank %d: refused %d datagram(s) that failed authentication or checks "
                "(so far: %s); a peer with the wrong COMFY_CLUSTER_KEY, another cluster on "
                "this port, or an attacker",
                self.rank,
                total - self._drops_logged,
                detail,
            )
            self._drops_logged = total


__all__ = ["PEER_CLOSED", "Health"]
