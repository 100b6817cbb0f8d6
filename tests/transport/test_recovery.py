"""Recovery: loss detection (packet and time thresholds), Karn, PTO, timers, rate samples."""

from __future__ import annotations

import itertools
import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from collectives.transport.congestion import INITIAL_WINDOW_BYTES, RateSample
from collectives.transport.recovery import SHORT_PATH_MAX_PTO, Recovery, SentPacket

MSS = 1200


class Recorder:
    """A Congestion that records its inputs and has a fixed window and rate."""

    def __init__(self, cwnd: int = 100 * MSS, rate: float = math.inf) -> None:
        self.cwnd = cwnd
        self.pacing_rate = rate
        self.samples: list[RateSample] = []
        self.sent: list[tuple[int, int]] = []
        self.losses: list[int] = []
        self.timeouts: list[int] = []

    def on_sent(self, size: int, bytes_in_flight: int, now: float) -> None:
        self.sent.append((size, bytes_in_flight))

    def on_ack(self, sample: RateSample, now: float) -> None:
        self.samples.append(sample)

    def on_loss(self, lost_bytes: int, bytes_in_flight: int, now: float) -> None:
        self.losses.append(lost_bytes)

    def on_timeout(self, pto_count: int, now: float) -> None:
        self.timeouts.append(pto_count)


def make(cc: Recorder | None = None, rtt: float = 0.1, max_ack_delay: float = 0.0) -> Recovery:
    return Recovery(rtt, max_ack_delay, 0.0, congestion=cc or Recorder(), max_datagram=MSS)


def send(rec: Recovery, numbers: range | list[int], now: float, **kw: bool) -> list[SentPacket]:
    pkts = [SentPacket(number=n, size=MSS, **kw) for n in numbers]
    for p in pkts:
        rec.on_sent(p, now)
    return pkts


def numbers(pkts: list[SentPacket]) -> list[int]:
    return sorted(p.number for p in pkts)


def test_sent_then_acked_updates_flight_and_rtt() -> None:
    rec = make()
    send(rec, range(3), 0.0)
    assert rec.bytes_in_flight == 3 * MSS and len(rec) == 3
    res = rec.on_ack([(0, 3)], 0.0, 0.05)
    assert numbers(res.acked) == [0, 1, 2] and res.lost == []
    assert res.rtt_sample == pytest.approx(0.05)
    assert rec.rtt.latest == pytest.approx(0.05)
    assert rec.bytes_in_flight == 0 and len(rec) == 0
    assert rec.last_ack_time == 0.05
    assert rec.on_ack([(0, 3)], 0.0, 0.06).acked == []  # duplicates are ignored


def test_sending_a_tracked_number_again_needs_on_resent() -> None:
    rec = make()
    send(rec, [7], 0.0)
    with pytest.raises(ValueError):
        send(rec, [7], 0.0)


def test_packet_threshold() -> None:
    rec = make()
    send(rec, range(5), 0.0)
    res = rec.on_ack([(3, 4)], 0.0, 0.01)
    assert numbers(res.lost) == [0]  # 3 - 0 >= 3; 1 and 2 may just be reordered
    assert rec.bytes_in_flight == 3 * MSS  # 1, 2 and 4
    res = rec.on_ack([(4, 5)], 0.0, 0.011)
    assert numbers(res.lost) == [1]


def test_time_threshold_and_loss_time() -> None:
    rec = make()
    send(rec, [0], 0.0)
    send(rec, [1], 0.01)
    res = rec.on_ack([(1, 2)], 0.0, 0.1)  # rtt sample 0.09
    assert res.lost == []
    delay = 9 / 8 * max(rec.rtt.smoothed, rec.rtt.latest)
    assert rec.loss_time() == pytest.approx(0.0 + delay)
    assert rec.on_timeout(0.05).lost == []  # early: nothing
    timeout = rec.loss_time()
    assert timeout is not None
    res2 = rec.on_timeout(timeout)
    assert numbers(res2.lost) == [0] and not res2.probe
    assert rec.loss_time() is None  # nothing left in flight
    assert rec.packets_lost == 1


def test_lost_then_acked_is_simply_acked() -> None:
    rec = make()
    send(rec, range(5), 0.0)
    lost = rec.on_ack([(1, 5)], 0.0, 0.05).lost
    assert numbers(lost) == [0]
    res = rec.on_ack([(0, 1)], 0.0, 0.06)
    assert numbers(res.acked) == [0] and res.lost == []
    assert rec.spurious_losses == 1 and len(rec) == 0 and rec.bytes_in_flight == 0


def test_resend_keeps_the_number_and_gives_no_rtt_sample() -> None:
    rec = make()
    pkts = send(rec, range(5), 0.0)
    rec.on_ack([(1, 5)], 0.0, 0.05)
    assert rec.bytes_in_flight == 0
    rec.on_resent(pkts[0], 0.5)
    assert pkts[0].retransmitted and pkts[0].sent_at == 0.5
    assert rec.bytes_in_flight == MSS
    rtt_before = (rec.rtt.latest, rec.rtt.smoothed)
    res = rec.on_ack([(0, 5)], 0.0, 0.9)
    assert numbers(res.acked) == [0]
    assert res.rtt_sample is None  # Karn: which transmission was acked is unknown
    assert (rec.rtt.latest, rec.rtt.smoothed) == rtt_before


def test_a_resent_packet_is_judged_by_what_was_sent_after_it() -> None:
    # Its number is low, but only packets sent *after* the resend may declare it lost.
    rec = make()
    pkts = send(rec, range(6), 0.0)
    rec.on_ack([(1, 6)], 0.0, 0.05)
    rec.on_resent(pkts[0], 0.05)
    send(rec, range(6, 8), 0.05)
    assert rec.on_ack([(6, 8)], 0.0, 0.1).lost == []  # only two later sends acked
    send(rec, [8], 0.1)
    res = rec.on_ack([(8, 9)], 0.0, 0.15)
    assert numbers(res.lost) == [0]


def test_a_resend_acknowledged_a_round_trip_later_orders_loss_detection() -> None:
    # A transfer's tail is all resends.  Once one of them is acknowledged at least min_rtt after
    # it left, no earlier transmission can explain that ACK, so resends sent before it are
    # judged by it (RACK) instead of each waiting for a probe timeout, backed off in turn.
    rec = make()
    pkts = send(rec, range(10), 0.0)
    assert numbers(rec.on_ack([(5, 10)], 0.0, 0.1).lost) == [0, 1, 2, 3, 4]
    for p in pkts[:5]:
        rec.on_resent(p, 0.2)
    # Sooner than min_rtt after the resend: it may be the original that arrived; no verdict.
    assert rec.on_ack([(4, 5)], 0.0, 0.25).lost == []
    rec.on_resent(pkts[3], 0.25)  # (a probe, say) so that number 3 can be acknowledged again
    res = rec.on_ack([(3, 4)], 0.0, 0.36)
    assert numbers(res.acked) == [3] and res.rtt_sample is None  # still Karn: no RTT sample
    assert numbers(res.lost) == [0, 1, 2]  # three sends before it, and 9/8 RTT old
    assert rec.pto_count == 0


def test_resend_while_still_in_flight_counts_once() -> None:
    rec = make()
    pkts = send(rec, range(2), 0.0)
    rec.on_resent(pkts[0], 0.2)
    assert rec.bytes_in_flight == 2 * MSS and len(rec) == 2


def test_resend_after_ack_tracks_it_again() -> None:
    # A frame the receiver could not authenticate was acked as "pending" and is resent whole.
    rec = make()
    pkts = send(rec, range(2), 0.0)
    rec.on_ack([(0, 2)], 0.0, 0.05)
    rec.on_resent(pkts[1], 0.1)
    assert len(rec) == 1 and rec.bytes_in_flight == MSS
    assert numbers(rec.on_ack([(1, 2)], 0.0, 0.2).acked) == [1]


def test_pto_fires_backs_off_and_resets_on_ack() -> None:
    cc = Recorder()
    rec = make(cc, rtt=0.1, max_ack_delay=0.01)
    send(rec, [0], 0.0)
    pto = rec.rtt.pto(0.01)
    assert rec.loss_time() == pytest.approx(pto)
    res = rec.on_timeout(pto)
    assert res.probe and res.lost == [] and rec.pto_count == 1 and cc.timeouts == [1]
    probe = rec.oldest_unacked()
    assert probe is not None and probe.number == 0
    rec.on_resent(probe, pto)
    assert rec.loss_time() == pytest.approx(pto + 2 * pto)  # doubled
    assert rec.on_timeout(pto + pto).probe is False  # early
    rec.on_timeout(3 * pto)
    assert rec.pto_count == 2
    send(rec, [1], 3 * pto)
    rec.on_ack([(1, 2)], 0.0, 3 * pto + 0.05)
    assert rec.pto_count == 0


def _probe_intervals(rtt: float, probes: int) -> list[float]:
    """The gaps between successive probes of an unanswered sender, after one RTT sample."""
    rec = make(Recorder(), rtt=0.1, max_ack_delay=0.005)
    send(rec, [0], 0.0)
    rec.on_ack([(0, 1)], 0.0, rtt)  # min_rtt = rtt
    now = rtt
    send(rec, [1], now)
    gaps = []
    for _ in range(probes):
        at = rec.loss_time()
        assert at is not None
        gaps.append(at - now)
        now = at
        assert rec.on_timeout(now).probe
        pkt = rec.oldest_unacked()
        assert pkt is not None
        rec.on_resent(pkt, now)
    return gaps


def test_probes_on_a_short_path_back_off_to_at_most_50_ms() -> None:
    # A sub-ms path is silent because its receiver is not scheduled (or a buffer overflowed):
    # when it is back, the next probe must come soon, not after seconds of backoff.
    gaps = _probe_intervals(100e-6, 10)
    assert gaps[1] == pytest.approx(2 * gaps[0])  # still backs off at first
    assert max(gaps) == pytest.approx(SHORT_PATH_MAX_PTO)
    assert sum(gaps) < 0.5


def test_a_short_path_probes_within_50_ms_even_with_a_noisy_rtt() -> None:
    # A busy host: one sample of 100 us, then scheduling delays of 20-40 ms inflate rttvar; the
    # plain PTO would be ~70 ms.
    rec = make(Recorder(), rtt=0.1, max_ack_delay=0.005)
    now = 0.0
    for i, sample in enumerate([100e-6, 0.02, 0.04, 0.001, 0.03]):
        send(rec, [i], now)
        now += sample
        rec.on_ack([(i, i + 1)], 0.0, now)
    assert rec.rtt.pto(0.005) > 1.2 * SHORT_PATH_MAX_PTO
    send(rec, [9], now)
    at = rec.loss_time()
    assert at is not None and at - now == pytest.approx(SHORT_PATH_MAX_PTO)


def test_probes_on_a_long_path_back_off_exponentially() -> None:
    gaps = _probe_intervals(0.02, 6)
    for a, b in itertools.pairwise(gaps):
        assert b == pytest.approx(2 * a)
    assert gaps[-1] > 1.0


def test_no_timer_without_ack_eliciting_packets_in_flight() -> None:
    rec = make()
    assert rec.loss_time() is None
    send(rec, [0], 0.0, ack_eliciting=False, in_flight=False)
    assert rec.loss_time() is None and rec.bytes_in_flight == 0
    assert not rec.on_timeout(10.0).probe


def test_lost_ack_only_packets_are_forgotten() -> None:
    rec = make()
    send(rec, [0], 0.0, ack_eliciting=False, in_flight=False)
    send(rec, range(1, 5), 0.0)
    res = rec.on_ack([(1, 5)], 0.0, 0.05)
    assert numbers(res.lost) == [0]
    assert len(rec) == 0  # nobody will resend it, so nothing is kept


def test_loss_time_is_never_in_the_past() -> None:
    rec = make()
    send(rec, [0], 0.0)
    rec.next_send_time(50.0)  # the owner's clock moved far past the PTO deadline
    lt = rec.loss_time()
    assert lt is not None and lt >= 50.0


@settings(max_examples=150, deadline=None)
@given(st.lists(st.tuples(st.sampled_from("sarwt"), st.floats(0, 0.2), st.integers(0, 40))))
def test_loss_time_never_before_the_last_now(ops: list[tuple[str, float, int]]) -> None:
    rec = make()
    now, nxt = 0.0, 0
    tracked: dict[int, SentPacket] = {}
    for op, dt, k in ops:
        now += dt
        if op == "s":
            pkt = SentPacket(number=nxt, size=MSS)
            tracked[nxt] = pkt
            rec.on_sent(pkt, now)
            nxt += 1
        elif op == "a" and nxt:
            rec.on_ack([(k % nxt, k % nxt + 3)], 0.0, now)
        elif op == "r" and tracked:
            rec.on_resent(tracked[k % nxt], now)
        elif op == "w":
            rec.next_send_time(now)
        else:
            rec.on_timeout(now)
        lt = rec.loss_time()
        assert lt is None or lt >= now
        assert rec.bytes_in_flight >= 0


def test_can_send_follows_the_window_but_an_empty_pipe_always_can() -> None:
    rec = make(Recorder(cwnd=2 * MSS))
    assert rec.can_send(10 * MSS)  # nothing in flight
    send(rec, [0], 0.0)
    assert rec.can_send(MSS)
    send(rec, [1], 0.0)
    assert not rec.can_send(1)


def test_next_send_time_paces_at_the_congestion_rate() -> None:
    rec = make(Recorder(rate=1.2e6))
    assert rec.next_send_time(0.0) == 0.0
    now = 0.0
    for n in range(200):
        now = rec.next_send_time(now)
        rec.on_sent(SentPacket(number=n, size=MSS), now)
    assert rec.next_send_time(now) > now
    # 200 datagrams beyond the burst take their time at 1.2 MB/s.
    assert now == pytest.approx((200 * MSS - rec.pacer.burst) / 1.2e6, rel=0.02)


def test_rate_sample_is_delivered_bytes_over_the_interval() -> None:
    cc = Recorder()
    rec = make(cc, rtt=0.1)
    send(rec, range(10), 0.0)
    rec.on_ack([(0, 10)], 0.0, 0.1)
    # Second flight sent at 0.1, acked at 0.2: 10 packets over 0.1 s.
    send(rec, range(10, 20), 0.1)
    rec.on_ack([(10, 20)], 0.0, 0.2)
    s = cc.samples[-1]
    assert s.delivery_rate == pytest.approx(10 * MSS / 0.1)
    assert s.delivered_total == 20 * MSS and s.newly_acked == 10 * MSS
    assert s.prior_delivered == 10 * MSS and s.prior_in_flight == 10 * MSS
    assert s.bytes_in_flight == 0 and s.rtt == pytest.approx(0.1)
    assert not s.is_app_limited


def test_rate_sample_rtt_has_the_ack_delay_removed() -> None:
    cc = Recorder()
    rec = make(cc, rtt=0.1, max_ack_delay=0.02)
    send(rec, [0], 0.0)
    rec.on_ack([(0, 1)], 0.015, 0.1)
    assert cc.samples[-1].rtt == pytest.approx(0.085)
    send(rec, [1], 0.1)
    rec.on_ack([(1, 2)], 0.5, 0.2)  # more than max_ack_delay: only max_ack_delay removed
    assert cc.samples[-1].rtt == pytest.approx(0.08)


def test_losses_reach_the_controller() -> None:
    cc = Recorder()
    rec = make(cc)
    send(rec, range(5), 0.0)
    rec.on_ack([(4, 5)], 0.0, 0.05)
    assert cc.samples[-1].newly_lost == 2 * MSS  # 0 and 1
    timeout = rec.loss_time()
    assert timeout is not None
    rec.on_timeout(timeout)
    assert cc.losses == [2 * MSS]  # 2 and 3 by the time threshold


def test_app_limited_marks_samples_until_that_data_is_delivered() -> None:
    cc = Recorder()
    rec = make(cc)
    send(rec, range(2), 0.0)
    rec.on_app_limited()
    send(rec, range(2, 4), 0.01)
    rec.on_ack([(0, 4)], 0.0, 0.1)
    assert cc.samples[-1].is_app_limited
    send(rec, range(4, 6), 0.1)
    rec.on_ack([(4, 6)], 0.0, 0.2)
    assert not cc.samples[-1].is_app_limited


def test_app_limited_ignored_when_the_window_is_full() -> None:
    cc = Recorder(cwnd=2 * MSS)
    rec = make(cc)
    send(rec, range(2), 0.0)
    rec.on_app_limited()
    rec.on_ack([(0, 2)], 0.0, 0.1)
    assert not cc.samples[-1].is_app_limited


def test_discard_forgets_a_packet_in_any_state() -> None:
    rec = make()
    send(rec, range(5), 0.0)
    rec.on_ack([(1, 5)], 0.0, 0.05)  # 0 lost
    discarded = rec.discard(0)
    assert discarded is not None and discarded.number == 0
    assert rec.discard(0) is None and len(rec) == 0
    send(rec, [9], 0.1)
    assert rec.discard(9) is not None and rec.bytes_in_flight == 0
    assert rec.loss_time() is None


def test_default_congestion_is_bbr() -> None:
    rec = Recovery(0.1, 0.025, 0.0)
    assert rec.cwnd == INITIAL_WINDOW_BYTES
    assert rec.pacing_rate == pytest.approx(2.885 * INITIAL_WINDOW_BYTES / 0.1)


def _state(rec: Recovery) -> tuple[object, ...]:
    pkts = [
        (p.number, p.size, p.sent_at, p.seq, p.delivered, p.delivered_at, p.first_sent_at,
         p.app_limited, p.data)
        for p in sorted(rec._unacked.values(), key=lambda p: p.number)
    ]  # fmt: skip
    return (
        pkts,
        rec._numbers,
        list(rec._outstanding),
        rec.bytes_in_flight,
        rec.pacer.tokens,
        rec._ack_eliciting_outstanding,
        rec._last_ack_eliciting_at,
        rec.congestion.cwnd,
    )


@pytest.mark.parametrize("count", [1, 3, 55])
def test_batched_sends_track_exactly_what_per_packet_sends_do(count: int) -> None:
    """on_sent_segments and on_sent_many (the bulk paths) leave the same state as on_sent per
    datagram: same stamps, maps, bytes in flight and pacer debt (Bbr, paced, after ACKs)."""
    recs = [Recovery(0.01, 0.0, 0.0, max_datagram=MSS) for _ in range(3)]
    now, first = 0.0, 0
    for frame in range(40):
        last = MSS - 17 * (frame % 3)
        for way, rec in enumerate(recs):
            if way == 0:
                pkts = [SentPacket(first + i, MSS, data=("f", i)) for i in range(count)]
                pkts[-1].size = last
                for p in pkts:
                    rec.on_sent(p, now)
            elif way == 1:
                pkts = [SentPacket(first + i, MSS, data=("f", i)) for i in range(count)]
                pkts[-1].size = last
                rec.on_sent_many(pkts, now)
            else:
                rec.on_sent_segments(first, count, MSS, last_size=last, handle="f", now=now)
        first += count
        now += 0.0004
        if frame % 2:
            for rec in recs:
                rec.on_ack([(0, first - count)], 0.0, now)
        assert _state(recs[1]) == _state(recs[0])
        assert _state(recs[2]) == _state(recs[0])
