"""At 10 % loss both ways: lost ACKs cause no duplicate resends, the tail of a transfer gets
bounded redundancy, and pacing behind a standing queue keeps the link busy."""

from __future__ import annotations

import random

import pytest

from collectives.testing.simnet import Link, SimNet
from collectives.transport.config import TransportConfig
from collectives.transport.congestion import Bbr, BbrState
from collectives.transport.receiving import TOUCHED_ACKS, TouchedFrames
from tests.transport.test_transport_on_simnet import MiB, Plan, build, no_peer_lost, payload


def test_a_touched_frame_leads_the_next_acks_then_drops_out() -> None:
    touched = TouchedFrames()
    touched.current[100] = None
    touched.current[40] = None
    assert list(touched.take()) == [100, 40]
    touched.current[200] = None
    # The newest first, then the older ones still repeated.
    assert list(touched.take()) == [200, 100, 40]
    for _ in range(TOUCHED_ACKS - 2):
        touched.take()
    assert list(touched.take()) == [200]  # 100 and 40 were in TOUCHED_ACKS ACKs
    assert touched.take() == {}
    touched.current[7] = None
    touched.clear()
    assert touched.take() == {}


def _lossy_transfer(seed: int) -> tuple[dict[str, int], dict[str, int]]:
    # The benchmark's path (100 Mbit/s, 100 ms, a BDP of queue) and default frames: a window
    # holds ~20 partial frames, more runs than one ACK carries.
    link = Link(delay=0.05, bandwidth=100e6, loss=0.1, queue_bytes=1250 * 1024)
    net = SimNet(seed=seed, link=link)
    eps = build(net, 2, TransportConfig())
    plan = Plan()
    plan.send(net, eps, 0, 1, 0, payload(random.Random(seed), 24 * MiB), parts=1)
    assert net.run_until(lambda: plan.done(net, 2), timeout=120.0)
    plan.verify(net, 2)
    no_peer_lost(net, 2)
    return eps[0].stats(), eps[1].stats()


@pytest.mark.parametrize("seed", [3, 4])
def test_lost_acks_do_not_make_the_sender_resend_what_arrived(seed: int) -> None:
    sender, receiver = _lossy_transfer(seed)
    # Duplicates the receiver saw: a resend of what it held (its report was lost), plus the
    # tail's deliberate copies.  One ACK in ten is lost; without repeating the runs of frames
    # that got resends, 0.5-1.5 % of all data datagrams were such duplicates.
    needless = receiver["dropped_duplicate"] - sender["redundant_segments"]
    assert needless <= sender["datagrams_out"] // 500, (needless, sender["datagrams_out"])
    assert sender["retransmitted_segments"] <= sender["datagrams_out"] * 0.125


def test_tail_redundancy_is_bounded() -> None:
    sender, _ = _lossy_transfer(5)
    assert sender["redundant_segments"] > 0  # the tail's resends and last segment went twice
    # Only resends sent with nothing new queued behind them, and one segment per burst.
    assert sender["redundant_segments"] <= sender["retransmitted_segments"] // 4


def _cruising(*, loss_rate: float, queue_free: bool, round_rate: float) -> Bbr:
    bbr = Bbr(max_datagram=1200, initial_rtt=0.05, now=0.0)
    bbr.state = BbrState.PROBE_BW
    bbr.filled_pipe = True
    bbr.pacing_gain = 1.0
    bbr.btlbw = 11.5e6  # the max filter's upward bias over a true 11.25e6 (90 % of 12.5e6)
    bbr.min_rtt = 0.05
    bbr.loss_rate = loss_rate
    bbr._queue_free = queue_free
    bbr._round_rate = round_rate
    bbr._set_outputs()
    return bbr


def test_behind_a_standing_queue_pacing_drains_it_without_idling_the_link() -> None:
    link = 12.5e6  # bytes/s; a round with a queue delivered link * (1 - 0.1)
    free = _cruising(loss_rate=0.1, queue_free=True, round_rate=0.9 * link)
    assert free.pacing_rate == pytest.approx(11.5e6 / 0.9)  # full compensation
    queued = _cruising(loss_rate=0.1, queue_free=False, round_rate=0.9 * link)
    assert queued.pacing_rate < link  # the queue drains ...
    assert queued.pacing_rate >= 0.94 * link  # ... and the link stays busy (btlbw: 92 %)
    # A round that delivered little (not link-bound) never paces under btlbw ...
    assert _cruising(loss_rate=0.1, queue_free=False, round_rate=1e6).pacing_rate == 11.5e6
    # ... and one that delivered a burst never over the queue-free rate.
    burst = _cruising(loss_rate=0.1, queue_free=False, round_rate=3 * link)
    assert burst.pacing_rate == pytest.approx(11.5e6 / 0.9)
    # Without loss nothing changes: btlbw behind a queue, as before.
    assert _cruising(loss_rate=0.0, queue_free=False, round_rate=link).pacing_rate == 11.5e6


def test_no_tail_copies_on_a_short_path() -> None:
    # Loopback-like (0.2 ms RTT, 64 KB datagrams): a datagram is a whole frame there, so a tail
    # copy would send a 64 KiB message twice; losses are rare and probes come within 50 ms.
    link = Link(delay=0.0001, bandwidth=10e9, loss=0.0)
    net = SimNet(seed=7, link=link)
    eps = build(net, 2, TransportConfig(max_datagram=65000))
    plan = Plan()
    before = 0
    for i in range(5):  # one at a time: each one-frame message leaves the queue dry
        plan.send(net, eps, 0, 1, 0, payload(random.Random(i), 48 * 1024), parts=1)
        assert net.run_until(lambda: plan.done(net, 2), timeout=30.0)
        if i == 0:  # before its first RTT sample a path counts as long: one copy at most
            before = eps[0].stats()["redundant_segments"]
            assert before <= 1
    plan.verify(net, 2)
    assert eps[0].stats()["redundant_segments"] == before
