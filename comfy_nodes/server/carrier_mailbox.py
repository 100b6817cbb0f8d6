"""Control messages through the rendezvous server's events mailbox, for peers UDP cannot reach.

With ``COMFY_CLUSTER_REGISTRATION_MODE=stun`` two instances may both sit behind NATs: neither can
send to the other's control port.  Both can reach the rendezvous server over HTTP, and its events
mailbox (``POST``/``GET /v1/clusters/{id}/events``, docs/rendezvous-protocol.md) carries small
JSON notes between a cluster's members.  :class:`MailboxCarrier` puts the same sealed control
datagrams (comfy_nodes.server.seal) in it:

* a datagram travels as one to :data:`MAX_PARTS` events of kind :data:`EVENT_KIND`, each
  ``{"to": rank, "m": part-set id, "i": index, "n": count, "d": base64 bytes}``, under the
  server's 4 KiB event body limit; the server stores opaque sealed bytes it can neither read nor
  forge;
* the sealed envelope's kind is ``mbox.<kind>`` and its body ``{"to": rank, "body": ...}``, so
  the recipient is authenticated with the rest (a server that rewrites the outer ``to`` gets the
  message dropped as ``misdirected``), and a mailbox datagram replayed at a UDP control port is a
  kind nobody takes;
* every instance long-polls the events (starting after those the mailbox held when it started:
  they were for an earlier process of this rank, or their sender posts them again) and opens
  only those addressed to it, with the seal's checks (forged, expired, replayed...: dropped and
  counted in :attr:`MailboxCarrier.dropped`), then the same exactly-once handling as the UDP
  carrier; replies go back through the mailbox.

The server takes an event only from a live member (``from_instance``): the carrier posts under
this rank's own registration (the udp backend's member) and, while this rank has none (its world
is being re-formed), under any live member's id.  That id only tells the server the event is the
cluster's; who sent it is in the sealed envelope.

:class:`FallbackCarrier` tries UDP first and turns to the mailbox after the first retry interval
(:data:`~comfy_nodes.server.carrier.RETRY_S`); a peer that answered through the mailbox is
reached there directly for :attr:`FallbackCarrier.sticky_s`, then UDP is tried again.
"""

from __future__ import annotations

import base64
import binascii
import logging
import math
import os
import secrets
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from typing import Any

from collectives.auth import ClusterKey
from collectives.errors import RendezvousError
from collectives.rendezvous.stun_client import SERVER_ENV, ClusterEvent, StunClient
from comfy_nodes.server.carrier import (
    RETRY_S,
    Address,
    Carrier,
    ControlUnreachableError,
    Handler,
    UdpCarrier,
)
from comfy_nodes.server.exchange import Exchange
from comfy_nodes.server.seal import DROP_REASONS, MAX_DATAGRAM, Envelope, Refusal, Seal

log = logging.getLogger("comfy_cluster")

EVENT_KIND = "comfy-control"
KIND_PREFIX = "mbox."
MAILBOX_ADDRESS: Address = ("mailbox", 0)
"""The address of a peer known only through the mailbox (the source of its mailbox requests)."""
PART_BYTES = 2400  # base64 makes 3200 characters: well under the server's 4 KiB event body
MAX_PARTS = math.ceil(MAX_DATAGRAM / PART_BYTES)
_MAX_PART_CHARS = 4 * math.ceil(PART_BYTES / 3)
_PENDING_SETS = 64  # part sets being assembled at once; the oldest is dropped beyond
_RETRY_S = 1.0  # an event posted is stored: repeat only in case it was lost (ring, restart)
_MAX_RETRY_S = 4.0
_POLL_S = 10.0
_ERROR_PAUSE_S = 1.0
DROP_COUNTERS = (*DROP_REASONS, "misdirected")


class MailboxCarrier:
    """Sealed control requests and replies through the events mailbox (see the module)."""

    def __init__(
        self,
        rank: int,
        seal: Seal,
        handler: Handler,
        client: Callable[[], StunClient],
        *,
        poll_s: float = _POLL_S,
        exchange: Exchange | None = None,
    ) -> None:
        """``client`` makes a :class:`StunClient` of this cluster (two are made: one posts, one
        long-polls, each with its own connections).  ``exchange``: the UDP carrier's, so that a
        request reaching this rank both ways still runs once."""
        self.rank = rank
        self._seal = seal
        self.exchange = exchange if exchange is not None else Exchange(rank, handler)
        self._post_client = client()
        self._poll_client = client()
        self._poll_s = poll_s
        self.dropped = dict.fromkeys(DROP_COUNTERS, 0)
        self.posted = 0
        self._lock = threading.Lock()
        self._poster: str | None = None
        self._parts: OrderedDict[str, tuple[float, int, dict[int, bytes]]] = OrderedDict()
        self._closed = threading.Event()
        self.ready = threading.Event()  # set once the mailbox has been read (its start)
        self._thread = threading.Thread(target=self._run, name="cluster-mailbox", daemon=True)
        self._thread.start()

    # -- sending ---------------------------------------------------------------------------------
    def request(
        self, rank: int, address: Address, kind: str, body: dict[str, Any], timeout: float
    ) -> dict[str, Any]:
        why = ["no answer"]

        def send(msg_id: str) -> None:
            envelope = Envelope(
                self.rank, msg_id, KIND_PREFIX + kind, False, {"to": rank, "body": body}
            )
            try:
                self._post(rank, self._seal.seal(envelope))  # a fresh seal each time
            except RendezvousError as err:
                why[0] = str(err)
                log.debug("control %s to rank %d through the mailbox: %s", kind, rank, err)

        def unreachable() -> Exception:
            return ControlUnreachableError(
                f"rank {rank} did not answer a {kind!r} control message through the rendezvous "
                f"server's mailbox ({SERVER_ENV}) within {timeout:g} s ({why[0]})",
                rank,
            )

        return self.exchange.call(
            send, timeout, retry_s=_RETRY_S, max_retry_s=_MAX_RETRY_S, closed=self._closed,
            unreachable=unreachable,
        )  # fmt: skip

    def _post(self, to: int, datagram: bytes) -> None:
        """``datagram`` as events for rank ``to``, under a live member's id."""
        set_id = secrets.token_hex(8)
        chunks = [datagram[i : i + PART_BYTES] for i in range(0, len(datagram), PART_BYTES)]
        for index, chunk in enumerate(chunks):
            data = base64.b64encode(chunk).decode()
            part = {"to": to, "m": set_id, "i": index, "n": len(chunks), "d": data}
            try:
                self._post_client.post_event(self._poster_id(), EVENT_KIND, part)
            except RendezvousError as err:
                if getattr(err, "status", None) == 404:
                    self._poster = None  # that member expired: pick a live one next time
                raise
        with self._lock:
            self.posted += 1

    def _poster_id(self) -> str:
        """This rank's own member on the server, else any live member (see the module)."""
        poster = self._poster
        if poster is not None:
            return poster
        members = self._post_client.members().members
        mine = [m for m in members if m.rank == self.rank]
        candidates = mine or list(members)
        if not candidates:
            raise RendezvousError(
                "the rendezvous server lists no live member of this cluster to post under "
                "(no rank has joined it yet)"
            )
        self._poster = candidates[0].instance_id
        return candidates[0].instance_id

    def close(self) -> None:
        self._closed.set()
        self._post_client.close()
        self._poll_client.close()
        # A long-poll in flight is not interrupted by closing its client: the thread ends when
        # it returns (within poll_s), finding the carrier closed; nothing waits for it here.
        self._thread.join(0.1)
        self.exchange.close()

    # -- receiving -------------------------------------------------------------------------------
    def _run(self) -> None:
        cursor: int | None = None
        while not self._closed.is_set():
            try:
                if cursor is None:
                    # What the mailbox held before this carrier started was for an earlier
                    # process of this rank, or its sender retries: start after it.
                    cursor = max((e.seq for e in self._poll_client.events()), default=0)
                    self.ready.set()
                    continue
                events = self._poll_client.events(after=cursor, timeout_s=self._poll_s)
            except (RendezvousError, RuntimeError) as err:  # RuntimeError: a closed client
                if self._closed.is_set():
                    return
                log.debug("control mailbox: %s", err)
                self._closed.wait(_ERROR_PAUSE_S)
                continue
            for event in events:
                cursor = max(cursor, event.seq)
                datagram = self._assemble(event)
                if datagram is not None:
                    self._open(datagram)

    def _assemble(self, event: ClusterEvent) -> bytes | None:
        """The datagram completed by ``event``'s part, if it is one addressed to this rank."""
        body = event.body
        if event.kind != EVENT_KIND or not isinstance(body, dict) or body.get("to") != self.rank:
            return None  # someone else's note: not ours to judge
        set_id, index, count, data = body.get("m"), body.get("i"), body.get("n"), body.get("d")
        if (
            not isinstance(set_id, str)
            or len(set_id) > 32
            or type(count) is not int
            or not 0 < count <= MAX_PARTS
            or type(index) is not int
            or not 0 <= index < count
            or not isinstance(data, str)
        ):
            self._drop("malformed", "a mailbox part of the wrong shape")
            return None
        if len(data) > _MAX_PART_CHARS:  # bounded before decoding
            self._drop("oversized", f"a mailbox part of {len(data)} characters")
            return None
        try:
            chunk = base64.b64decode(data, validate=True)
        except (binascii.Error, ValueError):
            self._drop("malformed", "a mailbox part that is not base64")
            return None
        if count == 1:
            return chunk
        now = time.monotonic()
        with self._lock:
            while self._parts and (
                len(self._parts) >= _PENDING_SETS
                or next(iter(self._parts.values()))[0] < now - self._seal.window_s
            ):
                self._parts.popitem(last=False)
            _, n, parts = self._parts.setdefault(set_id, (now, count, {}))
            if n != count:
                self._drop("malformed", "mailbox parts disagree on their count", locked=True)
                return None
            parts[index] = chunk
            if len(parts) < count:
                return None
            del self._parts[set_id]
        return b"".join(parts[i] for i in range(count))

    def _drop(self, reason: str, detail: str, *, locked: bool = False) -> None:
        if locked:
            self.dropped[reason] += 1
        else:
            with self._lock:
                self.dropped[reason] += 1
        log.debug("control mailbox event dropped: %s: %s", reason, detail)

    def _open(self, datagram: bytes) -> None:
        try:
            envelope = self._seal.open(datagram)
        except Refusal as refusal:
            self._drop(refusal.reason, str(refusal))
            return
        inner = envelope.body.get("body")
        if not envelope.kind.startswith(KIND_PREFIX) or not isinstance(inner, dict):
            self._drop("malformed", "a sealed datagram that is not a mailbox envelope")
            return
        if envelope.body.get("to") != self.rank:
            self._drop("misdirected", f"sealed for rank {envelope.body.get('to')!r}")
            return
        opened = Envelope(
            envelope.sender, envelope.msg_id, envelope.kind[len(KIND_PREFIX) :], envelope.reply,
            inner,
        )  # fmt: skip
        if opened.reply:
            self.exchange.replied(opened)
        else:
            self.exchange.requested(opened, MAILBOX_ADDRESS, self._reply)

    def _reply(self, request: Envelope, body: dict[str, Any]) -> None:
        kind = KIND_PREFIX + request.kind
        wrapped = {"to": request.sender, "body": body}
        try:
            reply = self._seal.seal(Envelope(self.rank, request.msg_id, kind, True, wrapped))
            self._post(request.sender, reply)
        except (RendezvousError, ValueError) as err:
            log.debug("control reply to rank %d through the mailbox: %s", request.sender, err)


class FallbackCarrier:
    """UDP first; the mailbox for a peer UDP did not reach (see the module)."""

    def __init__(
        self,
        udp: Carrier,
        mailbox: Carrier,
        *,
        first_try_s: float = RETRY_S,
        sticky_s: float = 60.0,
    ) -> None:
        self.udp, self.mailbox = udp, mailbox
        self.first_try_s = first_try_s
        self.sticky_s = sticky_s
        self._lock = threading.Lock()
        self._mailbox_until: dict[int, float] = {}
        self.via = {"udp": 0, "mailbox": 0}  # requests answered on each path

    def route(self, rank: int) -> str:
        """Where the next request to ``rank`` goes first: ``udp`` or ``mailbox``."""
        with self._lock:
            until = self._mailbox_until.get(rank)
        return "mailbox" if until is not None and time.monotonic() < until else "udp"

    def request(
        self, rank: int, address: Address, kind: str, body: dict[str, Any], timeout: float
    ) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        if address != MAILBOX_ADDRESS and self.route(rank) == "udp":
            try:
                reply = self.udp.request(rank, address, kind, body, min(self.first_try_s, timeout))
            except ControlUnreachableError as err:
                if time.monotonic() >= deadline:
                    raise
                log.debug("%s: trying the mailbox", err)
            else:
                self._count("udp")
                return reply
        try:
            reply = self.mailbox.request(
                rank, address, kind, body, max(deadline - time.monotonic(), 0.0)
            )
        except ControlUnreachableError:
            with self._lock:
                self._mailbox_until.pop(rank, None)
            raise
        with self._lock:
            self._mailbox_until[rank] = time.monotonic() + self.sticky_s
        self._count("mailbox")
        return reply

    def _count(self, path: str) -> None:
        with self._lock:
            self.via[path] += 1

    def close(self) -> None:
        self.udp.close()
        self.mailbox.close()


def with_mailbox(
    udp: UdpCarrier,
    rank: int,
    seal: Seal,
    handler: Handler,
    *,
    key: ClusterKey | None,
    environ: Mapping[str, str] | None = None,
) -> FallbackCarrier:
    """``udp`` backed by the mailbox of the cluster's rendezvous server (``COMFY_CLUSTER_STUN_*``
    variables, as the udp backend reads them)."""
    env = dict(os.environ if environ is None else environ)
    StunClient.from_env(env, key).close()  # a ConfigurationError now, naming the variable
    mailbox = MailboxCarrier(
        rank, seal, handler, lambda: StunClient.from_env(env, key), exchange=udp.exchange
    )
    return FallbackCarrier(udp, mailbox)
