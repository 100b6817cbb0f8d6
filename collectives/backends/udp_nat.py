"""The NAT-traversal layer of the udp backend's IO driver (docs/udp-transport.md, "NAT
traversal").

:class:`NatDriver` sits between the :class:`~collectives.backends.udp_io.Engine` and its socket
in ``stun`` discovery mode.  Everything here runs under the engine's lock, on the thread taking
the engine's turn.  It

* demultiplexes what the socket reads: from the rendezvous server's UDP address, STUN answers
  (our reflexive address), relayed datagrams (``0xCC 0x01``: unwrapped and given to the core
  under the source peer's virtual address) and punch hints (``0xCC 0x02``); from anywhere else,
  probes (``0xCD``, to :class:`~collectives.backends.udp_paths.Paths`) and transport datagrams
  (under the virtual address of the peer whose path they came by, or under their real source
  when it is unknown, so the core's authentication says whose they are);
* routes what the core sends to a virtual address: over the peer's verified direct path, or
  wrapped for the relay;
* keeps the NAT binding towards the server alive (an authenticated STUN binding every
  ``COMFY_CLUSTER_NAT_KEEPALIVE_S``, sooner after a fallback to the relay: a rebinding NAT also
  moved our relay address).
"""

from __future__ import annotations

import logging
import secrets
import select
import socket
import time
from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING

from collectives.backends.udp_nat_wire import (
    PROBE,
    RELAY,
    RELAY_DATA,
    RELAY_HEADER,
    RELAY_HINT,
    binding_answer,
    binding_request,
    is_stun,
    parse_hint,
    relay_header,
    unwrap_batch,
    wrap_batch,
)
from collectives.backends.udp_paths import Paths, virtual
from collectives.errors import ConfigurationError, RendezvousTimeoutError

if TYPE_CHECKING:
    from collectives.backends.udp_socket import UdpSocket
    from collectives.transport.endpoint import Endpoint

log = logging.getLogger(__name__)

KEEPALIVE_ENV = "COMFY_CLUSTER_NAT_KEEPALIVE_S"
DIRECT_ENV = "COMFY_CLUSTER_NAT_DIRECT"
DEFAULT_KEEPALIVE_S = 10.0
_BINDING_RETRY_S = 0.25  # an unanswered binding is repeated this often
_MAX_TRANSACTIONS = 16
_UNWRAP_BYTES = 65535  # a GRO read is at most this long

Address = tuple[str, int]
Datagram = tuple[memoryview, Address, int | None]  # (payload, address for the core, segment)


def keepalive_s(environ: Mapping[str, str]) -> float:
    raw = environ.get(KEEPALIVE_ENV, "").strip()
    if not raw:
        return DEFAULT_KEEPALIVE_S
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not 0.5 <= value <= 300:
        raise ConfigurationError(f"{KEEPALIVE_ENV}={raw!r} must be seconds in 0.5..300")
    return value


def direct_allowed(environ: Mapping[str, str]) -> bool:
    """``COMFY_CLUSTER_NAT_DIRECT=0`` keeps every peer on the relay (no probing)."""
    return environ.get(DIRECT_ENV, "1").strip().lower() not in ("0", "false", "no", "off")


class Binding:
    """Authenticated STUN bindings towards the server (the codec is in udp_nat_wire)."""

    def __init__(self, server: Address, username: str, token: bytes) -> None:
        self.server = server
        self._username = username
        self._token = token
        self._pending: dict[bytes, float] = {}
        self.reflexive: Address | None = None
        self.answered_at: float | None = None
        self.counters = {"stun_sent": 0, "stun_answers": 0, "stun_dropped": 0}

    def set_token(self, token: bytes) -> None:
        """A rejoin gave a new credential: answers to requests under the old one are void."""
        self._token = token
        self._pending.clear()

    def request(self, now: float) -> bytes:
        data, tid = binding_request(self._username, self._token)
        if len(self._pending) >= _MAX_TRANSACTIONS:
            del self._pending[min(self._pending, key=self._pending.__getitem__)]
        self._pending[tid] = now
        self.counters["stun_sent"] += 1
        return data

    def answer(self, data: bytes | memoryview, now: float) -> bool:
        got = binding_answer(data, set(self._pending), self._token)
        if got is None:
            self.counters["stun_dropped"] += 1
            return False
        tid, mapped = got
        del self._pending[tid]
        if mapped != self.reflexive:
            log.info("udp nat: reflexive address %s (was %s)", mapped, self.reflexive)
        self.reflexive, self.answered_at = mapped, now
        self.counters["stun_answers"] += 1
        return True


def bind_now(sock: socket.socket, binding: Binding, deadline: float) -> Address:
    """Bind synchronously from the rank's socket before the engine owns it (so the server
    knows our relay address before any peer relays to us); the reflexive address."""
    buf = bytearray(2048)
    while True:
        now = time.monotonic()
        if now >= deadline:
            raise RendezvousTimeoutError(
                f"no STUN answer from the rendezvous server's UDP port {binding.server[0]}:"
                f"{binding.server[1]}: is UDP to it open (COMFY_CLUSTER_STUN_SERVER, and the "
                "port its join answer names)?"
            )
        try:
            sock.sendto(binding.request(now), binding.server)
        except OSError as err:
            log.debug("udp nat: binding send failed: %s", err)
        until = min(deadline, now + _BINDING_RETRY_S)
        while (left := until - time.monotonic()) > 0:
            ready, _, _ = select.select([sock], [], [], left)
            if not ready:
                break
            try:
                n, src = sock.recvfrom_into(buf)
            except (BlockingIOError, InterruptedError):
                continue
            except OSError:
                continue  # an ICMP error of an earlier send
            if (str(src[0]), int(src[1])) == binding.server and binding.answer(
                memoryview(buf)[:n], time.monotonic()
            ):
                assert binding.reflexive is not None
                return binding.reflexive


class NatDriver:
    """See the module docstring."""

    def __init__(
        self,
        paths: Paths,
        binding: Binding,
        *,
        keepalive: float,
        now: float,
    ) -> None:
        self.paths = paths
        self.binding = binding
        self.server = binding.server
        self._keepalive = keepalive
        self._next_binding = now + keepalive
        self._relay_headers: dict[bytes, bytes] = {}
        self._unwrapped = bytearray(_UNWRAP_BYTES)  # a relayed GRO batch, headers stripped
        self.replies: list[tuple[Address, bytes]] = []  # probe answers, sent with the next poll
        self.counters = {"relayed_in": 0, "relayed_out": 0, "relay_dropped": 0,
                         "hints": 0, "unmapped_in": 0, "rejoins": 0}  # fmt: skip

    # -- inbound -----------------------------------------------------------------------------
    def inbound(
        self, view: memoryview, addr: Address, segment: int | None, now: float
    ) -> Iterator[Datagram]:
        """What of one read goes to the core, and under which address; the rest (STUN, hints,
        probes) is handled here.  Answers to probes are queued in :attr:`replies`."""
        if addr == self.server:
            yield from self._from_server(view, segment, now)
            return
        paths = self.paths
        rank = paths.by_addr.get(addr)
        if segment is None or segment >= len(view):
            if view and view[0] == PROBE:
                self.replies.extend(paths.on_probe(view, addr, now))
                return
            if rank is None:
                self.counters["unmapped_in"] += 1
                yield view, addr, None
            else:
                yield view, virtual(rank), None
            return
        if PROBE in bytes(view[::segment]):
            # A batch that holds probes: take it datagram by datagram.
            for at in range(0, len(view), segment):
                yield from self.inbound(view[at : at + segment], addr, None, now)
            return
        yield view, (addr if rank is None else virtual(rank)), segment

    def _from_server(self, view: memoryview, segment: int | None, now: float) -> Iterator[Datagram]:
        step = segment if segment is not None and segment < len(view) else len(view)
        by_handle = self.paths.by_handle
        if step < len(view) and (got := unwrap_batch(view, step, self._unwrapped)) is not None:
            # A GRO batch relayed from one peer: the core takes it as a batch, as a direct one.
            handle, size = got
            rank = by_handle.get(handle)
            count = -(-len(view) // step)
            if rank is None:
                self.counters["relay_dropped"] += count
                return
            self.counters["relayed_in"] += count
            yield memoryview(self._unwrapped)[:size], virtual(rank), step - RELAY_HEADER
            return
        for at in range(0, len(view), step):
            one = view[at : at + step]
            if len(one) > RELAY_HEADER and one[0] == RELAY and one[1] == RELAY_DATA:
                rank = by_handle.get(bytes(one[2:RELAY_HEADER]))
                if rank is None:
                    self.counters["relay_dropped"] += 1
                    continue
                self.counters["relayed_in"] += 1
                yield one[RELAY_HEADER:], virtual(rank), None
            elif len(one) > 1 and one[0] == RELAY and one[1] == RELAY_HINT:
                hint = parse_hint(one)
                rank = None if hint is None else by_handle.get(hint.handle)
                if hint is None or rank is None:
                    self.counters["relay_dropped"] += 1
                    continue
                self.counters["hints"] += 1
                self.paths.learn(rank, [(hint.addr, "hint")], now)
            elif is_stun(one):
                self.binding.answer(one, now)
            else:
                self.counters["relay_dropped"] += 1

    def core_address(self, ep: Endpoint, rank: int, addr: Address | None, now: float) -> bool:
        """The core says ``rank``'s authenticated traffic came from ``addr``.  A real address
        (a datagram we could not attribute: a NAT rebinding) is probed, and the core gets the
        peer's virtual address back, so where it sends stays the driver's choice.  Whether the
        event was ours to handle (not a real move the driver should log)."""
        if addr is None or addr in self.paths.by_virtual:
            return addr is not None
        if rank in self.paths.peers:
            self.paths.on_authentic_from(rank, addr, now)
            ep.set_peer_address(rank, virtual(rank))
        return True

    # -- outbound ----------------------------------------------------------------------------
    def outbound(
        self, addr: Address, payload: memoryview, segment: int
    ) -> tuple[Address, memoryview, int]:
        """Where a batch the core addressed to ``addr`` really goes (wrapped for the relay when
        the peer has no direct path)."""
        rank = self.paths.by_virtual.get(addr)
        if rank is None:
            return addr, payload, segment
        direct = self.paths.route(rank)
        if direct is not None:
            return direct, payload, segment
        handle = self.paths.peers[rank].handle
        header = self._relay_headers.get(handle)
        if header is None:
            header = self._relay_headers[handle] = relay_header(handle)
        # Every datagram wrapped, in one buffer: the socket sends it as GSO batches, the server
        # forwards each batch with one segmented send, the peer reads it as one GRO batch.
        self.counters["relayed_out"] += -(-len(payload) // segment)
        return self.server, wrap_batch(header, payload, segment), segment + RELAY_HEADER

    # -- timers ------------------------------------------------------------------------------
    def poll(self, now: float) -> list[tuple[Address, bytes]]:
        """Control datagrams due now: probe answers, probes, a STUN binding."""
        out, self.replies = self.replies, []
        out.extend(self.paths.poll(now))
        for _, old, new in self.paths.changes:
            if new == "relayed" and old != "relayed":
                self._next_binding = now  # a NAT that rebound also moved our relay address
        if now >= self._next_binding:
            out.append((self.server, self.binding.request(now)))
            answered = self.binding.answered_at
            fresh = answered is not None and now - answered < 2 * self._keepalive
            self._next_binding = now + (self._keepalive if fresh else _BINDING_RETRY_S * 4)
        return out

    def timer(self) -> float | None:
        t = self.paths.timer()
        return self._next_binding if t is None or self._next_binding < t else t

    def turn(self, ep: Endpoint, sock: UdpSocket, now: float) -> None:
        """Send the control datagrams due now; tell the core about path switches."""
        for addr, data in self.poll(now):
            sock.send_batch(addr, memoryview(data), len(data))  # lost when full: retried
        for rank, old, new in self.take_changes():
            # A new path has its own RTT and bottleneck: the session's model starts over.
            ep.reset_path(rank, now)
            log.info("udp nat: rank %d %s -> %s (%s)", rank, old, new,
                     self.paths.route(rank) or self.server)  # fmt: skip

    def rejoined(self, token: bytes, now: float) -> None:
        """This instance joined again (the server forgot it): bind at once with the new token."""
        self.binding.set_token(token)
        self._next_binding = now
        self.counters["rejoins"] += 1

    def take_changes(self) -> list[tuple[int, str, str]]:
        changes, self.paths.changes = self.paths.changes, []
        return changes

    def peer_info(self) -> dict[int, dict[str, object]]:
        out: dict[int, dict[str, object]] = {}
        for rank, peer in self.paths.peers.items():
            out[rank] = {
                "path": peer.path,
                "address": peer.direct or self.server,
                "handle": peer.handle.hex(),
                "direct_after_s": None if peer.direct_at is None else peer.direct_at - peer.since,
                "switches": peer.switches,
            }
        return out

    def stats(self) -> dict[str, int]:
        out = dict(self.counters)
        out.update(self.binding.counters)
        out.update(self.paths.counters)
        return out


def new_instance_id(rank: int) -> str:
    return f"rank{rank}-{secrets.token_hex(4)}"


__all__ = [
    "DIRECT_ENV",
    "KEEPALIVE_ENV",
    "Binding",
    "NatDriver",
    "bind_now",
    "direct_allowed",
    "keepalive_s",
    "new_instance_id",
]
