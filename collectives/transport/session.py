"""One peer's session: handshake state, the receive direction, and its half of the timers.

The state machine is in :mod:`.states`; the send direction in :mod:`.outbound` (created when the
handshake completes, since it needs the session keys).  What the receive direction keeps:

* partial frames of this session (bounded by ``2 * window_bytes + frame_bytes``), keyed by their
  first segment number, dropped and reported ``rejected`` when they fail authentication;
* the :class:`~.crypto.ReplayWindow` of authenticated segment numbers, which is also the
  ``acked`` list of our ACKs;
* an :class:`~.receiving.Inbox` that turns DATA chunks into messages, FIFO per channel.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from collectives.transport._pb import transport_pb2 as pb
from collectives.transport.config import TransportConfig
from collectives.transport.control_fields import ack_chunk
from collectives.transport.crypto import Cipher, ReplayWindow
from collectives.transport.events import Address, Event, PeerAddressChanged, PeerLost
from collectives.transport.frames import (
    ChunkKind,
    ControlChunk,
    DataChunk,
    FrameError,
    control_chunk,
    parse_chunks,
)
from collectives.transport.header import (
    HEADER_SIZE,
    VERSION,
    Header,
    PacketType,
    pack_header,
    segment_heads,
    segment_layout,
)
from collectives.transport.outbound import SMALL_FRAME, Batch, Outbound
from collectives.transport.receiving import (
    Allocator,
    Inbox,
    PartialFrame,
    TouchedFrames,
    gather_payloads,
    layout_ok,
    pending_runs,
)
from collectives.transport.sending import FrameBuilder, OutMessage
from collectives.transport.states import Input, State, allowed, next_state

_ACK_RANGES = 64  # newest ranges per list in one ACK: older ones were reported before
# When an ACK goes out at once rather than within max_ack_delay, in weight: a bulk frame weighs
# half, so every second one is acknowledged at once (a window's worth would wait max_ack_delay
# per round trip while cwnd is small).  A small frame (a small eager message's) weighs 1: its
# sender does not wait for the ACK, it needs it only to free the frame, so several share one (in
# a 4-rank small collective, pairs without reverse traffic sent an ACK-only datagram per message,
# ~40 % of all datagrams).  A sender that waits (window nearly full, closing) asks with a PING.
_ACK_EVERY_WEIGHT = 8
_LARGE_WEIGHT = _ACK_EVERY_WEIGHT // 2
# Segments of still incomplete frames that make an ACK go out at once: their ``pending`` ranges
# are what lets the sender resend only the missing segments of a large frame, so they must not
# wait for the frame to complete; but one ACK per two 1200-byte datagrams would cost more than
# the data, so they are batched (and a gap in the numbers, a likely loss, sends one at once).
_ACK_EVERY_SEGMENTS = 16
# Numbers a sender resent although we hold them: the intervals holding them ride on the next
# ACKs even when older than the newest _ACK_RANGES (that ACK was lost or crowded out).
_ASKED_MAX = 64
_SEGMENT = int(PacketType.SEGMENT)  # a plain int packs faster than the IntEnum member
# Members as module constants: each ChunkKind.X or State.X is a class attribute lookup.
_ACK = ChunkKind.ACK
_CREDIT = ChunkKind.CREDIT
_PING = ChunkKind.PING
_ESTABLISHED = State.ESTABLISHED
_HELLO_SENT = State.HELLO_SENT
_CLOSED = State.CLOSED
_LOST = State.LOST


class Session:
    """Everything this endpoint knows about one peer."""

    def __init__(
        self,
        *,
        peer: int,
        is_client: bool,
        addr: Address | None,
        local_id: int,
        config: TransportConfig,
        tag: bytes,
        comm_id: int,
        epoch: int,
        now: float,
        allocate: Allocator,
        emit: Callable[[Event], None],
        counters: dict[str, int],
    ) -> None:
        self.peer = peer
        self.is_client = is_client
        self.addr = addr
        self.local_id = local_id  # what the peer writes in datagrams to us
        self.remote_id = 0
        self.state = State.IDLE
        self.confirmed = False  # an authenticated frame came under the current keys
        self._config = config
        self._tag = tag
        self._comm_id = comm_id
        self._epoch = epoch
        self._emit = emit
        self._counters = counters
        self.created = now
        self.last_heard = now
        # Handshake: the client's HELLO (resent until answered), the server's answer (resent when
        # the same HELLO comes again).
        self.client_nonce = b""
        self.hello: bytes | None = None
        self.hello_next = now
        self.hello_tries = 0
        self.hello_ack: bytes | None = None
        self.hello_ack_due = False
        # Receive direction.
        self._rx: Cipher | None = None
        self._max_frame = config.frame_bytes + 1024
        self._plain = bytearray(self._max_frame)
        self._plain_view = memoryview(self._plain)
        self._sealed = bytearray(self._max_frame)  # a whole frame out of one GRO batch
        self._partial: dict[int, PartialFrame] = {}
        self._partial_bytes = 0
        self._partial_budget = 2 * config.window_bytes + config.frame_bytes
        self._replay = ReplayWindow()
        self._rejected: set[int] = set()
        self.inbox = Inbox(peer, allocate, emit)
        self._credit_granted = config.window_bytes
        self._window = config.window_bytes  # (config is frozen: read once, used per frame)
        self._credit_step = config.window_bytes // 4  # a grant this large is due at once
        self._unacked_eliciting = 0
        self._unacked_segments = 0
        self._ack_deadline: float | None = None
        self._ack_now = False
        self._newest_at = now
        self._highest_seen = -1  # highest segment number that arrived (gap detection)
        self._asked: set[int] = set()
        # Partial frames that got segments during our last ACKs: their runs go first in the next
        # ACK's ``pending`` list.  A resend lands in an *old* frame, whose runs the newest-first
        # rule crowds out, and a resend never reported is declared lost again by the sender.
        self._touched = TouchedFrames()
        self.latest = now  # the latest time given: no deadline is ever reported before it
        self._ping = False
        self._closing: bytes | None = None
        self.out: Outbound | None = None
        self._early: list[OutMessage] = []  # sent before the handshake finished
        self.suspect: tuple[float, float] | None = None  # (ICMP hint, deadline): unreachable()

    def fire(self, event: Input) -> None:
        self.state = next_state(self.state, event)

    # -- handshake results ------------------------------------------------------------------------

    def establish(
        self, tx: Cipher, rx: Cipher, remote_id: int, peer_window: int, now: float
    ) -> None:
        """Install fresh keys (a completed handshake); forgets everything sealed under old ones."""
        config = self._config
        builder = FrameBuilder(
            cipher=tx,
            tag=self._tag,
            max_datagram=config.max_datagram,
            frame_bytes=config.frame_bytes,
            max_batch_bytes=config.max_batch_bytes,
            comm_id=self._comm_id,
            epoch=self._epoch,
        )
        pending = list(self.out.queue) if self.out is not None else self._early
        self._early = []
        self.out = Outbound(
            peer=self.peer,
            builder=builder,
            config=config,
            credit_limit=peer_window,
            remote_id=remote_id,
            now=now,
            emit=self._emit,
            counters=self._counters,
        )
        if pending:
            self.out.queue.extend(pending)
        self.remote_id = remote_id
        self._rx = rx
        self._partial.clear()
        self._touched.clear()
        self._partial_bytes = 0
        self._replay = ReplayWindow()
        self._rejected.clear()
        self.last_heard = now
        self.confirmed = self.is_client
        if self.is_client:
            self._ping = True  # lets the server confirm the keys and start sending

    def queue(self, msg: OutMessage) -> None:
        if self.out is None:
            self._early.append(msg)
        else:
            self.out.queue.append(msg)

    def lose(self, reason: str) -> None:
        """The peer is gone: report it once and stop."""
        if allowed(self.state, Input.PEER_GONE):
            self.fire(Input.PEER_GONE)
            self._counters["peers_lost"] += 1
            self._emit(PeerLost(self.peer, reason))

    def unreachable(self, now: float) -> None:
        """An ICMP port unreachable came back for the peer's address.  ICMP is not
        authenticated, so it is a hint: PING the peer, and it is lost only if nothing
        authenticated comes from it within ``unreachable_grace`` (a live peer answers a PING
        within a round trip; without the hint a dead one is found by the peer timeout)."""
        if self.state is State.ESTABLISHED and self.confirmed and self.suspect is None:
            self.suspect = (now, now + self._config.unreachable_grace)
            self._ping = True

    def request_ack(self) -> None:
        """Ask the peer to acknowledge at once what we sent and queued (a PING with the next
        frame): small frames are otherwise acknowledged up to ``max_ack_delay`` late."""
        out = self.out
        if self.state is _ESTABLISHED and self.confirmed and out is not None and not out.idle:
            self._ping = True

    def close(self, kind: ChunkKind, reason: str) -> None:
        """Leave; the peer hears CLOSE or ABORT with the next (and last) frame."""
        if not allowed(self.state, Input.CLOSE_LOCAL):
            return
        if self.state is State.ESTABLISHED:  # best effort: an unconfirmed peer may not hear it
            msg = pb.Close(reason=reason) if kind is ChunkKind.CLOSE else pb.Abort(reason=reason)
            self._closing = control_chunk(kind, msg)
        self.fire(Input.CLOSE_LOCAL)

    # -- receive direction ------------------------------------------------------------------------

    def on_segment(self, header: Header, payload: memoryview, addr: Address, now: float) -> None:
        counters = self._counters
        self.latest = now if now > self.latest else self.latest  # max() as a compare
        if self.state is not _ESTABLISHED or self._rx is None:
            counters["dropped_unknown_session"] += 1
            return
        number = header.packet_number
        if number in self._replay:
            counters["dropped_duplicate" if number >= self._replay.floor else "dropped_replay"] += 1
            self._ack_now = True  # the peer resent: our ACK may have been lost
            if number >= self._replay.floor and len(self._asked) < _ASKED_MAX:
                self._asked.add(number)
            return
        if header.segments == 1:
            # layout_ok() for a one-datagram frame (each small message's): all of it is here.
            length = header.frame_length
            if not 0 < length <= self._max_frame or len(payload) != length:
                counters["dropped_malformed"] += 1
                return
            self._open(header, payload, addr, now)
            return
        if not layout_ok(header, len(payload), self._max_frame):
            counters["dropped_malformed"] += 1
            return
        first = header.first_number
        frame = self._partial.get(first)
        if frame is None:
            if self._replay.seen_any(first, first + header.segments):
                counters["dropped_duplicate"] += 1
                return
            if self._partial_bytes + header.frame_length > self._partial_budget:
                counters["dropped_overload"] += 1
                return
            frame = self._partial[first] = PartialFrame(header, now)
            self._partial_bytes += header.frame_length
            self._rejected.discard(first)
        elif not frame.fits(header, len(payload)):
            counters["dropped_malformed"] += 1
            return
        if not frame.put(header.segment, payload):
            counters["dropped_duplicate"] += 1
            self._ack_now = True
            self._touched.current[first] = None  # its report was lost: repeat it
            return
        if frame.missing == 0:
            del self._partial[first]
            self._partial_bytes -= frame.length
            self._open(header, memoryview(frame.buf), addr, now)
            return
        self._note_pending(first, number, now)

    def on_batch(
        self, header: Header, view: memoryview, seg: int, addr: Address, now: float
    ) -> bool:
        """A GRO batch: if it is consecutive new segments of one frame (every header what the
        first one implies), place them all in one pass and return True; else change nothing
        and return False (the caller then takes the batch datagram by datagram)."""
        self.latest = max(self.latest, now)
        if self.state is not State.ESTABLISHED or self._rx is None:
            return False
        n = len(view)
        k = -(-n // seg)
        start, count, length = header.segment, header.segments, header.frame_length
        if start + k > count or not 0 < length <= self._max_frame or count > length:
            return False
        per = segment_layout(length, count)
        stride = HEADER_SIZE + per
        stop = start + k
        last_len = length - (count - 1) * per if stop == count else per
        if seg != stride or last_len <= 0 or n != (k - 1) * stride + HEADER_SIZE + last_len:
            return False
        first = header.first_number
        if self._replay.seen_any(first + start, first + stop):
            return False
        img = np.frombuffer(view, dtype=np.uint8)
        heads = segment_heads(view[:HEADER_SIZE], start, k)
        rows = img[: (k - 1) * stride].reshape(k - 1, stride)
        tail = (k - 1) * stride
        if not (
            np.array_equal(rows[:, :HEADER_SIZE], heads[: k - 1])
            and np.array_equal(img[tail : tail + HEADER_SIZE], heads[k - 1])
        ):
            return False
        frame = self._partial.get(first)
        if frame is None:
            if start == 0 and stop == count:  # a whole frame: no partial state at all
                buf = np.frombuffer(self._sealed, dtype=np.uint8)
                gather_payloads(buf, rows, img[tail + HEADER_SIZE :], per)
                self._open(header, memoryview(self._sealed)[:length], addr, now)
                return True
            if self._replay.seen_any(first, first + count):
                return False
            if self._partial_bytes + length > self._partial_budget:
                return False
            frame = self._partial[first] = PartialFrame(header, now)
            self._partial_bytes += length
            self._rejected.discard(first)
        elif frame.count != count or frame.length != length or any(frame.have[start:stop]):
            return False
        buf = np.frombuffer(frame.buf, dtype=np.uint8)[start * per :]
        gather_payloads(buf, rows, img[tail + HEADER_SIZE :], per)
        frame.have[start:stop] = b"\x01" * k
        frame.missing -= k
        if frame.missing == 0:
            del self._partial[first]
            self._partial_bytes -= frame.length
            self._open(header, memoryview(frame.buf), addr, now)
            return True
        self._note_pending(first, first + start, now, k)
        return True

    def _note_pending(self, first: int, number: int, now: float, segments: int = 1) -> None:
        """Segments of the frame ``first``, still incomplete, arrived (the first is ``number``):
        they are reported ``pending`` at the normal ACK cadence, so the sender counts them
        delivered and resends only what is missing."""
        self._newest_at = now
        self._touched.current[first] = None
        self._unacked_segments += segments
        if number > self._highest_seen + 1 and self._highest_seen >= 0:
            self._ack_now = True  # a gap: likely a loss the sender should hear of at once
        self._highest_seen = max(self._highest_seen, number + segments - 1)
        if self._unacked_segments >= _ACK_EVERY_SEGMENTS:
            self._ack_now = True
        elif self._ack_deadline is None:
            self._ack_deadline = now + self._config.max_ack_delay

    def _open(self, header: Header, sealed: memoryview, addr: Address, now: float) -> None:
        rx = self._rx
        assert rx is not None
        _, _, _, _, number, index, count, length = header
        first = number - index  # header.first_number without the property call
        plain_len = length - rx.overhead
        # The AAD is segment 0's header (Header(...).pack() without building the tuple).
        aad = pack_header(VERSION, _SEGMENT, 0, self._tag, self.local_id, first, 0, count, length)
        plain = self._plain_view[:plain_len]
        if plain_len < 0 or not rx.open_into(first, aad, sealed, plain):
            self._counters["dropped_auth"] += 1
            self._reject(first)
            return
        self._replay.add(first, first + count)
        if self._rejected:
            self._rejected.discard(first)  # a resend of a frame we rejected authenticated
        if first + count <= self._highest_seen and len(self._asked) < _ASKED_MAX:
            # Completed out of order (by a resend): its interval may be older than the newest
            # _ACK_RANGES, and the sender must hear of that resend or it sends it again.
            self._asked.add(first)
        highest = first + count - 1
        weight = 1 if length < SMALL_FRAME else _LARGE_WEIGHT
        seen = self._highest_seen
        if weight == 1 and ((first > seen + 1 and seen >= 0) or first + count <= seen):
            # After a gap (a loss?) or filling one (a resend): ACK at once (if eliciting).
            weight = _ACK_EVERY_WEIGHT
        self._highest_seen = highest if highest > self._highest_seen else self._highest_seen
        self._counters["frames_opened"] += 1
        self.last_heard = self._newest_at = now
        if not self.confirmed:
            self.confirmed = True
            if self.out is not None:
                # The heartbeat counts from confirmation: a server that waited longer than
                # heartbeat_interval for the client's first frame must not owe a past PING.
                self.out.last_eliciting_sent = max(self.out.last_eliciting_sent, now)
        if addr != self.addr:
            old, self.addr = self.addr, addr
            self._emit(PeerAddressChanged(self.peer, old, addr))
        try:
            self._take_chunks(parse_chunks(plain), count, weight, now)
        except FrameError as err:
            self._counters["dropped_malformed"] += 1
            self.lose(f"protocol error: {err}")

    def _reject(self, first: int) -> None:
        """Report the frame starting at ``first`` as dropped: the sender resends it whole (its
        segments may have been reported ``pending``, which the sender counts as delivered)."""
        if len(self._rejected) < _ACK_RANGES:
            self._rejected.add(first)
        self._ack_now = True

    def _take_chunks(
        self, chunks: list[DataChunk | ControlChunk], segments: int, weight: int, now: float
    ) -> None:
        eliciting = False
        for chunk in chunks:
            if isinstance(chunk, DataChunk):
                if chunk[1] != self._comm_id or chunk[2] != self._epoch:  # comm id, epoch
                    raise FrameError("data chunk of another communicator or epoch")
                self.inbox.on_chunk(chunk)
                eliciting = True
                continue
            kind, msg = chunk
            if kind is _ACK or kind is _CREDIT:
                out = self.out
                if out is None:
                    continue
                if kind is _ACK:
                    acked, pending, rejected, delay, limit = msg  # an AckFields
                    # max(0.0, delay) as a compare (NaN gives 0.0 too)
                    out.on_ack(acked, pending, rejected, delay if delay > 0.0 else 0.0, now)
                else:
                    limit = msg.limit
                out.credit_limit = limit if limit > out.credit_limit else out.credit_limit
            elif kind is _PING:
                eliciting = True
                self._ack_now = True  # a probe or a heartbeat: its sender waits for the answer
            else:  # CLOSE or ABORT
                what = "closed" if kind is ChunkKind.CLOSE else "aborted"
                self.lose(f"peer {what}: {msg.reason}" if msg.reason else f"peer {what}")
                return
        if eliciting:
            self._unacked_eliciting += weight
            self._unacked_segments += segments
            if (
                self._unacked_eliciting >= _ACK_EVERY_WEIGHT
                or self._unacked_segments >= _ACK_EVERY_SEGMENTS
            ):
                self._ack_now = True
            elif self._ack_deadline is None:
                self._ack_deadline = now + self._config.max_ack_delay

    # -- what to send -----------------------------------------------------------------------------

    def _controls(self, now: float) -> list[bytes]:
        controls: list[bytes] = []
        inbox = self.inbox
        window = self._window
        credit_due = inbox.released + window - self._credit_granted >= self._credit_step
        out = self.out
        if (
            self._ack_now
            or credit_due
            or (self._ack_deadline is not None and now >= (self._ack_deadline))
            # Data is about to leave: the ACK rides in its frame, which saves a frame (a seal,
            # a syscall, and the peer's work to open it) later.
            or (
                (self._unacked_eliciting or self._unacked_segments)
                and out is not None
                and out.queue  # out.has_data, inlined
                and out.data_sent < out.credit_limit
            )
        ):
            # Credit rides on every ACK (in it): a lost grant is repeated by the next one.
            self._credit_granted = inbox.released + window
            controls.append(self._ack(now, self._credit_granted))
            self._ack_now = False
            self._ack_deadline = None
            self._unacked_eliciting = 0
            self._unacked_segments = 0
        if self._ping:
            self._ping = False
            controls.append(control_chunk(ChunkKind.PING, pb.Ping()))
            assert self.out is not None
            self.out.mark_eliciting()
        return controls

    def _ack(self, now: float, credit: int) -> bytes:
        """Our ACK chunk, with the flow-control ``credit`` we grant."""
        intervals = self._replay.intervals(_ACK_RANGES)
        if self._asked:
            # Intervals the sender showed it has not heard of (it resent into them).
            intervals = sorted({*intervals, *self._replay.holding(self._asked)})
            self._asked.clear()
        touched = self._touched.take()
        runs = pending_runs(self._partial, touched, _ACK_RANGES) if self._partial else []
        delay = now - self._newest_at
        return ack_chunk(
            intervals,
            runs,
            sorted(self._rejected) if self._rejected else [],
            delay if delay > 0.0 else 0.0,  # max(0.0, delay) without the call
            credit,
        )

    def produce(self, now: float, out: list[Batch]) -> None:
        """Append the datagrams this session may send now."""
        self.latest = now if now > self.latest else self.latest  # max() as a compare
        addr = self.addr
        if addr is None:
            return
        state = self.state
        if state is _HELLO_SENT and self.hello is not None and now >= self.hello_next:
            out.append((addr, self.hello, len(self.hello)))
            self.hello_tries += 1
            self.hello_next = now + self._config.hello_interval * 2 ** min(self.hello_tries, 6)
        if self.hello_ack_due and self.hello_ack is not None:
            self.hello_ack_due = False
            out.append((addr, self.hello_ack, len(self.hello_ack)))
        outbound = self.out
        if self._closing is not None and outbound is not None:
            outbound.produce(addr, [self._closing], now, out)
            self._closing = None
            return
        if self.state is not _ESTABLISHED or not self.confirmed or outbound is None:
            return
        if outbound.probe and outbound.credit_blocked:
            self._ping = True  # the probe asks for an ACK, which carries the credit we wait for
        outbound.produce(addr, self._controls(now), now, out)

    # -- timers -----------------------------------------------------------------------------------

    def timer(self) -> float | None:
        """The earliest of this session's deadlines, never before ``latest``.

        Asked for after every input, so it is a chain of compares (no list, no min/max calls);
        each deadline is the one the matching branch of :meth:`on_timer` acts on.
        """
        state = self.state
        if state is _CLOSED or state is _LOST:
            return None
        config = self._config
        t = self.last_heard + config.peer_timeout
        if state is _HELLO_SENT:
            t = self.hello_next if self.hello_next < t else t
        elif state is _ESTABLISHED:
            out = self.out
            if out is not None and self.confirmed:
                ack = self._ack_deadline
                if ack is not None and ack < t:
                    t = ack
                loss = out.recovery.loss_time()
                if loss is not None and loss < t:
                    t = loss
                paced = out.paced_until
                if paced is not None and paced < t:
                    t = paced
                beat = out.last_eliciting_sent + config.heartbeat_interval
                t = beat if beat < t else t
                if self.suspect is not None and self.suspect[1] < t:
                    t = self.suspect[1]
        # A deadline that passed while we handled other input is due now, never in the past.
        latest = self.latest
        return t if t > latest else latest

    def on_timer(self, now: float) -> None:
        self.latest = max(self.latest, now)
        if self.state in (State.CLOSED, State.LOST):
            return
        if now >= self.last_heard + self._config.peer_timeout:
            what = "no answer" if self.state is not State.ESTABLISHED else "nothing heard"
            self.lose(f"{what} for {self._config.peer_timeout:g} s")
            return
        suspect = self.suspect
        if suspect is not None and now >= suspect[1]:
            self.suspect = None
            if self.last_heard <= suspect[0]:
                grace = self._config.unreachable_grace
                self.lose(f"its port is closed (ICMP port unreachable, no answer for {grace:g} s)")
                return
        out = self.out
        if self.state is not State.ESTABLISHED or out is None or not self.confirmed:
            return
        loss_time = out.recovery.loss_time()
        if loss_time is not None and now >= loss_time:
            out.on_timeout(now)
        if now >= out.last_eliciting_sent + self._config.heartbeat_interval:
            self._ping = True
            out.last_eliciting_sent = now  # one PING per interval, answered or not
        if self._ack_deadline is not None and now >= self._ack_deadline:
            self._ack_now = True
            self._ack_deadline = None
