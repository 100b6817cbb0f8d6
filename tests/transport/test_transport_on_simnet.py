"""Real transport cores (collectives.transport.Endpoint) on the simulated network.

Every scenario is seeded and runs under the virtual clock, so it replays exactly and a 16 MiB
transfer over a lossy 100 Mbit/s link costs only the cores' CPU time.  The simnet itself fails a
run whose core asks for a timer in the past, so every test here checks that too.
"""

from __future__ import annotations

import itertools
import random
import tracemalloc
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import pytest

from collectives.auth import ClusterKey
from collectives.testing.simnet import Link, SimNet, SimNode

endpoint_module = pytest.importorskip("collectives.transport.endpoint")
from collectives.transport.config import TransportConfig  # noqa: E402
from collectives.transport.events import (  # noqa: E402
    MessageReceived,
    MessageSent,
    PeerAddressChanged,
    PeerConnected,
    PeerLost,
)

Endpoint = endpoint_module.Endpoint
KEY = ClusterKey("simnet-test-key-0123456789abcdef")
KiB, MiB = 1024, 1024 * 1024
DOCUMENTED_COUNTERS = {
    "datagrams_in", "datagrams_out", "bytes_in", "bytes_out", "frames_sealed", "frames_opened",
    "retransmitted_segments", "dropped_malformed", "dropped_wrong_cluster",
    "dropped_unknown_session", "dropped_auth", "dropped_replay", "dropped_duplicate",
    "handshakes", "peers_lost",
}  # fmt: skip
# Small frames and window: many frames and credit updates even in short transfers.
CONFIG = TransportConfig(
    frame_bytes=16 * KiB,
    window_bytes=256 * KiB,
    max_meta=4 * KiB,
    peer_timeout=3.0,
    heartbeat_interval=0.5,
)
LAN = Link(delay=0.005, bandwidth=100e6, queue_bytes=512 * KiB)


def build(
    net: SimNet,
    n: int,
    config: TransportConfig = CONFIG,
    *,
    insecure: bool = False,
    allocate: dict[int, Callable[[int, int, bytes, int], memoryview]] | None = None,
) -> list[Any]:
    """n endpoints named r0..r{n-1}; only the lower rank of a pair knows the other's address."""
    key = None if insecure else KEY
    endpoints = [
        Endpoint(rank=r, size=n, comm_id=7, epoch=1, key=key, config=config, now=net.now,
                 random=net.random_bytes(f"r{r}"), allocate=(allocate or {}).get(r))
        for r in range(n)
    ]  # fmt: skip
    addrs = [net.add_node(f"r{r}", ep) for r, ep in enumerate(endpoints)]
    for r, ep in enumerate(endpoints):
        for p in range(n):
            if p != r:
                ep.add_peer(p, addrs[p] if p > r else None, net.now)
    assert net.run_until(lambda: all_connected(net, n), timeout=10.0), "handshakes did not finish"
    return endpoints


def all_connected(net: SimNet, n: int) -> bool:
    return all(
        {e.peer for e in net.events_of(f"r{r}", PeerConnected)} == set(range(n)) - {r}
        for r in range(n)
    )


@dataclass
class Plan:
    """Messages sent and what must arrive: (src, dst, channel) -> [(id, meta, body)] in order."""

    sent: dict[tuple[int, int, int], list[tuple[int, bytes, bytes]]] = field(
        default_factory=lambda: defaultdict(list)
    )
    keep: list[object] = field(default_factory=list)  # bodies stay alive until MessageSent

    def send(self, net: SimNet, eps: Sequence[Any], src: int, dst: int, channel: int,
             body: bytes, parts: int = 1) -> None:  # fmt: skip
        meta = f"{src}>{dst}#{channel}:{len(self.sent[(src, dst, channel)])}".encode()
        cut = sorted({0, len(body), *(len(body) * i // parts for i in range(1, parts))})
        views = [memoryview(body)[a:b] for a, b in itertools.pairwise(cut)]
        self.keep.append(views)
        mid = eps[src].send(dst, channel, meta, views, net.now)
        self.sent[(src, dst, channel)].append((mid, meta, body))

    def count_to(self, dst: int) -> int:
        return sum(len(v) for (_, d, _), v in self.sent.items() if d == dst)

    def count_from(self, src: int) -> int:
        return sum(len(v) for (s, _, _), v in self.sent.items() if s == src)

    def done(self, net: SimNet, n: int) -> bool:
        return all(
            len(net.events_of(f"r{r}", MessageReceived)) >= self.count_to(r)
            and len(net.events_of(f"r{r}", MessageSent)) >= self.count_from(r)
            for r in range(n)
        )

    def verify(self, net: SimNet, n: int) -> None:
        """Byte-exact, FIFO per (peer, channel), nothing extra, every message acknowledged."""
        for r in range(n):
            got: dict[tuple[int, int], list[tuple[int, bytes, bytes]]] = defaultdict(list)
            for e in net.events_of(f"r{r}", MessageReceived):
                got[(e.peer, e.channel)].append((e.message_id, e.meta, bytes(e.body)))
            want = {(s, c): v for (s, d, c), v in self.sent.items() if d == r}
            assert set(got) == set(want), f"rank {r}: channels {set(got)} != {set(want)}"
            for k, messages in want.items():
                assert len(got[k]) == len(messages), f"rank {r} from {k}: count differs"
                for i, (m_got, m_want) in enumerate(zip(got[k], messages, strict=True)):
                    assert m_got[1] == m_want[1], f"rank {r} {k} #{i}: meta/order {m_got[1]!r}"
                    assert m_got[2] == m_want[2], (
                        f"rank {r} {k} #{i}: body differs ({len(m_got[2])} B)"
                    )
                    assert m_got[0] == m_want[0], f"rank {r} {k} #{i}: message id"
            acked = [e.message_id for e in net.events_of(f"r{r}", MessageSent)]
            sent_ids = [m[0] for (s, _, _), v in self.sent.items() if s == r for m in v]
            assert sorted(acked) == sorted(sent_ids), f"rank {r}: MessageSent ids differ"


def payload(rng: random.Random, size: int) -> bytes:
    return rng.randbytes(size)


def no_peer_lost(net: SimNet, n: int) -> None:
    lost = [(r, e) for r in range(n) for e in net.events_of(f"r{r}", PeerLost)]
    assert lost == [], f"unexpected PeerLost: {lost}"


SIZES = [1, 0, 100, 1199, 1200, 5000, 16 * KiB + 1, 70_000, 300_000]


@pytest.mark.parametrize(
    ("loss", "big"),
    [(0.0, 16 * MiB), (0.01, 4 * MiB), (0.1, 16 * MiB), (0.3, 1 * MiB)],
)
def test_mixed_sizes_arrive_byte_exact_under_loss(loss: float, big: int) -> None:
    net = SimNet(seed=int(loss * 1000) + 1, link=Link(delay=0.01, loss=loss, bandwidth=100e6))
    eps = build(net, 2)
    rng = random.Random(2)
    plan = Plan()
    for i, size in enumerate([*SIZES, big, *SIZES[:4]]):
        plan.send(net, eps, 0, 1, i % 2, payload(rng, size), parts=1 + i % 4)
    plan.send(net, eps, 1, 0, 0, payload(rng, 200_000), parts=3)  # the other way at once
    assert net.run_until(lambda: plan.done(net, 2), timeout=600.0), "transfer did not finish"
    plan.verify(net, 2)
    no_peer_lost(net, 2)
    stats = eps[0].stats()
    assert set(stats) >= DOCUMENTED_COUNTERS, f"missing counters {DOCUMENTED_COUNTERS - set(stats)}"
    if loss == 0.0:
        assert stats["retransmitted_segments"] <= stats["datagrams_out"] // 100
    else:
        assert stats["retransmitted_segments"] > 0


def test_reordering_duplication_and_jitter_keep_fifo_per_channel() -> None:
    link = Link(delay=0.01, jitter=0.003, loss=0.02, duplicate=0.05, reorder=0.05,
                reorder_delay=0.02, bandwidth=50e6)  # fmt: skip
    net = SimNet(seed=21, link=link)
    eps = build(net, 2)
    rng = random.Random(3)
    plan = Plan()
    for i in range(60):
        size = rng.choice([1, 500, 3000, 40_000, 150_000])
        plan.send(net, eps, i % 2, 1 - i % 2, i % 3, payload(rng, size), parts=1 + i % 3)
    assert net.run_until(lambda: plan.done(net, 2), timeout=300.0)
    plan.verify(net, 2)
    no_peer_lost(net, 2)
    assert net.stats.duplicated > 0 and net.stats.reordered > 0
    dup = sum(ep.stats()["dropped_duplicate"] for ep in eps)
    assert dup > 0, "duplicated datagrams arrived but none was counted as a duplicate"


def test_retransmissions_stay_within_a_factor_of_the_losses() -> None:
    net = SimNet(seed=5, link=LAN)
    net.set_link("r0", "r1", Link(delay=0.005, bandwidth=100e6, loss=0.05))  # data way only
    eps = build(net, 2)
    lost_before = net.stats.dropped["loss"]
    sent_before = eps[0].stats()["retransmitted_segments"]
    plan = Plan()
    plan.send(net, eps, 0, 1, 0, payload(random.Random(4), 8 * MiB), parts=4)
    assert net.run_until(lambda: plan.done(net, 2), timeout=120.0)
    plan.verify(net, 2)
    lost = net.stats.dropped["loss"] - lost_before
    resent = eps[0].stats()["retransmitted_segments"] - sent_before
    assert lost > 200  # the scenario did lose data
    # Every lost datagram of r0 must be resent at least once (a resend may be lost too), and a
    # sane recovery resends little more than what was lost.
    assert lost * 0.9 <= resent <= lost * 2 + 20, f"lost {lost}, resent {resent}"


def test_peer_lost_within_peer_timeout_under_a_permanent_partition() -> None:
    net = SimNet(seed=8, link=LAN)
    eps = build(net, 2)
    seen: dict[str, float] = {}

    def note_loss(node: SimNode, event: object) -> None:
        if isinstance(event, PeerLost):
            seen.setdefault(node.name, net.now)

    for name in ("r0", "r1"):
        net.on_event(name, note_loss)
    plan = Plan()
    plan.send(net, eps, 0, 1, 0, payload(random.Random(1), 2 * MiB))  # in flight when cut
    net.run_until(net.now + 0.05)
    cut = net.now
    net.partition("r0", "r1", both=True)
    timeout = CONFIG.peer_timeout
    assert net.run_until(lambda: len(seen) == 2, timeout=timeout * 3), f"PeerLost only at {seen}"
    for name, when in seen.items():
        # nothing authenticated for peer_timeout; slack for one heartbeat and one RTT
        assert when - cut <= timeout + CONFIG.heartbeat_interval + 0.1, (name, when - cut)
        assert when - cut >= timeout - CONFIG.heartbeat_interval - 0.1, (name, when - cut)
    assert [e.peer for e in net.events_of("r0", PeerLost)] == [1]
    assert eps[0].stats()["peers_lost"] == 1


def test_no_peer_lost_while_idle_or_after_a_short_partition() -> None:
    net = SimNet(seed=9, link=Link(delay=0.02, loss=0.1))
    eps = build(net, 2)
    net.run_until(net.now + CONFIG.peer_timeout * 5)  # idle over a lossy link: heartbeats only
    no_peer_lost(net, 2)
    plan = Plan()
    plan.send(net, eps, 0, 1, 0, payload(random.Random(2), 1 * MiB))
    net.run_until(net.now + 0.05)
    net.partition("r0", "r1", duration=CONFIG.peer_timeout / 2, both=True)
    assert net.run_until(lambda: plan.done(net, 2), timeout=60.0)
    plan.verify(net, 2)
    no_peer_lost(net, 2)


@pytest.mark.parametrize("who", ["r0", "r1"])
def test_address_change_mid_transfer_loses_nothing(who: str) -> None:
    net = SimNet(seed=12, link=Link(delay=0.01, loss=0.01, bandwidth=100e6))
    eps = build(net, 2)
    plan = Plan()
    rng = random.Random(6)
    plan.send(net, eps, 0, 1, 0, payload(rng, 4 * MiB), parts=2)
    plan.send(net, eps, 1, 0, 0, payload(rng, 1 * MiB))
    net.run_until(net.now + 0.15)
    assert not plan.done(net, 2)
    new = net.rebind(who)
    assert net.run_until(lambda: plan.done(net, 2), timeout=60.0)
    plan.verify(net, 2)
    no_peer_lost(net, 2)
    other = "r1" if who == "r0" else "r0"
    changes = net.events_of(other, PeerAddressChanged)
    assert changes and changes[-1].new == new


def test_four_peers_in_one_net() -> None:
    n = 4
    net = SimNet(seed=13, link=Link(delay=0.01, jitter=0.002, loss=0.05, bandwidth=50e6))
    eps = build(net, n)
    rng = random.Random(7)
    plan = Plan()
    for src in range(n):
        for dst in range(n):
            if src != dst:
                for channel in (0, 1):
                    for size in (10, 20_000, 200_000):
                        plan.send(net, eps, src, dst, channel, payload(rng, size), parts=2)
    assert net.run_until(lambda: plan.done(net, n), timeout=120.0)
    plan.verify(net, n)
    no_peer_lost(net, n)


def test_insecure_mode_moves_the_same_bytes() -> None:
    net = SimNet(seed=14, link=Link(delay=0.005, loss=0.05, bandwidth=100e6))
    config = TransportConfig(
        frame_bytes=16 * KiB, window_bytes=256 * KiB, max_meta=4 * KiB, insecure=True
    )
    eps = build(net, 2, config, insecure=True)
    plan = Plan()
    plan.send(net, eps, 0, 1, 3, payload(random.Random(8), 2 * MiB + 3), parts=3)
    assert net.run_until(lambda: plan.done(net, 2), timeout=60.0)
    plan.verify(net, 2)


def test_transport_memory_stays_within_the_window_whatever_the_message_size() -> None:
    # The receive buffer is allocated before measuring, so what remains is the transport's own
    # memory (staged bytes, sealed frames in flight) plus the simnet's datagrams in flight.
    size = 4 * MiB  # 16 windows: a core that buffers whole messages shows up clearly
    window = CONFIG.window_bytes
    net = SimNet(seed=15, link=Link(delay=0.01, loss=0.02, bandwidth=200e6, queue_bytes=128 * KiB))
    target = memoryview(bytearray(size))
    eps = build(net, 2, allocate={1: lambda peer, channel, meta, n: target[:n]})
    body = payload(random.Random(9), size)
    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        eps[0].send(1, 0, b"m", [memoryview(body)], net.now)
        peak_window = 0
        while not net.events_of("r1", MessageReceived):
            assert net.now < 120.0, "transfer did not finish"
            net.run_until(net.now + 0.05)
            peak_window = max(peak_window, tracemalloc.get_traced_memory()[1] - base)
    finally:
        tracemalloc.stop()
    assert bytes(target) == body
    # Sender's sealed frames in flight (at most the window the receiver granted) plus the
    # receiver's staged bytes (at most its window) plus the wire: a few windows, never the message.
    assert peak_window < 4 * window + 2 * MiB, f"peak {peak_window} B for a {size} B message"
