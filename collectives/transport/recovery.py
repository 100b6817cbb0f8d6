"""Loss detection, probe timeouts and delivery-rate sampling for one direction of a session.

This follows RFC 9002 (QUIC loss recovery) with one twist the design needs: a lost segment is
resent with the *same* packet number (its sealed bytes cannot change, see "Loss recovery: two
levels" in docs/udp-transport.md).  Packet numbers therefore do not order transmissions, so
every transmission also gets a private send sequence number, and the RFC's packet threshold
("three later packets were acknowledged") is measured in that sequence.  An ACK of a resent
number is ambiguous (which transmission arrived?), so, as Karn's algorithm prescribes, it gives no
RTT sample and does not advance the "largest acknowledged" that loss detection counts from.

Data structures, chosen for ACKs over windows of thousands of packets:

* ``_unacked``: number -> packet, everything not yet acknowledged (in flight or declared lost and
  waiting to be resent), and ``_numbers``, the same numbers sorted, so an ACK range finds its
  packets with two bisects instead of walking every number it covers;
* ``_outstanding``: send sequence -> packet, in send order, of the packets neither acknowledged
  nor declared lost.  Both loss thresholds are monotonic in send order, so loss detection pops
  from the front and stops at the first packet that is not lost: O(lost + 1) per ACK.
"""

from __future__ import annotations

from bisect import bisect_left, insort
from collections import OrderedDict
from collections.abc import Iterable

from .congestion import SHORT_RTT, Bbr, Congestion, RateSample
from .pacing import DEFAULT_BURST, SHORT_PATH_BURST, Pacer
from .rtt import GRANULARITY, RttEstimator
from .sent_packet import AckResult, SentPacket, TimeoutResult

__all__ = ["AckResult", "Recovery", "SentPacket", "TimeoutResult"]

#: RFC 9002 kPacketThreshold: reordering tolerated before a packet counts as lost.
PACKET_THRESHOLD = 3
#: RFC 9002 kTimeThreshold, as a multiple of the RTT.
TIME_THRESHOLD = 9 / 8
#: Probe timeouts back off exponentially up to this many doublings.
MAX_PTO_BACKOFF = 10
#: ... but on a path whose minimum RTT is under :data:`~.congestion.SHORT_RTT` (loopback, a LAN)
#: never to more than this between probes (nor the first one, when a busy host's scheduling
#: delays inflated rttvar).  Silence there means a receiver that is not being scheduled or a
#: socket buffer that overflowed, not a congested path: once the receiver is back, the transfer
#: waits for the next probe, and an exponential series (6, 12, 24 ... 384 ms) put that up to
#: one interval after it came back.  A receiver away for 1 s
#: mid-transfer (100 us RTT, tests/transport/test_core_loss.py) got it 560 ms after it came
#: back (179 ms after 0.6 s away); capped, 46 ms.  A probe is one datagram: one every 50 ms
#: to an absent peer costs nothing next to the stall.
SHORT_PATH_MAX_PTO = 0.05
#: On such a path the pacing rate is at least this times cwnd / srtt (as Linux TCP paces a flow
#: outside slow start): the delivery rate behind the model's rate is the receiver's scheduling
#: there, often several times below what it takes once it runs, and pacing slower than the
#: window opens only adds timer wakeups.  A queue that builds raises srtt, which slows this down.
SHORT_PATH_PACING_GAIN = 1.2
_new = tuple.__new__  # NamedTuples made per ACK: their own __new__ is a Python function


class Recovery:
    """Sender-side recovery state of one session direction (not thread-safe)."""

    def __init__(
        self,
        initial_rtt: float,
        max_ack_delay: float,
        now: float,
        congestion: Congestion | None = None,
        max_datagram: int = 1200,
    ) -> None:
        self.rtt = RttEstimator(initial_rtt)
        self.max_ack_delay = max_ack_delay
        self.max_datagram = max_datagram
        self.congestion: Congestion = (
            congestion
            if congestion is not None
            else Bbr(max_datagram=max_datagram, initial_rtt=initial_rtt, now=now)
        )
        self.pacer = Pacer(self.congestion.pacing_rate)
        self._short_path = False  # whether the pacer has SHORT_PATH_BURST (min_rtt < SHORT_RTT)
        self.bytes_in_flight = 0
        self.pto_count = 0
        self.last_ack_time: float | None = None
        #: Counters for stats(): packets declared lost, and those of them acknowledged later.
        self.packets_lost = 0
        self.spurious_losses = 0
        self._unacked: dict[int, SentPacket] = {}
        self._numbers: list[int] = []
        self._outstanding: OrderedDict[int, SentPacket] = OrderedDict()
        self._next_seq = 0
        self._largest_acked_seq = -1
        self._loss_deadline: float | None = None
        self._last_ack_eliciting_at: float | None = None
        self._ack_eliciting_outstanding = 0
        self._now = now
        # Delivery-rate estimation state (the "connection" half of each rate sample).
        self.delivered = 0
        self._delivered_at = now
        self._first_sent_at = now
        self._app_limited_until = 0

    # -- sending ---------------------------------------------------------------------------------

    def on_sent(self, pkt: SentPacket, now: float) -> None:
        """Record the first transmission of ``pkt`` (its number must be new)."""
        if pkt.number in self._unacked:
            raise ValueError(f"packet {pkt.number} is already tracked; use on_resent")
        self._add_number(pkt.number)
        self._track(pkt, now)

    def on_resent(self, pkt: SentPacket, now: float) -> None:
        """Record that ``pkt``'s number went out again with the same bytes.

        Works whatever the packet's state: declared lost (the usual case), still in flight (a
        probe), or already acknowledged (a frame the receiver could not authenticate, resent
        whole).
        """
        old = self._unacked.get(pkt.number)
        if old is None:
            self._add_number(pkt.number)
        elif not old.lost:
            self._forget_outstanding(old)
        pkt.retransmitted = True
        pkt.lost = False
        self._track(pkt, now)

    def on_sent_many(self, pkts: list[SentPacket], now: float) -> None:
        """Record the first transmission of ``pkts``, ascending numbers sent together (the
        datagrams of one frame, each at most ``max_datagram`` bytes): the same as
        :meth:`on_sent` for each in turn, in one pass.  Ascending numbers above every tracked
        one keep ``_numbers`` sorted by appending.

        Why it is the same: within one call nothing moves ``delivered`` or the rate-interval
        stamps (only ACKs do), so every packet is stamped alike; Bbr's ``on_sent`` keeps only the
        maximum ``bytes_in_flight``, which the last packet has; and the pacer's debt clamp
        (``-max(burst, size)``) is ``-burst`` for any datagram (<= max_datagram <= burst, checked
        below), for which subtracting
        the sizes one by one, clamping each time, equals subtracting the total and clamping once.
        """
        numbers = self._numbers
        if not pkts:
            return
        if (
            (numbers and pkts[0].number <= numbers[-1])
            or type(self.congestion) is not Bbr
            or self.max_datagram > self.pacer.burst
        ):
            for pkt in pkts:  # not above every tracked number, or another controller
                self.on_sent(pkt, now)
            return
        self._advance(now)
        if self.bytes_in_flight == 0:
            self._first_sent_at = now
            self._delivered_at = now
        delivered = self.delivered
        delivered_at = self._delivered_at
        first_sent_at = self._first_sent_at
        app_limited = self._app_limited_until > 0
        unacked = self._unacked
        outstanding = self._outstanding
        seq = self._next_seq
        total = 0
        eliciting = 0
        for pkt in pkts:
            number = pkt.number
            if number in unacked:
                raise ValueError(f"packet {number} is already tracked; use on_resent")
            pkt.sent_at = now
            pkt.seq = seq
            pkt.delivered = delivered
            pkt.delivered_at = delivered_at
            pkt.first_sent_at = first_sent_at
            pkt.app_limited = app_limited
            unacked[number] = pkt
            outstanding[seq] = pkt
            seq += 1
            numbers.append(number)
            if pkt.ack_eliciting:
                eliciting += 1
            if pkt.in_flight:
                total += pkt.size
        self._next_seq = seq
        if eliciting:
            self._ack_eliciting_outstanding += eliciting
            self._last_ack_eliciting_at = now
        if total:
            self.bytes_in_flight += total
            self.pacer.on_sent(total, now, self.pacer.burst)
            self.congestion.on_sent(total, self.bytes_in_flight, now)

    def on_sent_segments(
        self, first: int, count: int, size: int, *, last_size: int, handle: object, now: float
    ) -> list[SentPacket]:
        """The first transmission of one frame's ``count`` datagrams, numbered from ``first``:
        ``size`` bytes each but the last (``last_size``), ack-eliciting, the data of datagram
        ``i`` being ``(handle, i)``.  What :meth:`on_sent_many` does, with each packet built
        already stamped (no default written and then overwritten) and the maps filled by bulk
        updates: this runs once per frame of up to hundreds of datagrams.

        Safe to bulk-insert: the numbers are above every tracked one (else the general path
        runs), and ``_unacked`` holds exactly the numbers of ``_numbers``, so none is tracked.
        """
        numbers = self._numbers
        if (
            (numbers and first <= numbers[-1])
            or type(self.congestion) is not Bbr
            or self.max_datagram > self.pacer.burst
        ):
            pkts = [SentPacket(first + i, size, data=(handle, i)) for i in range(count)]
            pkts[-1].size = last_size
            for pkt in pkts:
                self.on_sent(pkt, now)
            return pkts
        self._now = now if now > self._now else self._now  # _advance, inlined
        if self.bytes_in_flight == 0:
            self._first_sent_at = now
            self._delivered_at = now
        d, d_at, f_at = self.delivered, self._delivered_at, self._first_sent_at
        app = self._app_limited_until > 0
        seq = self._next_seq
        if count == 1:
            # A small message's frame: the single packet without the bulk updates' set-up.
            pkt = SentPacket(first, last_size, now, True, True, False, d, d_at, f_at, app,
                             (handle, 0), seq)  # fmt: skip
            pkts = [pkt]
            self._unacked[first] = pkt
            self._outstanding[seq] = pkt
            numbers.append(first)
        else:
            # Positional: number, size, sent_at, ack_eliciting, in_flight, retransmitted,
            # delivered, delivered_at, first_sent_at, app_limited, data, seq.
            pkts = [
                SentPacket(first + i, size, now, True, True, False, d, d_at, f_at, app,
                           (handle, i), seq + i)
                for i in range(count)
            ]  # fmt: skip
            pkts[-1].size = last_size
            self._unacked.update(zip(range(first, first + count), pkts, strict=True))
            self._outstanding.update(zip(range(seq, seq + count), pkts, strict=True))
            numbers.extend(range(first, first + count))
        self._next_seq = seq + count
        self._ack_eliciting_outstanding += count
        self._last_ack_eliciting_at = now
        total = (count - 1) * size + last_size
        self.bytes_in_flight += total
        # Every datagram is <= max_datagram <= burst (checked above): see on_sent_many.
        self.pacer.on_sent(total, now, self.pacer.burst)
        self.congestion.on_sent(total, self.bytes_in_flight, now)
        return pkts

    def _track(self, pkt: SentPacket, now: float) -> None:
        self._advance(now)
        if self.bytes_in_flight == 0:
            # The rate interval must not span an idle period the sender chose.
            self._first_sent_at = now
            self._delivered_at = now
        pkt.sent_at = now
        pkt.seq = self._next_seq
        self._next_seq += 1
        pkt.delivered = self.delivered
        pkt.delivered_at = self._delivered_at
        pkt.first_sent_at = self._first_sent_at
        pkt.app_limited = self._app_limited_until > 0
        self._unacked[pkt.number] = pkt
        self._outstanding[pkt.seq] = pkt
        if pkt.ack_eliciting:
            self._ack_eliciting_outstanding += 1
            self._last_ack_eliciting_at = now
        if pkt.in_flight:
            self.bytes_in_flight += pkt.size
            self.pacer.on_sent(pkt.size, now)
            self.congestion.on_sent(pkt.size, self.bytes_in_flight, now)

    def can_send(self, size: int) -> bool:
        """Whether the congestion window has room for ``size`` more bytes.

        An empty pipe always has room, so a window smaller than one send cannot deadlock.
        """
        return self.bytes_in_flight == 0 or self.bytes_in_flight + size <= self.congestion.cwnd

    def next_send_time(self, now: float, size: int | None = None) -> float:
        """When the pacer lets the next ``size`` bytes (default one datagram) out; >= ``now``."""
        self._now = now if now > self._now else self._now  # (max() is a call: slower)
        return self.pacer.next_send_time(now, self.max_datagram if size is None else size)

    def on_app_limited(self) -> None:
        """The caller ran out of data to send while the window had room.

        Rate samples taken until the data now in flight is delivered then show the application's
        rate, not the path's, and must not lower the bandwidth estimate.
        """
        if self.bytes_in_flight + self.max_datagram <= self.congestion.cwnd:
            until = self.delivered + self.bytes_in_flight
            self._app_limited_until = until if until > 1 else 1  # max(until, 1)

    # -- acknowledgements ------------------------------------------------------------------------

    def on_ack(self, ranges: Iterable[tuple[int, int]], ack_delay: float, now: float) -> AckResult:
        """Process one ACK: ``ranges`` of received numbers (half-open, any order, may overlap).

        Runs once per ACK, a small message's as much as a bulk window's: helpers are inlined
        and min()/max() written as compares (each keeps the operand the call would return).
        """
        self._now = now if now > self._now else self._now
        self.last_ack_time = now
        numbers = self._numbers
        unacked = self._unacked
        outstanding = self._outstanding
        pkt = unacked[numbers[0]] if len(numbers) == 1 else None
        if (
            pkt is not None
            and type(ranges) is list
            and len(ranges) == 1
            and ranges[0][0] <= pkt.number < ranges[0][1]
            and not pkt.lost
            and not pkt.retransmitted
            and pkt.in_flight
            and pkt.ack_eliciting
            and pkt.seq in outstanding
        ):
            # Fast path: the only packet tracked, a first transmission in flight, is acked
            # (a small message's ACK).  The general loop below, for that one packet; a test
            # compares the two.
            largest = ranges[0][1] - 1
            del unacked[pkt.number]
            numbers.clear()
            del outstanding[pkt.seq]
            acked = [pkt]
            self.pto_count = 0
            prior_in_flight = self.bytes_in_flight
            size = pkt.size
            newly_acked = size
            newest: SentPacket | None = pkt
            sample_pkt: SentPacket | None = pkt if pkt.number == largest else None
            largest_seq = self._largest_acked_seq
            if pkt.seq > largest_seq:
                largest_seq = self._largest_acked_seq = pkt.seq
            self._ack_eliciting_outstanding -= 1
            self.bytes_in_flight -= size
            self.delivered += size
            self._delivered_at = now
        else:
            acked = []
            largest = -1
            for start, stop in ranges:
                largest = stop - 1 if stop - 1 > largest else largest
                lo = bisect_left(numbers, start)
                hi = bisect_left(numbers, stop, lo)
                if lo + 1 == hi:  # one packet (a small message's ACK): no comprehension
                    acked.append(unacked.pop(numbers[lo]))
                    del numbers[lo]
                elif lo < hi:
                    acked.extend(map(unacked.pop, numbers[lo:hi]))  # (no bytecode per packet)
                    del numbers[lo:hi]
            if not acked:
                return AckResult([], [], None)
            self.pto_count = 0
            prior_in_flight = self.bytes_in_flight
            newly_acked = 0
            newest = None  # of the delivery-rate sample
            sample_pkt = None  # of the RTT sample
            # One pass with everything hoisted into locals: an ACK of a 1200-byte-datagram
            # window acknowledges thousands of packets.  The body is _forget_outstanding inlined.
            largest_seq = self._largest_acked_seq
            min_rtt = self.rtt.min_rtt  # inf before any sample: no resend orders anything then
            eliciting_gone = 0
            flight_gone = 0
            spurious = 0
            newest_delivered = 0  # newest's delivered and sent_at (read only once it is set)
            newest_sent_at = 0.0
            for pkt in acked:
                seq = pkt.seq
                if pkt.lost:
                    spurious += 1
                elif outstanding.pop(seq, None) is not None:
                    if pkt.ack_eliciting:
                        eliciting_gone += 1
                    if pkt.in_flight:
                        flight_gone += pkt.size
                if not pkt.retransmitted:
                    largest_seq = seq if seq > largest_seq else largest_seq
                    if pkt.number == largest and pkt.ack_eliciting:
                        sample_pkt = pkt
                elif now - pkt.sent_at >= min_rtt and seq > largest_seq:
                    # A resend acknowledged at least min_rtt after it left (RACK, RFC 8985
                    # 6.2): no earlier transmission can be what arrived that late only if this
                    # one did, so it orders loss detection (still no RTT sample: Karn).  Without
                    # this a transfer's tail, all resends, waits for probe timeouts one lost
                    # resend at a time, each backed off twice as long as the last.
                    largest_seq = seq
                if pkt.in_flight:
                    newly_acked += pkt.size
                    delivered = pkt.delivered
                    if (
                        newest is None
                        or delivered > newest_delivered
                        or (delivered == newest_delivered and pkt.sent_at > newest_sent_at)
                    ):
                        newest = pkt
                        newest_delivered = delivered
                        newest_sent_at = pkt.sent_at
            self._largest_acked_seq = largest_seq
            self._ack_eliciting_outstanding -= eliciting_gone
            self.bytes_in_flight -= flight_gone
            self.spurious_losses += spurious
            if newest is not None:  # some packet was in flight (what the delivered count counts)
                self.delivered += newly_acked
                self._delivered_at = now

        rtt_sample: float | None = None
        path_rtt: float | None = None
        if sample_pkt is not None:
            rtt_sample = now - sample_pkt.sent_at
            self.rtt.update(rtt_sample, ack_delay, now)
            # Congestion control wants the path's delay: the receiver's own delay (bounded by
            # what it promised) removed, unless that leaves nothing plausible.
            delay = 0.0 if ack_delay < 0.0 else ack_delay
            delay = self.max_ack_delay if self.max_ack_delay < delay else delay
            path_rtt = rtt_sample - delay if rtt_sample - delay >= GRANULARITY else rtt_sample

        if largest_seq >= 0 and outstanding:
            lost = self._detect_lost(now)
            lost_bytes = sum(p.size for p in lost if p.in_flight) if lost else 0
        else:  # what _detect_lost finds then
            self._loss_deadline = None
            lost = []
            lost_bytes = 0
        if newest is not None or lost_bytes:
            # The delivery-rate sample (BBR's), inlined: once per ACK.
            delivered = self.delivered
            if self._app_limited_until and delivered > self._app_limited_until:
                self._app_limited_until = 0
            rate: float | None = None
            prior_delivered = delivered
            app_limited = False
            if newest is not None:
                prior_delivered = newest.delivered
                app_limited = newest.app_limited
                send_elapsed = newest.sent_at - newest.first_sent_at
                ack_elapsed = self._delivered_at - newest.delivered_at
                self._first_sent_at = newest.sent_at
                # The longer interval: a burst of sends or a burst of ACKs (compression) would
                # make the other one too short and the rate too high.  Shorter than the minimum
                # RTT means the sample covers less than one round trip of data: not a rate.
                interval = ack_elapsed if ack_elapsed > send_elapsed else send_elapsed  # max()
                if interval > 0 and interval >= self.rtt.min_rtt:
                    rate = (delivered - newest.delivered) / interval
            # By tuple.__new__ (RateSample's own __new__ is a Python function).
            sample = _new(RateSample, (
                rate, app_limited, prior_delivered, delivered, newly_acked, lost_bytes,
                prior_in_flight, self.bytes_in_flight, path_rtt,
            ))  # fmt: skip
            congestion = self.congestion
            congestion.on_ack(sample, now)
            rate = congestion.pacing_rate
            if self._short_path is not (self.rtt.min_rtt < SHORT_RTT):
                # Bursts of several frames on loopback or a LAN (see SHORT_PATH_BURST).
                self._short_path = not self._short_path
                burst = SHORT_PATH_BURST if self._short_path else DEFAULT_BURST
                self.pacer.set_min_burst(burst, now)
            if self._short_path:
                # What the window lets out per smoothed RTT (see SHORT_PATH_PACING_GAIN).
                srtt = self.rtt.smoothed
                least = SHORT_PATH_PACING_GAIN * congestion.cwnd / srtt if srtt > 0 else rate
                rate = least if least > rate else rate
            self.pacer.set_rate(rate, now)
        return _new(AckResult, (acked, lost, rtt_sample))  # (NamedTuple.__new__ costs more)

    # -- loss detection and timers ---------------------------------------------------------------

    def _loss_delay(self) -> float:
        return max(TIME_THRESHOLD * max(self.rtt.smoothed, self.rtt.latest), GRANULARITY)

    def _detect_lost(self, now: float) -> list[SentPacket]:
        self._loss_deadline = None
        largest = self._largest_acked_seq
        outstanding = self._outstanding
        if largest < 0 or not outstanding:
            return []
        loss_delay = self._loss_delay()
        lost: list[SentPacket] = []
        while outstanding:
            seq, pkt = next(iter(outstanding.items()))
            if seq >= largest:
                break  # nothing acknowledged was sent after it: not a candidate
            # Compare the deadline itself with ``now`` (not ``sent_at`` with ``now - delay``):
            # the timer fires at exactly that float, and it must then find the packet lost.
            deadline = pkt.sent_at + loss_delay
            if largest - seq < PACKET_THRESHOLD and deadline > now:
                self._loss_deadline = deadline
                break
            self._forget_outstanding(pkt)
            pkt.lost = True
            lost.append(pkt)
            if not pkt.ack_eliciting:
                # Nobody resends a packet that carried only ACKs; keep nothing of it.
                del self._unacked[pkt.number]
                self._remove_number(pkt.number)
        self.packets_lost += len(lost)
        return lost

    def loss_time(self) -> float | None:
        """When :meth:`on_timeout` must run next (None: no timer).

        Never earlier than the latest ``now`` this object was given: a deadline in the past
        would make a driver spin; it is due immediately instead.  Asked for after every input,
        so the probe timeout (RFC 9002's PTO, backed off, capped on a short path) is computed
        inline.
        """
        deadline = self._loss_deadline
        if deadline is None:
            last_sent = self._last_ack_eliciting_at
            if not self._ack_eliciting_outstanding or last_sent is None:
                return None
            rtt = self.rtt
            var = 4 * rtt.rttvar
            pto = rtt.smoothed + (var if var > GRANULARITY else GRANULARITY) + self.max_ack_delay
            count = self.pto_count
            interval = pto * (1 << (count if count < MAX_PTO_BACKOFF else MAX_PTO_BACKOFF))
            if interval > SHORT_PATH_MAX_PTO and rtt.min_rtt < SHORT_RTT:
                interval = SHORT_PATH_MAX_PTO
            deadline = last_sent + interval
        now = self._now
        return deadline if deadline > now else now

    def on_timeout(self, now: float) -> TimeoutResult:
        """Run the timer ``loss_time()`` asked for (harmless if called early)."""
        self._advance(now)
        if self._loss_deadline is not None:
            if now < self._loss_deadline:
                return TimeoutResult([], False)
            lost = self._detect_lost(now)
            lost_bytes = sum(p.size for p in lost if p.in_flight)
            if lost_bytes:
                self.congestion.on_loss(lost_bytes, self.bytes_in_flight, now)
            return TimeoutResult(lost, False)
        deadline = self.loss_time()
        if deadline is None or now < deadline:
            return TimeoutResult([], False)
        self.pto_count += 1
        self.congestion.on_timeout(self.pto_count, now)
        self.pacer.set_rate(self.congestion.pacing_rate, now)
        return TimeoutResult([], True)

    def oldest_unacked(self) -> SentPacket | None:
        """The earliest-sent ack-eliciting packet still in flight: what a probe should resend."""
        for pkt in self._outstanding.values():
            if pkt.ack_eliciting:
                return pkt
        return None

    def discard(self, number: int) -> SentPacket | None:
        """Stop tracking ``number`` (the caller gave up on it); returns the packet, if tracked."""
        pkt = self._unacked.pop(number, None)
        if pkt is None:
            return None
        if not pkt.lost:
            self._forget_outstanding(pkt)
        self._remove_number(number)
        return pkt

    # -- helpers ---------------------------------------------------------------------------------

    @property
    def cwnd(self) -> int:
        return self.congestion.cwnd

    @property
    def pacing_rate(self) -> float:
        return self.congestion.pacing_rate

    def __len__(self) -> int:
        """Packets tracked: in flight or lost and not yet resent."""
        return len(self._unacked)

    def _advance(self, now: float) -> None:
        self._now = now if now > self._now else self._now  # (max() is a call: slower)

    def _forget_outstanding(self, pkt: SentPacket) -> None:
        if self._outstanding.pop(pkt.seq, None) is None:
            return
        if pkt.ack_eliciting:
            self._ack_eliciting_outstanding -= 1
        if pkt.in_flight:
            self.bytes_in_flight -= pkt.size

    def _add_number(self, number: int) -> None:
        numbers = self._numbers
        if not numbers or number > numbers[-1]:
            numbers.append(number)
        else:
            insort(numbers, number)

    def _remove_number(self, number: int) -> None:
        numbers = self._numbers
        i = bisect_left(numbers, number)
        if i < len(numbers) and numbers[i] == number:
            del numbers[i]
