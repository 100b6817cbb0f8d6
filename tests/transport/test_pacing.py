"""Pacer: token bucket with a burst allowance and debt."""

from __future__ import annotations

import math

import pytest

from collectives.transport.pacing import DEFAULT_BURST, GRANULARITY, Pacer


def test_infinite_rate_never_delays() -> None:
    p = Pacer()
    for _ in range(1000):
        assert p.next_send_time(1.0, 1200) == 1.0
        p.on_sent(1200, 1.0)


def test_a_burst_goes_out_at_once_then_the_rate_applies() -> None:
    p = Pacer(rate=1e6, burst=12_000)
    for _ in range(10):
        assert p.next_send_time(0.0, 1200) == 0.0
        p.on_sent(1200, 0.0)
    t = p.next_send_time(0.0, 1200)
    assert t == pytest.approx(1200 / 1e6)


def test_long_run_rate_is_exact() -> None:
    rate, size = 2e6, 1200
    p = Pacer(rate=rate, burst=DEFAULT_BURST)
    now, sent = 0.0, 0
    while now < 1.0:
        now = p.next_send_time(now, size)
        p.on_sent(size, now)
        sent += size
    assert sent == pytest.approx(rate * 1.0 + DEFAULT_BURST, rel=0.01)


def test_a_send_bigger_than_the_burst_is_allowed_and_paid_for() -> None:
    p = Pacer(rate=1e6, burst=10_000)
    assert p.next_send_time(0.0, 50_000) == 0.0
    p.on_sent(50_000, 0.0)
    assert p.tokens == -40_000
    # The debt plus a full burst must be earned before the next big send.
    assert p.next_send_time(0.0, 50_000) == pytest.approx(0.05)


def test_debt_of_sends_that_ignored_the_pacer_is_capped() -> None:
    p = Pacer(rate=1e6, burst=10_000)
    for _ in range(100):
        p.on_sent(1200, 0.0)
    assert p.tokens == -10_000
    assert p.next_send_time(0.0, 1200) == pytest.approx(0.0112)


def test_tokens_never_exceed_the_burst_after_idle() -> None:
    p = Pacer(rate=1e6, burst=10_000)
    p.on_sent(10_000, 0.0)
    assert p.next_send_time(100.0, 1200) == 100.0
    assert p.tokens == 10_000


def test_set_rate_keeps_what_the_old_rate_earned() -> None:
    p = Pacer(rate=1e6, burst=10_000)
    p.on_sent(10_000, 0.0)
    p.set_rate(1e3, 0.005)  # 5000 bytes earned at the old rate
    assert p.tokens == pytest.approx(5000)
    assert p.next_send_time(0.005, 6000) == pytest.approx(0.005 + 1000 / 1e3)
    p.set_rate(math.inf, 0.006)
    assert p.next_send_time(0.006, 10**9) == 0.006


@pytest.mark.parametrize("rate", [0.0, -1.0, math.nan])
def test_invalid_rates_are_refused(rate: float) -> None:
    with pytest.raises(ValueError):
        Pacer(rate=rate)
    with pytest.raises(ValueError):
        Pacer().set_rate(rate, 0.0)


def test_the_burst_grows_to_a_millisecond_at_high_rates() -> None:
    # Pacing finer than the timer granularity only costs wakeups: at 2 GB/s a burst is 2 MB.
    pacer = Pacer(rate=1e6)
    assert pacer.burst == DEFAULT_BURST
    pacer.set_rate(2e9, now=0.0)
    assert pacer.burst == int(2e9 * GRANULARITY)
    pacer.set_rate(1e6, now=0.0)
    assert pacer.burst == DEFAULT_BURST
