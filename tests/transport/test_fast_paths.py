"""Each per-message fast path of the core leaves exactly the state its general path leaves.

The fast paths (docs/udp-transport.md, "Fast paths") skip work for the common case of a small
message: ``Bbr.on_ack`` outside DRAIN and PROBE_RTT, ``Recovery.on_ack`` of the only packet in
flight, ``Inbox.on_chunk`` of a whole message next in line.  Each test feeds the same inputs to
the fast entry point and to the general one and compares everything they keep.
"""

from __future__ import annotations

import dataclasses
import itertools
import random
from typing import Any

import pytest

from collectives.transport.congestion import Bbr, BbrState, RateSample
from collectives.transport.events import Event, MessageReceived, MessageSent
from collectives.transport.frames import DataChunk
from collectives.transport.receiving import Inbox
from collectives.transport.recovery import Recovery, SentPacket
from collectives.transport.rtt import WindowedFilter
from tests.transport.test_congestion import MSS, Sim

# -- Bbr.on_ack ----------------------------------------------------------------------------------


class _Recording:
    """A Congestion that forwards to a Bbr and records every call, to replay it elsewhere."""

    def __init__(self, bbr: Bbr) -> None:
        self.bbr = bbr
        self.calls: list[tuple[str, tuple[Any, ...]]] = []

    @property
    def cwnd(self) -> int:
        return self.bbr.cwnd

    @property
    def pacing_rate(self) -> float:
        return self.bbr.pacing_rate

    def on_sent(self, size: int, bytes_in_flight: int, now: float) -> None:
        self.calls.append(("on_sent", (size, bytes_in_flight, now)))
        self.bbr.on_sent(size, bytes_in_flight, now)

    def on_ack(self, sample: RateSample, now: float) -> None:
        self.calls.append(("on_ack", (sample, now)))
        self.bbr.on_ack(sample, now)

    def on_loss(self, lost_bytes: int, bytes_in_flight: int, now: float) -> None:
        self.calls.append(("on_loss", (lost_bytes, bytes_in_flight, now)))
        self.bbr.on_loss(lost_bytes, bytes_in_flight, now)

    def on_timeout(self, pto_count: int, now: float) -> None:
        self.calls.append(("on_timeout", (pto_count, now)))
        self.bbr.on_timeout(pto_count, now)


def _fields(obj: object) -> dict[str, object]:
    """An object's attributes: vars() of the source build; a compiled (mypyc) class has no
    ``__dict__``, its ``__getstate__`` lists them."""
    if hasattr(obj, "__dict__"):
        return dict(vars(obj))
    return dict(obj.__getstate__())  # type: ignore[attr-defined]


def _bbr_state(bbr: Bbr) -> dict[str, object]:
    state = _fields(bbr)
    for name, value in state.items():
        if isinstance(value, WindowedFilter):
            state[name] = (list(value._v), list(value._t))
    return state


def _fast_path_applies(bbr: Bbr, now: float) -> bool:
    return bbr.state in (BbrState.STARTUP, BbrState.PROBE_BW) and not (
        now - bbr._min_rtt_stamp > 10.0
    )


@pytest.mark.parametrize(
    ("loss", "rtt", "total", "seconds"),
    [
        (0.0, 0.05, float("inf"), 25.0),  # STARTUP, DRAIN, PROBE_BW, min_rtt renewals
        (0.05, 0.02, float("inf"), 12.0),  # random loss: loss_rate, inflight_hi growth
        (0.35, 0.03, float("inf"), 6.0),  # loss far above normal: inflight_hi bounds
        (0.0, 0.01, 3e6, 6.0),  # the application runs dry: app-limited samples
    ],
)
def test_bbr_on_ack_fast_path_leaves_the_general_paths_state(
    loss: float, rtt: float, total: float, seconds: float
) -> None:
    sim = Sim(rate=1.5e6, rtt=rtt, queue_bytes=60_000, loss=loss, total=total, seed=7)
    recording = _Recording(sim.bbr)
    sim.rec.congestion = recording
    sim.run(seconds, measure_from=0.0)
    assert recording.calls

    fast = Bbr(max_datagram=MSS, initial_rtt=0.1, now=0.0)
    general = Bbr(max_datagram=MSS, initial_rtt=0.1, now=0.0)
    taken = 0
    seen: set[BbrState] = set()
    for name, args in recording.calls:
        if name == "on_ack":
            sample, now = args
            taken += _fast_path_applies(fast, now)
            fast.on_ack(sample, now)
            general._on_ack_general(sample, now)
        else:
            getattr(fast, name)(*args)
            getattr(general, name)(*args)
        assert _bbr_state(fast) == _bbr_state(general), (name, args)
        seen.add(fast.state)
    assert taken > 100  # the fast path ran, and agreed every time
    if loss == 0.0 and total == float("inf"):
        assert {BbrState.STARTUP, BbrState.DRAIN, BbrState.PROBE_BW} <= seen


def test_bbr_min_rtt_expiry_takes_the_general_path_and_agrees() -> None:
    fast = Bbr(max_datagram=MSS, initial_rtt=0.05, now=0.0)
    general = Bbr(max_datagram=MSS, initial_rtt=0.05, now=0.0)
    rng = random.Random(3)
    delivered = 0
    now = 0.0
    for i in range(3000):
        now += 0.01
        rtt = 0.05 if i < 50 else 0.05 * rng.uniform(1.3, 2.0)  # a queue that never drains
        acked = 12_000
        sample = RateSample(
            2e6 * rng.uniform(0.8, 1.2), False, delivered, delivered + acked, acked, 0,
            60_000, 50_000, rtt,
        )  # fmt: skip
        delivered += acked
        fast.on_ack(sample, now)
        general._on_ack_general(sample, now)
        assert _bbr_state(fast) == _bbr_state(general), i
    assert fast.round_count > 100


# -- Recovery.on_ack -----------------------------------------------------------------------------


def _recovery_state(rec: Recovery) -> tuple[object, ...]:
    pkts = [
        (p.number, p.size, p.sent_at, p.seq, p.delivered, p.delivered_at, p.first_sent_at,
         p.app_limited, p.lost, p.retransmitted)
        for p in sorted(rec._unacked.values(), key=lambda p: p.number)
    ]  # fmt: skip
    simple = {
        k: v
        for k, v in _fields(rec).items()
        if k not in ("rtt", "congestion", "pacer", "_unacked", "_outstanding", "_numbers")
    }
    rtt = rec.rtt
    return (
        pkts,
        list(rec._numbers),
        list(rec._outstanding),
        simple,
        (rtt.smoothed, rtt.rttvar, rtt.min_rtt, rtt.latest, rtt.has_sample),
        _bbr_state(rec.congestion) if isinstance(rec.congestion, Bbr) else None,
        (rec.pacer.rate, rec.pacer.burst, rec.pacer.tokens),
    )


def _numbers_of(pkts: list[SentPacket]) -> list[int]:
    return sorted(p.number for p in pkts)


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_recovery_on_ack_of_the_only_packet_matches_the_general_loop(seed: int) -> None:
    """A list of one range takes the fast path when it acknowledges the only packet tracked;
    the same range as an iterator always takes the general loop."""
    rng = random.Random(seed)
    recs = [Recovery(0.01, 0.001, 0.0, max_datagram=65000) for _ in range(2)]
    now = 0.0
    first = 0
    fast_taken = 0
    for step in range(600):
        count = 1 if rng.random() < 0.8 else rng.randint(2, 4)
        app_limited = rng.random() < 0.3
        for rec in recs:
            rec.on_sent_segments(first, count, 1200, last_size=900, handle=None, now=now)
            if app_limited:
                rec.on_app_limited()
        first += count
        now += rng.uniform(5e-5, 3e-4)
        if rng.random() < 0.1:
            continue  # nothing acknowledged this time: several packets in flight next
        # Mostly everything; now and then the newest only (older ones may be declared lost).
        ranges = [(first - 1, first)] if rng.random() < 0.05 else [(0, first)]
        delay = rng.choice([0.0, 1e-5, 5e-4])
        fast_taken += len(recs[0]._numbers) == 1
        results = [
            recs[0].on_ack(list(ranges), delay, now),
            recs[1].on_ack(iter(ranges), delay, now),
        ]
        assert _numbers_of(results[0].acked) == _numbers_of(results[1].acked), step
        assert _numbers_of(results[0].lost) == _numbers_of(results[1].lost), step
        resend = {p.number for p in results[0].lost if p.ack_eliciting and rng.random() < 0.5}
        for rec, result in zip(recs, results, strict=True):
            for pkt in sorted(result.lost, key=lambda p: p.number):
                if pkt.number in resend:
                    rec.on_resent(pkt, now)
        assert results[0].rtt_sample == results[1].rtt_sample, step
        assert _recovery_state(recs[0]) == _recovery_state(recs[1]), step
        if rng.random() < 0.05:
            timer = recs[0].loss_time()
            assert timer == recs[1].loss_time()
            if timer is not None:
                now = max(now, timer)
                assert recs[0].on_timeout(now) == recs[1].on_timeout(now)
    assert fast_taken > 300


# -- Inbox.on_chunk ------------------------------------------------------------------------------


class _InboxLog:
    def __init__(self) -> None:
        self.allocations: list[tuple[int, int, bytes, int]] = []
        self.events: list[tuple[object, ...]] = []

    def allocate(self, peer: int, channel: int, meta: bytes, body_len: int) -> memoryview:
        self.allocations.append((peer, channel, meta, body_len))
        return memoryview(bytearray(body_len))

    def emit(self, event: Event) -> None:
        assert isinstance(event, MessageReceived)
        self.events.append(
            (event.peer, event.channel, event.message_id, event.meta, bytes(event.body))
        )


def _chunks(rng: random.Random) -> list[DataChunk]:
    """Messages on three channels, some whole, some split, some chunks reordered."""
    out: list[DataChunk] = []
    seqs = [0, 0, 0]
    for message_id in range(1, 400):
        channel = rng.randrange(3)
        seq = seqs[channel]
        seqs[channel] += 1
        meta = bytes([message_id % 256]) * rng.randint(0, 20)
        body = bytes([(message_id * 7) % 256]) * rng.choice([0, 1, 100, 3000])
        stream = meta + body
        cuts = [0, len(stream)]
        if len(body) > 1 and rng.random() < 0.3:
            cuts.insert(1, rng.randint(len(meta) + 1, len(stream) - 1))
        parts = [
            DataChunk(channel, 1, 0, seq, message_id, a, len(meta), len(body),
                      memoryview(stream[a:b]))
            for a, b in itertools.pairwise(cuts)
        ]  # fmt: skip
        if len(parts) > 1 and rng.random() < 0.5:
            parts.reverse()  # the body's tail before its meta: staged
        out.extend(parts)
    # Swap some neighbours of one channel: a later message before an earlier one.
    for i in range(len(out) - 1):
        if rng.random() < 0.1 and out[i].channel == out[i + 1].channel:
            out[i], out[i + 1] = out[i + 1], out[i]
    return out


@pytest.mark.parametrize("seed", [1, 2, 3, 4])
def test_inbox_whole_message_fast_path_matches_the_general_path(seed: int) -> None:
    logs = [_InboxLog(), _InboxLog()]
    inboxes = [Inbox(5, log.allocate, log.emit) for log in logs]
    fast_taken = 0
    for chunk in _chunks(random.Random(seed)):
        chan = inboxes[0]._channels.get(chunk.channel)
        fast_taken += (
            (chan is None or not chan.messages)
            and chunk.offset == 0
            and len(chunk.data) == chunk.meta_len + chunk.body_len
        )
        inboxes[0].on_chunk(chunk)
        inboxes[1]._on_chunk_general(chunk)
        assert logs[0].allocations == logs[1].allocations
        assert logs[0].events == logs[1].events
        for name in ("released", "staged_bytes"):
            assert getattr(inboxes[0], name) == getattr(inboxes[1], name)
        channels = [
            {
                c: (s.allocate_next, s.deliver_next, sorted(s.messages))
                for c, s in ib._channels.items()
            }
            for ib in inboxes
        ]
        assert channels[0] == channels[1]
    assert fast_taken > 100
    assert len(logs[0].events) == 399  # every message delivered


# -- events --------------------------------------------------------------------------------------


def test_per_message_events_keep_what_their_dataclasses_promise() -> None:
    """MessageReceived and MessageSent write their own __init__ (one per message): still frozen,
    keyword-constructible, compared, hashed and printed as the generated one would."""
    sent = MessageSent(peer=1, message_id=2)
    assert sent == MessageSent(1, 2) and hash(sent) == hash(MessageSent(1, 2))
    assert repr(sent) == "MessageSent(peer=1, message_id=2)"
    body = memoryview(b"xy")
    received = MessageReceived(peer=1, channel=2, message_id=3, meta=b"m", body=body)
    assert (received.peer, received.channel, received.message_id, received.meta) == (1, 2, 3, b"m")
    assert received.body is body
    assert [f.name for f in dataclasses.fields(received)] == list(received.__match_args__)
    for event in (sent, received):
        with pytest.raises(dataclasses.FrozenInstanceError):
            event.peer = 9  # type: ignore[misc]
