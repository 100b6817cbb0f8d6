"""Bbr rules for the start of a transfer and for lossy paths: when STARTUP ends, which losses
bound inflight, how soon loss is compensated, and when PROBE_RTT can be skipped."""

from __future__ import annotations

import math

import pytest

from collectives.transport.congestion import (
    STARTUP_LOSS_ROUNDS,
    STARTUP_RTT_SAMPLES,
    Bbr,
    BbrState,
    RateSample,
)
from tests.transport.test_congestion import MSS, Feed, to_probe_bw


def test_probe_rtt_is_skipped_after_a_recent_rtt_near_the_minimum() -> None:
    # Loss compensation keeps a small queue; the probe-down phase drains it once a gain cycle.
    # An RTT within the tolerated queue lately means no standing queue: no PROBE_RTT, even when
    # the round at expiry itself saw a queue.
    feed = to_probe_bw(1e7)
    bbr = feed.bbr
    while feed.now < 12:
        feed.ack(1e7, rtt=0.058, dt=0.25)  # a drained queue: 16 % above the minimum
        feed.ack(1e7, rtt=0.07, dt=0.25)  # a queued round
        assert bbr.state is BbrState.PROBE_BW
    assert bbr.min_rtt == pytest.approx(0.05)


def _startup_ack(bbr: Bbr, *, prior: int, total: int, rtt: float, now: float) -> None:
    bbr.on_ack(
        RateSample(
            delivery_rate=1e6,
            is_app_limited=False,
            prior_delivered=prior,
            delivered_total=total,
            newly_acked=MSS,
            newly_lost=0,
            prior_in_flight=10**6,
            bytes_in_flight=10**6,
            rtt=rtt,
        ),
        now,
    )


def test_startup_ends_within_the_round_whose_rtt_grows() -> None:
    # RFC 9406 checks every ACK once a round has 8 RTT samples: a round of 2.9x pacing onto a
    # queue already growing would overflow it before the round ends.
    bbr = Bbr(max_datagram=MSS, initial_rtt=0.1)
    _startup_ack(bbr, prior=0, total=MSS, rtt=0.05, now=0.05)  # round 1 starts
    delivered = MSS
    for i in range(STARTUP_RTT_SAMPLES):  # all inside round 2 (prior < its start)
        _startup_ack(bbr, prior=MSS, total=delivered + MSS, rtt=0.05, now=0.1 + i * 1e-3)
        delivered += MSS
    assert bbr.round_count == 2 and not bbr.filled_pipe  # only the first ACK started round 2
    # Round 3: 10 ms of queue.  Its first ACK ends round 2 (that sample is round 2's), so
    # STARTUP_RTT_SAMPLES ACKs give it one sample too few.
    start = delivered
    for i in range(STARTUP_RTT_SAMPLES):
        _startup_ack(bbr, prior=start, total=delivered + MSS, rtt=0.06, now=0.2 + i * 1e-3)
        delivered += MSS
    assert not bbr.filled_pipe
    _startup_ack(bbr, prior=start, total=delivered + MSS, rtt=0.06, now=0.21)
    assert bbr.filled_pipe and bbr.round_count == 3  # the round has not ended


def test_losses_found_while_draining_startup_do_not_bound_inflight() -> None:
    # STARTUP's overshoot is detected a round later, when DRAIN has already cut inflight:
    # judging the loss by that inflight would bound the window below what the path needs.
    feed = Feed(Bbr(max_datagram=MSS, initial_rtt=0.1))
    for rate in (1e6, 2e6, 4e6, 8e6):
        feed.ack(rate, inflight=10**6)
    for _ in range(3):  # plateau: pipe full
        feed.ack(8e6, inflight=10**6)
    assert feed.bbr.state is BbrState.DRAIN
    bdp = int(8e6 * feed.rtt)
    feed.ack(8e6, lost_fraction=0.5, inflight=4 * bdp)  # the overshoot's losses, found now
    feed.ack(8e6, inflight=bdp)  # ends that round (in DRAIN); inflight is down to a BDP
    assert feed.bbr.state is BbrState.PROBE_BW
    assert feed.bbr.inflight_hi == math.inf
    feed.ack(8e6, lost_fraction=0.5, inflight=bdp)  # still STARTUP's packets
    feed.ack(8e6, inflight=bdp)
    assert feed.bbr.inflight_hi == math.inf
    for _ in range(STARTUP_LOSS_ROUNDS):
        feed.ack(8e6, inflight=bdp)
    feed.ack(8e6, lost_fraction=0.5, inflight=bdp)  # now it is this phase's own loss
    feed.ack(8e6, inflight=bdp)
    assert math.isfinite(feed.bbr.inflight_hi)


def test_the_first_clean_round_sets_the_loss_rate_outright() -> None:
    # An EWMA from 0 took ten rounds (a second at 100 ms) to pace for the loss.
    feed = Feed(Bbr(max_datagram=MSS, initial_rtt=0.1))
    for _ in range(10):  # STARTUP, DRAIN, two rounds of grace, then clean rounds
        feed.ack(0.9e7, lost_fraction=0.1)
    assert feed.bbr.state is BbrState.PROBE_BW
    assert feed.bbr.loss_rate == pytest.approx(0.1, abs=0.005)
    assert feed.bbr.send_bw == pytest.approx(1e7, rel=0.02)
