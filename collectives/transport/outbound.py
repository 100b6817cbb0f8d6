"""One session's send direction: queued messages, sealed frames in flight, loss recovery.

Two levels (docs/udp-transport.md, "Loss recovery"): :class:`~.recovery.Recovery` counts
*segments* (each datagram is a :class:`~.recovery.SentPacket` whose ``data`` is ``(frame,
index)``), so RTT, loss and congestion work per datagram; memory is released per *frame*, once
every segment of it is in an ACK's ``acked`` ranges (frames the receiver authenticated), and
``MessageSent`` follows when every frame carrying a message is released.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable
from typing import cast

from collectives.transport._pb import transport_pb2 as pb
from collectives.transport.config import TransportConfig
from collectives.transport.congestion import SHORT_RTT
from collectives.transport.events import Address, Event, MessageFramed, MessageSent
from collectives.transport.frames import ChunkKind, control_chunk
from collectives.transport.ranges import RangeSet
from collectives.transport.recovery import Recovery, SentPacket
from collectives.transport.sending import FrameBuilder, OutMessage, SentFrame

Batch = tuple[Address, memoryview | bytes, int]
# A frame this small is acknowledged up to max_ack_delay late (several share one ACK, see
# session.py): when the window would hold the next frame back, it asks for an ACK at once.
SMALL_FRAME = 16 * 1024
_PING_CHUNK = control_chunk(ChunkKind.PING, pb.Ping())


class Outbound:
    """The sender half of an established session."""

    def __init__(
        self,
        *,
        peer: int,
        builder: FrameBuilder,
        config: TransportConfig,
        credit_limit: int,
        remote_id: int,
        now: float,
        emit: Callable[[Event], None],
        counters: dict[str, int],
    ) -> None:
        self._peer = peer
        self._builder = builder
        self._config = config
        self._remote_id = remote_id
        self._emit = emit
        self._counters = counters
        self.recovery = Recovery(
            config.initial_rtt, config.max_ack_delay, now, max_datagram=config.max_datagram
        )
        self.queue: deque[OutMessage] = deque()
        self.frames: dict[int, SentFrame] = {}  # by first segment number, ascending
        self._resend: deque[SentPacket] = deque()
        self.next_number = 0
        self.data_sent = 0  # stream bytes framed: what credit is counted against
        self.credit_limit = credit_limit
        self.paced_until: float | None = None
        self.probe = False
        self.last_eliciting_sent = now
        self._eliciting = False

    # -- acknowledgements -------------------------------------------------------------------------

    def on_ack(
        self,
        acked: list[tuple[int, int]],
        pending: list[tuple[int, int]],
        rejected: Iterable[int],
        ack_delay: float,
        now: float,
    ) -> None:
        result = self.recovery.on_ack(acked + pending if pending else acked, ack_delay, now)
        if result.lost:
            self._counters["lost_segments"] += len(result.lost)
            self._resend.extend(p for p in result.lost if p.data is not None)
        for first in rejected:
            frame = self.frames.get(first)
            if frame is not None:  # resent whole: the receiver dropped what it had of it
                self._resend.extend([self._packet(frame, i) for i in range(frame.count)])
        if len(acked) == 1:
            # The bulk case: one contiguous range (every frame arrived in order).  A frame is
            # covered when it lies inside it, which needs no RangeSet.
            lo, hi = acked[0]
            self._release(None, lo, hi)
        elif acked:
            self._release(RangeSet(max_ranges=len(acked) + 1, ranges=acked), 0, acked[-1][1])

    def _release(self, acked: RangeSet | None, lo: int, stop: int) -> None:
        """Free the frames every segment of which is in ``acked`` (None: in ``[lo, stop)``)."""
        frames = self.frames
        done: list[int] = []
        for first, frame in frames.items():
            if first >= stop:
                break
            end = first + frame.count
            if acked.covers(first, end) if acked is not None else (lo <= first and end <= stop):
                done.append(first)
        recycle = self._builder.recycle
        for first in done:
            frame = frames.pop(first)
            recycle(frame)  # a stale reference to it (a spurious-loss resend) is never sent
            for msg in frame.messages:
                msg.frames_pending -= 1
                if msg.frames_pending == 0 and msg.pos >= msg.total:  # (msg.framed, inlined)
                    self._emit(MessageSent(self._peer, msg.message_id))

    def on_timeout(self, now: float) -> None:
        result = self.recovery.on_timeout(now)
        if result.lost:
            self._counters["lost_segments"] += len(result.lost)
            self._resend.extend(p for p in result.lost if p.data is not None)
        if result.probe:
            self._counters["probe_timeouts"] += 1
            self.probe = True

    def timer(self) -> float | None:
        loss = self.recovery.loss_time()
        paced = self.paced_until
        if paced is None:
            return loss
        return paced if loss is None or paced < loss else loss

    @property
    def credit_blocked(self) -> bool:
        return bool(self.queue) and self.data_sent >= self.credit_limit

    @property
    def has_data(self) -> bool:
        """Whether data waits that the credit lets out (the window and pacer may still hold
        it back)."""
        return bool(self.queue) and self.data_sent < self.credit_limit

    @property
    def idle(self) -> bool:
        """Nothing queued and nothing unacknowledged."""
        return not self.queue and not self.frames

    # -- sending ----------------------------------------------------------------------------------

    def _packet(self, frame: SentFrame, index: int) -> SentPacket:
        return SentPacket(frame.first + index, frame.size(index), data=(frame, index))

    def produce(self, addr: Address, controls: list[bytes], now: float, out: list[Batch]) -> None:
        """Append what may go out now: resends first, then frames of control chunks and data.

        One call emits as many frames as the window, the pacer and the credit allow, with what
        the loop reads hoisted into locals: it runs once per frame on the bulk path.
        """
        self.paced_until = None
        recovery = self.recovery
        probe, self.probe = self.probe, False
        queue = self.queue
        if probe and not self._resend and not queue:
            oldest = recovery.oldest_unacked()
            if oldest is not None:
                self._resend.append(oldest)
        if self._resend:
            self._send_resends(addr, now, out, probe)
        builder = self._builder
        plain_cap = builder.plain_cap
        congestion = recovery.congestion
        counters = self._counters
        frames = self.frames
        while True:
            credit = self.credit_limit - self.data_sent
            want_data = credit > 0 and bool(queue)
            if want_data and not probe:
                # recovery.can_send inlined: an empty pipe always has room.
                flight = recovery.bytes_in_flight
                if flight and flight + plain_cap > congestion.cwnd:
                    want_data = False
                    counters["window_full"] += 1
                else:
                    at = recovery.next_send_time(now, plain_cap)
                    if at > now:
                        self.paced_until = at
                        want_data = False
                        counters["paced"] += 1
                    elif flight + plain_cap + SMALL_FRAME > congestion.cwnd:
                        # The next frame will wait for an ACK: a small one must ask for it.
                        head = queue[0]
                        if head.total - head.pos < SMALL_FRAME:
                            controls = [*controls, _PING_CHUNK]
            if not want_data and not controls:
                break
            plain_len, touched, data = builder.fill(controls, queue, credit if want_data else 0)
            controls = []
            probe = False
            first = self.next_number
            frame = builder.seal(plain_len, first, self._remote_id)
            count = frame.count
            self.next_number = first + count
            counters["frames_sealed"] += 1
            self.data_sent += data
            if touched or self._eliciting:
                self._eliciting = False
                frame.messages = touched
                frame.data_bytes = data
                for msg in touched:
                    msg.frames_pending += 1
                    if msg.pos >= msg.total:
                        # Sealed to the last byte: resends use the frames' images, so the
                        # caller's buffers are free now; drop our references to them.
                        msg.views = []
                        if msg.notify_framed:
                            self._emit(MessageFramed(self._peer, msg.message_id))
                frames[first] = frame
                stride = frame.stride
                last = len(frame.image) - (count - 1) * stride
                recovery.on_sent_segments(
                    first, count, stride, last_size=last, handle=frame, now=now
                )
                self.last_eliciting_sent = now
            if count == 1:
                # One datagram, one batch: _emit_batches' general split is not needed.
                image = frame.image
                out.append((addr, memoryview(image), len(image)))
                counters["datagrams_out"] += 1
                counters["bytes_out"] += len(image)
            else:
                self._emit_batches(addr, frame, 0, count, out)
            if not touched or not queue:  # (an empty queue: the next turn would stop anyway)
                if (
                    touched
                    and not queue
                    and len(image := frame.image) >= SMALL_FRAME
                    and recovery.rtt.min_rtt >= SHORT_RTT
                ):
                    self._tail_copy(addr, frame, len(image), out)
                break
        if not queue and not self._resend:
            recovery.on_app_limited()

    def _tail_copy(self, addr: Address, frame: SentFrame, length: int, out: list[Batch]) -> None:
        """Send the last segment of the last bulk frame before the queue ran dry once more.

        Nothing follows it, so neither its loss nor that of the ACK it draws can be inferred
        from a later ACK: either one cost a probe timeout (a quarter of a 256 MiB transfer's
        tail at 10 % loss, 100 ms RTT).  The copy makes the receiver ACK again (a duplicate asks
        for one at once).  One datagram per burst of bulk data, only while the window has room,
        and only on paths of 1 ms and more: on loopback or a LAN a datagram is a whole 64 KB frame
        (a 64 KiB message would go twice), loss means a full socket buffer, and a probe comes
        within 50 ms anyway (``SHORT_PATH_MAX_PTO``).
        """
        recovery = self.recovery
        last = length - (frame.count - 1) * frame.stride
        if recovery.bytes_in_flight + last <= recovery.congestion.cwnd:
            self._counters["redundant_segments"] += 1
            self._emit_batches(addr, frame, frame.count - 1, frame.count, out)

    def mark_eliciting(self) -> None:
        """The next frame carries a chunk that needs an answer (PING): track it for loss."""
        self._eliciting = True

    def _send_resends(self, addr: Address, now: float, out: list[Batch], probe: bool) -> None:
        recovery = self.recovery
        resend = self._resend
        while resend:
            pkt = resend[0]
            frame, index = cast("tuple[SentFrame, int]", pkt.data)
            if self.frames.get(frame.first) is not frame:
                resend.popleft()  # released meanwhile (a spurious loss)
                continue
            if not probe and not recovery.can_send(pkt.size):
                break
            probe = False
            resend.popleft()
            # Consecutive segments of one frame go out as one GSO batch.
            stop = index + 1
            group = [pkt]
            while resend and stop < frame.count:
                nxt = resend[0]
                if nxt.data != (frame, stop):
                    break
                group.append(resend.popleft())
                stop += 1
            size = 0
            for p in group:
                recovery.on_resent(p, now)
                size += p.size
            self._counters["retransmitted_segments"] += len(group)
            self._emit_batches(addr, frame, index, stop, out)
            if (
                not self.queue
                and recovery.rtt.min_rtt >= SHORT_RTT
                and recovery.bytes_in_flight + size <= recovery.congestion.cwnd
            ):
                # The transfer's tail: nothing new follows whose ACK would reveal this resend's
                # loss, so each lost one costs a round trip (or a probe timeout), and at 10 %
                # loss the tail was four such generations.  A second copy, while the window
                # has room for it (so never more than a window of them), makes that 1 %.
                self._counters["redundant_segments"] += len(group)
                self._emit_batches(addr, frame, index, stop, out)
            self.last_eliciting_sent = now

    def _emit_batches(
        self, addr: Address, frame: SentFrame, start: int, stop: int, out: list[Batch]
    ) -> None:
        per_batch = max(1, self._config.max_batch_bytes // frame.stride)
        counters = self._counters
        for lo in range(start, stop, per_batch):
            hi = min(stop, lo + per_batch)
            payload = frame.datagrams(lo, hi)
            out.append((addr, payload, frame.stride if hi - lo > 1 else len(payload)))
            counters["datagrams_out"] += hi - lo
            counters["bytes_out"] += len(payload)
