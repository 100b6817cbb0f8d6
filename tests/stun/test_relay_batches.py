"""The relay's batch path on a real server: GSO batches of relay datagrams (``UDP_SEGMENT``),
read by the server as one GRO batch, checked once and forwarded with one segmented send; and
the attacker's batches (mixed destinations, an unknown source, a foreign destination, a
malformed datagram in the middle, an oversized segment size, more than the rate allows), each
datagram of which ends dropped and counted or forwarded exactly as it would alone."""

from __future__ import annotations

import contextlib
import socket
import sys
from collections.abc import Iterator

import httpx
import pytest

from stun.registry import Registry
from stun.udp_core import UdpCore

from .server_proc import Rank, StunProcess, serving
from .test_udp import _binding, _join, _reflexive, _stats

pytestmark = pytest.mark.skipif(
    not sys.platform.startswith("linux"), reason="UDP GSO/GRO batches are Linux socket options"
)

SOL_UDP, UDP_SEGMENT, UDP_GRO = 17, 103, 104
DATA = bytes([0xCC, 0x01])


def _bound(server: StunProcess, http: httpx.Client, ranks: list[Rank], n: int) -> list[Rank]:
    made = [_join(http, ranks) for _ in range(n)]
    for r in made:
        assert _binding(server, r) is not None
        _reflexive(http, r)
    return made


def _send_batch(sock: socket.socket, datagrams: list[bytes], server: StunProcess) -> None:
    """One GSO send: every datagram but the last must have the first one's size."""
    assert server.udp_port is not None
    segment = len(datagrams[0])
    assert all(len(d) == segment for d in datagrams[:-1])
    cmsg = [(SOL_UDP, UDP_SEGMENT, segment.to_bytes(2, sys.byteorder))]
    sock.sendmsg([b"".join(datagrams)], cmsg, 0, ("127.0.0.1", server.udp_port))


def _receive(sock: socket.socket, count: int, wait: float = 2.0) -> list[bytes]:
    """Up to ``count`` relayed datagrams (GRO batches split), in order; punch hints skipped."""
    out: list[bytes] = []
    sock.settimeout(wait)
    try:
        while len(out) < count:
            data, anc, _, _ = sock.recvmsg(65535, socket.CMSG_SPACE(4))
            seg = next((int.from_bytes(v[:2], sys.byteorder) for _, _, v in anc), len(data))
            out += [data[at : at + seg] for at in range(0, len(data), seg)]
            out = [d for d in out if d[:2] == DATA]
    except TimeoutError:
        pass
    return out


def _payloads(n: int, size: int = 1200, last: int = 700) -> list[bytes]:
    return [bytes([i]) * (size if i < n - 1 else last) for i in range(n)]


def _delta(after: dict[str, int], before: dict[str, int]) -> dict[str, int]:
    return {k: after[k] - before[k] for k in after if after[k] != before[k]}


def test_a_batch_is_forwarded_as_one_batch_with_the_sources_handle(
    server: StunProcess, http: httpx.Client, ranks: list[Rank]
) -> None:
    a, b = _bound(server, http, ranks, 2)
    b.sock.setsockopt(SOL_UDP, UDP_GRO, 1)
    payloads = _payloads(20)
    before = _stats(http)
    _send_batch(a.sock, [DATA + b.handle + p for p in payloads], server)
    got = _receive(b.sock, 20)
    assert got == [DATA + a.handle + p for p in payloads]
    delta = _delta(_stats(http), before)
    assert delta == {
        "relay_forwarded": 20,
        "relay_bytes": sum(map(len, payloads)),
        "relay_batches": 1,
    }


def test_a_batch_mixing_destinations_goes_datagram_by_datagram(
    server: StunProcess, http: httpx.Client, ranks: list[Rank]
) -> None:
    a, b, c = _bound(server, http, ranks, 3)
    before = _stats(http)
    frames = [DATA + (b.handle if i % 2 == 0 else c.handle) + bytes([i]) * 500 for i in range(6)]
    _send_batch(a.sock, frames, server)
    assert _receive(b.sock, 3) == [DATA + a.handle + bytes([i]) * 500 for i in (0, 2, 4)]
    assert _receive(c.sock, 3) == [DATA + a.handle + bytes([i]) * 500 for i in (1, 3, 5)]
    assert _delta(_stats(http), before) == {"relay_forwarded": 6, "relay_bytes": 3000}


def test_a_malformed_datagram_in_the_middle_is_dropped_alone(
    server: StunProcess, http: httpx.Client, ranks: list[Rank]
) -> None:
    a, b = _bound(server, http, ranks, 2)
    before = _stats(http)
    good = [DATA + b.handle + bytes([i]) * 300 for i in range(5)]
    bad_kind = bytes([0xCC, 0x07]) + b.handle + bytes(300)  # not a relay datagram
    garbage = b"\x7f" * len(good[0])  # neither relay nor STUN
    frames = [*good[:2], bad_kind, *good[2:4], garbage, *good[4:]]
    _send_batch(a.sock, frames, server)
    assert _receive(b.sock, 5) == [DATA + a.handle + bytes([i]) * 300 for i in range(5)]
    delta = _delta(_stats(http), before)
    assert delta == {
        "relay_forwarded": 5,
        "relay_bytes": 1500,
        "relay_malformed": 1,
        "unknown_kind": 1,
    }


def test_a_batch_from_an_unknown_source_or_to_a_foreign_cluster_is_dropped_whole(
    server: StunProcess, http: httpx.Client, ranks: list[Rank]
) -> None:
    (b,) = _bound(server, http, ranks, 1)
    other = _join(http, ranks, cluster="beta")
    assert _binding(server, other) is not None
    _reflexive(http, other)
    before = _stats(http)
    frames = [DATA + b.handle + p for p in _payloads(8, 400, 100)]
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as stranger:  # never bound: no member
        stranger.bind(("127.0.0.1", 0))
        _send_batch(stranger, frames, server)
    _send_batch(other.sock, frames, server)  # a member of beta, to alpha's b
    assert _receive(b.sock, 1, wait=0.5) == []
    delta = _delta(_stats(http), before)
    assert delta == {"relay_unknown_source": 8, "relay_unknown_destination": 8}


def test_an_oversized_segment_size_is_dropped_and_counted_per_datagram(
    server: StunProcess, http: httpx.Client, ranks: list[Rank]
) -> None:
    a, b = _bound(server, http, ranks, 2)
    before = _stats(http)
    # 3000-byte datagrams: over the server's COMFY_CLUSTER_STUN_MAX_DATAGRAM (2048)
    _send_batch(a.sock, [DATA + b.handle + bytes(2990)] * 3, server)
    # a last datagram without even a relay header: the batch is taken apart, it alone dropped
    _send_batch(a.sock, [DATA + b.handle + bytes(100)] * 2 + [DATA + b.handle[:3]], server)
    assert _receive(b.sock, 3, wait=1.0) == [DATA + a.handle + bytes(100)] * 2
    delta = _delta(_stats(http), before)
    assert delta == {
        "oversize": 3,
        "relay_malformed": 1,
        "relay_forwarded": 2,
        "relay_bytes": 200,
    }


@contextlib.contextmanager
def _pair_at(env: dict[str, str]) -> Iterator[tuple[StunProcess, httpx.Client, Rank, Rank]]:
    """A server of its own (``env``), a client of it and two bound ranks, all closed after."""
    made: list[Rank] = []
    with serving(env) as server, server.client() as http:
        try:
            a, b = _bound(server, http, made, 2)
            yield server, http, a, b
        finally:
            for r in made:
                r.sock.close()


def test_the_rate_limit_counts_every_datagram_of_a_batch() -> None:
    # A burst of 10
    with _pair_at({"COMFY_CLUSTER_STUN_RELAY_PPS": "100"}) as (limited, http, a, b):
        before = _stats(http)
        _send_batch(a.sock, [DATA + b.handle + bytes(200)] * 30, limited)
        assert len(_receive(b.sock, 30, wait=1.0)) == 10
        delta = _delta(_stats(http), before)
        assert delta == {
            "relay_forwarded": 10,
            "relay_bytes": 2000,
            "relay_batches": 1,
            "relay_rate_limited": 20,
        }


def test_without_gro_the_asyncio_mode_relays_a_batch_datagram_by_datagram() -> None:
    with _pair_at({"COMFY_CLUSTER_STUN_UDP_MODE": "asyncio"}) as (plain, http, a, b):
        before = _stats(http)
        payloads = _payloads(12, 800, 20)
        _send_batch(a.sock, [DATA + b.handle + p for p in payloads], plain)
        assert _receive(b.sock, 12) == [DATA + a.handle + p for p in payloads]
        delta = _delta(_stats(http), before)
        assert delta == {"relay_forwarded": 12, "relay_bytes": sum(map(len, payloads))}


def test_without_gso_the_core_forwards_a_checked_batch_datagram_by_datagram() -> None:
    """The core alone (the layer under the socket): a uniform batch is checked once and, where
    the socket has no segmented send, each rewritten datagram goes out by itself."""
    registry = Registry(ttl_s=60.0, max_instances=4)
    cluster = registry.add_cluster("alpha", b"", declared=True)
    a, b = (
        registry.join(cluster, name, rank=None, world_size=2, local=[], role=None)
        for name in ("a", "b")
    )
    a_addr, b_addr = ("203.0.113.1", 1000), ("203.0.113.2", 2000)
    registry.set_reflexive(a, a_addr)
    registry.set_reflexive(b, b_addr)
    core = UdpCore(registry, max_datagram=2048, relay_pps=1e6, stun_pps=50.0, post=lambda f: f())
    sent: list[tuple[bytes, tuple[str, int]]] = []
    core.send = lambda data, addr: sent.append((bytes(data), addr))
    payloads = _payloads(5, 300, 10)
    buf = bytearray(65535)
    batch = b"".join(DATA + b.handle + p for p in payloads)
    buf[: len(batch)] = batch
    core.relay_batch(buf, len(batch), 310, a_addr)
    assert sent == [(DATA + a.handle + p, b_addr) for p in payloads]
    assert core.counters.relay_batches == 1 and core.counters.relay_forwarded == 5
