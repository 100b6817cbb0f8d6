"""The relay keeps real time: a reference flow gets the link's ceiling and no more, and the link
is timed from each datagram's kernel arrival, not from a late read.  (How late the relay forwards
and the socket driver fires timers is measured by ``python -m benchmarks wan --relay --reference``,
not asserted here.)"""

from __future__ import annotations

import socket
import time

import pytest

from collectives.testing.lossy_relay import LossyRelay, RelayLink
from collectives.testing.relay_reference import reference_flow


def test_reference_flow_gets_the_ceiling_and_no_more() -> None:
    # 20 Mbit/s (about 2100 datagrams/s) keeps an in-process relay and sender far from the GIL's
    # limits; the sender offers 5 % more, so the relay's queue (and its rate) decides.
    link = RelayLink(loss=0.02, delay=0.01, bandwidth=20e6, queue_bytes=64 << 10)
    result = reference_flow(link, seconds=2.0, seed=4, in_process=True)
    forward = result.relay["forward"]
    assert result.sent == forward.received
    assert forward.send_failed == 0
    assert forward.queue_dropped > 0  # offered above the link: the tail of the queue drops
    assert result.received == forward.forwarded
    # Never faster than its link; not much slower either (which would under-report a
    # transport).  How close it gets on a quiet machine is the wan benchmark's `ref` row, not a
    # pass/fail bound here: a loaded CI machine delays the in-process relay thread.
    assert 0.9 < result.ratio < 1.02, result
    # The loss rate is the configured one: binomial sd ~0.003 over ~4000 datagrams
    assert abs(forward.loss_rate - 0.02) < 0.012


def test_reference_flow_needs_a_rate() -> None:
    with pytest.raises(ValueError, match="bandwidth"):
        reference_flow(RelayLink(delay=0.01), seconds=1.0)


def test_link_time_starts_at_kernel_arrival_not_at_a_late_read() -> None:
    # 1250 B at 1 Mbit/s: 10 ms each, sent 10 ms apart while the relay does not read (not
    # started): the link was free for each one on arrival.  Read 0.1 s late, they are all past
    # due, so they leave together; timed from the late read instead they would be serialised
    # again, 10 ms each (~0.2 s), as if the link had been down while the relay was busy.
    client = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    target = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    for sock in (client, target):
        sock.bind(("127.0.0.1", 0))
        sock.settimeout(2.0)
    relay = LossyRelay(target.getsockname(), RelayLink(bandwidth=1e6, queue_bytes=1 << 20))
    # Linux switches receive timestamps on for the whole stack in deferred work when the first
    # socket asks: a datagram that arrives before that is stamped when it is read.
    time.sleep(0.05)
    try:
        for i in range(20):
            client.sendto(bytes([i]) * 1250, relay.address)
            time.sleep(0.01)
        time.sleep(0.1)
        relay.start()
        arrivals = []
        for _ in range(20):
            target.recv(2000)
            arrivals.append(time.monotonic())
    finally:
        relay.stop()
        client.close()
        target.close()
    stats = relay.stats()["forward"]
    assert stats.forwarded == 20
    assert stats.read_late_max >= 0.1
    assert arrivals[-1] - arrivals[0] < 0.1, arrivals
