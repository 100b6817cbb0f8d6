"""Path selection of the udp backend's NAT traversal (sans-IO: ``now`` is an argument).

Each peer has a *relay path* (the rendezvous server forwards ``0xCC`` datagrams by handle) and
zero or more *direct paths* (its candidates: local addresses, the reflexive address the server
saw, a punch hint, or a peer-reflexive address an authentic probe came from).  Rules:

* Transport datagrams go over the relay until a direct path is **verified**: a pong (MAC'd under
  the cluster key) echoing the nonce of a ping we sent to exactly the pong's source address.
  Nothing else moves traffic: not a punch hint, not an unauthenticated datagram, not a replayed
  ping (it only makes us answer and probe the address; without the key nobody can pong).
* Every unverified candidate is pinged on a fast schedule (0, 0.1, 0.3, 0.7, 1.5 s, then every
  2 s); both sides do it at once, which is simultaneous hole punching: each side's outgoing ping
  opens its own NAT for the other's.  An authentic ping from an address we have not verified
  triggers a ping back at once (ICE's triggered check), which is what lets a symmetric NAT's
  per-destination port be found from the other side.
* Once direct, the path is pinged every :data:`KEEPALIVE_S`; with no pong for :data:`DEAD_S`
  the peer falls back to the relay and the candidates are probed fast again (a rebinding NAT,
  a path that died).  A verified path is replaced only by one of higher priority (a local
  candidate beats a reflexive one), so the path never flips back and forth.
* The core sees one stable *virtual* address per peer (:func:`virtual`): which path carried a
  datagram never reaches it, so reordering across paths cannot make it switch.

Each switch is recorded in :attr:`Paths.changes` for the driver, which resets the session's
congestion model (a new path has a new RTT and bottleneck).
"""

from __future__ import annotations

import secrets
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from collectives.backends.udp_nat_wire import PING, PONG, Probe, ProbeCodec

Address = tuple[str, int]

KEEPALIVE_S = 1.0  # ping interval on the direct path in use (also keeps its NAT mapping)
DEAD_S = 3.5  # no pong for this long: the direct path is dead, back to the relay
_SCHEDULE = (0.0, 0.1, 0.2, 0.4, 0.8)  # gaps between the first pings of a candidate
_SLOW_S = 2.0  # then one ping every this many seconds
_GIVE_UP_S = 60.0  # an unverified candidate is pinged this long after it was (re)learned
_PING_TTL_S = 5.0  # a pong later than this does not count
_TRIGGER_GAP_S = 0.05  # a triggered ping goes at most this often per candidate
MAX_CANDIDATES = 16  # per peer: its own up to 8, hints, peer-reflexive addresses
_MAX_PINGS = 64  # outstanding pings per peer
PRIORITY = {"local": 3, "reflexive": 2, "hint": 2, "peer-reflexive": 1}


def virtual(rank: int) -> Address:
    """The address the core knows ``rank`` by: never a real one, so never sent to as is."""
    return (f"nat-rank-{rank}.invalid", 0)


@dataclass
class _Candidate:
    addr: Address
    kind: str
    learned: float
    tries: int = 0
    next_ping: float = 0.0
    last_ping: float = -1.0
    verified_at: float | None = None


@dataclass
class PeerPath:
    """What one peer's paths look like now (see the module docstring)."""

    rank: int
    handle: bytes
    since: float
    candidates: dict[Address, _Candidate] = field(default_factory=dict)
    direct: Address | None = None
    direct_kind: str = ""
    last_pong: float = 0.0
    next_keepalive: float = 0.0
    direct_at: float | None = None  # when it first went direct
    switches: int = 0
    pings: dict[bytes, tuple[Address, float]] = field(default_factory=dict)

    @property
    def path(self) -> str:
        """``relayed``, ``direct`` (a local candidate) or ``punched`` (a NAT'd one)."""
        if self.direct is None:
            return "relayed"
        return "direct" if self.direct_kind == "local" else "punched"


class Paths:
    """Every peer's paths (not thread-safe: the driver's lock guards it)."""

    def __init__(
        self,
        me: int,
        codec: ProbeCodec,
        *,
        allow_direct: bool = True,
        random: Callable[[int], bytes] = secrets.token_bytes,
    ) -> None:
        self.me = me
        self.codec = codec
        self.allow_direct = allow_direct
        self._random = random
        self.peers: dict[int, PeerPath] = {}
        self.by_handle: dict[bytes, int] = {}
        self.by_virtual: dict[Address, int] = {}
        # Addresses an authentic probe came from: a transport datagram from one is the peer's
        # (the core still authenticates it; this only picks the virtual address it is given).
        self.by_addr: dict[Address, int] = {}
        self.changes: list[tuple[int, str, str]] = []  # (rank, old path, new path)
        self.counters = {"probes_sent": 0, "probes_dropped": 0, "pongs_unmatched": 0,
                         "path_switches": 0, "fallbacks": 0}  # fmt: skip

    # -- peers and candidates ----------------------------------------------------------------
    def add_peer(self, rank: int, handle: bytes, now: float) -> PeerPath:
        peer = self.peers.get(rank)
        if peer is None:
            peer = self.peers[rank] = PeerPath(rank, handle, now)
            self.by_virtual[virtual(rank)] = rank
        elif peer.handle != handle:
            self.by_handle.pop(peer.handle, None)
            peer.handle = handle
        self.by_handle[handle] = rank
        return peer

    def learn(self, rank: int, candidates: Iterable[tuple[Address, str]], now: float) -> None:
        """Candidates of ``rank`` (from the server's member list, a hint, a probe's source)."""
        peer = self.peers.get(rank)
        if peer is None or not self.allow_direct:
            return
        for addr, kind in candidates:
            known = peer.candidates.get(addr)
            if known is not None:
                if PRIORITY.get(kind, 0) > PRIORITY.get(known.kind, 0):
                    known.kind = kind
                continue
            if len(peer.candidates) >= MAX_CANDIDATES:
                self._evict(peer)
                if len(peer.candidates) >= MAX_CANDIDATES:
                    continue
            peer.candidates[addr] = _Candidate(addr, kind, now, next_ping=now)

    def _evict(self, peer: PeerPath) -> None:
        """Make room: drop the oldest unverified peer-reflexive or hinted candidate."""
        spare = [c for c in peer.candidates.values()
                 if c.verified_at is None and c.kind in ("peer-reflexive", "hint")
                 and c.addr != peer.direct]  # fmt: skip
        if spare:
            victim = min(spare, key=lambda c: c.learned)
            del peer.candidates[victim.addr]

    # -- routing -----------------------------------------------------------------------------
    def route(self, rank: int) -> Address | None:
        """Where transport datagrams for ``rank`` go: its verified direct address, or None for
        the relay."""
        peer = self.peers.get(rank)
        return None if peer is None else peer.direct

    # -- inbound -----------------------------------------------------------------------------
    def on_probe(
        self, data: bytes | memoryview, src: Address, now: float
    ) -> list[tuple[Address, bytes]]:
        """One probe datagram from ``src``; the datagrams to send in answer."""
        probe = self.codec.open(data, self.me)
        peer = None if probe is None else self.peers.get(probe.src)
        if probe is None or peer is None:
            self.counters["probes_dropped"] += 1
            return []
        if probe.kind == PING:
            return self._on_ping(peer, probe, src, now)
        self._on_pong(peer, probe, src, now)
        return []

    def _on_ping(
        self, peer: PeerPath, probe: Probe, src: Address, now: float
    ) -> list[tuple[Address, bytes]]:
        out = [(src, self.codec.seal(PONG, self.me, peer.rank, self._random(16), probe.nonce))]
        self.counters["probes_sent"] += 1
        if not self.allow_direct:
            return out
        self.by_addr.setdefault(src, peer.rank)
        known = peer.candidates.get(src)
        if known is None:
            self.learn(peer.rank, [(src, "peer-reflexive")], now)
            known = peer.candidates.get(src)
        if known is not None and known.verified_at is None:
            # The triggered check: ping back at once, unless we just did (two sides answering
            # each other's pings must not turn into a storm).
            known.next_ping = min(known.next_ping, max(now, known.last_ping + _TRIGGER_GAP_S))
        return out

    def _on_pong(self, peer: PeerPath, probe: Probe, src: Address, now: float) -> None:
        # Consumed only by a pong from the address pinged: a copy sent from elsewhere first
        # must not void the real one.
        sent = peer.pings.get(probe.echo)
        if sent is None or sent[0] != src or now - sent[1] > _PING_TTL_S:
            self.counters["pongs_unmatched"] += 1
            return
        del peer.pings[probe.echo]
        if not self.allow_direct:
            return
        self.by_addr.setdefault(src, peer.rank)
        cand = peer.candidates.get(src)
        if cand is None:
            return
        cand.verified_at = now
        if peer.direct == src:
            peer.last_pong = now
            return
        if peer.direct is None or PRIORITY.get(cand.kind, 0) > PRIORITY.get(peer.direct_kind, 0):
            self._switch(peer, src, cand.kind, now)

    def on_authentic_from(self, rank: int, addr: Address, now: float) -> None:
        """The core authenticated a transport datagram of ``rank`` from ``addr``, an address we
        had not mapped (a NAT rebinding): probe it now."""
        peer = self.peers.get(rank)
        if peer is None or not self.allow_direct or addr in self.by_virtual:
            return
        self.learn(rank, [(addr, "peer-reflexive")], now)
        cand = peer.candidates.get(addr)
        if cand is not None and cand.addr != peer.direct:
            cand.next_ping = max(now, cand.last_ping + _TRIGGER_GAP_S)
            cand.tries = 0

    # -- timers ------------------------------------------------------------------------------
    def poll(self, now: float) -> list[tuple[Address, bytes]]:
        """Probes due now (and fallbacks of dead direct paths)."""
        out: list[tuple[Address, bytes]] = []
        if not self.allow_direct:
            return out
        for peer in self.peers.values():
            if peer.direct is not None:
                if now - peer.last_pong > DEAD_S:
                    self._fall_back(peer, now)
                elif now >= peer.next_keepalive:
                    peer.next_keepalive = now + KEEPALIVE_S
                    out.append(self._ping(peer, peer.direct, now))
            for cand in peer.candidates.values():
                if cand.addr == peer.direct or now < cand.next_ping:
                    continue
                if peer.direct is not None and PRIORITY.get(cand.kind, 0) <= PRIORITY.get(
                    peer.direct_kind, 0
                ):
                    cand.next_ping = now + _SLOW_S * 5  # a better path than this is in use
                    continue
                if now - cand.learned > _GIVE_UP_S and cand.tries > len(_SCHEDULE):
                    cand.next_ping = float("inf")
                    continue
                out.append(self._ping(peer, cand.addr, now))
                cand.last_ping = now
                cand.tries += 1
                gap = _SCHEDULE[cand.tries] if cand.tries < len(_SCHEDULE) else _SLOW_S
                cand.next_ping = now + gap
        return out

    def timer(self) -> float | None:
        best: float | None = None
        if not self.allow_direct:
            return None
        for peer in self.peers.values():
            if peer.direct is not None:
                for t in (peer.next_keepalive, peer.last_pong + DEAD_S):
                    best = t if best is None or t < best else best
            for cand in peer.candidates.values():
                if cand.addr != peer.direct and cand.next_ping != float("inf"):
                    best = cand.next_ping if best is None or cand.next_ping < best else best
        return best

    def _ping(self, peer: PeerPath, addr: Address, now: float) -> tuple[Address, bytes]:
        nonce = self._random(16)
        if len(peer.pings) >= _MAX_PINGS:
            oldest = min(peer.pings, key=lambda n: peer.pings[n][1])
            del peer.pings[oldest]
        peer.pings[nonce] = (addr, now)
        self.counters["probes_sent"] += 1
        return addr, self.codec.seal(PING, self.me, peer.rank, nonce)

    def _switch(self, peer: PeerPath, addr: Address, kind: str, now: float) -> None:
        old = peer.path
        peer.direct, peer.direct_kind = addr, kind
        peer.last_pong = now
        peer.next_keepalive = now + KEEPALIVE_S
        peer.switches += 1
        if peer.direct_at is None:
            peer.direct_at = now
        self.counters["path_switches"] += 1
        self.changes.append((peer.rank, old, peer.path))

    def _fall_back(self, peer: PeerPath, now: float) -> None:
        old = peer.path
        dead = peer.direct
        peer.direct, peer.direct_kind = None, ""
        peer.switches += 1
        self.counters["fallbacks"] += 1
        for cand in peer.candidates.values():
            if cand.addr == dead:
                cand.verified_at = None
            cand.tries, cand.next_ping, cand.learned = 0, now, now
        self.changes.append((peer.rank, old, "relayed"))


__all__ = ["DEAD_S", "KEEPALIVE_S", "PRIORITY", "Paths", "PeerPath", "virtual"]
