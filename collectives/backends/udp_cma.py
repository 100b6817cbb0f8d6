"""Same-host messages of the ``udp`` backend: the receiver copies the body out of the sender.

Between ranks of one host that can read each other's memory (probed when the world forms,
:func:`collectives.backends.cma.probe_world`), a body of :data:`cma.MIN_BYTES` or more does not
travel through the socket: the sender posts a *far message* whose meta lists the address of
each of its buffers and whose body is empty, and the receiver, on arrival, copies the buffers
straight out of the sender with ``process_vm_readv`` (one copy at memcpy speed, into the
waiting receive's own buffer where it lands) and answers with an *acknowledgement* carrying 0
or the errno of the read.  The sender's post waits for that answer (its buffers must stay put
until then), as a large wire post waits until its body is sealed; it never waits for the
receiver to *take* the message: the receiver's driver reads on arrival.

Both travel as ordinary messages of the encrypted, authenticated transport, so a far message
keeps its place in its channel's FIFO order, and nothing of it is trusted before the core has
authenticated it.  The bytes themselves are not encrypted: they never leave the host, and a
process that may read this one's memory could read the cluster key there too.  A far message
from a peer that was not probed readable (and the pid it was probed with is the only one ever
read) is refused before anything is allocated.

Wire format (little-endian)::

    far message meta:  b"CCFM" | transfer id u64 | buffer count u16 | count x address u64 |
                       the ordinary meta (envelope + codec header)
    acknowledgement:   channel ACK_CHANNEL, meta b"CCFA" | transfer id u64 | errno i32,
                       empty body
"""

from __future__ import annotations

import errno
import os
import struct
from typing import TYPE_CHECKING, NamedTuple

from collectives.backends import cma
from collectives.backends.udp_health import PEER_CLOSED
from collectives.errors import ConnectionLostError, RemoteProtocolError

if TYPE_CHECKING:
    import threading
    from collections.abc import Callable, Sequence

    from collectives.backends.shm_ring import Ring
    from collectives.deadline import Deadline
    from collectives.transport.endpoint import Endpoint

FAR_MARK = b"CCFM"
ACK_MARK = b"CCFA"
# A channel no seam channel maps to (user tags map below 2**31 + 2, see udp.channel_id).
ACK_CHANNEL = (1 << 32) - 1
MAX_BUFFERS = 1 << 10  # far buffers per message (a codec message has a handful)
REFUSED = errno.EPROTO  # the acknowledgement of a far message the receiver refused

_HEAD = struct.Struct("<4sQH")
_ADDRESS = struct.Struct("<Q")
_ACK = struct.Struct("<4sQi")


class Far(NamedTuple):
    """A parsed far message: its transfer id, buffer addresses and the ordinary meta."""

    xfer: int
    addresses: list[int]
    meta: bytes


def is_far(meta: bytes) -> bool:
    return meta[:4] == FAR_MARK


def far_meta(xfer: int, addresses: list[int], meta: bytes) -> bytes:
    """The meta of a far message whose buffers are at ``addresses`` in this process."""
    head = _HEAD.pack(FAR_MARK, xfer, len(addresses))
    return head + b"".join(_ADDRESS.pack(a) for a in addresses) + meta


def parse_far(meta: bytes, src: int) -> Far:
    """Parse a far message's meta (:func:`is_far`); :class:`RemoteProtocolError` if malformed."""
    if len(meta) < _HEAD.size:
        raise RemoteProtocolError(f"truncated far message from rank {src}")
    _, xfer, count = _HEAD.unpack_from(meta)
    end = _HEAD.size + count * _ADDRESS.size
    if count > MAX_BUFFERS or len(meta) < end:
        raise RemoteProtocolError(f"malformed far message from rank {src} ({count} buffers)")
    addresses = [_ADDRESS.unpack_from(meta, _HEAD.size + i * _ADDRESS.size)[0]
                 for i in range(count)]  # fmt: skip
    return Far(xfer, addresses, bytes(meta[end:]))


def ack_meta(xfer: int, code: int) -> bytes:
    return _ACK.pack(ACK_MARK, xfer, code)


def parse_ack(meta: bytes) -> tuple[int, int] | None:
    """``(transfer id, errno)`` of an acknowledgement, None when the bytes are not one."""
    if len(meta) != _ACK.size:
        return None
    mark, xfer, code = _ACK.unpack(meta)
    return (xfer, code) if mark == ACK_MARK else None


def read_far(pid: int, far: Far, sizes: list[int], into: memoryview) -> None:
    """Copy each buffer of ``far`` (``sizes`` from its checked codec header) from process
    ``pid`` into ``into``, back to back.  Raises ``OSError`` with the kernel's errno."""
    if len(far.addresses) != len(sizes):
        raise OSError(REFUSED, f"{len(far.addresses)} addresses for {len(sizes)} buffers")
    base, offset = cma.address_of(into), 0
    for address, size in zip(far.addresses, sizes, strict=True):
        if size:
            cma.read(pid, address, base + offset, size)
        offset += size


def failure(src: int, code: int) -> str:
    """Why a far transfer from or to ``src`` failed, and what to do about it."""
    what = "refused the message" if code == REFUSED else os.strerror(code)
    return (
        f"the same-host copy with rank {src} failed ({what}); {cma.ENV}=0 sends every message "
        "through the socket"
    )


class FarSender:
    """The sending side of far messages (a mixin of the IO driver's ``Engine``)."""

    lock: threading.Lock
    ep: Endpoint
    clock: Callable[[], float]
    outstanding: dict[int, set[int]]
    unframed: dict[int, set[int]]
    lost: dict[int, str]
    counters: dict[str, int]
    cma_readers: frozenset[int]
    far_answers: dict[int, int | None]
    _xfers: int
    check_usable: Callable[[int, str], None]
    _release_held: Callable[[], None]
    _drive: Callable[[Callable[[], bool], int, Deadline, str | None], None]
    shm_out: dict[int, Ring]
    _shm_send: Callable[[int, Ring, int, bytes, Sequence[memoryview]], int]

    def send_far(
        self, peer: int, channel: int, meta: bytes, body: list[memoryview], dl: Deadline
    ) -> None:
        """Post a message whose ``body`` ``peer`` copies out of this process, and wait (within
        ``dl``) until it answers: only then may the caller reuse ``body``."""
        self.wait_far([(peer, self.post_far(peer, channel, meta, body, dl))], dl)

    def post_far(
        self, peer: int, channel: int, meta: bytes, body: list[memoryview], dl: Deadline
    ) -> int:
        """Post a far message without waiting for its answer; its transfer id, for
        :meth:`wait_far` (``body`` must stay put until then)."""
        with self.lock:
            self.check_usable(peer, dl.op)
            self._xfers += 1
            xfer = self._xfers
            addresses = [cma.address_of(b) for b in body]
            self.far_answers[xfer] = None
            self.counters["far_sent"] += 1
            ring = self.shm_out.get(peer)
            if ring is not None:  # in order with the ring's other messages (udp_shm)
                self._shm_send(peer, ring, channel, far_meta(xfer, addresses, meta), ())
                return xfer
            mid = self.ep.send(
                peer, channel, far_meta(xfer, addresses, meta), [], self.clock(),
                notify_framed=True,
            )  # fmt: skip
            self.outstanding[peer].add(mid)
            self.unframed[peer].add(mid)
            self._release_held()
        return xfer

    def wait_far(self, posted: list[tuple[int, int]], dl: Deadline) -> None:
        """Wait (within ``dl``) for the answers to the ``(peer, transfer id)`` far messages
        ``posted``; raise the first failure after every answer is in (or the first wait's
        error, the rest then forgotten)."""
        answers, lost = self.far_answers, self.lost
        failed: ConnectionLostError | None = None
        try:
            with self.lock:
                for peer, xfer in posted:

                    def answered(peer: int = peer, xfer: int = xfer) -> bool:
                        # A peer that closed (not aborted) took what it wanted, as for wait_sent.
                        closed = lost.get(peer, "").startswith(PEER_CLOSED)
                        return answers[xfer] is not None or closed

                    self._drive(answered, peer, dl, "the peer did not copy")
                    code = answers[xfer]
                    if code and failed is None:
                        failed = ConnectionLostError(failure(peer, code), [peer])
        finally:
            self.forget_far(posted)
        if failed is not None:
            raise failed

    def forget_far(self, posted: list[tuple[int, int]]) -> None:
        """Stop waiting for the answers to ``posted`` (an answer that comes later is dropped)."""
        with self.lock:
            for _, xfer in posted:
                self.far_answers.pop(xfer, None)


__all__ = [
    "ACK_CHANNEL",
    "REFUSED",
    "Far",
    "FarSender",
    "ack_meta",
    "failure",
    "far_meta",
    "is_far",
    "parse_ack",
    "parse_far",
    "read_far",
]
