"""Byte formats of the udp backend's NAT traversal (sans-IO; docs/udp-transport.md, "NAT
traversal", and docs/rendezvous-protocol.md, "UDP port").

* **STUN binding** towards the rendezvous server: RFC 5389 messages encoded and parsed by
  aioice's STUN codec, with ``USERNAME = cluster_id:instance_id`` and ``MESSAGE-INTEGRITY``
  keyed with the instance's token.  An answer counts only when it carries the transaction id
  we sent and its integrity verifies under the token.
* **Relay framing** (``0xCC``): ``0xCC 0x01 handle(8) payload`` (to the server: the handle is
  the destination; from it: the source); ``0xCC 0x02 peer_handle(8) ipv4(4) port(2)`` is the
  server's punch hint.
* **Probes** (``0xCD``), rank to rank over a candidate path: ``0xCD kind(1) from(2) to(2)
  comm(8) epoch(4) nonce(16) echo(16)`` and an HMAC-SHA256 under the cluster key.  A ping
  carries a fresh nonce; a pong echoes it.  A pong whose echo matches a ping we sent to exactly
  its source address proves the path works both ways between two key holders.
"""

from __future__ import annotations

import hmac
import ipaddress
import struct
from dataclasses import dataclass

import numpy as np
from aioice import stun

from collectives.auth import ClusterKey

RELAY = 0xCC
RELAY_DATA = 0x01
RELAY_HINT = 0x02
RELAY_HEADER = 10  # 0xCC, kind, handle(8)
PROBE = 0xCD
PING = 1
PONG = 2
_PROBE = struct.Struct("!BBHHQI16s16s")
PROBE_SIZE = _PROBE.size + 32
_PROBE_LABEL = b"udp-nat-probe"
_HINT_SIZE = RELAY_HEADER + 6
_STUN_MAX = 548  # a binding answer is ~100 bytes; anything longer is not one of ours
INSECURE_PROBE_KEY = ClusterKey("comfy-cluster-insecure-nat-probes")

Address = tuple[str, int]


# -- STUN ------------------------------------------------------------------------------------
def is_stun(data: bytes | memoryview) -> bool:
    """The RFC 5389 shape: first two bits zero and the magic cookie at bytes 4-8."""
    return (
        len(data) >= stun.HEADER_LENGTH
        and data[0] < 0x40
        and bytes(data[4:8]) == stun.COOKIE.to_bytes(4, "big")
    )


def binding_request(username: str, token: bytes) -> tuple[bytes, bytes]:
    """An authenticated binding request and its transaction id."""
    msg = stun.Message(stun.Method.BINDING, stun.Class.REQUEST)
    msg.attributes["USERNAME"] = username
    msg.add_message_integrity(token)
    return bytes(msg), msg.transaction_id


def binding_answer(
    data: bytes | memoryview, transaction_ids: set[bytes], token: bytes
) -> tuple[bytes, Address] | None:
    """``(transaction id, reflexive address)`` of a binding success answer to one of
    ``transaction_ids`` whose integrity verifies under ``token``; None for anything else."""
    if len(data) > _STUN_MAX:
        return None
    try:
        msg = stun.parse_message(bytes(data))
    except (ValueError, KeyError, IndexError, UnicodeDecodeError, struct.error):
        return None
    if (
        msg.message_method != stun.Method.BINDING
        or msg.message_class != stun.Class.RESPONSE
        or msg.transaction_id not in transaction_ids
        or "MESSAGE-INTEGRITY" not in msg.attributes
        or not msg.check_message_integrity(token)
    ):
        return None
    mapped = msg.attributes.get("XOR-MAPPED-ADDRESS")
    if not isinstance(mapped, tuple) or len(mapped) != 2:
        return None
    return msg.transaction_id, (str(mapped[0]), int(mapped[1]))


# -- relay -----------------------------------------------------------------------------------
def relay_header(handle: bytes) -> bytes:
    return bytes((RELAY, RELAY_DATA)) + handle


def wrap_batch(header: bytes, payload: memoryview, segment: int) -> memoryview:
    """``payload`` (datagrams of ``segment`` bytes, the last may be shorter) with ``header``
    before each datagram: a batch of ``segment + RELAY_HEADER``-byte relay datagrams, ready for
    one segmented send.  One strided numpy copy, not a Python loop over datagrams."""
    total = payload.nbytes
    if total <= segment:  # one datagram (an ACK): cheaper without numpy
        return memoryview(header + payload)
    count = -(-total // segment)
    stride = segment + RELAY_HEADER
    out = np.empty(total + count * RELAY_HEADER, dtype=np.uint8)
    src = np.frombuffer(payload, dtype=np.uint8)
    full = total // segment
    if full:
        rows = out[: full * stride].reshape(full, stride)
        rows[:, :RELAY_HEADER] = np.frombuffer(header, dtype=np.uint8)
        rows[:, RELAY_HEADER:] = src[: full * segment].reshape(full, segment)
    if full < count:
        tail = out[full * stride :]
        tail[:RELAY_HEADER] = np.frombuffer(header, dtype=np.uint8)
        tail[RELAY_HEADER:] = src[full * segment :]
    return out.data


def unwrap_batch(view: memoryview, segment: int, into: bytearray) -> tuple[bytes, int] | None:
    """A GRO batch of relay datagrams (``segment`` bytes each, the last may be shorter) that
    all carry ``0xCC 0x01`` and one source handle: ``(handle, n)`` with the ``n`` bytes of
    payload, datagrams of ``segment - RELAY_HEADER`` bytes, copied into ``into`` (one strided
    numpy copy).  None when the batch is anything else (the caller takes it datagram by
    datagram): mixed sources, a hint or STUN answer among them, a datagram without payload."""
    n = len(view)
    count = -(-n // segment)
    last = n - (count - 1) * segment
    if segment <= RELAY_HEADER or last <= RELAY_HEADER or count < 2:
        return None
    img = np.frombuffer(view, dtype=np.uint8)
    head = img[:RELAY_HEADER]
    if head[0] != RELAY or head[1] != RELAY_DATA:
        return None
    rows = img[: (count - 1) * segment].reshape(count - 1, segment)
    tail = img[(count - 1) * segment :]
    if not ((rows[:, :RELAY_HEADER] == head).all() and (tail[:RELAY_HEADER] == head).all()):
        return None
    width = segment - RELAY_HEADER
    size = n - count * RELAY_HEADER
    out = np.frombuffer(into, dtype=np.uint8, count=size)
    out[: (count - 1) * width].reshape(count - 1, width)[:] = rows[:, RELAY_HEADER:]
    out[(count - 1) * width :] = tail[RELAY_HEADER:]
    return bytes(head[2:]), size


@dataclass(frozen=True)
class Hint:
    handle: bytes
    addr: Address


def parse_hint(data: bytes | memoryview) -> Hint | None:
    if len(data) != _HINT_SIZE or data[0] != RELAY or data[1] != RELAY_HINT:
        return None
    host = str(ipaddress.IPv4Address(bytes(data[10:14])))
    port = int.from_bytes(data[14:16], "big")
    if port == 0:
        return None
    return Hint(bytes(data[2:10]), (host, port))


def hint(handle: bytes, addr: Address) -> bytes:
    """A punch hint as the server sends it (for tests)."""
    return (
        bytes((RELAY, RELAY_HINT))
        + handle
        + ipaddress.IPv4Address(addr[0]).packed
        + addr[1].to_bytes(2, "big")
    )


# -- probes ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Probe:
    kind: int
    src: int
    dst: int
    nonce: bytes
    echo: bytes


class ProbeCodec:
    """Seals and opens probes of one world (comm id, epoch) under the cluster key."""

    def __init__(self, key: ClusterKey | None, comm: int, epoch: int) -> None:
        self._mac_key = (key or INSECURE_PROBE_KEY).derive(_PROBE_LABEL)
        self._comm = comm
        self._epoch = epoch

    def seal(self, kind: int, src: int, dst: int, nonce: bytes, echo: bytes = bytes(16)) -> bytes:
        body = _PROBE.pack(PROBE, kind, src, dst, self._comm, self._epoch, nonce, echo)
        return body + hmac.digest(self._mac_key, body, "sha256")

    def open(self, data: bytes | memoryview, me: int) -> Probe | None:
        """The probe, if it is authentic, of this world and addressed to rank ``me``."""
        if len(data) != PROBE_SIZE:
            return None
        body = bytes(data[: _PROBE.size])
        tag = bytes(data[_PROBE.size :])
        if not hmac.compare_digest(hmac.digest(self._mac_key, body, "sha256"), tag):
            return None
        _, kind, src, dst, comm, epoch, nonce, echo = _PROBE.unpack(body)
        if kind not in (PING, PONG) or dst != me or (comm, epoch) != (self._comm, self._epoch):
            return None
        return Probe(kind, src, dst, nonce, echo)


__all__ = [
    "PROBE",
    "PROBE_SIZE",
    "RELAY",
    "RELAY_HEADER",
    "Hint",
    "Probe",
    "ProbeCodec",
    "binding_answer",
    "binding_request",
    "hint",
    "is_stun",
    "parse_hint",
    "relay_header",
    "unwrap_batch",
    "wrap_batch",
]
