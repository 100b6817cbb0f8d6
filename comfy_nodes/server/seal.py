"""Sealed control datagrams: what one rank's control endpoint sends another, and the checks on it.

A datagram is ``MAGIC | nonce (12 bytes) | AES-256-GCM(JSON envelope)``, under a subkey of the
cluster key (HKDF, label ``comfy-cluster control``), with ``MAGIC`` as associated data.  The
envelope names its sender's rank, the time it was sealed, a message id (a retransmission keeps
its id, under a fresh nonce) and whether it is a reply.  :meth:`Seal.open` refuses, and counts:

* ``oversized``: longer than :data:`MAX_DATAGRAM` (the receiver reads at most one byte more, so
  nothing larger is ever buffered);
* ``malformed``: too short, another magic, or (after authentication) an envelope that is not the
  expected JSON object;
* ``auth``: not sealed under this cluster's key (forged, altered, truncated, another key);
* ``expired``: sealed more than ``window_s`` away from this rank's clock;
* ``replayed``: a nonce already opened within the window (each one is remembered that long).

Without a key (loopback only, or ``COMFY_CLUSTER_INSECURE=1``) a public key seals: the same code
runs, and authenticates nothing.
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from collectives.auth import ClusterKey

MAGIC = b"CCC1"
NONCE_BYTES = 12
TAG_BYTES = 16
MAX_DATAGRAM = 16 * 1024
"""The largest control datagram (a heartbeat's report is about 2 KiB; a reason is clipped to
:data:`MAX_REASON_CHARS`)."""
MAX_REASON_CHARS = 4000
WINDOW_S = 30.0
"""How far apart the ranks' clocks may be, and how long a nonce is remembered."""
_LABEL = b"comfy-cluster control"
_INSECURE_KEY = ClusterKey("comfy-cluster-insecure-control-channel")
DROP_REASONS = ("oversized", "malformed", "auth", "expired", "replayed")


class Refusal(Exception):
    """A datagram that is dropped; ``reason`` is one of :data:`DROP_REASONS`."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason


@dataclass(frozen=True)
class Envelope:
    """An opened control datagram."""

    sender: int  # the sender's rank (authenticated with the rest)
    msg_id: str  # the request's id; a reply carries its request's
    kind: str  # the message kind (comfy_nodes.server.messages); a reply's is its request's
    reply: bool
    body: dict[str, Any]


class Seal:
    """Seals and opens this cluster's control datagrams; remembers nonces to refuse replays."""

    def __init__(
        self, key: ClusterKey | None, window_s: float = WINDOW_S, max_remembered: int = 65536
    ) -> None:
        self._aead = AESGCM((key or _INSECURE_KEY).derive(_LABEL))
        self.window_s = window_s
        self._max = max_remembered
        self._seen: OrderedDict[bytes, float] = OrderedDict()
        self._lock = threading.Lock()

    def seal(self, envelope: Envelope, now: float | None = None) -> bytes:
        plain = json.dumps(
            {
                "t": time.time() if now is None else now,
                "from": envelope.sender,
                "id": envelope.msg_id,
                "kind": envelope.kind,
                "reply": envelope.reply,
                "body": envelope.body,
            },
            separators=(",", ":"),
        ).encode()
        nonce = os.urandom(NONCE_BYTES)
        datagram = MAGIC + nonce + self._aead.encrypt(nonce, plain, MAGIC)
        if len(datagram) > MAX_DATAGRAM:
            raise ValueError(
                f"a {envelope.kind!r} control message of {len(datagram)} bytes is larger than "
                f"{MAX_DATAGRAM}"
            )
        return datagram

    def open(self, datagram: bytes, now: float | None = None) -> Envelope:
        """The envelope of an authentic, fresh datagram, else :class:`Refusal`."""
        if len(datagram) > MAX_DATAGRAM:
            raise Refusal("oversized", f"{len(datagram)} bytes, at most {MAX_DATAGRAM}")
        if len(datagram) < len(MAGIC) + NONCE_BYTES + TAG_BYTES or not datagram.startswith(MAGIC):
            raise Refusal("malformed", "not a control datagram")
        nonce = datagram[len(MAGIC) : len(MAGIC) + NONCE_BYTES]
        try:
            plain = self._aead.decrypt(nonce, datagram[len(MAGIC) + NONCE_BYTES :], MAGIC)
        except InvalidTag:
            raise Refusal("auth", "not sealed with this cluster's key") from None
        envelope, sealed_at = _parse(plain)
        now = time.time() if now is None else now
        if abs(now - sealed_at) > self.window_s:
            raise Refusal("expired", f"sealed {now - sealed_at:+.0f} s ago")
        with self._lock:
            self._forget(now)
            if nonce in self._seen:
                raise Refusal("replayed", "this datagram was opened before")
            self._seen[nonce] = now
        return envelope

    def _forget(self, now: float) -> None:
        while self._seen and (
            len(self._seen) >= self._max or next(iter(self._seen.values())) < now - self.window_s
        ):
            self._seen.popitem(last=False)


def _parse(plain: bytes) -> tuple[Envelope, float]:
    try:
        data = json.loads(plain)
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise Refusal("malformed", "the envelope is not JSON") from None
    if not isinstance(data, dict):
        raise Refusal("malformed", "the envelope is not a JSON object")
    sealed_at, sender, msg_id = data.get("t"), data.get("from"), data.get("id")
    kind, reply, body = data.get("kind"), data.get("reply"), data.get("body")
    if (
        not isinstance(sealed_at, int | float)
        or type(sender) is not int
        or not 0 <= sender < 2**31
        or not isinstance(msg_id, str)
        or not isinstance(kind, str)
        or not isinstance(reply, bool)
        or not isinstance(body, dict)
    ):
        raise Refusal("malformed", "the envelope lacks a field or has one of the wrong type")
    return Envelope(sender, msg_id, kind, reply, body), float(sealed_at)
