"""HELLO and HELLO_ACK: the two datagrams that open a session ("Wire format" in the design doc).

A handshake datagram is the fixed header, a protobuf body (:mod:`._pb.transport_pb2`) and an
HMAC-SHA256 over both under a key derived from the cluster key.  The MAC is checked before the
body is parsed and before any state exists, so a forged or foreign datagram costs one HMAC and
allocates nothing that outlives the call.  A captured HELLO replayed later is refused by its
wall-clock timestamp (outside ``hello_window``) or, inside the window, by a bounded cache of the
client nonces already seen.
"""

from __future__ import annotations

import hmac
from collections import OrderedDict
from typing import Any

from collectives.auth import ClusterKey
from collectives.transport._pb import transport_pb2 as pb
from collectives.transport.crypto import handshake_label
from collectives.transport.header import HEADER_SIZE, Header, PacketType

MAC_SIZE = 32


def _mac(key: ClusterKey, signed: bytes | memoryview) -> bytes:
    return key.mac(handshake_label(), bytes(signed))


def build(
    key: ClusterKey | None, tag: bytes, ptype: PacketType, session_id: int, msg: Any
) -> bytes:
    """A HELLO (``session_id`` 0) or HELLO_ACK (the client's session id) datagram."""
    body: bytes = msg.SerializeToString()
    head = Header(int(ptype), 0, tag, session_id, 0, 0, 1, len(body)).pack()
    signed = head + body
    return signed if key is None else signed + _mac(key, signed)


def open_body(key: ClusterKey | None, data: memoryview, header: Header) -> Any | None:
    """The parsed Hello/HelloAck of an authentic handshake datagram, else None."""
    mac_size = 0 if key is None else MAC_SIZE
    if len(data) != HEADER_SIZE + header.frame_length + mac_size:
        return None
    signed = data[: HEADER_SIZE + header.frame_length]
    if key is not None and not hmac.compare_digest(_mac(key, signed), data[len(signed) :]):
        return None
    msg = pb.Hello() if header.type == PacketType.HELLO else pb.HelloAck()
    try:
        msg.ParseFromString(signed[HEADER_SIZE:])
    except Exception:  # protobuf's DecodeError; a MAC'd body only fails from a buggy peer
        return None
    return msg


class ReplayGuard:
    """Refuses HELLOs outside the timestamp window and nonces already seen within it.

    At most ``max_nonces`` are remembered; past that, a fresh HELLO is refused rather than an
    unexpired nonce forgotten (forgetting it would let its HELLO be replayed).
    """

    def __init__(self, window: float, max_nonces: int = 4096) -> None:
        self._window = window
        self._max = max_nonces
        self._seen: OrderedDict[bytes, float] = OrderedDict()

    def accept(self, nonce: bytes, timestamp: float, wall_now: float) -> bool:
        """Whether a HELLO with this nonce and timestamp is fresh; remembers it if so."""
        if not abs(wall_now - timestamp) <= self._window:
            return False
        seen = self._seen
        horizon = wall_now - self._window
        while seen and next(iter(seen.values())) < horizon:
            seen.popitem(last=False)
        if nonce in seen:
            return False
        if len(seen) >= self._max:
            for old in [n for n, stamp in seen.items() if stamp < horizon]:
                del seen[old]
            if len(seen) >= self._max:
                return False
        seen[nonce] = timestamp
        return True

    def __len__(self) -> int:
        return len(self._seen)
