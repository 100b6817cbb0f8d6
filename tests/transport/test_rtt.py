"""RttEstimator (RFC 9002 section 5 with a windowed min_rtt) and WindowedFilter."""

from __future__ import annotations

import pytest

from collectives.transport.rtt import GRANULARITY, RttEstimator, WindowedFilter


def test_before_any_sample_uses_the_initial_rtt() -> None:
    rtt = RttEstimator(0.2)
    assert rtt.smoothed == 0.2
    assert rtt.rttvar == 0.1
    assert not rtt.has_sample
    assert rtt.pto(0.025) == pytest.approx(0.2 + 4 * 0.1 + 0.025)
    with pytest.raises(ValueError):
        RttEstimator(0.0)


def test_first_sample_replaces_the_guess() -> None:
    rtt = RttEstimator(0.5)
    rtt.update(0.1, ack_delay=0.05, now=1.0)  # ack delay ignored on the first sample
    assert (rtt.latest, rtt.smoothed, rtt.rttvar, rtt.min_rtt) == (0.1, 0.1, 0.05, 0.1)


def test_later_samples_are_ewma_smoothed() -> None:
    rtt = RttEstimator(0.5)
    rtt.update(0.1, 0.0, 0.0)
    rtt.update(0.2, 0.0, 0.1)
    assert rtt.rttvar == pytest.approx(0.75 * 0.05 + 0.25 * 0.1)
    assert rtt.smoothed == pytest.approx(0.875 * 0.1 + 0.125 * 0.2)
    assert rtt.min_rtt == 0.1
    assert rtt.latest == 0.2


def test_ack_delay_subtracted_only_when_it_leaves_at_least_min_rtt() -> None:
    honest = RttEstimator(0.5)
    honest.update(0.1, 0.0, 0.0)
    honest.update(0.15, 0.04, 0.1)  # 0.11 >= 0.1: subtracted
    assert honest.smoothed == pytest.approx(0.875 * 0.1 + 0.125 * 0.11)

    inflated = RttEstimator(0.5)
    inflated.update(0.1, 0.0, 0.0)
    inflated.update(0.15, 0.09, 0.1)  # 0.06 < min_rtt: the raw sample is used
    assert inflated.smoothed == pytest.approx(0.875 * 0.1 + 0.125 * 0.15)


def test_nonpositive_samples_are_ignored() -> None:
    rtt = RttEstimator(0.3)
    rtt.update(0.0, 0.0, 1.0)
    rtt.update(-1.0, 0.0, 1.0)
    assert not rtt.has_sample and rtt.smoothed == 0.3


def test_pto_has_a_granularity_floor() -> None:
    rtt = RttEstimator(0.5)
    for i in range(200):
        rtt.update(0.01, 0.0, i * 0.01)  # perfectly steady: rttvar decays towards 0
    assert 4 * rtt.rttvar < GRANULARITY
    assert rtt.pto(0.0) == pytest.approx(rtt.smoothed + GRANULARITY)
    assert rtt.pto(0.02) == pytest.approx(rtt.smoothed + GRANULARITY + 0.02)


def test_min_rtt_follows_a_path_change_after_the_window() -> None:
    rtt = RttEstimator(0.1)
    rtt.update(0.01, 0.0, 0.0)
    t = 0.0
    while t < 9.0:  # the path got slower; the old minimum is still within its window
        t += 0.05
        rtt.update(0.05, 0.0, t)
    assert rtt.min_rtt == 0.01
    while t < 25.0:
        t += 0.05
        rtt.update(0.05, 0.0, t)
    assert rtt.min_rtt == 0.05


def test_windowed_max_keeps_the_best_within_the_window() -> None:
    f = WindowedFilter(10, maximum=True)
    assert f.get() is None
    assert f.update(5.0, 0) == 5.0
    assert f.update(3.0, 1) == 5.0
    assert f.update(7.0, 2) == 7.0
    for t in range(3, 12):
        assert f.update(4.0, t) == 7.0
    # Past the window the old best expires and a recent runner-up takes over, not the newest.
    assert f.update(1.0, 13) == 4.0
    assert f.update(1.0, 40) == 1.0


def test_windowed_min() -> None:
    f = WindowedFilter(1.0, maximum=False)
    f.update(0.5, 0.0)
    assert f.update(0.7, 0.5) == 0.5
    assert f.update(0.7, 1.6) == 0.7
