"""Endpoints wired together in memory under a manual clock, for the core's own tests.

No loss model and no bandwidth: datagrams go straight from ``datagrams_to_send`` of one endpoint
into ``receive`` of another (optionally through ``tamper``, which may drop, change or duplicate
them).  ``collectives/testing/simnet.py`` is the full simulated network.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from collectives.auth import ClusterKey
from collectives.transport import Endpoint, TransportConfig
from collectives.transport.events import Event

KEY = ClusterKey("pairs-test-cluster-key-0123456789")
Tamper = Callable[[int, int, bytes], Iterable[bytes]]


def addr_of(rank: int) -> tuple[str, int]:
    return ("127.0.0.1", 40000 + rank)


class Mesh:
    """``n`` endpoints that reach each other directly; ``now`` moves only when told."""

    def __init__(
        self,
        n: int = 2,
        config: TransportConfig | None = None,
        *,
        key: ClusterKey | None = KEY,
        comm_id: int = 7,
        epoch: int = 1,
        tamper: Tamper | None = None,
        connect: bool = True,
        tick: float = 1e-5,
        gro: bool = False,
        **endpoint_args: object,
    ) -> None:
        self.now = 0.0
        self.config = config or TransportConfig()
        self.endpoints = [
            Endpoint(
                rank=r,
                size=n,
                comm_id=comm_id,
                epoch=epoch,
                key=key,
                config=self.config,
                now=self.now,
                **endpoint_args,  # type: ignore[arg-type]
            )
            for r in range(n)
        ]
        self.events: list[list[Event]] = [[] for _ in range(n)]
        self.tamper = tamper
        self.aliases: dict[tuple[str, int], int] = {}  # extra addresses of a rank (rebinding)
        self.gro = gro  # hand batches over whole with their segment size (no tamper then)
        self.tick = tick  # each step takes this long: the path's one-way delay, never zero
        self.wire: list[int] = [0] * n  # datagrams put on the wire, per sender
        if connect:
            for a in range(n):
                for b in range(n):
                    if a != b:
                        self.endpoints[a].add_peer(b, addr_of(b), self.now)

    def rank_of(self, addr: tuple[str, int]) -> int:
        return self.aliases.get(addr, addr[1] - 40000)

    def step(self) -> int:
        """Take what every endpoint may send now, then deliver it ``tick`` later."""
        flights: list[tuple[int, int, bytes]] = []
        batches: list[tuple[int, int, bytes, int]] = []
        for src, ep in enumerate(self.endpoints):
            for addr, payload, seg in ep.datagrams_to_send(self.now):
                data = bytes(payload)
                dst = self.rank_of(addr)
                if self.gro:
                    batches.append((src, dst, data, seg))
                    continue
                flights += [(src, dst, data[i : i + seg]) for i in range(0, len(data), seg)]
        self.now += self.tick
        for src, dst, data, seg in batches:
            self.endpoints[dst].receive(data, addr_of(src), self.now, seg)
        for src, dst, d in flights:
            self.wire[src] += 1
            for out in [d] if self.tamper is None else self.tamper(src, dst, d):
                self.endpoints[dst].receive(out, addr_of(src), self.now)
        self._drain()
        return len(flights) + len(batches)

    def _drain(self) -> None:
        for r, ep in enumerate(self.endpoints):
            while (event := ep.next_event()) is not None:
                self.events[r].append(event)

    def advance(self) -> bool:
        """Jump the clock to the earliest timer and fire it; False when no timer is set."""
        timers = [t for ep in self.endpoints if (t := ep.get_timer()) is not None]
        if not timers:
            return False
        self.now = max(self.now, min(timers))
        for ep in self.endpoints:
            timer = ep.get_timer()
            if timer is not None and timer <= self.now:
                ep.handle_timer(self.now)
        self._drain()
        return True

    def run_until(self, done: Callable[[], bool], max_time: float = 60.0) -> bool:
        """Move datagrams and fire timers until ``done()`` or the clock passes ``max_time``."""
        for _ in range(1_000_000):
            if done():
                return True
            if self.step():
                continue
            if done():
                return True
            if not self.advance() or self.now > max_time:
                return done()
        return done()

    def of(self, rank: int, kind: type) -> list:  # type: ignore[type-arg]
        return [e for e in self.events[rank] if isinstance(e, kind)]
