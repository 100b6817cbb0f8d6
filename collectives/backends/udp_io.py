"""The IO driver of the ``udp`` backend: a progress engine around the sans-IO core.

Who runs what (a *turn*: feed every datagram the socket has to ``Endpoint.receive``, run
``handle_timer`` when due, hand out the core's events, send what it lets out):

* A **waiting caller** (a ``take``, or a post waiting for its acknowledgement) drives the
  engine itself: it takes turns, and between them waits in ``select`` on the socket, bounded by
  the core's timer and its own deadline.  The message it waits for is read, decrypted and handed
  over by its own thread: no thread hand-off on the hot path (a condition variable hand-off
  costs 10-25 us, a wakeup of a sleeping IO thread more).  When several callers wait, one polls
  (the *poller*) and wakes the rest when events come; the next takes over when it leaves.
* A **posting caller** queues its message and sends what the core lets out at once, from its
  own thread.  It wakes whoever waits in ``select`` only when the core's timer moved earlier.
* The **IO thread** takes turns only while no caller waits (ACKs, resends, heartbeats, pacing
  go on while nobody calls in).  While callers drive it sleeps (without the engine's lock) and
  looks again every :data:`_IO_GRACE_S`: nobody wakes it per op (a wakeup and the GIL cost
  more than a small op).  A drive that outlasts the grace (a large transfer) parks it until
  the last caller leaves, who wakes it: one wakeup per drive, not one per grace.
* A wait that a turn satisfies leaves the core's output unasked for (see ``Engine._turn``).

One lock guards the core (it is not thread-safe); ``select`` is the only syscall made without
it, so datagrams leave in the order the core emits them.  Waits (a bounded poll, then
``select``: :mod:`~collectives.backends.udp_wait`) run with 1 us timer slack on the driving
threads.

Receiving (in :mod:`~collectives.backends.udp_inbox`): the core calls ``Engine._allocate`` once
per message, in FIFO order per ``(peer, channel)``, when its meta is complete.  The codec header
in the meta is checked there (:func:`collectives.codec.check_header` with the receiver's
options) before anything is allocated, and the body goes straight into a waiting ``_take``'s
buffer when it is that receive's next message and :func:`~collectives.backends.p2p.lands_in`
says it fits, or in a buffer offered ahead of its take (:meth:`Engine.offer`, a fan-in's
blocks); otherwise into a pool buffer (large) or a fresh one; a receive with a buffer that
comes later gets a copy (memcpy: a tenth of the cost of first-touch page faults) and the pool
its buffer back.  A message
whose meta is malformed still drains (the bytes are the peer's credit) into a scratch buffer and
is handed to ``_take`` as the :class:`RemoteProtocolError` it is; one that also announces more
than ``max_message_bytes`` makes the allocator raise the core's ``FrameError``: the core then
drops that peer's session as a protocol breach (``PeerLost``) and nothing is allocated.

A landing buffer whose receive timed out may still be written until the communicator is aborted
(a timed-out op is fatal to the communicator, so nobody reads it meanwhile).
"""

from __future__ import annotations

import contextlib
import logging
import math
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

from collectives.backends.udp_cma import FarSender
from collectives.backends.udp_health import PEER_CLOSED, Health
from collectives.backends.udp_inbox import Inbox, Key, Landing, _Incoming, _Queued
from collectives.backends.udp_pool import BufferPool
from collectives.backends.udp_shm import ShmLinks
from collectives.backends.udp_socket import RECV_BYTES, fine_timer_slack
from collectives.backends.udp_wait import Waits
from collectives.codec import CodecOptions, Header
from collectives.errors import (
    CollectivesError,
    CommunicatorAbortedError,
)
from collectives.transport.events import (
    MessageFramed,
    MessageReceived,
    MessageSent,
    PeerAddressChanged,
    PeerConnected,
    PeerLost,
)

if TYPE_CHECKING:
    from collectives.backends.udp_nat import NatDriver
    from collectives.backends.udp_socket import Address, UdpSocket
    from collectives.deadline import Deadline
    from collectives.transport.endpoint import Endpoint

log = logging.getLogger(__name__)

_READS_PER_TURN = 64  # reads fed to the core before its timers and sends get a look-in
_IDLE_WAIT_S = 1.0  # the longest wait without a timer (a lost wakeup costs at most this)
_IO_GRACE_S = 0.002  # how long the IO thread leaves the socket to callers after the last one
_BUSY_S = 1.0  # a rank that posted or read within this is busy (see _run)
_REFILL_QUIET_S = 0.01  # refill the buffer pool only after this long without traffic
_tuned = threading.local()


class Engine(Inbox, FarSender, Health, Waits, ShmLinks):
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
        nat: NatDriver | None = None,
    ) -> None:
        self.sock = sock
        self.nat = nat  # ``stun`` discovery: relay, probes, STUN between the core and the socket
        self.rank = rank
        self.size = size
        self._codec = codec
        self.clock = clock
        self.lock = threading.Lock()
        self.cond = threading.Condition(self.lock)  # callers: events came, or the poller left
        self._io_cond = threading.Condition(self.lock)  # the IO thread: no caller drives now
        self.boxes: dict[Key, deque[_Queued | CollectivesError]] = {}
        self._incoming: dict[Key, deque[_Incoming]] = {}
        self.landings: dict[Key, Landing] = {}
        self._offered: dict[Key, Landing] = {}  # see Inbox.offer
        self.outstanding: dict[int, set[int]] = {p: set() for p in range(size) if p != rank}
        self.unframed: dict[int, set[int]] = {p: set() for p in range(size) if p != rank}
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
            "landed_late": 0,  # taken after they began to arrive: the rest landed (_land_late)
            "copied_in": 0,  # messages copied into a receive's buffer that came later
            "refilled": 0,  # pool buffers replaced while quiet (udp_pool)
            "caller_turns": 0,  # turns taken by waiting callers
            "io_turns": 0,  # turns taken by the IO thread
            "far_sent": 0,  # same-host messages whose body the receiver copied (udp_cma)
            "far_read": 0,  # same-host messages copied out of their sender
        }
        self._init_shm()  # rings to ranks of this host (udp_shm), set when the world formed
        self.cma_sources: dict[int, int] = {}  # set by UdpBackend when the world formed
        self.cma_readers: frozenset[int] = frozenset()
        self.far_answers: dict[int, int | None] = {}
        self._xfers = 0
        self._urgent = False  # an answer to a far message waits to be sent (see _turn)
        self._pool = BufferPool(per_size=max(2, size - 1))  # one per peer: see BufferPool
        self._headers: dict[bytes, tuple[CodecOptions, Header]] = {}
        self._rbuf = bytearray(RECV_BYTES + 1)
        self._rview = memoryview(self._rbuf)
        self._drivers = 0  # callers inside _drive
        self._poller = False  # a caller is taking turns (the others wait on ``cond``)
        # When the thread in ``select`` will wake by itself (-inf: nobody is in select), so a
        # poster knows whether an earlier timer needs a wakeup.
        self._poll_until = -math.inf
        self._io_until = -math.inf
        self._init_waits(sock.fileno(), sock.address[0], size)
        # The core's timer as of its last input (every touch of the core ends by reading it).
        self._timer: float | None = -math.inf  # -inf: not asked yet (a first turn asks)
        self._last_active = -math.inf  # when this rank last posted or read
        self._drops_logged = 0  # refused datagrams already reported in the log
        self._drops_next = 0.0  # when the log may next report them
        self._held = False  # a ``hold`` send is queued in the core and not pumped yet
        self._unpumped = False  # the core was fed and not asked for output since (see _turn)
        self._drive_gen = 0  # counts the times callers started driving (see _run)
        self._io_deep = False  # the IO thread is parked until the last driver leaves
        self.ep = make_endpoint(self._allocate)
        self._thread = threading.Thread(target=self._run, name=f"udp-io-{rank}", daemon=True)
        self._thread.start()

    # -- the caller side -------------------------------------------------------------------------
    def send(
        self,
        peer: int,
        channel: int,
        meta: bytes,
        body: Sequence[memoryview],
        *,
        borrowed: bool = False,
        hold: bool = False,
    ) -> int:
        """Queue one message and send what may leave now; its id.  ``borrowed``: ``body`` is the
        caller's, who must wait with :meth:`wait_framed` before reusing it.  ``hold``: leave it
        queued in the core until the next send, take, :meth:`flush` or IO turn (see
        ``P2PBackend._post_soon``)."""
        with self.lock:
            self.check_usable(peer, "send")
            ring = self.shm_out.get(peer)
            if ring is not None:  # a rank of this host (udp_shm): no seal, no socket
                self._last_active = self.clock()
                return self._shm_send(peer, ring, channel, meta, body)
            now = self.clock()
            # Every message reports when it is sealed, not only a borrowed one (whose caller
            # waits for that): _turn needs to know that nothing of ours waits to be sealed.
            mid = self.ep.send(peer, channel, meta, body, now, notify_framed=True)
            self.outstanding[peer].add(mid)
            self.unframed[peer].add(mid)
            if hold and not borrowed:
                self._held = True
                return mid
            self._release_held()  # pumps the new message (and anything held)
        return mid

    def flush(self) -> None:
        """Send what a ``hold`` send (or a satisfied wait, see :meth:`_turn`) left queued."""
        with self.lock:
            if self._held or self._unpumped:
                self._release_held()

    def _release_held(self) -> None:
        """Pump what ``hold`` sends queued; wake whoever must see an earlier timer (holding
        the lock)."""
        now = self.clock()
        self._pump(now)
        self._last_active = now
        timer = self._timer = self._next_timer()
        if timer is not None and timer < self._wake_at():
            self.wake()

    def _wake_at(self) -> float:
        """When the thread that takes the next turn wakes by itself (holding the lock)."""
        if self._poller:
            return self._poll_until
        return self._io_until if self._drivers == 0 else -math.inf

    def wait_framed(self, peer: int, mid: int, dl: Deadline) -> None:
        """Wait (within ``dl``) until the core is done with the buffers of message ``mid``
        (sent ``borrowed``): every byte is sealed into frames, which resends use."""
        unframed = self.unframed[peer]

        def done() -> bool:
            return mid not in unframed or self.lost.get(peer, "").startswith(PEER_CLOSED)

        with self.lock:
            self._drive(done, peer, dl, "the peer did not open its window")

    def wait_sent(self, peer: int, mid: int, dl: Deadline) -> None:
        """Wait (within ``dl``) until message ``mid`` is acknowledged."""
        outstanding = self.outstanding[peer]

        def done() -> bool:
            # A peer that closed (not aborted) took what it wanted: the core stopped sending to
            # it, so the buffers are free, and the post was eager anyway.  Its CLOSE can overtake
            # the ACK of our last bytes, after it took the message they carried.
            return mid not in outstanding or self.lost.get(peer, "").startswith(PEER_CLOSED)

        with self.lock:
            self._drive(done, peer, dl, "the peer did not acknowledge")

    def _drive(
        self,
        ready: Callable[[], bool],
        peer: int,
        dl: Deadline,
        what: str | None,
    ) -> None:
        """Make progress until ``ready()`` (holding the lock; see the module docstring): take
        turns as the poller, or wait for the one who is.  Raises at ``dl``, when ``peer`` is
        lost, on abort and close."""
        if not getattr(_tuned, "done", False):
            _tuned.done = True
            fine_timer_slack()
        self._drivers += 1
        if self._drivers == 1:
            self._drive_gen += 1
        spin_until = self.clock() + self._spin_s
        try:
            while not ready():
                self.check_usable(peer, dl.op)
                remaining = dl.remaining()
                if remaining <= 0:
                    raise dl.error([peer]) if what is None else dl.error([peer], what)
                if self._poller:
                    self.cond.wait(remaining)  # another thread polls: its turns notify
                    continue
                self._poller = True
                try:
                    self.counters["caller_turns"] += 1
                    if self._turn(ready) or ready():
                        continue  # more to read, or done: no wait
                    timer = self._timer
                    if self._spin(spin_until if timer is None else min(spin_until, timer)):
                        continue
                    until = self.clock() + min(remaining, _IDLE_WAIT_S)
                    self._poll_until = until if timer is None else min(until, timer)
                    self._block(self._poll_until)
                finally:
                    self._poll_until = -math.inf
                    self._poller = False
        except CollectivesError:
            raise
        except Exception as err:  # the core or the socket broke: fail every waiter, loudly
            self._failed(err)
            raise CommunicatorAbortedError(f"rank {self.rank}: {self.aborted}") from err
        finally:
            self._drivers -= 1
            if self._drivers:
                self.cond.notify_all()  # one of the others becomes the poller
            elif self._io_deep:
                self._io_cond.notify()  # the IO thread waited out a long drive: its turn now
            elif self._unpumped and self._io_until > self.clock() + _IO_GRACE_S:
                self.wake()  # output left for the IO thread, asleep in select: not that long

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
                self._timer = self._next_timer()
            self.cond.notify_all()
        self.wake()  # a poller in select sees the abort at once

    def close(self, linger: float) -> None:
        """Let sent messages be acknowledged (up to ``linger`` s), say CLOSE, stop the thread.
        Idempotent."""
        with self.lock:
            if self.closed:
                return
            end = self.clock() + linger
            if self.aborted is None:  # small frames are acknowledged late unless asked for
                self.ep.request_acks(self.clock())
            self._release_held()
            while self.aborted is None and any(
                ids for peer, ids in self.outstanding.items() if peer not in self.lost
            ):
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
                    self._timer = self._next_timer()
            self._stopping = True
            self.cond.notify_all()
            self._io_cond.notify()
        self.wake()
        if self._thread is not threading.current_thread():
            self._thread.join(timeout=5.0)
        self.sock.close()
        self._close_waits()
        with self.lock:
            self._close_shm()

    # -- the IO thread ---------------------------------------------------------------------------
    def _run(self) -> None:
        fine_timer_slack()
        seen = -1  # the drive (``_drive_gen``) this thread last found under way
        try:
            while not self._stopping:
                gen = self._drive_gen
                if self._drivers and gen != seen:
                    # A caller drives: look again after the grace (module docstring), asleep
                    # without the lock (a wait on it contended with the caller's turns).
                    seen = gen
                    time.sleep(_IO_GRACE_S)
                    continue
                with self.lock:
                    if self._drivers:
                        if self._drive_gen == seen and not self._stopping:
                            # The same drive for a whole grace: parked until it ends.
                            self._io_deep = True
                            try:
                                self._io_cond.wait(_IDLE_WAIT_S)
                            finally:
                                self._io_deep = False
                        continue
                    until = self._io_turn()
                if until > -math.inf and self._refill_due():
                    # Outside the lock, a slice at a time: a caller who comes meanwhile drives.
                    self._io_until = -math.inf
                    if self._pool.refill_step():
                        self.counters["refilled"] += 1
                    continue
                # Outside the lock: back from select, this thread does not take the lock from
                # a caller who started driving meanwhile (a hand-off, or a stall if preempted).
                try:
                    self._select(until, 0)
                finally:
                    self._io_until = -math.inf
        except Exception as err:  # the core or the socket broke: fail every waiter, loudly
            with self.lock:
                self._failed(err)

    def _io_turn(self) -> float:
        """One turn of the IO thread (holding the lock; no caller drives); until when it then
        waits (now: more to read, after posters had a chance at the lock)."""
        self.counters["io_turns"] += 1
        self._log_drops()
        self._io_draining = True  # see ShmLinks._hold_far
        try:
            if self._turn():
                return -math.inf
        finally:
            self._io_draining = False
        # While the rank is busy the thread looks every grace period, so a post wakes it only
        # for a timer due sooner (a pacing gap); idle, it sleeps.
        timer, now = self._timer, self.clock()
        busy = now - self._last_active < _BUSY_S
        until = min(now + (_IO_GRACE_S if busy else _IDLE_WAIT_S), self._held_until)
        self._io_until = until if timer is None else min(until, timer)
        return self._io_until

    def _refill_due(self) -> bool:
        """Whether to touch the pool's next replacement buffer now: one is wanted and the rank
        has been quiet for :data:`_REFILL_QUIET_S` (its page faults then delay no message)."""
        return self._pool.wanted and self.clock() - self._last_active >= _REFILL_QUIET_S

    def _failed(self, err: Exception) -> None:
        log.error("udp rank %d: the IO driver failed", self.rank, exc_info=err)
        self.aborted = self.aborted or f"the udp IO driver failed: {err!r}"
        self.cond.notify_all()

    def _turn(self, done: Callable[[], bool] | None = None) -> bool:
        """Read what the socket has, feed the core, run its timer, pump (holding the lock);
        whether reads were left (the turn stopped at :data:`_READS_PER_TURN`).

        ``done``: the waiting caller's condition.  When the turn meets it, no timer was due and
        every message of ours is sealed, the caller leaves without asking the core for output
        (``_unpumped``): that costs ~20 us per peer, on the path of every small receive, and
        all it can yield then is an ACK (with its credit; due in 0.5 ms at the soonest), which
        goes with the caller's next send (in its data frame), its next wait, or an IO turn
        within :data:`_IO_GRACE_S`."""
        ep, sock, buf, view, nat = self.ep, self.sock, self._rbuf, self._rview, self.nat
        now = self.clock()
        timer = self._timer
        due = timer is not None and timer <= now
        reads = polled = 0
        while polled < _READS_PER_TURN:
            got = sock.read_into(buf)
            if got is None:
                break
            polled += 1
            n, addr, segment = got
            if n < 0 or (n == 0 and self.doorbells_expected):
                continue  # an ICMP error, or a doorbell of the same-host rings (udp_shm)
            reads += 1
            if nat is None:
                ep.receive(view[:n], addr, now, segment)
            else:
                for data, vaddr, seg in nat.inbound(view[:n], addr, segment, now):
                    ep.receive(data, vaddr, now, seg)
        if nat is not None:
            nat.turn(ep, sock, now)  # probes, STUN bindings, path switches
        hints = sock.unreachable  # ICMP port unreachable (UdpSocket.report_unreachable)
        if hints:
            for addr in hints:
                ep.unreachable(addr, now)
            hints.clear()
            due = True  # the core PINGs the peer and set a deadline: pump and re-read the timer
        rings = bool(self._rings_in or self._shm_pending)  # same-host rings (udp_shm)
        if due:
            ep.handle_timer(now)
        elif not reads and not self._unsent and not self._held and not self._unpumped:
            if rings and self._shm_turn():
                self._last_active = now
            self._timer = timer if nat is None else self._next_timer()
            return False  # nothing reached the core since it last spoke: it has nothing new
        if reads:
            self.counters["reads"] += reads
            self._last_active = now
        self._events(now)
        # The rings after the socket's messages: a far message's place in its queue was taken
        # when the core read its meta (``_allocate``), before any ring message read after it;
        # and a message written before its peer's CLOSE is read before the CLOSE is acted on.
        if rings and self._shm_turn():
            self._last_active = now
        if (
            done is not None
            and not due
            and not self._urgent
            and done()
            and not any(self.unframed.values())
        ):
            self._unpumped = True
        else:
            self._send_out(now)
            self._events(now)  # what sending emitted (MessageFramed): a waiter sees it now
        self._timer = self._next_timer()
        return polled == _READS_PER_TURN

    def _next_timer(self) -> float | None:
        """The core's timer, or the NAT layer's when that comes first."""
        timer = self.ep.get_timer()
        if self.nat is None:
            return timer
        other = self.nat.timer()
        return other if timer is None or (other is not None and other < timer) else timer

    def _pump(self, now: float) -> None:
        """Hand out the core's events, send what it lets out, then what sending emitted (so a
        ``wait_framed`` returns now, not at the next datagram) (holding the lock)."""
        self._events(now)
        self._send_out(now)
        self._events(now)

    def _events(self, now: float) -> None:
        """Hand out the core's events (holding the lock)."""
        ep = self.ep
        notify = False
        while (event := ep.next_event()) is not None:
            notify = True
            if isinstance(event, MessageReceived):
                self._received(event)
            elif isinstance(event, MessageFramed):
                self.unframed[event.peer].discard(event.message_id)
            elif isinstance(event, MessageSent):
                self.outstanding[event.peer].discard(event.message_id)
            elif isinstance(event, PeerConnected):
                self.connected.add(event.peer)
                self.peer_addrs[event.peer] = event.addr
                if self.nat is not None:
                    self.nat.core_address(ep, event.peer, event.addr, now)
            elif isinstance(event, PeerLost):
                self.lost.setdefault(event.peer, event.reason)
                log.info("udp rank %d: rank %d lost (%s)", self.rank, event.peer, event.reason)
            elif isinstance(event, PeerAddressChanged):
                self.peer_addrs[event.peer] = event.new
                if self.nat is not None and self.nat.core_address(ep, event.peer, event.new, now):
                    continue
                self.counters["address_changes"] += 1
                log.info("udp rank %d: rank %d moved %s -> %s", self.rank, event.peer,
                         event.old, event.new)  # fmt: skip
        if notify:
            self.cond.notify_all()

    def _send_out(self, now: float) -> None:
        """Send what the core lets out (holding the lock)."""
        self._held = self._unpumped = self._urgent = False
        unsent = self._unsent
        while unsent:
            addr, payload, segment = unsent[0]
            done = self.sock.send_batch(addr, payload, segment)
            if done < payload.nbytes:
                unsent[0] = (addr, payload[done:], segment)
                self.counters["send_blocked"] += 1
                return
            unsent.popleft()
        nat = self.nat
        for batch in self.ep.datagrams_to_send(now):
            addr, view, segment = batch[0], memoryview(batch[1]), batch[2]
            if nat is not None:
                addr, view, segment = nat.outbound(addr, view, segment)
            if unsent:
                unsent.append((addr, view, segment))
                continue
            done = self.sock.send_batch(addr, view, segment)
            if done < view.nbytes:
                unsent.append((addr, view[done:], segment))
                self.counters["send_blocked"] += 1


__all__ = ["Engine", "Landing"]
