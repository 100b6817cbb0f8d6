"""Pacing on a path with a sub-millisecond RTT (loopback, a LAN): bursts of several frames and a
rate no slower than the window opens; a longer path keeps the model's rate and bursts."""

from __future__ import annotations

import math

import pytest

from collectives.transport.congestion import SHORT_RTT, RateSample
from collectives.transport.pacing import DEFAULT_BURST, SHORT_PATH_BURST, Pacer
from collectives.transport.recovery import SHORT_PATH_PACING_GAIN, Recovery, SentPacket

MSS = 1200


class FixedModel:
    """A Congestion with a fixed window and pacing rate (the layer under test is Recovery)."""

    def __init__(self, cwnd: int, rate: float) -> None:
        self.cwnd = cwnd
        self.pacing_rate = rate

    def on_sent(self, size: int, bytes_in_flight: int, now: float) -> None:
        pass

    def on_ack(self, sample: RateSample, now: float) -> None:
        pass

    def on_loss(self, lost_bytes: int, bytes_in_flight: int, now: float) -> None:
        pass

    def on_timeout(self, pto_count: int, now: float) -> None:
        pass


def _exchange(rtt: float, model: FixedModel, count: int = 20) -> Recovery:
    """Send and acknowledge ``count`` packets one by one, each after ``rtt``."""
    rec = Recovery(0.1, 0.0, 0.0, congestion=model, max_datagram=MSS)
    now = 0.0
    for n in range(count):
        rec.on_sent(SentPacket(n, MSS), now)
        now += rtt
        rec.on_ack([(n, n + 1)], 0.0, now)
    return rec


def test_min_burst_lets_several_frames_out_back_to_back() -> None:
    pacer = Pacer(rate=1e6)
    pacer.on_sent(64 * 1024, 0.0)
    assert pacer.next_send_time(0.0, 64 * 1024) > 0.0  # the default burst: one frame
    pacer.set_min_burst(SHORT_PATH_BURST, 0.0)
    assert pacer.burst == SHORT_PATH_BURST
    now = 1.0  # long enough to fill the larger bucket at 1 MB/s
    for _ in range(SHORT_PATH_BURST // (64 * 1024)):
        assert pacer.next_send_time(now, 64 * 1024) == now
        pacer.on_sent(64 * 1024, now)
    assert pacer.next_send_time(now, 64 * 1024) > now
    pacer.set_min_burst(DEFAULT_BURST, now)
    assert pacer.burst == DEFAULT_BURST


@pytest.mark.parametrize("burst", [0, -1])
def test_min_burst_must_be_positive(burst: int) -> None:
    with pytest.raises(ValueError, match="burst"):
        Pacer(rate=1e6).set_min_burst(burst, 0.0)


def test_a_short_path_paces_no_slower_than_the_window_opens() -> None:
    model = FixedModel(cwnd=4 << 20, rate=10e6)  # a rate measured while the receiver slept
    rtt = SHORT_RTT / 10
    rec = _exchange(rtt, model)
    assert rec.pacer.burst >= SHORT_PATH_BURST
    least = SHORT_PATH_PACING_GAIN * model.cwnd / rec.rtt.smoothed
    assert rec.pacer.rate == pytest.approx(least)
    assert rec.pacer.rate > model.pacing_rate


def test_a_long_path_keeps_the_models_rate_and_burst() -> None:
    model = FixedModel(cwnd=4 << 20, rate=10e6)
    rec = _exchange(0.02, model)
    assert rec.pacer.rate == model.pacing_rate
    assert rec.pacer.burst == max(DEFAULT_BURST, int(model.pacing_rate * 0.001))


def test_a_fast_model_rate_is_never_lowered_on_a_short_path() -> None:
    model = FixedModel(cwnd=4 << 20, rate=math.inf)  # pacing off stays off
    rec = _exchange(SHORT_RTT / 10, model)
    assert math.isinf(rec.pacer.rate)
