"""A seeded, simulated network under a virtual clock, driving sans-IO transport cores.

Why: loss, reordering, a 100 ms RTT or a NAT rebinding are slow, flaky or impossible to produce on
loopback, and a wall clock makes every failure unrepeatable.  Here time is a number that jumps from
one event to the next, every random choice comes from one ``random.Random(seed)``, and a run with
the same seed replays exactly.  A 10 s transfer at 100 Mbit/s costs only the CPU of the cores.

What it drives: any object with the sans-IO endpoint methods of ``docs/udp-transport.md``
(:class:`Driven`: ``receive`` / ``datagrams_to_send`` / ``get_timer`` / ``handle_timer`` /
``next_event``), such as ``collectives.transport.Endpoint``, or a trivial fake in a test::

    net = SimNet(seed=1, link=Link(delay=0.025, loss=0.01, bandwidth=100e6))
    a_addr = net.add_node("a", endpoint_a)
    b_addr = net.add_node("b", endpoint_b)
    endpoint_a.add_peer(1, b_addr, net.now)
    endpoint_b.add_peer(0, None, net.now)
    endpoint_a.send(1, 0, b"meta", [memoryview(body)], net.now)
    assert net.run_until(lambda: net.events_of("b", MessageReceived), timeout=30.0)

The loop: after every interaction with a node (a datagram in, a timer fired) the net drains the
node's events (kept in :attr:`SimNode.events`, and handed to ``on_event`` callbacks, which may
call ``send``), then takes everything ``datagrams_to_send`` offers and puts it on the wire, then
reads ``get_timer``.  A node that asks for a timer earlier than the current time fails the run
with an ``AssertionError`` naming it: a sans-IO core must never do that.

The wire, per directed pair of nodes (:class:`Link`; :meth:`SimNet.set_link` overrides one):
a GSO batch is split into its datagrams; each one waits for the link to be free (serialisation at
``bandwidth``; a backlog above ``queue_bytes`` is tail-dropped), is lost with probability
``loss``, travels ``delay`` plus up to ``jitter`` (jitter alone never reorders: a link is FIFO),
with probability ``reorder`` gets up to ``reorder_delay`` more (that is what reorders), and with
probability ``duplicate`` arrives twice.  Partitions (:meth:`SimNet.partition`) drop what enters a
link, per direction, for a while or for good.  :meth:`SimNet.rebind` gives a node a new address
mid-run (a NAT rebinding): its datagrams then come from the new address and datagrams still sent
to the old one are dropped (``no_route``).
"""

from __future__ import annotations

import heapq
import itertools
import random
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar, overload

Address = tuple[str, int]
Payload = bytes | bytearray | memoryview
E = TypeVar("E")
_MAX_SPINS = 1000


class Driven(Protocol):
    """What the net drives: the sans-IO endpoint API of ``docs/udp-transport.md``."""

    def receive(
        self, data: bytes, addr: Address, now: float, segment_size: int | None = None
    ) -> None: ...

    def datagrams_to_send(self, now: float) -> Sequence[tuple[Address, Payload, int]]: ...

    def get_timer(self) -> float | None: ...

    def handle_timer(self, now: float) -> None: ...

    def next_event(self) -> object | None: ...


@dataclass(frozen=True)
class Link:
    """How one direction between two nodes behaves.  Times in seconds, bandwidth in bits/s."""

    delay: float = 0.0
    jitter: float = 0.0
    loss: float = 0.0
    duplicate: float = 0.0
    reorder: float = 0.0
    reorder_delay: float = 0.0
    bandwidth: float | None = None  # None: serialisation takes no time and nothing queues
    queue_bytes: int = 1 << 20  # backlog waiting for the wire beyond which arrivals are dropped

    def __post_init__(self) -> None:
        for name in ("loss", "duplicate", "reorder"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"Link.{name} is a probability, got {value}")
        if min(self.delay, self.jitter, self.reorder_delay) < 0:
            raise ValueError("Link delays must not be negative")
        if self.bandwidth is not None and self.bandwidth <= 0:
            raise ValueError(f"Link.bandwidth must be positive, got {self.bandwidth}")


@dataclass
class LinkState:
    """A directed link's config, wire occupancy and byte counters."""

    config: Link
    busy_until: float = 0.0  # when the wire finishes serialising what is queued
    last_arrival: float = 0.0  # keeps the link FIFO under jitter
    bytes_offered: int = 0  # everything the sender put on this link
    bytes_delivered: int = 0  # what reached the other end (duplicates included)


@dataclass
class SimNode:
    """A driven object with its name, current address, timer and the events it emitted."""

    name: str
    endpoint: Driven
    addr: Address
    events: list[object] = field(default_factory=list)
    timer: float | None = None
    on_event: list[Callable[[SimNode, object], None]] = field(default_factory=list)


@dataclass
class NetStats:
    """What the wire did, in datagrams (``dropped`` by reason) and bytes per directed link."""

    sent: int = 0
    delivered: int = 0
    past_timers: int = 0  # counted only with strict_timers=False (else they fail the run)
    timer_spins: int = 0
    duplicated: int = 0
    reordered: int = 0
    dropped: Counter[str] = field(default_factory=Counter)


@dataclass(frozen=True)
class _Partition:
    src: str
    dst: str
    until: float | None  # None: for good (until heal)


class SimNet:
    """The simulated network; see the module docstring."""

    def __init__(
        self,
        seed: int = 0,
        link: Link | None = None,
        start: float = 0.0,
        *,
        strict_timers: bool = True,
    ) -> None:
        self.seed = seed
        # False only to look past a core's timer bug for the rest of a run: a timer in the past
        # then fires now, and one stuck at an instant gets nudged 1 us on; both are counted.
        self.strict_timers = strict_timers
        self.rng = random.Random(seed)
        self.now = start
        self.default_link = link if link is not None else Link()
        self.stats = NetStats()
        self.nodes: dict[str, SimNode] = {}
        self._by_addr: dict[Address, SimNode] = {}
        self._links: dict[tuple[str, str], LinkState] = {}
        self._partitions: list[_Partition] = []
        # (arrival time, tie-breaker, destination address, source address, link, datagram)
        self._wire: list[tuple[float, int, Address, Address, LinkState, bytes]] = []
        self._seq = itertools.count()
        self._next_host = 1
        self._spin_key: tuple[str, float, int] | None = None
        self._spins = 0

    # ----------------------------------------------------------------------------- topology

    def add_node(self, name: str, endpoint: Driven, addr: Address | None = None) -> Address:
        """Attach ``endpoint`` as ``name``; returns its address (10.0.0.N:9000 unless given)."""
        if name in self.nodes:
            raise ValueError(f"node {name!r} already exists")
        if addr is None:
            addr = self._fresh_address()
        if addr in self._by_addr:
            raise ValueError(f"address {addr} is taken by {self._by_addr[addr].name!r}")
        node = SimNode(name, endpoint, addr)
        self.nodes[name] = node
        self._by_addr[addr] = node
        return addr

    def address_of(self, name: str) -> Address:
        return self.nodes[name].addr

    def set_link(self, src: str, dst: str, link: Link, *, both: bool = False) -> None:
        """Make the direction ``src`` -> ``dst`` (and back, with ``both``) behave as ``link``."""
        self._link(src, dst).config = link
        if both:
            self._link(dst, src).config = link

    def link_state(self, src: str, dst: str) -> LinkState:
        return self._link(src, dst)

    def partition(
        self, src: str, dst: str, *, duration: float | None = None, both: bool = False
    ) -> None:
        """Drop everything ``src`` sends to ``dst`` from now on, for ``duration`` s or for good."""
        until = None if duration is None else self.now + duration
        self._partitions.append(_Partition(src, dst, until))
        if both:
            self._partitions.append(_Partition(dst, src, until))

    def heal(self, src: str, dst: str, *, both: bool = False) -> None:
        """End the partitions from ``src`` to ``dst`` (and back, with ``both``)."""
        pairs = {(src, dst), (dst, src)} if both else {(src, dst)}
        self._partitions = [p for p in self._partitions if (p.src, p.dst) not in pairs]

    def rebind(self, name: str, addr: Address | None = None) -> Address:
        """Give node ``name`` a new address now (a NAT rebinding); returns it."""
        node = self.nodes[name]
        new = addr if addr is not None else (node.addr[0], self._fresh_port(node.addr[0]))
        if new in self._by_addr:
            raise ValueError(f"address {new} is taken by {self._by_addr[new].name!r}")
        del self._by_addr[node.addr]
        node.addr = new
        self._by_addr[new] = node
        return new

    def on_event(self, name: str, callback: Callable[[SimNode, object], None]) -> None:
        """Call ``callback(node, event)`` for each event node ``name`` emits from now on."""
        self.nodes[name].on_event.append(callback)

    def random_bytes(self, name: str) -> Callable[[int], bytes]:
        """A deterministic ``random`` for a core's constructor, seeded by the seed and ``name``.

        Apart from the wire's generator, so a core drawing more or fewer bytes does not change
        which datagrams the wire loses.
        """
        rng = random.Random(f"{self.seed}/{name}")
        return rng.randbytes

    # ----------------------------------------------------------------------------- events

    @overload
    def events_of(self, name: str) -> list[object]: ...

    @overload
    def events_of(self, name: str, kind: type[E]) -> list[E]: ...

    def events_of(self, name: str, kind: type[Any] | None = None) -> list[Any]:
        """The events node ``name`` emitted so far (only those of ``kind`` when given)."""
        events = self.nodes[name].events
        return [e for e in events if kind is None or isinstance(e, kind)]

    # ----------------------------------------------------------------------------- running

    def wake(self, name: str | None = None) -> None:
        """Collect what node ``name`` (every node when None) has to send now.

        Needed after calling into a core from outside the loop (``send``, ``add_peer``):
        :meth:`run_until` and :meth:`step` do it for every node when they start.
        """
        for node in self.nodes.values() if name is None else [self.nodes[name]]:
            self._after_interaction(node)

    def step(self) -> bool:
        """Process the next event (a datagram arrives or a timer fires); False when none is left."""
        return self._step(*self._next_timer())

    def _step(self, when: float | None, node: SimNode | None) -> bool:
        if self._wire and (when is None or self._wire[0][0] < when):
            arrival, _, dst, src, link, data = heapq.heappop(self._wire)
            self.now = max(self.now, arrival)
            target = self._by_addr.get(dst)
            if target is None:  # its node rebound while the datagram was in flight
                self.stats.dropped["no_route"] += 1
                return True
            self.stats.delivered += 1
            link.bytes_delivered += len(data)
            target.endpoint.receive(data, src, self.now)
            self._after_interaction(target)
            return True
        if when is None or node is None:
            return False
        self.now = max(self.now, when)
        self._note_spin(node)
        node.endpoint.handle_timer(self.now)
        self._after_interaction(node)
        return True

    def _note_spin(self, node: SimNode) -> None:
        # A core whose timer stays at the current instant would spin here forever; a few firings
        # at one instant are normal (pacing, several deadlines), thousands are a bug in the core.
        key = (node.name, self.now, self.stats.sent)
        self._spins = self._spins + 1 if key == self._spin_key else 0
        self._spin_key = key
        if self._spins >= _MAX_SPINS and not self.strict_timers:
            self.stats.timer_spins += 1
            self._spins = 0
            self.now += 1e-6
        elif self._spins >= _MAX_SPINS:
            raise AssertionError(
                f"simnet: node {node.name!r} asked for a timer at t={self.now:.9f} "
                f"{_MAX_SPINS} times in a row without sending anything"
            )

    def run_until(
        self,
        until: Callable[[], bool] | float,
        *,
        timeout: float = 60.0,
        max_steps: int = 10_000_000,
    ) -> bool:
        """Run until ``until()`` is true (or virtual time ``until`` is reached).

        Gives up after ``timeout`` seconds of virtual time or when nothing is left to happen,
        returning False; with a time, the clock then stands at exactly that time.  ``max_steps``
        guards against a core that keeps asking for a timer at the same instant.
        """
        self.wake()
        if not callable(until):
            self._run_to_time(float(until), max_steps)
            return True
        deadline = self.now + timeout
        for _ in range(max_steps):
            if until():
                return True
            when, node = self._next_timer()
            nxt = self._first(when)
            if nxt is None or nxt > deadline:
                self.now = max(self.now, deadline)
                return until()
            self._step(when, node)
        raise AssertionError(f"simnet: {max_steps} steps without reaching the goal (busy loop?)")

    def _run_to_time(self, end: float, max_steps: int) -> None:
        for _ in range(max_steps):
            when, node = self._next_timer()
            nxt = self._first(when)
            if nxt is None or nxt > end:
                self.now = max(self.now, end)
                return
            self._step(when, node)
        raise AssertionError(f"simnet: {max_steps} steps before t={end} (busy loop?)")

    # ----------------------------------------------------------------------------- internals

    def _fresh_address(self) -> Address:
        host = f"10.0.0.{self._next_host}"
        self._next_host += 1
        return (host, 9000)

    def _fresh_port(self, host: str) -> int:
        port = 9001
        while (host, port) in self._by_addr:
            port += 1
        return port

    def _link(self, src: str, dst: str) -> LinkState:
        state = self._links.get((src, dst))
        if state is None:
            state = self._links[(src, dst)] = LinkState(self.default_link)
        return state

    def link_bytes(self) -> dict[tuple[str, str], tuple[int, int]]:
        """(bytes offered, bytes delivered) per directed link ``(src, dst)`` used so far."""
        return {k: (s.bytes_offered, s.bytes_delivered) for k, s in self._links.items()}

    def _partitioned(self, src: str, dst: str) -> bool:
        self._partitions = [p for p in self._partitions if p.until is None or p.until > self.now]
        return any(p.src == src and p.dst == dst for p in self._partitions)

    def _next_timer(self) -> tuple[float | None, SimNode | None]:
        best: float | None = None
        best_node: SimNode | None = None
        for node in self.nodes.values():
            # Polled every step: a test may have called into the core from outside the loop.
            timer = node.endpoint.get_timer()
            self._check_timer(node, timer)
            node.timer = timer
            if timer is not None and (best is None or timer < best):
                best, best_node = timer, node
        return best, best_node

    def _first(self, when: float | None) -> float | None:
        # The earlier of the next timer (``when``) and the next arrival.
        if self._wire and (when is None or self._wire[0][0] < when):
            return self._wire[0][0]
        return when

    def _check_timer(self, node: SimNode, timer: float | None) -> None:
        if timer is not None and timer < self.now - 1e-9:
            if not self.strict_timers:
                self.stats.past_timers += 1
                return
            raise AssertionError(
                f"simnet: node {node.name!r} asked for a timer in the past "
                f"({timer:.9f} < now {self.now:.9f})"
            )

    def _after_interaction(self, node: SimNode) -> None:
        called_back = self._drain_events(node)
        for addr, payload, segment_size in node.endpoint.datagrams_to_send(self.now):
            self._transmit(node, addr, payload, segment_size)
        if called_back:  # a callback may have queued more (a reply): take that too
            self._drain_events(node)
            for addr, payload, segment_size in node.endpoint.datagrams_to_send(self.now):
                self._transmit(node, addr, payload, segment_size)
        timer = node.endpoint.get_timer()
        self._check_timer(node, timer)
        node.timer = timer

    def _drain_events(self, node: SimNode) -> bool:
        called = False
        while (event := node.endpoint.next_event()) is not None:
            node.events.append(event)
            for callback in node.on_event:
                callback(node, event)
                called = True
        return called

    def _transmit(self, node: SimNode, addr: Address, payload: Payload, segment_size: int) -> None:
        view = memoryview(payload).cast("B")
        if segment_size <= 0:
            raise AssertionError(f"simnet: node {node.name!r} sent segment_size {segment_size}")
        for start in range(0, len(view), segment_size):
            # A copy: the core may reuse its send buffer once datagrams_to_send returns.
            self._put_on_wire(node, addr, bytes(view[start : start + segment_size]))

    def _put_on_wire(self, node: SimNode, addr: Address, data: bytes) -> None:
        self.stats.sent += 1
        target = self._by_addr.get(addr)
        if target is None:
            self.stats.dropped["no_route"] += 1
            return
        if self._partitioned(node.name, target.name):
            self.stats.dropped["partition"] += 1
            return
        state = self._link(node.name, target.name)
        link = state.config
        rng = self.rng
        state.bytes_offered += len(data)
        depart = self.now
        if link.bandwidth is not None:
            backlog_s = max(0.0, state.busy_until - self.now)
            if backlog_s * link.bandwidth / 8 + len(data) > link.queue_bytes:
                self.stats.dropped["queue"] += 1
                return
            depart = max(self.now, state.busy_until) + len(data) * 8 / link.bandwidth
            state.busy_until = depart
        if link.loss and rng.random() < link.loss:
            self.stats.dropped["loss"] += 1
            return
        arrival = depart + link.delay + (rng.uniform(0.0, link.jitter) if link.jitter else 0.0)
        arrival = max(arrival, state.last_arrival)
        state.last_arrival = arrival
        if link.reorder and rng.random() < link.reorder:
            self.stats.reordered += 1
            arrival += rng.uniform(0.0, link.reorder_delay)
        self._schedule(state, arrival, target.addr, node.addr, data)
        if link.duplicate and rng.random() < link.duplicate:
            self.stats.duplicated += 1
            extra = rng.uniform(0.0, link.reorder_delay or link.jitter or 1e-4)
            self._schedule(state, arrival + extra, target.addr, node.addr, data)

    def _schedule(
        self, state: LinkState, arrival: float, dst: Address, src: Address, data: bytes
    ) -> None:
        heapq.heappush(self._wire, (arrival, next(self._seq), dst, src, state, data))


__all__ = ["Address", "Driven", "Link", "LinkState", "NetStats", "SimNet", "SimNode"]
