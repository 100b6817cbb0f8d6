"""Frame sealing, session keys and the replay window of the udp transport.

One AES-128-GCM seal per *frame* (up to ``frame_bytes``), not per datagram: the cipher costs about
the same per call up to a few KiB, so sealing large frames amortises it ("Wire format" in
docs/udp-transport.md).  Each direction of a session has its own key and IV, derived by HKDF from
the cluster key and both handshake nonces, so a key never seals under the same nonce twice: the
nonce is the IV XOR the frame's first packet number, and packet numbers only count up.
"""

from __future__ import annotations

import bisect
import struct

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from collectives.auth import ClusterKey

TAG_SIZE = 16
NONCE_SIZE = 16  # handshake nonces
_KEY_SIZE = 16
_IV_SIZE = 12
_INSECURE_TAG = b"\0\0\0\0"

Buffer = bytes | bytearray | memoryview


def cluster_tag(key: ClusterKey | None) -> bytes:
    """4 public bytes naming the cluster: datagrams of another cluster are dropped first."""
    return _INSECURE_TAG if key is None else key.derive(b"udp cluster tag")[:4]


def handshake_label() -> bytes:
    """The :meth:`ClusterKey.mac` label of HELLO and HELLO_ACK."""
    return b"udp handshake"


class FrameCipher:
    """Seals or opens frames of one direction of one session."""

    __slots__ = ("_aead", "_iv", "overhead")

    def __init__(self, key: bytes, iv: bytes) -> None:
        self._aead = AESGCM(key)
        self._iv = int.from_bytes(iv, "big")
        self.overhead = TAG_SIZE

    def _nonce(self, first_number: int) -> bytes:
        return (self._iv ^ first_number).to_bytes(_IV_SIZE, "big")

    def seal_into(self, first_number: int, aad: bytes, plain: Buffer, out: memoryview) -> None:
        """Write ``plain`` sealed (``len(plain) + overhead`` bytes) into ``out``."""
        # The nonce is _nonce(first_number), inlined: once per frame.
        nonce = (self._iv ^ first_number).to_bytes(_IV_SIZE, "big")
        self._aead.encrypt_into(nonce, plain, aad, out)

    def open_into(self, first_number: int, aad: bytes, sealed: Buffer, out: memoryview) -> bool:
        """Write the plaintext of ``sealed`` into ``out``; False (``out`` garbage) when forged."""
        nonce = (self._iv ^ first_number).to_bytes(_IV_SIZE, "big")  # _nonce, inlined
        try:
            self._aead.decrypt_into(nonce, sealed, aad, out)
        except InvalidTag:
            return False
        return True


class NullCipher:
    """The insecure mode's "cipher": copies.  Only with ``TransportConfig.insecure``."""

    __slots__ = ("overhead",)

    def __init__(self) -> None:
        self.overhead = 0

    def seal_into(self, first_number: int, aad: bytes, plain: Buffer, out: memoryview) -> None:
        out[:] = plain

    def open_into(self, first_number: int, aad: bytes, sealed: Buffer, out: memoryview) -> bool:
        out[:] = sealed
        return True


Cipher = FrameCipher | NullCipher


def session_ciphers(
    key: ClusterKey | None,
    client_nonce: bytes,
    server_nonce: bytes,
    comm_id: int,
    epoch: int,
) -> tuple[Cipher, Cipher]:
    """``(client_to_server, server_to_client)`` ciphers of one session.

    Both nonces enter the salt, so neither side alone picks the keys, and a replayed HELLO meets a
    fresh server nonce: its keys are new and useless to whoever replayed it.  The communicator and
    epoch enter the info, so a datagram of another world can never open here.
    """
    if key is None:
        return NullCipher(), NullCipher()
    master = key.derive(b"udp session")
    context = struct.pack(">QQ", comm_id & (1 << 64) - 1, epoch & (1 << 64) - 1)
    out: list[Cipher] = []
    for direction in (b"client to server", b"server to client"):
        material = HKDF(
            algorithm=hashes.SHA256(),
            length=_KEY_SIZE + _IV_SIZE,
            salt=client_nonce + server_nonce,
            info=b"udp frame key/" + direction + context,
        ).derive(master)
        out.append(FrameCipher(material[:_KEY_SIZE], material[_KEY_SIZE:]))
    return out[0], out[1]


class ReplayWindow:
    """Packet numbers of authenticated frames, as merged half-open intervals.

    A number in it was accepted once and is refused again; a number below ``floor`` is refused
    as too old to tell.  Bounded by the number of *gaps*, not by distance: a segment resent long
    after its neighbours (a lost datagram of a large frame) must still be accepted, or its frame
    would be resent forever.  Past ``max_intervals`` gaps the oldest is given up (raising
    ``floor``).  The same intervals are the ``acked`` ranges of the ACK.
    """

    __slots__ = ("_starts", "_stops", "floor", "max_intervals")

    def __init__(self, max_intervals: int = 1024) -> None:
        self._starts: list[int] = []
        self._stops: list[int] = []
        self.floor = 0
        self.max_intervals = max_intervals

    def __contains__(self, number: int) -> bool:
        if number < self.floor:
            return True
        stops = self._stops
        if not stops or number >= stops[-1]:
            return False  # above every interval: the next datagram in order, the usual case
        i = bisect.bisect_right(self._starts, number) - 1
        return i >= 0 and number < self._stops[i]

    def seen_any(self, start: int, stop: int) -> bool:
        """Whether any number of ``[start, stop)`` was accepted (or is below the floor)."""
        if start < self.floor:
            return True
        i = bisect.bisect_right(self._starts, stop - 1) - 1
        return i >= 0 and self._stops[i] > start

    def add(self, start: int, stop: int) -> None:
        """Accept ``[start, stop)`` (the caller checked :meth:`seen_any` first)."""
        starts, stops = self._starts, self._stops
        if stops and start == stops[-1]:  # the common case: the next frame in order
            stops[-1] = stop
            return
        i = bisect.bisect_left(starts, start)
        starts.insert(i, start)
        stops.insert(i, stop)
        # Merge with the neighbours it touches.
        if i + 1 < len(starts) and stops[i] == starts[i + 1]:
            stops[i] = stops[i + 1]
            del starts[i + 1], stops[i + 1]
        if i > 0 and stops[i - 1] == starts[i]:
            stops[i - 1] = stops[i]
            del starts[i], stops[i]
        while len(starts) > self.max_intervals:
            self.floor = stops[0]
            del starts[0], stops[0]

    def holding(self, numbers: set[int]) -> list[tuple[int, int]]:
        """The intervals that hold any of ``numbers`` (those below ``floor`` have none)."""
        starts, stops = self._starts, self._stops
        out: set[tuple[int, int]] = set()
        for number in numbers:
            i = bisect.bisect_right(starts, number) - 1
            if i >= 0 and number < stops[i]:
                out.add((starts[i], stops[i]))
        return sorted(out)

    def intervals(self, limit: int) -> list[tuple[int, int]]:
        """The newest ``limit`` intervals, ascending (the oldest ones were long acknowledged)."""
        starts = self._starts
        if len(starts) == 1:  # the usual case (no gap): one interval, no slices or zip
            return [(starts[0], self._stops[0])]
        return list(zip(starts[-limit:], self._stops[-limit:], strict=True))
