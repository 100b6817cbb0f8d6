"""How control messages travel between ComfyUI instances: a request, one reply, with a timeout.

:class:`Carrier` is what the rest of the pack uses; :class:`UdpCarrier` implements it with sealed
datagrams (comfy_nodes.server.seal) on one UDP port per instance, independent of any world: it
works while the cluster is broken (a follower died, one restarted and asks where the cluster
is), which a communicator of the current world could not.

A request is retransmitted (same message id, fresh nonce) every ``RETRY_S`` until its reply comes
or its timeout passes (:class:`ControlUnreachableError`, naming the rank and its address).  The
receiver runs each request once: a retransmission of a request it is handling is ignored, one it
has answered gets the same reply again.  Handlers run on a small thread pool, so a handler that
asks another rank something never blocks the receive loop.  What the seal refuses is dropped and
counted in :attr:`UdpCarrier.dropped`, never answered.
"""

from __future__ import annotations

import concurrent.futures
import logging
import secrets
import socket
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Any, Protocol

from collectives.errors import ConfigurationError, PeerUnreachableError
from comfy_nodes.server.seal import DROP_REASONS, MAX_DATAGRAM, Envelope, Refusal, Seal

log = logging.getLogger("comfy_cluster")

Address = tuple[str, int]
Handler = Callable[[Envelope, Address], dict[str, Any]]
"""Answers one authentic request (its reply body); the address is the datagram's source."""

RETRY_S = 0.2
_MAX_RETRY_S = 1.0
_REPLIES_KEPT = 1024


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
        self, rank: int, bind: Address, seal: Seal, handler: Handler, *, port_env: str
    ) -> None:
        """``port_env``: the variable that sets the port, named when it cannot be bound."""
        self.rank = rank
        self._seal = seal
        self._handler = handler
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
        self._waiting: dict[str, tuple[threading.Event, list[dict[str, Any]]]] = {}
        self._handling: set[tuple[int, str]] = set()
        self._answered: OrderedDict[tuple[int, str], bytes] = OrderedDict()
        self._pool = concurrent.futures.ThreadPoolExecutor(4, thread_name_prefix="cluster-ctl")
        self._closed = threading.Event()
        self._thread = threading.Thread(target=self._run, name="cluster-control", daemon=True)
        self._thread.start()

    # -- sending ---------------------------------------------------------------------------------
    def request(
        self, rank: int, address: Address, kind: str, body: dict[str, Any], timeout: float
    ) -> dict[str, Any]:
        msg_id = secrets.token_hex(8)
        done, box = threading.Event(), list[dict[str, Any]]()
        with self._lock:
            self._waiting[msg_id] = (done, box)
        deadline, pause = time.monotonic() + timeout, RETRY_S
        try:
            while True:
                # Sealed afresh each time: the receiver refuses a nonce it has opened.
                datagram = self._seal.seal(Envelope(self.rank, msg_id, kind, False, body))
                try:
                    self._sock.sendto(datagram, address)
                except OSError as err:  # no route yet, or a name that does not resolve
                    log.debug("control %s to rank %d: %s", kind, rank, err)
                remaining = deadline - time.monotonic()
                if done.wait(min(pause, max(remaining, 0.0))):
                    return box[0]
                if time.monotonic() >= deadline or self._closed.is_set():
                    raise ControlUnreachableError(
                        f"rank {rank} at udp {address[0]}:{address[1]} did not answer a "
                        f"{kind!r} control message within {timeout:g} s (down, another cluster "
                        "key, or its control port unreachable?)",
                        rank,
                    )
                pause = min(pause * 2, _MAX_RETRY_S)
        finally:
            with self._lock:
                self._waiting.pop(msg_id, None)

    def close(self) -> None:
        self._closed.set()
        self._thread.join(2.0)
        self._sock.close()
        self._pool.shutdown(wait=False, cancel_futures=True)

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
                self._replied(envelope)
            else:
                self._requested(envelope, source)

    def _replied(self, envelope: Envelope) -> None:
        with self._lock:
            waiting = self._waiting.get(envelope.msg_id)
        if waiting is not None and not waiting[0].is_set():
            waiting[1].append(envelope.body)
            waiting[0].set()

    def _requested(self, envelope: Envelope, source: Address) -> None:
        key = (envelope.sender, envelope.msg_id)
        with self._lock:
            answer = self._answered.get(key)
            busy = key in self._handling
            if answer is None and not busy:
                self._handling.add(key)
        if answer is not None:
            self._send(answer, source)  # a retransmission: its reply was lost
        elif not busy:
            self._pool.submit(self._handle, envelope, source)

    def _handle(self, envelope: Envelope, source: Address) -> None:
        key = (envelope.sender, envelope.msg_id)
        try:
            body = self._handler(envelope, source)
        except Exception as err:  # a bug in a handler must not leave the sender retrying
            log.exception("control %s from rank %d", envelope.kind, envelope.sender)
            body = {"ok": False, "error": f"{type(err).__name__}: {err}"}
        reply = self._seal.seal(Envelope(self.rank, envelope.msg_id, envelope.kind, True, body))
        with self._lock:
            self._handling.discard(key)
            self._answered[key] = reply
            while len(self._answered) > _REPLIES_KEPT:
                self._answered.popitem(last=False)
        self._send(reply, source)

    def _send(self, datagram: bytes, address: Address) -> None:
        try:
            self._sock.sendto(datagram, address)
        except OSError as err:
            log.debug("control reply to %s: %s", address, err)
