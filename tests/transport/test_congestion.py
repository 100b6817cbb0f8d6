"""Bbr unit rules, and a packet-level simulation of Recovery + Bbr over a lossy bottleneck.

The simulation is the test that matters: a link of ``rate`` bytes/s with a bounded FIFO queue, a
fixed propagation RTT and random loss, driven by a virtual clock; the sender resends what
recovery declares lost (same numbers), the receiver ACKs every other packet with its newest
ranges.  It checks the properties the design promises (goodput near link * (1 - loss) even at
10 % loss, a bounded queue, retransmissions near the loss rate, timers never in the past).
"""

from __future__ import annotations

import heapq
import math
import random
from collections import deque
from dataclasses import dataclass, field

import pytest

from collectives.transport.congestion import (
    INITIAL_WINDOW_BYTES,
    PROBE_BW_GAINS,
    SHORT_RTT_MIN_CWND,
    STARTUP_GAIN,
    Bbr,
    BbrState,
    RateSample,
)
from collectives.transport.ranges import RangeSet
from collectives.transport.recovery import Recovery, SentPacket

MSS = 1200

# -- the simulation ------------------------------------------------------------------------------


@dataclass
class SimResult:
    goodput: float  # unique bytes/s at the receiver over the measured window
    max_queue: int  # bytes in the bottleneck queue, worst case over the measured window
    sends: int  # first transmissions
    resends: int
    link_loss: int  # packets the random loss took
    queue_drops: int
    timer_in_past: int  # loss_time() values earlier than the clock when read
    idle_timeouts: int
    states: set[BbrState] = field(default_factory=set)
    spurious: int = 0
    btlbw: float = 0.0
    loss_rate: float = 0.0


class Sim:
    """Event-driven: a heap of (time, order, kind, payload); one sender, one receiver."""

    def __init__(
        self,
        *,
        rate: float,
        rtt: float,
        queue_bytes: int,
        loss: float,
        seed: int = 1,
        loss_after_queue: bool = True,
        ack_every: int = 2,
        max_ack_delay: float = 0.005,
        total: float = math.inf,
    ) -> None:
        self.total = total
        self.rate, self.rtt, self.queue_bytes, self.loss = rate, rtt, queue_bytes, loss
        self.loss_after_queue = loss_after_queue
        self.ack_every, self.max_ack_delay = ack_every, max_ack_delay
        self.rng = random.Random(seed)
        self.now = 0.0
        self.events: list[tuple[float, int, str, object]] = []
        self.order = 0
        self.bbr = Bbr(max_datagram=MSS, initial_rtt=0.1, now=0.0)
        self.rec = Recovery(0.1, max_ack_delay, 0.0, congestion=self.bbr, max_datagram=MSS)
        self.next_number = 0
        self.resend: deque[SentPacket] = deque()
        self.acked: set[int] = set()
        self.wake_at = math.inf
        self.timer_at = math.inf
        # link
        self.link_free = 0.0
        self.queue: deque[tuple[float, int]] = deque()
        self.queued = 0
        # receiver
        self.received = RangeSet(256)
        self.unacked_arrivals = 0
        self.first_unacked_at = 0.0
        self.ack_timer_at = math.inf
        self.arrivals: list[tuple[float, int]] = []
        # stats
        self.sends = self.resends = self.link_loss = self.queue_drops = 0
        self.timer_in_past = 0
        self.idle_timeouts = 0  # timer runs that found nothing to do (a spinning timer)
        self.queue_samples: list[tuple[float, int]] = []
        self.states: set[BbrState] = set()

    def push(self, t: float, kind: str, payload: object = None) -> None:
        self.order += 1
        heapq.heappush(self.events, (t, self.order, kind, payload))

    # sender ------------------------------------------------------------------------------------

    def pump(self) -> None:
        rec, now = self.rec, self.now
        while True:
            while self.resend and self.resend[0].number in self.acked:
                self.resend.popleft()
            if not rec.can_send(MSS):
                break
            t = rec.next_send_time(now)
            if t > now:
                if t < self.wake_at:
                    self.wake_at = t
                    self.push(t, "wake")
                break
            if not self.resend and self.next_number >= self.total:
                rec.on_app_limited()
                break
            if self.resend:
                pkt = self.resend.popleft()
                rec.on_resent(pkt, now)
                self.resends += 1
            else:
                pkt = SentPacket(number=self.next_number, size=MSS)
                self.next_number += 1
                rec.on_sent(pkt, now)
                self.sends += 1
            self.transmit(pkt.number)
        self.arm_timer()

    def arm_timer(self) -> None:
        t = self.rec.loss_time()
        if t is None:
            return
        if t < self.now:
            self.timer_in_past += 1
        if t != self.timer_at:
            self.timer_at = t
            self.push(t, "timer", t)

    def on_timer(self, t: float) -> None:
        if t != self.timer_at:
            return  # superseded
        self.timer_at = math.inf
        result = self.rec.on_timeout(self.now)
        if not result.lost and not result.probe:
            self.idle_timeouts += 1
        self.resend.extend(result.lost)
        if result.probe:
            oldest = self.rec.oldest_unacked()
            if oldest is not None:
                self.rec.on_resent(oldest, self.now)
                self.resends += 1
                self.transmit(oldest.number)
        self.pump()

    def on_ack(self, ranges: list[tuple[int, int]], ack_delay: float) -> None:
        result = self.rec.on_ack(ranges, ack_delay, self.now)
        for pkt in result.acked:
            self.acked.add(pkt.number)
        self.resend.extend(result.lost)
        self.states.add(self.bbr.state)
        self.pump()

    # link --------------------------------------------------------------------------------------

    def transmit(self, number: int) -> None:
        now = self.now
        while self.queue and self.queue[0][0] <= now:
            self.queued -= self.queue.popleft()[1]
        if not self.loss_after_queue and self.rng.random() < self.loss:
            self.link_loss += 1
            return
        if self.queued + MSS > self.queue_bytes:
            self.queue_drops += 1
            return
        depart = max(now, self.link_free) + MSS / self.rate
        self.link_free = depart
        self.queue.append((depart, MSS))
        self.queued += MSS
        self.queue_samples.append((now, self.queued))
        if self.loss_after_queue and self.rng.random() < self.loss:
            self.link_loss += 1
            return
        self.push(depart + self.rtt / 2, "arrive", number)

    # receiver ----------------------------------------------------------------------------------

    def on_arrive(self, number: int) -> None:
        if number not in self.received:
            self.arrivals.append((self.now, MSS))
        self.received.add(number)
        if self.unacked_arrivals == 0:
            self.first_unacked_at = self.now
        self.unacked_arrivals += 1
        if self.unacked_arrivals >= self.ack_every:
            self.send_ack()
        elif self.ack_timer_at == math.inf:
            self.ack_timer_at = self.now + self.max_ack_delay
            self.push(self.ack_timer_at, "ack_timer")

    def send_ack(self) -> None:
        ranges = []
        for r in reversed(self.received):
            ranges.append(r)
            if len(ranges) == 32:
                break
        delay = self.now - self.first_unacked_at
        self.unacked_arrivals = 0
        self.ack_timer_at = math.inf
        self.push(self.now + self.rtt / 2, "ack", (ranges, delay))

    # driver ------------------------------------------------------------------------------------

    def run(self, duration: float, measure_from: float) -> SimResult:
        self.pump()
        while self.events:
            t, _, kind, payload = heapq.heappop(self.events)
            if t > duration:
                break
            self.now = t
            if kind == "arrive":
                assert isinstance(payload, int)
                self.on_arrive(payload)
            elif kind == "ack":
                assert isinstance(payload, tuple)
                self.on_ack(payload[0], payload[1])
            elif kind == "ack_timer":
                if self.unacked_arrivals and t >= self.ack_timer_at:
                    self.send_ack()
            elif kind == "wake":
                if t >= self.wake_at:
                    self.wake_at = math.inf
                    self.pump()
            elif kind == "timer":
                assert isinstance(payload, float)
                self.on_timer(payload)
        window = duration - measure_from
        delivered = sum(b for t, b in self.arrivals if t >= measure_from)
        max_queue = max((q for t, q in self.queue_samples if t >= measure_from), default=0)
        return SimResult(
            goodput=delivered / window,
            max_queue=max_queue,
            sends=self.sends,
            resends=self.resends,
            link_loss=self.link_loss,
            queue_drops=self.queue_drops,
            timer_in_past=self.timer_in_past,
            idle_timeouts=self.idle_timeouts,
            states=self.states,
            spurious=self.rec.spurious_losses,
            btlbw=self.bbr.btlbw,
            loss_rate=self.bbr.loss_rate,
        )


# -- Bbr rules, fed synthetic rate samples -------------------------------------------------------


class Feed:
    """Feeds a Bbr one ACK per round trip, each ending a round."""

    def __init__(self, bbr: Bbr, rtt: float = 0.05) -> None:
        self.bbr, self.rtt = bbr, rtt
        self.delivered = 0
        self.now = 0.0

    def ack(
        self,
        rate: float,
        *,
        lost_fraction: float = 0.0,
        inflight: int | None = None,
        app_limited: bool = False,
        rtt: float | None = None,
        dt: float | None = None,
    ) -> None:
        rtt = self.rtt if rtt is None else rtt
        acked = max(int(rate * rtt), MSS)
        lost = int(acked * lost_fraction / (1 - lost_fraction))
        prior = self.delivered
        self.delivered += acked
        self.now += rtt if dt is None else dt
        flight = acked if inflight is None else inflight
        self.bbr.on_sent(MSS, flight, self.now)
        sample = RateSample(
            delivery_rate=rate,
            is_app_limited=app_limited,
            prior_delivered=prior,
            delivered_total=self.delivered,
            newly_acked=acked,
            newly_lost=lost,
            prior_in_flight=flight,
            bytes_in_flight=flight,
            rtt=rtt,
        )
        self.bbr.on_ack(sample, self.now)


def to_probe_bw(rate: float = 1e7) -> Feed:
    feed = Feed(Bbr(max_datagram=MSS, initial_rtt=0.1))
    for _ in range(10):
        feed.ack(rate)
    assert feed.bbr.state is BbrState.PROBE_BW
    return feed


def test_initial_window_and_rate() -> None:
    bbr = Bbr(max_datagram=MSS, initial_rtt=0.2)
    assert bbr.state is BbrState.STARTUP
    # Two default frames (64 KiB each) fit: a frame leaves only when all of it fits.
    assert bbr.cwnd == INITIAL_WINDOW_BYTES >= 2 * (64 * 1024 + 55 * 32)
    assert bbr.pacing_rate == pytest.approx(STARTUP_GAIN * INITIAL_WINDOW_BYTES / 0.2)
    # With big datagrams (loopback) the window is 32 of them.
    assert Bbr(max_datagram=60000).cwnd == 32 * 60000


def test_startup_until_bandwidth_plateaus_then_drain_then_probe_bw() -> None:
    feed = Feed(Bbr(max_datagram=MSS, initial_rtt=0.1))
    rate = 1e5
    for _ in range(6):  # doubling every round: still starting up
        rate *= 2
        feed.ack(rate, inflight=10**9)
        assert feed.bbr.state is BbrState.STARTUP
    for _ in range(2):
        feed.ack(rate, inflight=10**9)
        assert feed.bbr.state is BbrState.STARTUP
    feed.ack(rate, inflight=10**9)  # third round without 25 % growth: the pipe is full
    assert feed.bbr.state is BbrState.DRAIN
    assert feed.bbr.pacing_gain < 1
    feed.ack(rate, inflight=feed.bbr.bdp())  # the queue drained
    assert feed.bbr.state is BbrState.PROBE_BW


def test_startup_pacing_never_slows_down() -> None:
    feed = Feed(Bbr(max_datagram=MSS, initial_rtt=0.1))
    start = feed.bbr.pacing_rate
    feed.ack(1e4)  # an early, tiny sample
    assert feed.bbr.pacing_rate >= start


def test_probe_bw_window_and_gain_cycle() -> None:
    feed = to_probe_bw(1e7)
    bbr = feed.bbr
    gains = set()
    for _ in range(40):
        feed.ack(1e7, inflight=int(1.3 * bbr.bdp()))
        gains.add(bbr.pacing_gain)
        assert bbr.pacing_rate == pytest.approx(bbr.pacing_gain * 1e7)
        # Two BDPs plus the ACK aggregation: one ACK per round trip is the most there can be.
        assert 0 < bbr.extra_acked <= 1.001 * 1e7 * 0.05
        assert bbr.cwnd == int(2 * 1e7 * 0.05) + int(bbr.extra_acked)
    assert gains == set(PROBE_BW_GAINS)


def test_window_floor_is_four_datagrams() -> None:
    feed = to_probe_bw(1e7)
    for _ in range(12):  # the bandwidth collapsed: 2 BDP is 100 bytes
        feed.ack(1e3, inflight=0)
    assert feed.bbr.btlbw == 1e3
    assert feed.bbr.cwnd == 4 * MSS


def test_a_tiny_min_rtt_floors_the_window_at_a_mebibyte() -> None:
    # Loopback: 30 us of path, 2 GB/s; 2 BDP would be 120 kB, less than two GSO batches.
    feed = Feed(Bbr(max_datagram=65000, initial_rtt=0.1), rtt=30e-6)
    for _ in range(10):
        feed.ack(2e9)
    assert feed.bbr.cwnd >= SHORT_RTT_MIN_CWND


def test_ack_aggregation_widens_the_window() -> None:
    feed = to_probe_bw(1e7)
    bbr = feed.bbr
    plain = 2 * bbr.bdp()
    # A receiver that ACKs a whole round trip at once: the window must hold what the next burst
    # of ACKs releases, on top of 2 BDP, but never more than 100 ms at btlbw.
    for _ in range(3):
        feed.ack(1e7)
    assert bbr.extra_acked > 0
    assert plain < bbr.cwnd <= plain + 0.1 * 1e7


def test_probe_rtt_is_skipped_while_rtts_stay_near_the_minimum() -> None:
    feed = to_probe_bw(1e7)
    bbr = feed.bbr
    while feed.now < 12:  # 5 % above the minimum: no queue worth draining
        feed.ack(1e7, rtt=0.0525, dt=0.5)
        assert bbr.state is BbrState.PROBE_BW
    assert bbr.min_rtt == pytest.approx(0.05)


def test_startup_ends_when_the_round_trip_time_grows() -> None:
    feed = Feed(Bbr(max_datagram=MSS, initial_rtt=0.1))
    rate = 1e5
    for _ in range(3):  # still doubling, but a queue of 10 ms is building: HyStart++'s signal
        rate *= 2
        feed.ack(rate, inflight=10**9, rtt=0.05)
    assert feed.bbr.state is BbrState.STARTUP
    feed.ack(2 * rate, inflight=10**9, rtt=0.06)
    feed.ack(4 * rate, inflight=10**9, rtt=0.06)
    assert feed.bbr.filled_pipe


def test_random_loss_does_not_lower_the_rate() -> None:
    feed = to_probe_bw(1e7)
    bbr = feed.bbr
    for _ in range(200):  # 10 % loss in rounds that built no queue
        feed.ack(0.9e7, lost_fraction=0.1)
    assert bbr.btlbw == pytest.approx(0.9e7)
    assert bbr.loss_rate == pytest.approx(0.1, abs=0.01)
    # Paced at what keeps the link full, not at the (lower) delivered rate.
    assert bbr.send_bw == pytest.approx(1e7, rel=0.02)
    assert bbr.inflight_hi == math.inf


def test_loss_with_a_standing_queue_is_not_compensated() -> None:
    feed = to_probe_bw(1e7)
    for _ in range(100):  # RTT doubled: our own queue, so this loss is congestion
        feed.ack(1e7, lost_fraction=0.1, rtt=0.1)
    assert feed.bbr.loss_rate == 0.0
    assert feed.bbr.send_bw == pytest.approx(1e7)


def test_loss_compensation_is_capped() -> None:
    feed = to_probe_bw(1e7)
    for _ in range(200):
        feed.ack(0.8e7, lost_fraction=0.2)
    assert feed.bbr.send_bw <= 0.8e7 / (1 - 0.15) + 1


def test_high_loss_bounds_inflight_then_the_bound_grows_back() -> None:
    feed = to_probe_bw(1e7)
    bbr = feed.bbr
    big = 2 * bbr.bdp()
    feed.ack(1e7, lost_fraction=0.5, inflight=big)
    assert math.isfinite(bbr.inflight_hi)
    assert bbr.bdp() <= bbr.inflight_hi <= 0.85 * big
    assert bbr.cwnd <= bbr.inflight_hi
    assert bbr.pacing_rate >= 0.75 * 1e7  # the rate model is untouched
    for _ in range(30):  # no more excess loss while using all the bound allows
        feed.ack(1e7, inflight=bbr.cwnd)
    assert bbr.inflight_hi == math.inf
    assert bbr.cwnd == 2 * bbr.bdp() + int(bbr.extra_acked)


def test_high_loss_in_startup_ends_startup() -> None:
    feed = Feed(Bbr(max_datagram=MSS, initial_rtt=0.1))
    feed.ack(1e6, inflight=10**6)
    feed.ack(2e6, lost_fraction=0.4, inflight=10**6)
    assert feed.bbr.state is not BbrState.STARTUP
    assert feed.bbr.filled_pipe


def test_app_limited_samples_only_raise_the_estimate() -> None:
    feed = to_probe_bw(1e7)
    feed.ack(1e6, app_limited=True)
    assert feed.bbr.btlbw == 1e7
    feed.ack(2e7, app_limited=True)
    assert feed.bbr.btlbw == 2e7


def test_bandwidth_estimate_expires_after_ten_rounds() -> None:
    feed = to_probe_bw(1e7)
    for _ in range(12):
        feed.ack(5e6)
    assert feed.bbr.btlbw == 5e6


def test_probe_rtt_when_min_rtt_is_stale() -> None:
    feed = to_probe_bw(1e7)
    bbr = feed.bbr
    while feed.now < 11:  # RTT never again as low as the minimum (nor within 25 % of it)
        feed.ack(1e7, rtt=0.07, dt=0.5)
    assert bbr.state is BbrState.PROBE_RTT
    assert bbr.cwnd == max(4 * MSS, bbr.bdp(0.5))
    feed.ack(1e7, rtt=0.07, inflight=bbr.cwnd, dt=0.01)
    feed.ack(1e7, rtt=0.07, inflight=bbr.cwnd, dt=0.3)
    feed.ack(1e7, rtt=0.07, inflight=bbr.cwnd, dt=0.01)
    assert bbr.state is BbrState.PROBE_BW
    assert bbr.min_rtt == pytest.approx(0.07)  # the path's new delay


def test_persistent_timeouts_restart_the_model() -> None:
    feed = to_probe_bw(1e7)
    feed.bbr.on_timeout(1, feed.now)
    feed.bbr.on_timeout(2, feed.now)
    assert feed.bbr.state is BbrState.PROBE_BW
    feed.bbr.on_timeout(3, feed.now)
    assert feed.bbr.state is BbrState.STARTUP
    assert feed.bbr.cwnd == INITIAL_WINDOW_BYTES and feed.bbr.btlbw == 0


# -- the simulation's checks -----------------------------------------------------------------------

RATE = 2.5e6  # 20 Mbit/s
RTT = 0.04
BDP = RATE * RTT
BURST = 64 * 1024


@pytest.mark.parametrize("loss", [0.0, 0.01, 0.05, 0.10])
@pytest.mark.parametrize("loss_after_queue", [True, False], ids=["after", "before"])
def test_goodput_under_random_loss(loss: float, loss_after_queue: bool) -> None:
    sim = Sim(
        rate=RATE,
        rtt=RTT,
        queue_bytes=int(2 * BDP),
        loss=loss,
        seed=7,
        loss_after_queue=loss_after_queue,
    )
    r = sim.run(duration=6.0, measure_from=2.0)
    assert r.goodput >= 0.9 * RATE * (1 - loss)
    assert r.goodput <= RATE * 1.001  # the link is the link
    assert r.max_queue <= 2 * BDP + BURST
    assert r.queue_drops == 0  # random loss alone must not push us into the queue's limit
    if loss:
        expected = loss / (1 - loss)
        assert 0.5 * expected <= r.resends / r.sends <= 2 * expected
    else:
        assert r.resends == 0
    assert r.timer_in_past == 0
    assert r.idle_timeouts <= 5
    assert {BbrState.STARTUP, BbrState.DRAIN, BbrState.PROBE_BW} <= r.states


def test_loss_after_the_bottleneck_is_compensated() -> None:
    # Lost datagrams used the link: delivery samples show R * (1 - loss), and pacing at that
    # would idle the link by the loss fraction (about 94 % of R * (1 - loss) here).
    sim = Sim(rate=RATE, rtt=RTT, queue_bytes=int(20 * BDP), loss=0.1, seed=2)
    r = sim.run(duration=6.0, measure_from=2.0)
    assert r.goodput >= 0.97 * RATE * 0.9
    assert r.loss_rate == pytest.approx(0.1, abs=0.03)
    assert r.max_queue <= BDP  # ... without a standing queue to show for it


def test_deep_queue_stays_mostly_empty() -> None:
    sim = Sim(rate=RATE, rtt=RTT, queue_bytes=int(20 * BDP), loss=0.0, seed=3)
    r = sim.run(duration=6.0, measure_from=2.0)
    assert r.goodput >= 0.95 * RATE
    # Probing adds a quarter BDP now and then; STARTUP's overshoot has drained long before.
    assert r.max_queue <= 0.5 * BDP + BURST


@pytest.mark.parametrize("loss", [0.0, 0.05])
def test_shallow_queue_keeps_the_link_busy_without_runaway_loss(loss: float) -> None:
    sim = Sim(rate=RATE, rtt=RTT, queue_bytes=int(0.25 * BDP), loss=loss, seed=5)
    r = sim.run(duration=6.0, measure_from=2.0)
    assert r.goodput >= 0.9 * RATE * (1 - loss)
    # Overflow happens (the queue is smaller than a probe), but the resends stay within twice
    # what the random loss alone costs, plus a few percent.
    assert r.resends / r.sends <= 2 * loss / (1 - loss) + 0.03
    assert r.timer_in_past == 0


def test_a_finite_transfer_completes_despite_loss() -> None:
    # 2000 datagrams, then the sender runs dry (app-limited): every one must arrive, resends of
    # resends included, and the timers must go quiet once all is acknowledged.
    sim = Sim(rate=RATE, rtt=RTT, queue_bytes=int(2 * BDP), loss=0.1, seed=11, total=2000)
    r = sim.run(duration=5.0, measure_from=1.0)
    assert list(sim.received) == [(0, 2000)]
    assert len(sim.rec) == 0 and sim.rec.bytes_in_flight == 0
    assert sim.rec.loss_time() is None
    assert r.sends == 2000 and r.timer_in_past == 0
