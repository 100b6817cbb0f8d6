"""The send side of a session: messages into frames, frames into datagrams.

Copies: each body byte is copied once into a frame's plaintext and sealed once into the frame's
*image*: its datagrams laid out back to back, headers included, exactly as a GSO ``sendmsg``
wants them.  A frame of one datagram is sealed straight into its image; a frame of several is
sealed into a scratch buffer and spread over the image's segments by one strided numpy copy,
with every segment header written from one template row (no Python loop per datagram).  The
image is kept until every segment of the frame is acknowledged, and a lost segment is resent as
a slice of it: the same bytes under the same packet number.

Images are recycled: a released frame's image (one nobody else references: no datagram of it
waits in a driver's queue or a simulated network) is the next frame's of the same size.  A fresh
64 KiB ``bytearray`` per frame cost 12 page faults per frame at 65000-byte datagrams (the
allocator hands freed heap tops back to the kernel): ~20 % of the sender's CPU per byte.
"""

from __future__ import annotations

import sys
from collections import deque
from collections.abc import Sequence

import numpy as np

from collectives.transport.crypto import Cipher
from collectives.transport.frames import DATA_HEADER, DATA_HEADER_SIZE, DATA_KIND
from collectives.transport.header import (
    HEADER_SIZE,
    VERSION,
    PacketType,
    pack_header,
    segment_heads,
)

_U64 = (1 << 64) - 1
_SEGMENT = int(PacketType.SEGMENT)  # a plain int packs faster than the IntEnum member
_SPARE_IMAGES = 64  # released frame images kept for reuse, per builder (4 MiB at 64 KiB)


class OutMessage:
    """One queued message and how far it has been framed."""

    __slots__ = (
        "body_len",
        "channel",
        "frames_pending",
        "message_id",
        "meta",
        "notify_framed",
        "pos",
        "seq",
        "total",
        "view_index",
        "view_offset",
        "views",
    )

    def __init__(
        self,
        message_id: int,
        channel: int,
        seq: int,
        meta: bytes,
        body: Sequence[memoryview],
        *,
        notify_framed: bool = False,
    ) -> None:
        self.message_id = message_id
        self.channel = channel
        self.seq = seq
        self.meta = meta
        # One pass (once per message): bytes views, empty ones left out, and their total.
        views: list[memoryview] = []
        body_len = 0
        for given in body:
            v = given if given.format == "B" and given.ndim == 1 else given.cast("B")
            if v.nbytes:
                views.append(v)
                body_len += v.nbytes
        self.views = views
        self.body_len = body_len
        self.total = len(meta) + self.body_len
        self.pos = 0  # stream offset (meta, then body) of the next byte to frame
        self.view_index = 0
        self.view_offset = 0
        self.frames_pending = 0  # frames holding its bytes not yet acknowledged
        self.notify_framed = notify_framed  # emit MessageFramed once every byte is sealed

    @property
    def framed(self) -> bool:
        return self.pos >= self.total

    def copy_into(self, out: memoryview, n: int) -> None:
        """Copy the next ``n`` stream bytes into ``out`` and advance."""
        views = self.views
        if n == self.total and len(views) <= 1:
            # Fast path: the whole message at once (a small one), meta then its one view: what
            # the loop below does then, leaving the cursor past that view.
            meta_len = len(self.meta)
            out[:meta_len] = self.meta
            if views:
                out[meta_len:n] = views[0]
            self.view_index = len(views)
            self.pos = n
            return
        dst = 0
        pos = self.pos
        meta = self.meta
        meta_left = len(meta) - pos
        if meta_left > 0:
            k = meta_left if meta_left < n else n  # min() as a compare, as below
            out[:k] = meta[pos : pos + k] if pos or k < meta_left else meta  # (no slice copy)
            dst = k
        i, off = self.view_index, self.view_offset
        while dst < n:
            view = views[i]
            k = view.nbytes - off
            k = n - dst if n - dst < k else k
            out[dst : dst + k] = view[off : off + k] if off or k < view.nbytes else view
            dst += k
            off += k
            if off == view.nbytes:
                i, off = i + 1, 0
        self.view_index, self.view_offset = i, off
        self.pos += n


class SentFrame:
    """A sealed frame's datagrams, kept until every segment of it is acknowledged."""

    __slots__ = ("count", "data_bytes", "first", "image", "messages", "per", "stride")

    def __init__(self, first: int, count: int, per: int, image: bytearray) -> None:
        self.first = first
        self.count = count
        self.per = per
        self.stride = HEADER_SIZE + per
        self.image = image
        self.messages: list[OutMessage] = []
        self.data_bytes = 0

    def datagrams(self, start: int, stop: int) -> memoryview:
        """Segments ``[start, stop)`` (indices), contiguous: one GSO batch."""
        end = min(stop * self.stride, len(self.image))
        return memoryview(self.image)[start * self.stride : end]

    def size(self, index: int) -> int:
        """Bytes of datagram ``index``."""
        return min(self.stride, len(self.image) - index * self.stride)


class FrameBuilder:
    """Fills and seals frames for one direction of one session."""

    def __init__(
        self,
        *,
        cipher: Cipher,
        tag: bytes,
        max_datagram: int,
        frame_bytes: int,
        comm_id: int,
        epoch: int,
        max_batch_bytes: int = 65000,
    ) -> None:
        self._cipher = cipher
        self._tag = tag
        self._max_datagram = max_datagram
        cap = max_datagram - HEADER_SIZE
        # Fill frames to a whole number of full datagrams: then every datagram but a message's
        # last is max_datagram bytes.  No more datagrams than one GSO batch holds: a frame then
        # leaves in one sendmsg and arrives in one GRO read, which the receiver places whole
        # (Session.on_batch) with no partial-frame state.  At 1200 bytes a 64 KiB frame was 56
        # datagrams, sent as 54 + 2: the receiver allocated, filled and completed a partial
        # frame for every one (48 -> 30 us of receiver CPU per frame, measured in the core).
        per_frame = max(1, min(frame_bytes // cap, max_batch_bytes // max_datagram))
        self.plain_cap = min(frame_bytes, per_frame * cap - cipher.overhead)
        self._plain = bytearray(self.plain_cap)
        self._plain_view = memoryview(self._plain)
        self._cap = cap
        self._overhead = cipher.overhead
        # comm id and epoch as the DATA chunk header's unsigned 64-bit fields.
        comm_id &= _U64
        epoch &= _U64
        self._sealed = bytearray(self.plain_cap + cipher.overhead)
        self._comm_id = comm_id
        self._epoch = epoch
        self._spare: dict[int, list[bytearray]] = {}  # image length -> released images
        self._spare_count = 0

    def recycle(self, frame: SentFrame) -> None:
        """Keep a released frame's image for a later frame of the same size, when nothing but
        ``frame`` references it (a memoryview of it, a batch the driver could not send yet or a
        datagram a simulated network holds, keeps a reference: such an image is left alone)."""
        image = frame.image
        # References: ``frame.image``, ``image`` and getrefcount's argument.
        if self._spare_count >= _SPARE_IMAGES or sys.getrefcount(image) > 3:
            return
        self._spare.setdefault(len(image), []).append(image)
        self._spare_count += 1

    def fill(
        self, controls: Sequence[bytes], queue: deque[OutMessage], credit: int
    ) -> tuple[int, list[OutMessage], int]:
        """Write ``controls`` then as much queued data as fits and ``credit`` allows.

        Returns ``(plaintext length, messages touched, data bytes)``; messages completely framed
        leave ``queue``.
        """
        plain = self._plain_view
        pos = 0
        for chunk in controls:
            plain[pos : pos + len(chunk)] = chunk
            pos += len(chunk)
        touched: list[OutMessage] = []
        data = 0
        cap = self.plain_cap - DATA_HEADER_SIZE
        pack = DATA_HEADER.pack_into  # pack_data_header's body: no keyword call per chunk
        comm_id, epoch = self._comm_id, self._epoch
        while queue:
            msg = queue[0]
            meta_len = len(msg.meta)
            left = msg.total - msg.pos
            # min(room, left, credit) as compares: min() is a call, once per chunk.
            n = cap - pos
            n = left if left < n else n
            n = credit - data if credit - data < n else n
            if msg.pos == 0 and n < meta_len + (1 if msg.body_len else 0):  # min(1, body_len)
                break  # a message's first chunk carries its whole meta (and a body byte)
            if n <= 0 and msg.total > 0:
                break
            pack(plain, pos, DATA_KIND, 0, meta_len, msg.channel, comm_id, epoch, msg.seq,
                 msg.message_id, msg.pos, n, msg.body_len)  # fmt: skip
            pos += DATA_HEADER_SIZE
            msg.copy_into(plain[pos : pos + n], n)
            pos += n
            data += n
            touched.append(msg)
            if msg.pos >= msg.total:  # framed
                queue.popleft()
            else:
                break  # the frame is full (or the credit spent)
        return pos, touched, data

    def seal(self, plain_len: int, first: int, session_id: int) -> SentFrame:
        """Seal the filled plaintext as the frame whose first segment number is ``first``."""
        sealed_len = plain_len + self._overhead
        count = -(-sealed_len // self._cap) or 1  # segments_for, inlined
        per = -(-sealed_len // count)  # segment_layout, inlined
        # The segment-0 header is the AAD (Header(...).pack() without the tuple).
        aad = pack_header(VERSION, _SEGMENT, 0, self._tag, session_id, first, 0, count,
                          sealed_len)  # fmt: skip
        plain = self._plain_view[:plain_len]
        size = count * HEADER_SIZE + sealed_len
        spare = self._spare.get(size)  # _image(size), inlined: once per frame
        if spare:
            self._spare_count -= 1
            image = spare.pop()  # every byte is overwritten by the seal
        else:
            image = bytearray(size)
        if count == 1:
            # The sealed bytes go straight behind the header.
            image[:HEADER_SIZE] = aad
            self._cipher.seal_into(first, aad, plain, memoryview(image)[HEADER_SIZE:])
            return SentFrame(first, count, per, image)
        sealed = memoryview(self._sealed)[:sealed_len]
        self._cipher.seal_into(first, aad, plain, sealed)
        _spread(image, sealed, aad, count, per)
        return SentFrame(first, count, per, image)


def _spread(image: bytearray, sealed: memoryview, head: bytes, count: int, per: int) -> None:
    """Lay ``sealed`` out as ``count`` datagrams of ``per`` bytes (the last shorter) into
    ``image``, each behind its header: ``head`` (segment 0's) with number and index set."""
    stride = HEADER_SIZE + per
    img = np.frombuffer(image, dtype=np.uint8)
    src = np.frombuffer(sealed, dtype=np.uint8)
    full = count - 1  # every segment but the last has ``per`` bytes
    rows = img[: full * stride].reshape(full, stride)
    rows[:, HEADER_SIZE:] = src[: full * per].reshape(full, per)
    heads = segment_heads(head, 0, count)
    rows[:, :HEADER_SIZE] = heads[:full]
    last = full * stride
    img[last : last + HEADER_SIZE] = heads[full]
    img[last + HEADER_SIZE :] = src[full * per :]
