"""The constants of :mod:`.congestion`'s controller, each with the reason for its value."""

from __future__ import annotations

#: 2/ln(2): the smallest gain that doubles the delivery rate every round trip in STARTUP.
STARTUP_GAIN = 2.885
#: STARTUP's window gain.  Measured on the simulated 100 Mbit/s path: BBRv3's 2.0 (which bounds the
#: STARTUP queue to one BDP) removed the ~1000 tail drops at the end of STARTUP but ramped up
#: one round trip later, which cost more whole-transfer goodput than the resends did.
STARTUP_CWND_GAIN = STARTUP_GAIN
#: Probe up, drain what that queued, then cruise; one phase per min_rtt.
PROBE_BW_GAINS = (1.25, 0.75, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0)
PROBE_BW_CWND_GAIN = 2.0
#: Rounds of the bandwidth max filter: longer than one gain cycle, so a probe is always in it.
BTLBW_WINDOW_ROUNDS = 10
#: STARTUP ends when the bandwidth grew less than this factor for FULL_BW_ROUNDS rounds.
FULL_BW_GROWTH = 1.25
FULL_BW_ROUNDS = 3
MIN_RTT_WINDOW = 10.0
PROBE_RTT_DURATION = 0.2
#: Random loss above this is treated as congestion anyway: no path worth using loses more, and
#: compensating more would let a lossy queue hide behind it.
MAX_LOSS_COMPENSATION = 0.15
#: A round losing more than this (and more than twice its normal loss plus 10 %) is congestion.
HIGH_LOSS = 0.25
#: ... and only when at least this many packets were lost: a few losses in a tiny round say
#: nothing about the path.
HIGH_LOSS_MIN_PACKETS = 3
#: EWMA weight per clean round of the loss-rate estimate.
LOSS_RATE_GAIN = 1 / 8
#: Back-off factor of inflight_hi below the inflight that lost too much.
INFLIGHT_HI_BETA = 0.85
#: A min_rtt below this is a LAN or loopback: host scheduling, not the wire, sets the real RTT.
SHORT_RTT = 0.001
#: The window floor there: 64 frames of 64 KiB, a quarter of the receive credit and of the socket
#: buffer the UDP backend asks for (16 MiB each).  Such a path's RTT is the receiver's scheduling
#: delay (1-2 ms with 4 ranks on 2 cores), so the BDP from a delivery rate measured while it was
#: descheduled is far too small, and 1 MiB left a fan-out leader waiting on a full window.
SHORT_RTT_MIN_CWND = 4 << 20
#: Rounds over which the largest ACK aggregation is remembered.
EXTRA_ACKED_ROUNDS = 10
#: Aggregation is trusted up to this much time at btlbw (BBR's cap): more would be a queue.
EXTRA_ACKED_MAX_TIME = 0.1
#: HyStart++'s delay increase threshold: min_rtt / 8, clamped to these bounds (seconds).
STARTUP_RTT_DIVISOR = 8
STARTUP_RTT_MIN_THRESH = 0.004
STARTUP_RTT_MAX_THRESH = 0.016
#: Rounds after DRAIN whose losses are still blamed on STARTUP's overshoot, not judged.
STARTUP_LOSS_ROUNDS = 2
#: RTT samples a round needs before its minimum is trusted mid-round (RFC 9406's N_RTT_SAMPLE).
STARTUP_RTT_SAMPLES = 8
#: A round with an RTT this close to min_rtt renews it without PROBE_RTT.
SIMILAR_MIN_RTT = 1.125
#: The queueing delay (share of min_rtt, at least 2 ms) below which a round counts as free of
#: our own queue: loss compensation stays on, and min_rtt is renewed without PROBE_RTT.  12.5 %
#: switched compensation off so often at 5-10 % loss that goodput fell by 2 %.
QUEUE_FREE_SLACK = 0.25
#: Behind a standing queue of ours, pacing is this far under the link rate the last round's
#: delivery rate implies (and never under btlbw): the queue drains, the link stays busy.
QUEUE_DRAIN_MARGIN = 0.05
#: PROBE_BW gain cycles within which an RTT near min_rtt renews min_rtt when it expires.
NEAR_MIN_RTT_CYCLES = 2
#: The least initial window (bytes), whatever the datagram size: two frames of the default
#: ``frame_bytes`` (64 KiB, 55 datagrams of 1200 bytes) and their control chunks.  A frame leaves
#: only when all of it fits in the window, so a smaller window moved one frame per round trip
#: and cost STARTUP two rounds (0.2 s of a 3 s transfer at 100 ms) before any rate sample.
INITIAL_WINDOW_BYTES = 136 * 1024
