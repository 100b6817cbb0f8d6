"""The rendezvous store's wire format: handshake, authenticated frames, requests and replies.

No sockets and no clocks here (:mod:`collectives.rendezvous.store` moves the bytes); everything
is a function of bytes in, bytes or a typed error out, so the codec is tested on its own.

Handshake (both sides prove they hold the cluster key; nothing is served before it)::

    server -> client   HELLO   = MAGIC  VERSION  server_nonce[32]
    client -> server   PROOF   = MAGIC  VERSION  client_nonce[32]  mac(key, "client", sn, cn)
    server -> client   ACCEPT  = b"OK"  mac(key, "server", sn, cn)     (or REFUSE = b"NO", close)

The MACs are :meth:`collectives.auth.ClusterKey.mac` under :data:`LABEL`.  Fresh nonces on both
sides mean a recorded handshake cannot be replayed, and the server's answer tells the client that
it talks to a holder of the key (the genuine rank 0), not to whoever got the port first.

After it, every frame is ``length:u32 payload tag[32]`` where ``tag`` is HMAC-SHA256 under a
session key (from both nonces) over the direction, a per-direction sequence number and the
payload: a frame cannot be forged, altered, reordered or replayed into the connection.  Frames
are authenticated, not encrypted: keys and values (ranks' addresses) are visible on the wire.

A request payload is ``op:u8`` followed by length-prefixed fields; a reply is ``status:u8`` then
fields.  Every size is bounded (:data:`MAX_KEY_BYTES`, :data:`MAX_VALUE_BYTES`,
:data:`MAX_FRAME_BYTES`); anything malformed is a :class:`~collectives.errors.RemoteProtocolError`.
"""

from __future__ import annotations

import enum
import hashlib
import hmac
import struct
from dataclasses import dataclass

from collectives.auth import ClusterKey
from collectives.errors import AuthenticationError, RemoteProtocolError

LABEL = b"rendezvous-store"
MAGIC = b"CCRS"
VERSION = 1
NONCE_BYTES = 32
TAG_BYTES = 32
HELLO_BYTES = len(MAGIC) + 1 + NONCE_BYTES
PROOF_BYTES = HELLO_BYTES + TAG_BYTES
ACCEPT = b"OK"
REFUSE = b"NO"
ANSWER_BYTES = len(ACCEPT) + TAG_BYTES

MAX_KEY_BYTES = 4096
MAX_VALUE_BYTES = 1 << 20
MAX_KEYS_PER_REQUEST = 4096
MAX_FRAME_BYTES = 4 << 20
_LENGTH = struct.Struct("<I")
_I64 = struct.Struct("<q")

# The key every process knows, used where require_key allows running without one (loopback, or
# COMFY_CLUSTER_INSECURE=1): the protocol stays the same, and it authenticates nothing.
INSECURE_KEY = ClusterKey("comfy-cluster-rendezvous-without-a-key")


class Op(enum.IntEnum):
    SET = 1
    GET = 2
    ADD = 3
    CHECK = 4
    WAIT = 5
    COMPARE_SET = 6
    DELETE = 7
    NUM_KEYS = 8


# op -> (keys, trailing values) of a request; None: any number of keys.
_SHAPES: dict[Op, tuple[int | None, int]] = {
    Op.SET: (1, 1),
    Op.GET: (1, 0),
    Op.ADD: (1, 1),
    Op.CHECK: (None, 0),
    Op.WAIT: (None, 1),
    Op.COMPARE_SET: (1, 2),
    Op.DELETE: (1, 0),
    Op.NUM_KEYS: (0, 0),
}


class Status(enum.IntEnum):
    OK = 0
    TIMEOUT = 1
    MISSING = 2
    ERROR = 3


def client_tag(key: ClusterKey, server_nonce: bytes, client_nonce: bytes) -> bytes:
    return key.mac(LABEL, b"client", server_nonce, client_nonce)


def server_tag(key: ClusterKey, server_nonce: bytes, client_nonce: bytes) -> bytes:
    return key.mac(LABEL, b"server", server_nonce, client_nonce)


def hello(server_nonce: bytes) -> bytes:
    return MAGIC + bytes([VERSION]) + server_nonce


def parse_hello(data: bytes) -> bytes:
    """The server nonce; :class:`AuthenticationError` if this is not our store at all."""
    if len(data) != HELLO_BYTES or not data.startswith(MAGIC):
        raise AuthenticationError(
            "the rendezvous port does not speak the collectives store protocol (another program, "
            "or a different version of this library on rank 0)"
        )
    if data[len(MAGIC)] != VERSION:
        raise AuthenticationError(
            f"rank 0's rendezvous store speaks protocol version {data[len(MAGIC)]}, this rank "
            f"{VERSION}: run the same version of the library on every rank"
        )
    return data[len(MAGIC) + 1 :]


def proof(key: ClusterKey, server_nonce: bytes, client_nonce: bytes) -> bytes:
    return hello(client_nonce) + client_tag(key, server_nonce, client_nonce)


def check_proof(key: ClusterKey, server_nonce: bytes, data: bytes) -> bytes:
    """The client nonce of a valid proof; raises :class:`AuthenticationError` otherwise."""
    if len(data) != PROOF_BYTES or not data.startswith(MAGIC) or data[len(MAGIC)] != VERSION:
        raise AuthenticationError("malformed handshake")
    client_nonce = data[len(MAGIC) + 1 : HELLO_BYTES]
    if not key.verify(LABEL, data[HELLO_BYTES:], b"client", server_nonce, client_nonce):
        raise AuthenticationError("wrong cluster key")
    return client_nonce


def session_key(key: ClusterKey, server_nonce: bytes, client_nonce: bytes) -> bytes:
    return key.mac(LABEL, b"session", server_nonce, client_nonce)


class FrameSealer:
    """Tags (``seal``) or checks (``open``) one direction's frames, counting them."""

    def __init__(self, session: bytes, direction: bytes) -> None:
        self._session = session
        self._direction = direction
        self._seq = 0

    def _tag(self, payload: bytes) -> bytes:
        head = self._direction + struct.pack("<Q", self._seq)
        return hmac.new(self._session, head + payload, hashlib.sha256).digest()

    def seal(self, payload: bytes) -> bytes:
        if len(payload) > MAX_FRAME_BYTES:
            raise RemoteProtocolError(
                f"store frame of {len(payload)} bytes exceeds {MAX_FRAME_BYTES}"
            )
        frame = _LENGTH.pack(len(payload)) + payload + self._tag(payload)
        self._seq += 1
        return frame

    def open(self, payload: bytes, tag: bytes) -> bytes:
        if not hmac.compare_digest(self._tag(payload), tag):
            raise AuthenticationError("store frame failed authentication")
        self._seq += 1
        return payload


def frame_length(header: bytes) -> int:
    """Payload length from a frame's 4-byte header; bounded."""
    (length,) = _LENGTH.unpack(header)
    if length > MAX_FRAME_BYTES:
        raise RemoteProtocolError(f"store frame of {length} bytes exceeds {MAX_FRAME_BYTES}")
    return int(length)


def pack_fields(head: int, *fields: bytes) -> bytes:
    out = bytearray([head])
    for field in fields:
        out += _LENGTH.pack(len(field))
        out += field
    return bytes(out)


def unpack_fields(payload: bytes) -> tuple[int, list[bytes]]:
    if not payload:
        raise RemoteProtocolError("empty store message")
    fields: list[bytes] = []
    at = 1
    while at < len(payload):
        if at + 4 > len(payload):
            raise RemoteProtocolError("truncated store message")
        (size,) = _LENGTH.unpack_from(payload, at)
        at += 4
        if at + size > len(payload):
            raise RemoteProtocolError("truncated store message")
        fields.append(payload[at : at + size])
        at += size
    return payload[0], fields


@dataclass(frozen=True)
class Request:
    """One decoded request; ``decode`` checks the op's arity and every size bound."""

    op: Op
    keys: tuple[str, ...] = ()
    values: tuple[bytes, ...] = ()
    amount: int = 0
    timeout_ms: int = 0

    def encode(self) -> bytes:
        fields = [k.encode("utf-8") for k in self.keys]
        if self.op is Op.ADD:
            fields.append(_I64.pack(self.amount))
        elif self.op is Op.WAIT:
            fields.append(_I64.pack(self.timeout_ms))
        fields.extend(self.values)
        return pack_fields(self.op, *fields)

    @classmethod
    def decode(cls, payload: bytes) -> Request:
        raw_op, fields = unpack_fields(payload)
        try:
            op = Op(raw_op)
        except ValueError:
            raise RemoteProtocolError(f"unknown store op {raw_op}") from None
        n_keys, n_values = _SHAPES[op]
        if n_keys is None:
            n_keys = len(fields) - n_values
            if not 0 <= n_keys <= MAX_KEYS_PER_REQUEST:
                raise RemoteProtocolError(f"store {op.name} names {n_keys} keys")
        if len(fields) != n_keys + n_values:
            raise RemoteProtocolError(f"store {op.name} with {len(fields)} fields")
        keys = tuple(_key(raw) for raw in fields[:n_keys])
        rest = fields[n_keys:]
        if op in (Op.ADD, Op.WAIT):
            if len(rest[0]) != _I64.size:
                raise RemoteProtocolError(f"store {op.name} with a malformed number")
            (number,) = _I64.unpack(rest[0])
            if op is Op.ADD:
                return cls(op, keys, amount=number)
            return cls(op, keys, timeout_ms=max(number, 0))
        for value in rest:
            if len(value) > MAX_VALUE_BYTES:
                raise RemoteProtocolError(
                    f"store value of {len(value)} bytes exceeds {MAX_VALUE_BYTES}"
                )
        return cls(op, keys, values=tuple(rest))


def _key(raw: bytes) -> str:
    if not raw or len(raw) > MAX_KEY_BYTES:
        raise RemoteProtocolError(f"store key of {len(raw)} bytes (1..{MAX_KEY_BYTES})")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        raise RemoteProtocolError("store key is not UTF-8") from None


def encode_i64(value: int) -> bytes:
    return _I64.pack(value)


def decode_i64(raw: bytes) -> int:
    if len(raw) != _I64.size:
        raise RemoteProtocolError("malformed number in a store reply")
    return int(_I64.unpack(raw)[0])


__all__ = [
    "INSECURE_KEY",
    "LABEL",
    "MAX_FRAME_BYTES",
    "MAX_KEY_BYTES",
    "MAX_VALUE_BYTES",
    "FrameSealer",
    "Op",
    "Request",
    "Status",
    "check_proof",
    "frame_length",
    "hello",
    "pack_fields",
    "parse_hello",
    "proof",
    "server_tag",
    "session_key",
    "unpack_fields",
]
