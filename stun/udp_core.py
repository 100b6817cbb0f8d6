"""What the UDP port does with one datagram: STUN binding, relay, or drop (and count).

Independent of how datagrams arrive (``udp_server`` drives it from a dedicated thread or from
asyncio).  STUN messages are decoded and encoded with aioice's codec.  The relay path comes
first and stays short: it is the one that runs tens of thousands of times a second.

**Relay batches** (:meth:`UdpCore.relay_batch`).  Where the kernel coalesces a flow's datagrams
(``UDP_GRO``), one read holds up to 64 equal-sized relay datagrams of one source.  When every one
of them is ``0xCC 0x01`` with the same destination handle, the batch is checked once (source,
destination, size), rate-limited per datagram, its handles rewritten to the source's in place
(eight strided writes, not one per datagram) and forwarded with one segmented send
(``UDP_SEGMENT``): two syscalls per 64 datagrams instead of two per datagram.  Anything else (a
mixed batch, a malformed datagram in it) is taken datagram by datagram with the same checks.
"""

from __future__ import annotations

import ipaddress
import struct
from collections.abc import Callable
from dataclasses import asdict, dataclass

from aioice import stun

from .limits import KeyedLimiter
from .registry import Addr, Member, Registry

STUN_COOKIE = b"\x21\x12\xa4\x42"
RELAY_MAGIC = 0xCC
RELAY_DATA = 0x01
PUNCH_HINT = 0x02
RELAY_HEADER = 10  # 0xCC, kind, 8-byte handle
_RELAY_PREFIX = bytes([RELAY_MAGIC, RELAY_DATA])
_PUNCH_PREFIX = bytes([RELAY_MAGIC, PUNCH_HINT])

Send = Callable[[bytes, Addr], None]
# (buffer, segment size, destination): datagrams of ``segment`` bytes (the last may be shorter)
SendBatch = Callable[[memoryview, int, Addr], None]
Post = Callable[[Callable[[], None]], None]


@dataclass
class Counters:
    """Every datagram ends in exactly one of these (plus the bytes and batches relayed)."""

    stun_plain: int = 0
    stun_authenticated: int = 0
    stun_bad_integrity: int = 0
    stun_malformed: int = 0
    stun_rate_limited: int = 0
    relay_forwarded: int = 0
    relay_bytes: int = 0
    relay_batches: int = 0  # GRO reads forwarded as one segmented send (datagrams: forwarded)
    relay_unknown_source: int = 0
    relay_unknown_destination: int = 0
    relay_rate_limited: int = 0
    relay_malformed: int = 0
    oversize: int = 0
    unknown_kind: int = 0
    punch_hints: int = 0
    send_errors: int = 0

    def snapshot(self) -> dict[str, int]:
        return asdict(self)


class UdpCore:
    def __init__(
        self,
        registry: Registry,
        *,
        max_datagram: int,
        relay_pps: float,
        stun_pps: float,
        post: Post,
    ) -> None:
        self.registry = registry
        self.max_datagram = max_datagram
        self.relay_pps = relay_pps
        self.relay_burst = max(1.0, relay_pps / 10)
        self.stun_limiter = KeyedLimiter(stun_pps, max(1.0, stun_pps), registry.clock)
        self.post = post
        self.counters = Counters()
        self.send: Send = _unset_send
        self.send_batch: SendBatch = self.send_each

    def handle(self, data: bytes, addr: Addr) -> None:
        c = self.counters
        if len(data) > self.max_datagram:
            c.oversize += 1
            return
        if data[:1] == b"\xcc":
            self._relay(data, addr)
        elif len(data) >= 20 and data[0] < 2 and data[4:8] == STUN_COOKIE:
            self._stun(data, addr)
        else:
            c.unknown_kind += 1

    # -- relay ------------------------------------------------------------------------------

    def _relay(self, data: bytes, addr: Addr) -> None:
        c = self.counters
        if len(data) < RELAY_HEADER or data[1] != RELAY_DATA:
            c.relay_malformed += 1
            return
        src = self.registry.relay_addrs.get(addr)
        registry = self.registry
        now = registry.clock()
        if src is None or src.removed or now - src.last_seen > registry.ttl_s:
            c.relay_unknown_source += 1
            return
        cluster = registry.clusters.get(src.cluster_id)
        dst = cluster.by_handle.get(data[2:10]) if cluster is not None else None
        if (
            dst is None
            or dst.reflexive is None
            or dst.removed
            or now - dst.last_seen > registry.ttl_s
        ):
            c.relay_unknown_destination += 1
            return
        # per-source token bucket; only this thread touches these two fields
        tokens = min(self.relay_burst, src.relay_tokens + (now - src.relay_stamp) * self.relay_pps)
        src.relay_stamp = now
        if tokens < 1.0:
            src.relay_tokens = tokens
            c.relay_rate_limited += 1
            return
        src.relay_tokens = tokens - 1.0
        # Counted before the send: a peer that got the datagram reads counters that include it.
        c.relay_forwarded += 1
        c.relay_bytes += len(data) - RELAY_HEADER
        self.send(_RELAY_PREFIX + src.handle + data[RELAY_HEADER:], dst.reflexive)

    def relay_batch(self, buf: bytearray, n: int, segment: int, addr: Addr) -> None:
        """A GRO read of ``n`` bytes in ``buf``: datagrams of ``segment`` bytes from ``addr``
        (the last may be shorter).  ``buf`` is rewritten in place and may be reused afterwards."""
        count = -(-n // segment)
        if count == 1:
            self.handle(bytes(buf[:n]), addr)
            return
        c = self.counters
        if segment > self.max_datagram:
            c.oversize += count
            return
        if not _uniform(buf, n, segment, count):
            for at in range(0, n, segment):
                self.handle(bytes(buf[at : min(n, at + segment)]), addr)
            return
        registry = self.registry
        now = registry.clock()
        src = registry.relay_addrs.get(addr)
        if src is None or src.removed or now - src.last_seen > registry.ttl_s:
            c.relay_unknown_source += count
            return
        cluster = registry.clusters.get(src.cluster_id)
        dst = cluster.by_handle.get(bytes(buf[2:RELAY_HEADER])) if cluster is not None else None
        if (
            dst is None
            or dst.reflexive is None
            or dst.removed
            or now - dst.last_seen > registry.ttl_s
        ):
            c.relay_unknown_destination += count
            return
        tokens = min(self.relay_burst, src.relay_tokens + (now - src.relay_stamp) * self.relay_pps)
        src.relay_stamp = now
        allowed = min(count, int(tokens))
        src.relay_tokens = tokens - allowed
        if allowed < count:
            c.relay_rate_limited += count - allowed
            if allowed == 0:
                return
        end = n if allowed == count else allowed * segment
        handle = src.handle
        for k in range(8):  # every datagram's handle: eight strided writes
            buf[2 + k : end : segment] = handle[k : k + 1] * allowed
        c.relay_forwarded += allowed  # counted before the send, as in _relay
        c.relay_bytes += end - allowed * RELAY_HEADER
        c.relay_batches += 1
        self.send_batch(memoryview(buf)[:end], segment, dst.reflexive)

    def send_each(self, view: memoryview, segment: int, addr: Addr) -> None:
        """Where the socket has no segmented send: one datagram at a time."""
        for at in range(0, len(view), segment):
            self.send(bytes(view[at : at + segment]), addr)

    # -- STUN -------------------------------------------------------------------------------

    def _stun(self, data: bytes, addr: Addr) -> None:
        c = self.counters
        try:
            msg = stun.parse_message(data)
        except Exception:  # the codec raises ValueError, struct.error, UnicodeDecodeError...
            c.stun_malformed += 1
            return
        if msg.message_method != stun.Method.BINDING or msg.message_class != stun.Class.REQUEST:
            c.stun_malformed += 1
            return
        username = msg.attributes.get("USERNAME")
        if username is None:
            if "MESSAGE-INTEGRITY" in msg.attributes:
                c.stun_bad_integrity += 1  # integrity without a user to check it against
                return
            if self.stun_limiter.allow(addr[0]) > 0:
                c.stun_rate_limited += 1
                return
            answer = _mapped(msg, addr)
            answer.add_fingerprint()
            self.send(bytes(answer), addr)
            c.stun_plain += 1
            return
        member = self._member(str(username))
        if member is None or not msg.check_message_integrity(member.token):
            # never answered: an unanswered guess teaches nothing
            c.stun_bad_integrity += 1
            return
        answer = _mapped(msg, addr)
        answer.add_message_integrity(member.token)
        self.send(bytes(answer), addr)
        c.stun_authenticated += 1
        if member.reflexive != addr:
            self.post(lambda: self._record(member, addr))

    def _member(self, username: str) -> Member | None:
        cluster_id, sep, instance_id = username.partition(":")
        cluster = self.registry.clusters.get(cluster_id) if sep else None
        member = cluster.members.get(instance_id) if cluster is not None else None
        if member is None or not self.registry.is_live(member):
            return None
        return member

    def _record(self, member: Member, addr: Addr) -> None:
        """On the loop thread: the new reflexive/relay address, then punch hints both ways."""
        if not self.registry.set_reflexive(member, addr):
            return
        cluster = self.registry.clusters.get(member.cluster_id)
        if cluster is None:
            return
        mine = _hint_addr(addr)
        for peer in list(cluster.members.values()):
            if peer is member or peer.reflexive is None or not self.registry.is_live(peer):
                continue
            theirs = _hint_addr(peer.reflexive)
            if mine is None or theirs is None:
                continue
            self.send(_PUNCH_PREFIX + peer.handle + theirs, addr)
            self.send(_PUNCH_PREFIX + member.handle + mine, peer.reflexive)
            self.counters.punch_hints += 2


def _uniform(buf: bytearray, n: int, segment: int, count: int) -> bool:
    """Whether each of the ``count`` datagrams in ``buf[:n]`` starts with ``0xCC 0x01`` and the
    first one's destination handle (every header byte checked with one strided slice)."""
    if n - (count - 1) * segment < RELAY_HEADER:
        return False  # the last datagram is too short for a header
    head = buf[:RELAY_HEADER]
    if head[:2] != _RELAY_PREFIX:
        return False
    return all(buf[k:n:segment] == head[k : k + 1] * count for k in range(RELAY_HEADER))


def _hint_addr(addr: Addr) -> bytes | None:
    try:
        ip = ipaddress.IPv4Address(addr[0])
    except ValueError:
        return None  # the hint format carries IPv4 only
    return ip.packed + struct.pack("!H", addr[1])


def _unset_send(data: bytes, addr: Addr) -> None:
    raise RuntimeError("UdpCore.send is set by the server that owns the socket")


def _mapped(request: stun.Message, addr: Addr) -> stun.Message:
    """The binding response telling ``addr`` what it looks like from here."""
    return stun.Message(
        stun.Method.BINDING,
        stun.Class.RESPONSE,
        request.transaction_id,
        {"XOR-MAPPED-ADDRESS": addr},
    )
