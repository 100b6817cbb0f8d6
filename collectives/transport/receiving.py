"""The receive side of a session: partial frames, and messages out of chunks in FIFO order.

A frame is authenticated only when all its segments are in, so its segments wait in a
:class:`PartialFrame` (sessions are established, so the id is known; the total held is bounded by
the caller).  Once opened, its DATA chunks go to an :class:`Inbox`, which calls ``allocate`` and
reports whole messages per ``(peer, channel)`` in the order the sender sent them; bytes that come
before their message's meta (a frame resent late) are staged.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable

import numpy as np

from collectives.transport.events import Event, MessageReceived
from collectives.transport.frames import DataChunk, FrameError
from collectives.transport.header import HEADER_SIZE, Header, segment_layout

Allocator = Callable[[int, int, bytes, int], memoryview]


def default_allocate(peer: int, channel: int, meta: bytes, body_len: int) -> memoryview:
    return memoryview(bytearray(body_len))


class PartialFrame:
    """The segments of one frame that arrived so far."""

    __slots__ = ("buf", "count", "first", "have", "length", "missing", "per", "started")

    def __init__(self, header: Header, now: float) -> None:
        self.first = header.first_number
        self.count = header.segments
        self.length = header.frame_length
        self.per = segment_layout(self.length, self.count)
        self.buf = bytearray(self.length)
        self.have = bytearray(self.count)
        self.missing = self.count
        self.started = now

    def fits(self, header: Header, payload_len: int) -> bool:
        """Whether a segment with this header belongs to this frame's layout."""
        if header.segments != self.count or header.frame_length != self.length:
            return False
        return payload_len == self.segment_length(header.segment)

    def segment_length(self, index: int) -> int:
        if index == self.count - 1:
            return self.length - index * self.per
        return self.per

    def put(self, index: int, payload: memoryview) -> bool:
        """Store segment ``index``; False if it was here already."""
        if self.have[index]:
            return False
        self.have[index] = 1
        self.missing -= 1
        at = index * self.per
        self.buf[at : at + len(payload)] = payload
        return True

    def runs(self) -> list[tuple[int, int]]:
        """Segment-number ranges of the segments held."""
        runs: list[tuple[int, int]] = []
        have = self.have
        i, n = 0, self.count
        while i < n:
            i = have.find(1, i)
            if i < 0:
                break
            j = have.find(0, i)
            j = n if j < 0 else j
            runs.append((self.first + i, self.first + j))
            i = j
        return runs


#: ACKs in a row that put a partial frame's runs first after it got segments.  One ACK only: at
#: 10 % loss one ACK in ten is lost, and a resend into an old frame whose one report was lost
#: is never reported again (the newest-first rule crowds old frames out), so the sender declares
#: it lost and sends it again: 1.3 % of all data segments were such duplicates at 100 ms.
TOUCHED_ACKS = 3


class TouchedFrames:
    """Partial frames that got segments since the last ``TOUCHED_ACKS`` ACKs, newest first.

    ``current`` (frame first number -> None, in arrival order) is written once per segment, so
    it is a plain dict attribute; :meth:`take` is called once per ACK.
    """

    __slots__ = ("_recent", "current")

    def __init__(self) -> None:
        self.current: dict[int, None] = {}
        self._recent: deque[dict[int, None]] = deque(maxlen=TOUCHED_ACKS - 1)

    def take(self) -> dict[int, None]:
        """The frames the next ACK reports first; starts the next ACK's interval."""
        touched = self.current
        merged = dict(touched)
        for older in self._recent:
            merged.update(older)
        self._recent.appendleft(touched)
        self.current = {}
        return merged

    def clear(self) -> None:
        self.current = {}
        self._recent.clear()


def pending_runs(
    partial: dict[int, PartialFrame], touched: dict[int, None], room: int
) -> list[tuple[int, int]]:
    """The ``pending`` ranges of an ACK, at most about ``room``, ascending.

    Newest first, like the acked list: older runs were reported before, and a sender that never
    hears of its newest segments counts them in flight past its window and cannot send the
    resends that would complete the older frames (a stall at 10 % loss).  But frames that got
    segments since the last ACK (``touched``) come first of all: a resend lands in an *old*
    frame, and a resend never reported is declared lost again by the sender.
    """
    runs: list[tuple[int, int]] = []
    for first in touched:
        frame = partial.get(first)
        if frame is not None and room > 0:
            held = frame.runs()[-room:]
            runs.extend(held)
            room -= len(held)
    for first, frame in reversed(partial.items()):
        if room <= 0:
            break
        if first in touched:
            continue
        newest = frame.runs()[-room:]
        runs.extend(newest)
        room -= len(newest)
    runs.sort()
    return runs


def gather_payloads(buf: np.ndarray, rows: np.ndarray, tail: np.ndarray, per: int) -> None:
    """Copy the payloads of a GRO batch (``rows``: full datagrams, header included; ``tail``:
    the last datagram's payload) back to back into ``buf``."""
    full = len(rows)
    buf[: full * per].reshape(full, per)[:] = rows[:, HEADER_SIZE:]
    buf[full * per : full * per + len(tail)] = tail


def layout_ok(header: Header, payload_len: int, max_frame: int) -> bool:
    """Whether a segment's header describes a frame this side could have been sent.

    Cheap checks before anything is held: the frame is not over the size bound, every segment
    would be non-empty, and this one has the length its index implies.
    """
    length, count = header.frame_length, header.segments
    if not 0 < length <= max_frame or count > length:
        return False
    if count == 1:  # a one-datagram frame (each small message's): its payload is all of it
        return payload_len == length
    per = segment_layout(length, count)
    last = length - (count - 1) * per
    if last <= 0:
        return False
    expected = last if header.segment == count - 1 else per
    return payload_len == expected


class _InMessage:
    __slots__ = (
        "body",
        "body_len",
        "high",
        "message_id",
        "meta",
        "meta_len",
        "received",
        "staged",
    )

    def __init__(self) -> None:
        self.meta: bytes | None = None
        self.meta_len = -1
        self.body_len = -1
        self.message_id = -1
        self.body: memoryview | None = None
        self.staged: list[tuple[int, bytes]] = []
        self.received = 0  # stream bytes (meta included) that arrived
        self.high = 0  # body bytes [0, high) may have been written: what retarget() copies


class _Channel:
    __slots__ = ("allocate_next", "deliver_next", "messages")

    def __init__(self) -> None:
        self.allocate_next = 0
        self.deliver_next = 0
        self.messages: dict[int, _InMessage] = {}


class Inbox:
    """Messages from one peer, assembled from authenticated DATA chunks."""

    def __init__(self, peer: int, allocate: Allocator, emit: Callable[[Event], None]) -> None:
        self._peer = peer
        self._allocate = allocate
        self._emit = emit
        self._channels: dict[int, _Channel] = {}
        self.staged_bytes = 0
        self.released = 0  # stream bytes placed in the caller's buffers: credit to hand back

    def on_chunk(self, chunk: DataChunk) -> None:
        """Take one chunk; raises :class:`FrameError` when it contradicts what came before."""
        channel, _, _, seq, message_id, offset, meta_len, body_len, data = chunk
        chan = self._channels.get(channel)
        if chan is None:
            chan = self._channels[channel] = _Channel()
        if seq < chan.deliver_next:
            raise FrameError(f"chunk of message {seq}, which was delivered already")
        if (
            not chan.messages
            and seq == chan.deliver_next
            and seq == chan.allocate_next
            and offset == 0
            and len(data) == meta_len + body_len
        ):
            # Fast path, a small message's usual case: all of it, next in line, nothing else
            # waiting in the channel.  What the general path does then (allocate, copy, deliver)
            # without the _InMessage and its staging copy (a test compares the two).
            meta = bytes(data[:meta_len])
            self.released += meta_len
            body = self._allocate(self._peer, channel, meta, body_len)
            if body.nbytes != body_len:
                raise ValueError(f"allocate returned {body.nbytes} bytes for a body of {body_len}")
            body = body.cast("B") if body.format != "B" or body.ndim != 1 else body
            if body_len:
                body[:] = data[meta_len:]
                self.released += body_len
            chan.allocate_next += 1
            chan.deliver_next += 1
            self._emit(MessageReceived(self._peer, channel, message_id, meta, body))
            return
        self._on_chunk_general(chunk, chan)

    def retarget(self, channel: int, body: memoryview) -> bool:
        """Write the rest of ``channel``'s next message to deliver into ``body`` (a buffer of its
        body's size) instead of the one its allocation returned, copying what arrived so far:
        a receive posted after its message began to arrive (the sender ran ahead while the
        receiver was busy) gets it in its own buffer, not in a pool buffer copied afterwards.
        False, changing nothing, if that message is not allocated yet or not this size."""
        chan = self._channels.get(channel)
        msg = None if chan is None else chan.messages.get(chan.deliver_next)
        if msg is None or msg.body is None or body.nbytes != msg.body_len:
            return False
        body = body.cast("B") if body.format != "B" or body.ndim != 1 else body
        high = msg.high
        if high:
            body[:high] = msg.body[:high]
        msg.body = body
        return True

    def _on_chunk_general(self, chunk: DataChunk, chan: _Channel | None = None) -> None:
        """:meth:`on_chunk` for any chunk (its fast path takes a whole message next in line)."""
        if chan is None:
            chan = self._channels.get(chunk.channel)
            if chan is None:
                chan = self._channels[chunk.channel] = _Channel()
            if chunk.seq < chan.deliver_next:
                raise FrameError(f"chunk of message {chunk.seq}, which was delivered already")
        msg = chan.messages.get(chunk.seq)
        if msg is None:
            msg = chan.messages[chunk.seq] = _InMessage()
        if msg.body_len < 0:
            msg.body_len, msg.meta_len, msg.message_id = (
                chunk.body_len,
                chunk.meta_len,
                chunk.message_id,
            )
        elif (msg.body_len, msg.meta_len, msg.message_id) != (
            chunk.body_len,
            chunk.meta_len,
            chunk.message_id,
        ):
            raise FrameError(f"chunks of message {chunk.seq} disagree about its size")
        n = len(chunk.data)
        if msg.received + n > msg.meta_len + msg.body_len:
            raise FrameError(f"message {chunk.seq} got more bytes than it has")
        msg.received += n
        offset, data = chunk.offset, chunk.data
        if offset == 0:
            msg.meta = bytes(data[: msg.meta_len])
            self.released += msg.meta_len
            offset, data = msg.meta_len, data[msg.meta_len :]
        if len(data):
            if msg.body is not None:
                at = offset - msg.meta_len
                end = at + len(data)
                msg.body[at:end] = data
                msg.high = end if end > msg.high else msg.high
                self.released += len(data)
            else:
                msg.staged.append((offset, bytes(data)))
                self.staged_bytes += len(data)
        if chunk.seq == chan.allocate_next or msg.received == msg.meta_len + msg.body_len:
            self._advance(chunk.channel, chan)

    def _advance(self, channel: int, chan: _Channel) -> None:
        # Allocate in FIFO order as metas become known, then deliver in FIFO order as messages
        # complete; a later message never overtakes an earlier one of the same channel.
        messages = chan.messages
        while True:
            msg = messages.get(chan.allocate_next)
            if msg is None or msg.meta is None:
                break
            body = self._allocate(self._peer, channel, msg.meta, msg.body_len)
            if body.nbytes != msg.body_len:
                raise ValueError(
                    f"allocate returned {body.nbytes} bytes for a body of {msg.body_len}"
                )
            body = body.cast("B") if body.format != "B" or body.ndim != 1 else body
            for offset, data in msg.staged:
                at = offset - msg.meta_len
                body[at : at + len(data)] = data
                msg.high = max(msg.high, at + len(data))
                self.staged_bytes -= len(data)
                self.released += len(data)
            msg.staged = []
            msg.body = body
            chan.allocate_next += 1
        while True:
            msg = messages.get(chan.deliver_next)
            if msg is None or msg.body is None or msg.received != msg.meta_len + msg.body_len:
                break
            del messages[chan.deliver_next]
            chan.deliver_next += 1
            assert msg.meta is not None
            self._emit(MessageReceived(self._peer, channel, msg.message_id, msg.meta, msg.body))
