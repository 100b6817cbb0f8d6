"""The simulated network itself, checked with trivial fake nodes (no transport core)."""

from __future__ import annotations

from collections.abc import Sequence

import pytest

from collectives.testing.simnet import Address, Link, SimNet


class Fake:
    """Sends what the test puts in ``outbox``; records what arrives; one optional timer."""

    def __init__(self) -> None:
        self.outbox: list[tuple[Address, bytes, int]] = []
        self.inbox: list[tuple[float, Address, bytes]] = []
        self.timer: float | None = None
        self.fired: list[float] = []
        self.events: list[object] = []

    def queue(self, addr: Address, data: bytes) -> None:
        self.outbox.append((addr, data, len(data)))

    def receive(
        self, data: bytes, addr: Address, now: float, segment_size: int | None = None
    ) -> None:
        self.inbox.append((now, addr, bytes(data)))

    def datagrams_to_send(self, now: float) -> Sequence[tuple[Address, bytes, int]]:
        out, self.outbox = self.outbox, []
        return out

    def get_timer(self) -> float | None:
        return self.timer

    def handle_timer(self, now: float) -> None:
        self.fired.append(now)
        self.timer = None

    def next_event(self) -> object | None:
        return self.events.pop(0) if self.events else None


def pair(seed: int = 0, link: Link | None = None) -> tuple[SimNet, Fake, Fake, Address, Address]:
    net = SimNet(seed=seed, link=link)
    a, b = Fake(), Fake()
    return net, a, b, net.add_node("a", a), net.add_node("b", b)


def numbered(i: int, size: int = 100) -> bytes:
    return i.to_bytes(4, "big") + bytes(size - 4)


def test_addresses_are_distinct_and_delivery_names_the_source() -> None:
    net, a, b, a_addr, b_addr = pair()
    assert a_addr != b_addr
    a.queue(b_addr, b"hello")
    assert net.run_until(lambda: bool(b.inbox), timeout=1.0)
    assert b.inbox == [(0.0, a_addr, b"hello")]
    assert net.stats.sent == net.stats.delivered == 1


def test_loss_rate_matches_the_configured_probability() -> None:
    n = 20_000
    net, a, b, _, b_addr = pair(seed=7, link=Link(loss=0.1))
    for i in range(n):
        a.queue(b_addr, numbered(i, 8))
    net.run_until(5.0)
    lost = n - len(b.inbox)
    # binomial standard deviation is 0.002 here: 0.015 is over 7 of them
    assert abs(lost / n - 0.1) < 0.015
    assert net.stats.dropped["loss"] == lost
    assert net.stats.delivered == len(b.inbox)


def test_bandwidth_serialises_datagrams_and_the_queue_tail_drops() -> None:
    # 1250 B at 1 Mbit/s is 10 ms on the wire; plus 5 ms of propagation.
    link = Link(delay=0.005, bandwidth=1e6, queue_bytes=10_000)
    net, a, b, _, b_addr = pair(link=link)
    for i in range(20):
        a.queue(b_addr, numbered(i, 1250))
    net.run_until(1.0)
    times = [t for t, _, _ in b.inbox]
    # a backlog of 10 000 B holds 8 datagrams; the other 12 are tail-dropped
    assert len(times) == 8
    assert net.stats.dropped["queue"] == 12
    assert times == pytest.approx([0.005 + 0.01 * (i + 1) for i in range(8)])
    assert [int.from_bytes(d[:4], "big") for _, _, d in b.inbox] == list(range(8))
    offered, delivered = net.link_bytes()[("a", "b")]
    assert (offered, delivered) == (20 * 1250, 8 * 1250)


def test_a_gso_batch_is_split_into_its_datagrams() -> None:
    net, a, b, _, b_addr = pair()
    a.outbox.append((b_addr, bytes(range(250)), 100))
    net.run_until(1.0)
    assert [len(d) for _, _, d in b.inbox] == [100, 100, 50]
    assert b"".join(d for _, _, d in b.inbox) == bytes(range(250))


def test_partition_is_directional_and_time_bounded() -> None:
    net, a, b, a_addr, b_addr = pair(link=Link(delay=0.001))
    net.partition("a", "b", duration=1.0)
    a.queue(b_addr, b"lost")
    b.queue(a_addr, b"through")
    net.run_until(0.5)
    assert b.inbox == []
    assert [d for _, _, d in a.inbox] == [b"through"]
    assert net.stats.dropped["partition"] == 1
    net.run_until(1.5)  # the partition has ended
    a.queue(b_addr, b"after")
    net.run_until(2.0)
    assert [d for _, _, d in b.inbox] == [b"after"]


def test_permanent_partition_lasts_until_healed() -> None:
    net, a, b, _, b_addr = pair()
    net.partition("a", "b", both=True)
    for t in (1.0, 100.0):
        a.queue(b_addr, b"x")
        net.run_until(t)
    assert b.inbox == []
    net.heal("a", "b", both=True)
    a.queue(b_addr, b"y")
    net.run_until(101.0)
    assert [d for _, _, d in b.inbox] == [b"y"]


def test_jitter_keeps_a_link_fifo_and_reordering_does_not() -> None:
    def arrival_order(link: Link) -> list[int]:
        net, a, b, _, b_addr = pair(seed=3, link=link)
        for i in range(500):
            a.queue(b_addr, numbered(i))
        net.run_until(10.0)
        return [int.from_bytes(d[:4], "big") for _, _, d in b.inbox]

    jittery = arrival_order(Link(delay=0.01, jitter=0.005, bandwidth=10e6))
    assert jittery == list(range(500))
    reordered = arrival_order(Link(delay=0.01, bandwidth=10e6, reorder=0.1, reorder_delay=0.005))
    assert sorted(reordered) == list(range(500))
    assert reordered != list(range(500))


def test_duplication_delivers_some_datagrams_twice() -> None:
    net, a, b, _, b_addr = pair(seed=5, link=Link(delay=0.01, duplicate=0.2))
    for i in range(1000):
        a.queue(b_addr, numbered(i))
    net.run_until(1.0)
    assert net.stats.duplicated == len(b.inbox) - 1000
    assert 120 < net.stats.duplicated < 280
    assert {int.from_bytes(d[:4], "big") for _, _, d in b.inbox} == set(range(1000))


def test_the_seed_decides_everything() -> None:
    def run(seed: int) -> list[tuple[float, Address, bytes]]:
        link = Link(
            delay=0.01,
            jitter=0.002,
            loss=0.2,
            duplicate=0.05,
            reorder=0.1,
            reorder_delay=0.01,
            bandwidth=5e6,
        )
        net, a, b, _, b_addr = pair(seed=seed, link=link)
        for i in range(300):
            a.queue(b_addr, numbered(i))
        net.run_until(5.0)
        return b.inbox

    assert run(11) == run(11)
    assert run(11) != run(12)
    net = SimNet(seed=4)
    assert net.random_bytes("a")(16) == SimNet(seed=4).random_bytes("a")(16)
    assert net.random_bytes("a")(16) != net.random_bytes("b")(16)


def test_timers_fire_at_their_time_and_a_timer_in_the_past_names_the_node() -> None:
    net, a, b, _, _ = pair()
    a.timer = 2.5
    net.run_until(3.0)
    assert a.fired == [2.5]
    assert net.now == 3.0
    b.timer = 1.0  # earlier than now: a core must never ask for that
    with pytest.raises(AssertionError, match=r"'b'.*timer in the past"):
        net.run_until(4.0)


def test_run_until_predicate_reports_failure_at_the_timeout() -> None:
    net, a, b, _, b_addr = pair(link=Link(delay=1.0))
    a.queue(b_addr, b"slow")
    assert not net.run_until(lambda: bool(b.inbox), timeout=0.5)
    assert net.now == 0.5
    assert net.run_until(lambda: bool(b.inbox), timeout=5.0)
    assert net.now == 1.0


def test_rebinding_changes_the_source_and_strands_the_old_address() -> None:
    net, a, b, a_addr, b_addr = pair(link=Link(delay=0.01))
    b.queue(a_addr, b"in flight")  # to a's old address: dropped on arrival
    net.run_until(0.001)
    new = net.rebind("a")
    assert new != a_addr and net.address_of("a") == new
    a.queue(b_addr, b"from new")
    b.queue(a_addr, b"to old")
    net.run_until(1.0)
    assert [(addr, data) for _, addr, data in b.inbox] == [(new, b"from new")]
    assert b.inbox[0][0] == pytest.approx(0.011)
    assert a.inbox == []
    assert net.stats.dropped["no_route"] == 2


def test_events_are_collected_and_callbacks_may_answer() -> None:
    net, a, b, a_addr, _ = pair()
    seen: list[object] = []

    def answer(node: object, event: object) -> None:
        seen.append(event)
        b.queue(a_addr, b"reply")

    net.on_event("b", answer)
    b.events.append("ping")
    b.timer = 0.5  # the interaction that lets the net drain the event
    net.run_until(1.0)
    assert net.events_of("b") == ["ping"] == seen
    assert net.events_of("b", int) == []
    assert [d for _, _, d in a.inbox] == [b"reply"]


def test_a_timer_that_never_moves_on_is_reported() -> None:
    class Stuck(Fake):
        def handle_timer(self, now: float) -> None:
            self.fired.append(now)  # and keeps self.timer: asks again for the same instant

    net = SimNet()
    stuck = Stuck()
    net.add_node("stuck", stuck)
    stuck.timer = 1.0
    with pytest.raises(AssertionError, match=r"'stuck'.*1000 times"):
        net.run_until(2.0)
    assert len(stuck.fired) == 1000


def test_lenient_timers_count_the_core_bugs_instead_of_failing() -> None:
    class Stuck(Fake):
        def handle_timer(self, now: float) -> None:
            self.fired.append(now)
            if len(self.fired) > 1500:
                self.timer = None

    net = SimNet(strict_timers=False)
    stuck = Stuck()
    net.add_node("stuck", stuck)
    stuck.timer = 1.0
    net.run_until(2.0)
    assert net.stats.timer_spins == 1
    assert stuck.fired[999] == 1.0 and stuck.fired[1000] == pytest.approx(1.0 + 1e-6)
    stuck.timer = 0.5  # in the past: fired at once, counted
    net.run_until(3.0)
    assert stuck.fired[-1] == 2.0
    assert net.stats.past_timers >= 1
