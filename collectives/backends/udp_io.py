"""The IO driver of the ``udp`` backend: one thread per communicator around the sans-IO core.

Who runs what:

* The **IO thread** owns the socket's receive side and the clock: it polls the socket and a
  wakeup pipe, feeds every datagram to ``Endpoint.receive``, calls ``handle_timer`` when
  ``get_timer()`` is due (retransmissions, ACKs, pacing, heartbeats: they go on while nobody
  calls in), turns the core's events into mailbox entries and wakes the waiting callers.
* A **posting caller** queues its message and sends what the core lets out at once, from its
  own thread: the hot send path has no thread hand-off.  It wakes the IO thread only when the
  core's timer moved earlier than the thread's sleep.

Every touch of the core happens under one lock (the core is not thread-safe); syscalls that
may wait (``poll``) and reads (``recvmsg``) happen outside it.  Sends run under it, so the order
the core emits datagrams in is the order they leave in.

Receiving: the core calls :meth:`Engine._allocate` once per message, in FIFO order per
``(peer, channel)``, when its meta is complete.  The codec header in the meta is checked there
(:func:`collectives.codec.check_header` with the receiver's options) before anything is
allocated, and the body goes straight into a waiting ``_take``'s buffer when it is that
receive's next message and :func:`~collectives.backends.p2p.lands_in` says it fits; otherwise
into a fresh :func:`~collectives.codec.alloc_buffer`.  A message whose meta is malformed still
drains (the bytes are the peer's credit) into a scratch buffer and is handed to ``_take`` as
the :class:`RemoteProtocolError` it is; one that also announces more than
``max_message_bytes`` makes the allocator raise the core's ``FrameError``: the core then drops
that peer's session as a protocol breach (``PeerLost``) and nothing is allocated.

A buffer handed to a landing that then times out may still be written until the communicator is
aborted (an op that timed out is fatal to the communicator, so nobody reads it meanwhile).
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import select
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from collectives.backends.envelope import SIZE as ENVELOPE_SIZE
from collectives.backends.envelope import Envelope
from collectives.backends.p2p import lands_in
from collectives.codec import CodecOptions, Encoded, Header, alloc_buffer, check_header
from collectives.errors import (
    CodecError,
    CollectivesError,
    CommunicatorAbortedError,
    ConnectionLostError,
    RemoteProtocolError,
    RendezvousTimeoutError,
)
from collectives.transport.events import (
    MessageReceived,
    MessageSent,
    PeerAddressChanged,
    PeerConnected,
    PeerLost,
)
from collectives.transport.frames import FrameError

if TYPE_CHECKING:
    from collectives.backends.udp_socket import Address, UdpSocket
    from collectives.deadline import Deadline
    from collectives.transport.endpoint import Endpoint

log = logging.getLogger(__name__)

_READS_PER_ROUND = 64  # datagrams read before the core gets them: one lock round per batch
_IDLE_POLL_S = 1.0  # the longest poll without a timer (a lost wakeup costs at most this)
_FINE_TIMER_S = 0.002  # below this a timer is waited for with sleep(), not poll()

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


class Engine:
    """Drives one :class:`Endpoint` over one :class:`UdpSocket` (see the module docstring)."""

    def __init__(
        self,
        sock: UdpSocket,
        make_endpoint: Callable[[Callable[[int, int, bytes, int], memoryview]], Endpoint],
        *,
        rank: int,
        size: int,
        codec: Callable[[], CodecOptions],
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.sock = sock
        self.rank = rank
        self.size = size
        self._codec = codec
        self.clock = clock
        self.lock = threading.Lock()
        self.cond = threading.Condition(self.lock)
        self.boxes: dict[Key, deque[Taken | CollectivesError]] = {}
        self._incoming: dict[Key, deque[_Incoming]] = {}
        self.landings: dict[Key, Landing] = {}
        self.outstanding: dict[int, set[int]] = {p: set() for p in range(size) if p != rank}
        self.connected: set[int] = set()
        self.lost: dict[int, str] = {}
        self.aborted: str | None = None
        self.closed = False
        self._stopping = False
        self._unsent: deque[tuple[Address, memoryview, int]] = deque()
        self.counters = {
            "send_blocked": 0,
            "reads": 0,
            "wakeups": 0,
            "address_changes": 0,
            "landed": 0,  # messages written straight into a waiting receive's buffer
        }
        self._sleep_until = math.inf
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)
        self.ep = make_endpoint(self._allocate)
        self._thread = threading.Thread(target=self._run, name=f"udp-io-{rank}", daemon=True)
        self._thread.start()

    # -- the caller side -------------------------------------------------------------------------
    def send(self, peer: int, channel: int, meta: bytes, body: Sequence[memoryview]) -> int:
        """Queue one message and send what may leave now; its id (see :meth:`wait_sent`)."""
        with self.lock:
            self.check_usable(peer, "send")
            now = self.clock()
            mid = self.ep.send(peer, channel, meta, body, now)
            self.outstanding[peer].add(mid)
            self._pump(now)
            timer = self.ep.get_timer()
        if timer is not None and timer < self._sleep_until:
            self.wake()
        return mid

    def wait_sent(self, peer: int, mid: int, dl: Deadline) -> None:
        """Wait (within ``dl``) until the core is done with message ``mid``'s buffers."""
        with self.lock:
            while mid in self.outstanding[peer]:
                self.check_usable(peer, dl.op)
                remaining = dl.remaining()
                if remaining <= 0:
                    raise dl.error([peer], "the peer did not acknowledge the data")
                self.cond.wait(remaining)

    def take(self, src: int, channel: int, dl: Deadline, into: memoryview | None) -> Taken:
        """The next message from ``src`` on ``channel`` (see ``P2PBackend._take``)."""
        key = (src, channel)
        with self.lock:
            queue = self.boxes.setdefault(key, deque())
            landing = None
            if into is not None and not queue and not self._incoming.get(key):
                landing = self.landings[key] = Landing(into)
            try:
                while True:
                    if landing is not None and landing.claimed:
                        # The body is landing in ``into``: it is this receive's message, ahead
                        # of anything queued meanwhile.
                        if landing.result is not None:
                            return _unwrap(landing.result)
                    elif queue:
                        return _unwrap(queue.popleft())
                    self._check_alive(src, dl.op, waiting=True)
                    remaining = dl.remaining()
                    if remaining <= 0:
                        raise dl.error([src])
                    self.cond.wait(remaining)
            finally:
                if landing is not None and self.landings.get(key) is landing:
                    del self.landings[key]

    def has_message(self, src: int, channel: int) -> bool:
        with self.lock:
            return bool(self.boxes.get((src, channel)))

    def wait_connected(self, deadline: float, timeout: float) -> None:
        """Wait until the handshake with every peer is done; name the ones that never answer."""
        peers = set(self.outstanding)
        with self.lock:
            while not peers <= self.connected:
                if self.lost:
                    peer, reason = next(iter(self.lost.items()))
                    raise ConnectionLostError(
                        f"udp backend on rank {self.rank}: rank {peer} was lost while connecting "
                        f"({reason})",
                        ranks=self.lost,
                    )
                remaining = deadline - self.clock()
                if remaining <= 0:
                    missing = sorted(peers - self.connected)
                    raise RendezvousTimeoutError(
                        f"udp backend on rank {self.rank}: no handshake with rank(s) "
                        f"{', '.join(map(str, missing))} after {timeout:g} s: are they running, "
                        "with the same cluster key (COMFY_CLUSTER_KEY), and is UDP open between "
                        "the hosts?"
                    )
                self.cond.wait(min(remaining, 0.25))

    def check_usable(self, peer: int, op: str) -> None:
        """Raise the error a new op towards ``peer`` gets now (call holding the lock)."""
        if self.aborted is not None:
            raise CommunicatorAbortedError(f"rank {self.rank} was aborted: {self.aborted}")
        if self.closed:
            raise CommunicatorAbortedError(f"rank {self.rank}: the udp communicator is closed")
        if peer in self.lost:
            raise ConnectionLostError(
                f"{op} on rank {self.rank}: rank {peer} is gone ({self.lost[peer]})", ranks=(peer,)
            )

    def _check_alive(self, peer: int, op: str, *, waiting: bool) -> None:
        self.check_usable(peer, op)

    # -- lifetime --------------------------------------------------------------------------------
    def abort(self, reason: str) -> None:
        with self.lock:
            if self.aborted is not None or self.closed:
                return
            self.aborted = reason
            now = self.clock()
            with contextlib.suppress(Exception):
                self.ep.abort(reason, now)
                self._pump(now)
            self.cond.notify_all()

    def close(self, linger: float) -> None:
        """Let sent messages be acknowledged (up to ``linger`` s), say CLOSE, stop the thread.
        Idempotent."""
        with self.lock:
            if self.closed:
                return
            end = self.clock() + linger
            while self.aborted is None and self._unacknowledged():
                remaining = end - self.clock()
                if remaining <= 0:
                    log.info("udp rank %d: closing with unacknowledged messages", self.rank)
                    break
                self.cond.wait(remaining)
            self.closed = True
            if self.aborted is None:
                now = self.clock()
                with contextlib.suppress(Exception):
                    self.ep.close(now)
                    self._pump(now)
            self._stopping = True
            self.cond.notify_all()
        self.wake()
        if self._thread is not threading.current_thread():
            self._thread.join(timeout=5.0)
        self.sock.close()
        for fd in (self._wake_r, self._wake_w):
            with contextlib.suppress(OSError):
                os.close(fd)

    def _unacknowledged(self) -> bool:
        return any(ids for peer, ids in self.outstanding.items() if peer not in self.lost)

    def wake(self) -> None:
        with contextlib.suppress(OSError):
            os.write(self._wake_w, b"\0")

    def stats(self) -> dict[str, Any]:
        with self.lock:
            out: dict[str, Any] = dict(self.ep.stats())
            out.update(self.counters)
        info = self.sock.info
        out.update(
            rcvbuf=info.rcvbuf, sndbuf=info.sndbuf, gso=info.gso, gro=info.gro,
            max_datagram=info.max_datagram,
        )  # fmt: skip
        return out

    # -- the IO thread ---------------------------------------------------------------------------
    def _run(self) -> None:
        poller = select.poll()
        poller.register(self._wake_r, select.POLLIN)
        sock_fd = self.sock.fileno()
        poller.register(sock_fd, select.POLLIN)
        writing = False
        busy = False
        try:
            while True:
                with self.lock:
                    if self._stopping:
                        return
                    timer = self.ep.get_timer()
                    now = self.clock()
                    wait = _IDLE_POLL_S if timer is None else min(max(timer - now, 0.0), 1.0)
                    self._sleep_until = now + wait
                    want_write = bool(self._unsent)
                if want_write != writing:
                    writing = want_write
                    mask = select.POLLIN | (select.POLLOUT if writing else 0)
                    poller.modify(sock_fd, mask)
                if busy:
                    ready = poller.poll(0)
                elif wait < _FINE_TIMER_S:
                    # poll() counts whole milliseconds; a pacing gap is often tens of µs.
                    ready = poller.poll(0)
                    if not ready and wait > 0:
                        time.sleep(wait)
                else:
                    ready = poller.poll(math.floor(wait * 1000))
                if any(fd == self._wake_r for fd, _ in ready):
                    self.counters["wakeups"] += 1
                    with contextlib.suppress(OSError):
                        os.read(self._wake_r, 4096)
                reads = self.sock.receive(_READS_PER_ROUND)
                busy = len(reads) == _READS_PER_ROUND
                with self.lock:
                    self._sleep_until = -math.inf  # awake: callers need not wake us
                    if self._stopping:
                        return
                    now = self.clock()
                    for data, addr, segment in reads:
                        self.ep.receive(data, addr, now, segment)
                    self.counters["reads"] += len(reads)
                    timer = self.ep.get_timer()
                    if timer is not None and timer <= now:
                        self.ep.handle_timer(now)
                    self._pump(now)
        except Exception as err:  # the core or the socket broke: fail every waiter, loudly
            log.exception("udp rank %d: the IO thread failed", self.rank)
            with self.lock:
                self.aborted = self.aborted or f"the udp IO thread failed: {err!r}"
                self.cond.notify_all()

    def _pump(self, now: float) -> None:
        """Hand out the core's events, then send what it lets out (holding the lock)."""
        ep = self.ep
        notify = False
        while (event := ep.next_event()) is not None:
            notify = True
            if isinstance(event, MessageReceived):
                self._received(event)
            elif isinstance(event, MessageSent):
                self.outstanding[event.peer].discard(event.message_id)
            elif isinstance(event, PeerConnected):
                self.connected.add(event.peer)
            elif isinstance(event, PeerLost):
                self.lost.setdefault(event.peer, event.reason)
                log.info("udp rank %d: rank %d lost (%s)", self.rank, event.peer, event.reason)
            elif isinstance(event, PeerAddressChanged):
                self.counters["address_changes"] += 1
                log.info("udp rank %d: rank %d moved %s -> %s", self.rank, event.peer,
                         event.old, event.new)  # fmt: skip
        if notify:
            self.cond.notify_all()
        self._send_out(now)

    def _send_out(self, now: float) -> None:
        unsent = self._unsent
        while unsent:
            addr, payload, segment = unsent[0]
            done = self.sock.send_batch(addr, payload, segment)
            if done < payload.nbytes:
                unsent[0] = (addr, payload[done:], segment)
                self.counters["send_blocked"] += 1
                return
            unsent.popleft()
        for addr, data, segment in self.ep.datagrams_to_send(now):
            view = memoryview(data)
            if unsent:
                unsent.append((addr, view, segment))
                continue
            done = self.sock.send_batch(addr, view, segment)
            if done < view.nbytes:
                unsent.append((addr, view[done:], segment))
                self.counters["send_blocked"] += 1

    # -- receiving -------------------------------------------------------------------------------
    def _allocate(self, peer: int, channel: int, meta: bytes, body_len: int) -> memoryview:
        """The core's allocator (called holding the lock; see the module docstring)."""
        key = (peer, channel)
        incoming = self._incoming.setdefault(key, deque())
        codec = self._codec()
        item = _Incoming(None, b"", None, [], None, None)
        try:
            item.env = Envelope.unpack_from(meta, src=peer)
            item.header = bytes(meta[ENVELOPE_SIZE:])
            item.checked = check_header(item.header, codec)
            item.sizes = item.checked.wire_sizes
            if sum(item.sizes) != body_len:
                raise RemoteProtocolError(
                    f"rank {peer} sent a {body_len}-byte body but its codec header announces "
                    f"{sum(item.sizes)} bytes"
                )
        except CollectivesError as err:
            if body_len > codec.max_message_bytes:
                # Not even drained: the core drops the session as a protocol breach.
                raise FrameError(f"rank {peer}: {err}") from None
            item.error = err
        landing = self.landings.get(key)
        if (
            item.error is None
            and landing is not None
            and not landing.claimed
            and not incoming
            and not self.boxes.get(key)
            and len(item.sizes) == 1
            and landing.into.nbytes == body_len
            and lands_in(item.header, body_len)
        ):
            landing.claimed = True
            del self.landings[key]
            item.landing = landing
            incoming.append(item)
            self.counters["landed"] += 1
            return landing.into
        incoming.append(item)
        return alloc_buffer(body_len)

    def _received(self, event: MessageReceived) -> None:
        key = (event.peer, event.channel)
        incoming = self._incoming.get(key)
        if not incoming:  # the core skipped our allocator: never, unless it is broken
            self.boxes.setdefault(key, deque()).append(
                RemoteProtocolError(f"rank {event.peer}: a message arrived without its meta")
            )
            return
        item = incoming.popleft()
        result: Taken | CollectivesError
        if item.error is not None or item.env is None:
            result = item.error or CodecError(f"malformed message from rank {event.peer}")
        else:
            buffers, offset = [], 0
            for size in item.sizes:
                buffers.append(event.body[offset : offset + size])
                offset += size
            result = (item.env, Encoded(item.header, buffers, item.checked))
        if item.landing is not None:
            item.landing.result = result
        else:
            self.boxes.setdefault(key, deque()).append(result)


def _unwrap(item: Taken | CollectivesError) -> Taken:
    if isinstance(item, CollectivesError):
        raise item
    return item


__all__ = ["Engine", "Landing"]
