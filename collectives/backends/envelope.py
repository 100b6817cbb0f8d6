"""The one envelope every message-moving backend puts in front of a collective's messages.

It names what the message belongs to, so that a receiver can tell "the peer is in another
collective" (or another world) from "this is my data" before it touches a byte of the payload::

    offset size field
    0      4    magic b"CCEV"
    4      1    version (1)
    5      1    length of the op name
    6      2    reserved, 0
    8      8    seq: the communicator's collective sequence number (0 for user point-to-point)
    16     4    root (signed; NO_ROOT = -1 for rootless ops)
    20     4    epoch: the incarnation of the world (a re-formed world counts up)
    24     8    comm: communicator id, a hash of the world's name (:func:`comm_id`)
    32     24   op name (ASCII, zero padded)

``SIZE`` = 56 bytes, little-endian.  Build envelopes with :func:`op_envelope` (a collective's)
and :func:`user_envelope` (every user point-to-point message: op :data:`USER_OP`, sequence 0),
which hold the op name as a receiver unpacks it, cut to its field.  In-process backends may
pass :class:`Envelope` objects as they are; byte transports :meth:`~Envelope.pack` them.
:meth:`Envelope.expect` is the one check every receiver applies: same world (comm, epoch), same
op and sequence, same root; anything else raises :class:`CollectiveMismatchError` naming both
ranks (a message from another world or epoch: :class:`RemoteProtocolError`, as it can only be
stale or foreign).
"""

from __future__ import annotations

import hashlib
import struct
from typing import TYPE_CHECKING, NamedTuple

from collectives.errors import CollectiveMismatchError, RemoteProtocolError

if TYPE_CHECKING:
    from typing_extensions import Buffer

MAGIC = b"CCEV"
VERSION = 1
NO_ROOT = -1
_NAME_FIELD = 24
_STRUCT = struct.Struct(f"<4sBBHQiIQ{_NAME_FIELD}s")
SIZE = _STRUCT.size
USER_OP = "send"  # the op every user point-to-point message names (sequence 0, no root)


def comm_id(world: str) -> int:
    """A 64-bit id for the world named ``world`` (every rank computes the same)."""
    return int.from_bytes(hashlib.blake2b(world.encode("utf-8"), digest_size=8).digest(), "little")


class Envelope(NamedTuple):
    op: str
    seq: int
    root: int = NO_ROOT
    comm: int = 0
    epoch: int = 0

    def describe(self) -> str:
        where = f", root {self.root}" if self.root >= 0 else ""
        return f"{self.op} (collective #{self.seq}{where})"

    def pack(self) -> bytes:
        out = bytearray(SIZE)
        self.pack_into(out)
        return bytes(out)

    def pack_into(self, buffer: Buffer, offset: int = 0) -> None:
        name = _wire_name(self.op)
        _STRUCT.pack_into(
            buffer, offset, MAGIC, VERSION, len(name), 0, self.seq, self.root, self.epoch,
            self.comm, name,
        )  # fmt: skip

    @classmethod
    def unpack_from(cls, data: Buffer, offset: int = 0, *, src: int = -1) -> Envelope:
        """Parse an envelope; :class:`RemoteProtocolError` if the bytes are not one."""
        view = memoryview(data).cast("B")
        if view.nbytes - offset < SIZE:
            raise RemoteProtocolError(f"truncated message envelope from rank {src}")
        magic, version, name_len, reserved, seq, root, epoch, comm, name = _STRUCT.unpack_from(
            view, offset
        )
        if magic != MAGIC or version != VERSION or reserved or name_len > _NAME_FIELD:
            raise RemoteProtocolError(
                f"malformed message envelope from rank {src} (magic {bytes(magic)!r}, version "
                f"{version}): is every rank running the same version of comfyui-cluster?"
            )
        op = name[:name_len].decode("ascii", "replace")
        return cls(op, seq, root, comm, epoch)

    def expect(self, got: Envelope, *, rank: int, src: int) -> None:
        """Raise unless ``got`` (from ``src``) belongs to the same op as this one (``rank``'s)."""
        if got == self:
            return
        if (got.comm, got.epoch) != (self.comm, self.epoch):
            raise RemoteProtocolError(
                f"rank {rank} ({self.describe()}) received a message from rank {src} for another "
                f"world (communicator {got.comm:#x} epoch {got.epoch}, this one is "
                f"{self.comm:#x} epoch {self.epoch}): a stale or foreign message"
            )
        raise CollectiveMismatchError(
            f"rank {rank} is in {self.describe()} but rank {src} sent for {got.describe()}: "
            "every rank must call the same collectives, with the same root, in the same order",
            ranks=(rank, src),
        )


def _wire_name(op: str) -> bytes:
    """``op`` as the envelope carries it: ASCII, cut to the name field."""
    return op.encode("ascii", "replace")[:_NAME_FIELD]


def op_envelope(op: str, seq: int, root: int, comm: int, epoch: int) -> Envelope:
    """The envelope of ``op`` number ``seq`` (``root``: NO_ROOT for rootless ops) in world
    ``comm``, incarnation ``epoch``, with the op name as a receiver unpacks it."""
    return Envelope(_wire_name(op).decode("ascii"), seq, root, comm, epoch)


def user_envelope(comm: int, epoch: int) -> Envelope:
    """The envelope of every user point-to-point message in world ``comm``, ``epoch``."""
    return op_envelope(USER_OP, 0, NO_ROOT, comm, epoch)


__all__ = [
    "MAGIC",
    "NO_ROOT",
    "SIZE",
    "USER_OP",
    "Envelope",
    "comm_id",
    "op_envelope",
    "user_envelope",
]
