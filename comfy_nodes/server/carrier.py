"""How control messages travel between ComfyUI instances: a request, one reply, with a timeout.

:class:`Carrier` is what the rest of the pack uses; :class:`UdpCarrier` implements it with sealed
datagrams (comfy_nodes.server.seal) on one UDP port per instance, independent of any world: it
works while the cluster is broken (a follower died, one restarted and asks where the cluster
is), which a communicator of the current world could not.

A request is retransmitted (same message id, fresh nonce) every ``RETRY_S``, doubling, until its
reply comes or its timeout passes (:class:`ControlUnreachableError`, naming the rank and its
address); the receiver runs each request once (comfy_nodes.server.exchange, shared with the
mailbox carrier).  What the seal refuses is dropped and counted in :attr:`UdpCarrier.dropped`,
never answered.
"""

from __future__ import annotations

import logging
import socket
import threading
from typing import Any, Protocol

from collectives.errors import ConfigurationError, PeerUnreachableError
from comfy_nodes.server.exchange import Address, Answer, Exchange, Handler
from comfy_nodes.server.seal import DROP_REASONS, MAX_DATAGRAM, Envelope, Refusal, Seal

__all__ = [
    "RETRY_S",
    "Address",
    "Carrier",
    "ControlUnreachableError",
    "Handler",
    "UdpCarrier",
]

log = logging.getLogger("comfy_cluster")

RETRY_S = 0.2
_MAX_RETRY_S = 1.0


class ControlUnreachableError(PeerUnreachableError):
    """A rank did not answer a control request within its timeout."""

    def __init__(self, message: str, rank: int) -> None:
        super().__init__(message)
        self.rank = rank


class Carrier(Protocol):
    """Carries control requests and their replies between the cluster's instances."""

    def request(
        self, rank: int, address: Address, kind: str, body: dict[str, Any], timeout: float
    ) -> dict[str, Any]:
        """Send ``body`` to ``rank`` at ``address`` and return its reply's body; raises
        :class:`ControlUnreachableError` after ``timeout`` seconds without one."""
        ...

    def close(self) -> None: ...


class UdpCarrier:
    """Sealed request/reply datagrams on one UDP socket (see the module's docstring)."""

    def __init__(
        self,
        rank: int,
        bind: Address,
        seal: Seal,
        handler: Handler,
        *,
        port_env: str,
        exchange: Exchange | None = None,
    ) -> None:
        """``port_env``: the variable that sets the port, named when it cannot be bound.
        ``exchange``: one shared with another carrier (the mailbox), so that a request reaching
        this rank both ways still runs once."""
        self.rank = rank
        self._seal = seal
        self.exchange = exchange if exchange is not None else Exchange(rank, handler)
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            self._sock.bind(bind)
        except OSError as err:
            self._sock.close()
            raise ConfigurationError(
                f"the cluster's control channel cannot listen on udp {bind[0]}:{bind[1]} "
                f"({err.strerror or err}): set {port_env} to a free port"
            ) from None
        self._sock.settimeout(0.5)  # the receive loop checks for close() this often
        self.address: Address = self._sock.getsockname()
        self.dropped = dict.fromkeys(DROP_REASONS, 0)
        self._lock = threading.Lock()
        self._closed = threading.Event()
        self._thread = threading.Thread(target=self._run, name="cluster-control", daemon=True)
        self._thread.start()

    # -- sending ---------------------------------------------------------------------------------
    def request(
        self, rank: int, address: Address, kind: str, body: dict[str, Any], timeout: float
    ) -> dict[str, Any]:
        def send(msg_id: str) -> None:
            # Sealed afresh each time: the receiver refuses a nonce it has opened.
            self._send(self._seal.seal(Envelope(self.rank, msg_id, kind, False, body)), address)

        def unreachable() -> Exception:
            return ControlUnreachableError(
                f"rank {rank} at udp {address[0]}:{address[1]} did not answer a {kind!r} "
                f"control message within {timeout:g} s (down, another cluster key, or its "
                "control port unreachable?)",
                rank,
            )

        return self.exchange.call(
            send, timeout, retry_s=RETRY_S, max_retry_s=_MAX_RETRY_S, closed=self._closed,
            unreachable=unreachable,
        )  # fmt: skip

    def close(self) -> None:
        self._closed.set()
        self._thread.join(2.0)
        self._sock.close()
        self.exchange.close()

    # -- receiving -------------------------------------------------------------------------------
    def _run(self) -> None:
        while not self._closed.is_set():
            try:
                # One byte more than the largest datagram: a longer one is seen as such, and
                # nothing larger is ever buffered.
                datagram, source = self._sock.recvfrom(MAX_DATAGRAM + 1)
            except TimeoutError:
                continue
            except OSError:
                if self._closed.is_set():
                    return
                continue  # e.g. an ICMP "port unreachable" from an earlier send
            try:
                envelope = self._seal.open(datagram)
            except Refusal as refusal:
                with self._lock:
                    self.dropped[refusal.reason] += 1
                log.debug("control datagram from %s dropped: %s", source, refusal)
                continue
            if envelope.reply:
                self.exchange.replied(envelope)
            else:
                self.exchange.requested(envelope, source, self._answer(source))

    def _answer(self, source: Address) -> Answer:
        def answer(request: Envelope, body: dict[str, Any]) -> None:
            reply = Envelope(self.rank, request.msg_id, request.kind, True, body)
            self._send(self._seal.seal(reply), source)

        return answer

    def _send(self, datagram: bytes, address: Address) -> None:
        try:
            self._sock.sendto(datagram, address)
        except OSError as err:  # no route yet, or a name that does not resolve
            log.debug("control datagram to %s: %s", address, err)
