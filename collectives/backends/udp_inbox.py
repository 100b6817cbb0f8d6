"""The receive side of the ``udp`` backend's IO driver: where message bodies land.

Split from :mod:`collectives.backends.udp_io` (whose module docstring describes the rules:
``_allocate`` runs once per message in FIFO order per ``(peer, channel)``, checks the codec
header before anything is allocated, and lands the body in a waiting receive's buffer, a pool
buffer or a fresh one).  :class:`Inbox` is a mixin of :class:`~collectives.backends.udp_io.Engine`:
everything here runs holding the engine's lock, except :meth:`Inbox.take` (which takes it, and
drives the engine while it waits) and :meth:`Inbox._hand_over`.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from collectives.backends.envelope import SIZE as ENVELOPE_SIZE
from collectives.backends.envelope import Envelope
from collectives.backends.p2p import lands_in
from collectives.backends.udp_cma import (
    ACK_CHANNEL,
    REFUSED,
    Far,
    ack_meta,
    failure,
    is_far,
    parse_ack,
    parse_far,
    read_far,
)
from collectives.backends.udp_pool import BufferPool
from collectives.codec import CodecOptions, Encoded, Header, alloc_buffer, check_header
from collectives.errors import (
    CodecError,
    CollectivesError,
    ConnectionLostError,
    RemoteProtocolError,
)
from collectives.transport.events import MessageReceived
from collectives.transport.frames import FrameError

if TYPE_CHECKING:
    from collectives.backends.shm_ring import Ring
    from collectives.deadline import Deadline
    from collectives.transport.endpoint import Endpoint

_POOL_MIN = 64 << 10  # smaller bodies are cheap to allocate: not pooled
# Distinct codec headers remembered as checked: a loop of ops repeats a handful of them, and a
# parse costs more than the rest of a small message's allocation.  Cleared when full.
_HEADER_CACHE = 64

_EMPTY = memoryview(bytearray(0))  # the core's body of a message with none
Key = tuple[int, int]  # (peer, channel)
Taken = tuple[Envelope, Encoded]


class Landing:
    """A waiting ``_take``'s own buffer, offered to the next message of its queue."""

    __slots__ = ("claimed", "into", "result")

    def __init__(self, into: memoryview) -> None:
        self.into = into
        self.claimed = False  # the core is writing the next message into it
        self.result: Taken | CollectivesError | None = None


@dataclass
class _Incoming:
    """A message the core allocated for and has not finished yet (kept in FIFO order)."""

    env: Envelope | None
    header: bytes
    checked: Header | None
    sizes: list[int]
    landing: Landing | None
    error: CollectivesError | None
    buffer: memoryview | None = None  # the pool buffer it was allocated, while it writes there
    far: Far | None = None  # a far message (udp_cma): its body is read from the sender
    dest: memoryview | None = None  # where a far message's body is read into


@dataclass
class _Queued:
    """A whole message waiting for its ``take``; ``pooled``: the pool buffer its body is in."""

    taken: Taken
    pooled: memoryview | None


class Inbox:
    """The engine's receive-side state and the core's allocator (a mixin of ``Engine``)."""

    lock: threading.Lock
    boxes: dict[Key, deque[_Queued | CollectivesError]]
    landings: dict[Key, Landing]
    _offered: dict[Key, Landing]
    counters: dict[str, int]
    _incoming: dict[Key, deque[_Incoming]]
    _pool: BufferPool
    ep: Endpoint
    _codec: Callable[[], CodecOptions]
    # header bytes -> (the options it was checked with, the parsed header: frozen, shareable)
    _headers: dict[bytes, tuple[CodecOptions, Header]]
    _held: bool
    _release_held: Callable[[], None]
    _drive: Callable[[Callable[[], bool], int, Deadline, str | None], None]
    clock: Callable[[], float]
    # Same-host messages (udp_cma): peer -> the pid this process may read; transfer id -> the
    # errno its receiver answered (None: no answer yet); whether an answer waits to be sent.
    cma_sources: dict[int, int]
    far_answers: dict[int, int | None]
    _urgent: bool
    shm_out: dict[int, Ring]  # same-host rings (udp_shm)
    _shm_send: Callable[[int, Ring, int, bytes, Sequence[memoryview]], int]

    def offer(self, offers: Sequence[tuple[int, int, memoryview]]) -> None:
        """Offer ``(src, channel, into)`` buffers ahead of their takes (which should pass the
        same ``into``): the next message of each queue lands in its buffer even while the
        caller still waits for another peer.  A gather takes one peer at a time; without this
        the messages of the peers not waited for yet went to pool buffers (a page fault per
        4 KiB written) and were copied into the caller's blocks afterwards: a 4-rank fan-in
        of 24 MB per rank cost the root 104 ms of CPU, 63 ms with this and a pool buffer per peer.
        Queues that already hold a whole message get no offer (FIFO: that one comes first);
        one that is arriving takes the rest of it (:meth:`_land_late`)."""
        with self.lock:
            for src, channel, into in offers:
                key = (src, channel)
                if key in self.landings or self.boxes.get(key):
                    continue
                landing = self._landing(key, into)
                if landing is not None:
                    self._offered[key] = landing

    def take(self, src: int, channel: int, dl: Deadline, into: memoryview | None) -> Taken:
        """The next message from ``src`` on ``channel`` (see ``P2PBackend._take``)."""
        key = (src, channel)
        with self.lock:
            if self._held:
                self._release_held()  # before any wait: the peer may need it to answer
            queue = self.boxes.setdefault(key, deque())
            # An offered buffer serves this take whatever ``into`` is: its message may be in it
            # already (the caller copies from it when it is not ``into``).
            landing = self._offered.pop(key, None)
            if landing is None and into is not None and not queue:
                landing = self._landing(key, into)

            def ready() -> bool:
                if landing is not None and landing.claimed:
                    # The body is landing in ``into``: it is this receive's message, ahead of
                    # anything queued meanwhile.
                    return landing.result is not None
                return bool(queue)

            try:
                self._drive(ready, src, dl, None)
            finally:
                if landing is not None and self.landings.get(key) is landing:
                    del self.landings[key]
            if landing is not None and landing.claimed:
                assert landing.result is not None
                return _unwrap(landing.result)
            item = queue.popleft()
        if isinstance(item, CollectivesError):
            raise item
        return self._hand_over(item, into)

    def has_message(self, src: int, channel: int) -> bool:
        """Whether a message from ``src`` on ``channel`` waits for its take."""
        with self.lock:
            offered = self._offered.get((src, channel))
            if offered is not None and offered.result is not None:
                return True  # landed in an offered buffer (see offer)
            return bool(self.boxes.get((src, channel)))

    def withdraw(self, keys: Sequence[tuple[int, int]]) -> None:
        """Drop the offers of :meth:`offer` whose ``take`` did not run (the op failed; like a
        timed-out receive's buffer, one already claimed may still be written until the
        communicator, which a failed op poisons, is aborted)."""
        with self.lock:
            for key in keys:
                landing = self._offered.pop(key, None)
                if landing is not None:
                    self._withdraw(key, landing)

    def _withdraw(self, key: Key, landing: Landing) -> None:
        if self.landings.get(key) is landing:
            del self.landings[key]  # unclaimed: later messages go to the pool again

    def _landing(self, key: Key, into: memoryview) -> Landing | None:
        """Where the next message of ``key`` (none queued whole) will land in ``into``: a
        landing its allocation claims, or the rest of one already arriving
        (:meth:`_land_late`; None when that one cannot land).  Holding the lock."""
        if self._incoming.get(key):
            return self._land_late(key, into)
        landing = self.landings[key] = Landing(into)
        return landing

    def _land_late(self, key: Key, into: memoryview) -> Landing | None:
        """A take posted after its message began to arrive in a pool buffer (the sender ran
        ahead while this rank was busy, often copying the previous message out of the pool):
        the rest of the body lands in ``into`` and the core copies the part that came, not
        :meth:`_hand_over` the whole body after it completed.  A 128 MiB broadcast loop at
        2 ranks copied every body once more that way.  Called holding the lock; None when
        the message is not one that can land (:meth:`_allocate`'s rules)."""
        incoming = self._incoming.get(key)
        if not incoming or self.boxes.get(key):
            return None
        item = incoming[0]
        if (
            item.landing is not None
            or item.error is not None
            or item.far is not None
            or len(item.sizes) != 1
            or item.sizes[0] != into.nbytes
            or not lands_in(item.header if item.checked is None else item.checked, into.nbytes)
            or not self.ep.retarget(key[0], key[1], into)
        ):
            return None
        if item.buffer is not None:
            self._pool.put(item.buffer)  # the core no longer writes it
            item.buffer = None
        item.landing = landing = Landing(into)
        landing.claimed = True
        self.counters["landed_late"] += 1
        return landing

    def _hand_over(self, item: _Queued, into: memoryview | None) -> Taken:
        """A queued message for a ``take`` (outside the lock): copied into ``into`` when it
        fits there, its pool buffer then reused."""
        env, msg = item.taken
        header = msg.header if msg.checked is None else msg.checked  # parsed once
        if into is not None and len(msg.buffers) == 1 and lands_in(header, into.nbytes):
            into[:] = msg.buffers[0]
            if item.pooled is not None:
                self._pool.put(item.pooled)
            self.counters["copied_in"] += 1
            return env, Encoded(msg.header, [into], msg.checked)
        if item.pooled is not None:
            self._pool.gone(item.pooled)  # the caller keeps it (decoded zero-copy)
        return item.taken

    def _allocate(self, peer: int, channel: int, meta: bytes, body_len: int) -> memoryview:
        """The core's allocator (called holding the lock; see the module docstring)."""
        if channel == ACK_CHANNEL:
            return _EMPTY  # an acknowledgement of a far message: all in its meta (_received)
        key = (peer, channel)
        incoming = self._incoming.setdefault(key, deque())
        codec = self._codec()
        item = _Incoming(None, b"", None, [], None, None)
        try:
            if is_far(meta):
                item.far = far = parse_far(meta, peer)
                meta = far.meta
                if peer not in self.cma_sources or body_len:
                    raise RemoteProtocolError(
                        f"rank {peer} sent a same-host message, but it was not found readable "
                        "when the world formed"
                    )
            item.env = Envelope.unpack_from(meta, src=peer)
            item.header = header = bytes(meta[ENVELOPE_SIZE:])
            item.checked = checked_header(self._headers, header, codec)
            item.sizes = item.checked.wire_sizes
            if item.far is None and sum(item.sizes) != body_len:
                raise RemoteProtocolError(
                    f"rank {peer} sent a {body_len}-byte body but its codec header announces "
                    f"{sum(item.sizes)} bytes"
                )
        except CollectivesError as err:
            if body_len > codec.max_message_bytes:
                # Not even drained: the core drops the session as a protocol breach.
                raise FrameError(f"rank {peer}: {err}") from None
            item.error = err
        # A far message's body is read in _received, into what is chosen here as for any other.
        nbytes = body_len if item.far is None or item.error is not None else sum(item.sizes)
        body = self._destination(key, item, incoming, nbytes)
        if item.far is None:
            return body
        item.dest = body
        return _EMPTY

    def _destination(
        self, key: Key, item: _Incoming, incoming: deque[_Incoming], nbytes: int
    ) -> memoryview:
        """Where ``item``'s body of ``nbytes`` goes (queued in ``incoming``, holding the lock)."""
        landing = self.landings.get(key)
        if (
            item.error is None
            and landing is not None
            and not landing.claimed
            and not incoming
            and not self.boxes.get(key)
            and len(item.sizes) == 1
            and landing.into.nbytes == nbytes
            and lands_in(item.header if item.checked is None else item.checked, nbytes)
        ):
            landing.claimed = True
            del self.landings[key]
            item.landing = landing
            incoming.append(item)
            self.counters["landed"] += 1
            return landing.into
        incoming.append(item)
        if nbytes < _POOL_MIN or item.error is not None:
            return alloc_buffer(nbytes)
        item.buffer = self._pool.get(nbytes)
        return item.buffer

    def _read_far(self, peer: int, item: _Incoming) -> CollectivesError | None:
        """Copy a far message's body out of ``peer`` and answer it (holding the lock); the
        error its receive gets instead, if any."""
        far = item.far
        assert far is not None
        error, code = item.error, REFUSED
        if error is None:
            assert item.dest is not None
            try:
                read_far(self.cma_sources[peer], far, item.sizes, item.dest)
                code = 0
                self.counters["far_read"] += 1
            except OSError as err:
                code = err.errno or REFUSED
                error = ConnectionLostError(failure(peer, code), [peer])
        try:
            ring = self.shm_out.get(peer)
            if ring is not None:  # the message came through the ring (udp_shm): so does this
                self._shm_send(peer, ring, ACK_CHANNEL, ack_meta(far.xfer, code), ())
            else:
                self.ep.send(peer, ACK_CHANNEL, ack_meta(far.xfer, code), [], self.clock())
                self._urgent = True  # the sender waits for it: out this turn, not the next
        except CollectivesError:
            pass  # the peer is gone: nobody waits for the answer
        return error

    def _received(self, event: MessageReceived) -> None:
        if event.channel == ACK_CHANNEL:
            answer = parse_ack(event.meta)
            if answer is not None and answer[0] in self.far_answers:
                self.far_answers[answer[0]] = answer[1]  # anything else is dropped: not ours
            return
        key = (event.peer, event.channel)
        incoming = self._incoming.get(key)
        if not incoming:  # the core skipped our allocator: never, unless it is broken
            self.boxes.setdefault(key, deque()).append(
                RemoteProtocolError(f"rank {event.peer}: a message arrived without its meta")
            )
            return
        item = incoming.popleft()
        body = event.body
        if item.far is not None:
            item.error = self._read_far(event.peer, item)
            assert item.dest is not None  # _allocate gives every far message one
            body = item.dest
            if item.error is not None and item.buffer is not None:
                self._pool.put(item.buffer)
        result: _Queued | CollectivesError
        if item.error is not None or item.env is None:
            result = item.error or CodecError(f"malformed message from rank {event.peer}")
        else:
            buffers: list[memoryview]
            if item.landing is not None:
                # The receive's own view, not a slice of the body: ``p2p.place_block`` knows a
                # block is in place (no decode) by identity, and a slice is a new object (every
                # small landed receive was decoded again).  Landing needs exactly one buffer.
                buffers = [item.landing.into]
            elif len(item.sizes) == 1:
                buffers = [body]
            else:
                buffers = split_body(body, item.sizes)
            taken = (item.env, Encoded(item.header, buffers, item.checked))
            result = _Queued(taken, pooled=item.buffer)
        if item.landing is not None:
            item.landing.result = result if isinstance(result, CollectivesError) else result.taken
        else:
            self.boxes.setdefault(key, deque()).append(result)


def checked_header(
    cache: dict[bytes, tuple[CodecOptions, Header]], header: bytes, codec: CodecOptions
) -> Header:
    """``header`` checked against ``codec`` (:func:`check_header`), remembered in ``cache``:
    the same bytes pass the same options' check again (a loop of ops repeats a handful of
    headers, and a parse costs more than the rest of a small message's allocation)."""
    known = cache.get(header)
    if known is not None and known[0] is codec:
        return known[1]
    checked = check_header(header, codec)
    if len(cache) >= _HEADER_CACHE:
        cache.clear()
    cache[header] = (codec, checked)
    return checked


def split_body(body: memoryview, sizes: Sequence[int]) -> list[memoryview]:
    """``body`` cut into the buffers of ``sizes`` (a codec header's ``wire_sizes``)."""
    buffers, offset = [], 0
    for size in sizes:
        buffers.append(body[offset : offset + size])
        offset += size
    return buffers


def _unwrap(item: Taken | CollectivesError) -> Taken:
    if isinstance(item, CollectivesError):
        raise item
    return item


__all__ = ["Inbox", "Key", "Landing", "Taken"]
