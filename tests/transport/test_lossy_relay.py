"""The real-socket lossy relay on loopback: its counters, its delay and rate, then a transfer."""

from __future__ import annotations

import random
import socket
import struct
import time
from collections.abc import Iterator

import pytest

from collectives.testing.lossy_relay import LossyRelay, RelayLink
from collectives.testing.simnet_udp import SocketNet

RECV_TIMEOUT = 2.0


@pytest.fixture
def sockets() -> Iterator[tuple[socket.socket, socket.socket]]:
    client = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    target = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    for sock in (client, target):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
        sock.bind(("127.0.0.1", 0))
        sock.settimeout(RECV_TIMEOUT)
    yield client, target
    client.close()
    target.close()


def drain(sock: socket.socket, quiet: float = 0.3) -> list[tuple[float, bytes]]:
    """Everything that arrives until nothing has for ``quiet`` seconds."""
    got: list[tuple[float, bytes]] = []
    sock.settimeout(quiet)
    try:
        while True:
            data = sock.recv(65536)
            got.append((time.monotonic(), data))
    except TimeoutError:
        return got
    finally:
        sock.settimeout(RECV_TIMEOUT)


def test_loss_rate_is_close_to_the_configured_one(
    sockets: tuple[socket.socket, socket.socket],
) -> None:
    client, target = sockets
    n = 4000
    with LossyRelay(target.getsockname(), RelayLink(loss=0.1), seed=3) as relay:
        for i in range(n):
            client.sendto(struct.pack("!I", i), relay.address)
            if i % 200 == 199:
                time.sleep(0.002)  # stay far below the socket buffers: the relay chooses losses
        got = drain(target)
    stats = relay.stats()["forward"]  # after stop: every forward is counted
    assert stats.received == n
    assert stats.send_failed == 0
    assert stats.forwarded == len(got) == n - stats.lost
    # binomial standard deviation 0.0047: 0.03 is over 6 of them
    assert abs(stats.loss_rate - 0.1) < 0.03
    numbers = [struct.unpack("!I", d)[0] for _, d in got]
    assert numbers == sorted(numbers)  # no jitter configured: FIFO


def test_delay_is_respected_and_replies_come_back(
    sockets: tuple[socket.socket, socket.socket],
) -> None:
    client, target = sockets
    link = RelayLink(delay=0.05, jitter=0.01)
    with LossyRelay(target.getsockname(), link, seed=1) as relay:
        delays = []
        for _ in range(20):
            sent = time.monotonic()
            client.sendto(b"ping", relay.address)
            data, source = target.recvfrom(100)
            delays.append(time.monotonic() - sent)
            assert data == b"ping"
            assert source == relay.back_address  # the target sees the relay, not the client
            target.sendto(b"pong", source)
            assert client.recvfrom(100) == (b"pong", relay.address)
    stats = relay.stats()
    # Never early: the relay must hold each datagram for at least the delay.  (The upper bound
    # only catches a relay that forgot the datagram; it is no speed requirement.)
    assert min(delays) >= 0.05
    assert max(delays) < 0.05 + 0.01 + 1.0
    assert stats["forward"].forwarded == stats["backward"].forwarded == 20


def test_bandwidth_limits_the_rate_and_the_queue_tail_drops(
    sockets: tuple[socket.socket, socket.socket],
) -> None:
    client, target = sockets
    # 1250 B at 1 Mbit/s: 10 ms each.  A queue of 20 datagrams, 60 sent at once.
    link = RelayLink(bandwidth=1e6, queue_bytes=20 * 1250)
    with LossyRelay(target.getsockname(), link) as relay:
        start = time.monotonic()
        for i in range(60):
            client.sendto(struct.pack("!I", i) + bytes(1246), relay.address)
        got = drain(target)
    stats = relay.stats()["forward"]
    assert stats.received == 60
    assert 15 <= stats.forwarded <= 25  # about the queue; how many fit depends on arrival speed
    assert stats.queue_dropped == 60 - stats.forwarded == 60 - len(got)
    # serialisation: n datagrams cannot leave before n * 10 ms
    assert got[-1][0] - start >= 0.01 * len(got) * 0.95


class Echo:
    """A fake sans-IO node: sends its outbox, answers every datagram with its reverse."""

    def __init__(self) -> None:
        self.outbox: list[tuple[tuple[str, int], bytes, int]] = []
        self.inbox: list[bytes] = []

    def receive(
        self, data: bytes, addr: tuple[str, int], now: float, segment_size: int | None = None
    ) -> None:
        self.inbox.append(bytes(data))
        if not data.startswith(b"re:"):
            self.outbox.append((addr, b"re:" + bytes(data)[::-1], len(data) + 3))

    def datagrams_to_send(self, now: float) -> list[tuple[tuple[str, int], bytes, int]]:
        out, self.outbox = self.outbox, []
        return out

    def get_timer(self) -> float | None:
        return None

    def handle_timer(self, now: float) -> None:
        raise AssertionError("no timer was asked for")

    def next_event(self) -> object | None:
        return None


def test_socket_net_drives_fake_nodes_through_the_relay() -> None:
    a, b = Echo(), Echo()
    with SocketNet() as net:
        net.add_node("a", a)
        b_addr = net.add_node("b", b)
        with LossyRelay(b_addr, RelayLink(delay=0.01)) as relay:
            # a GSO-style batch of three datagrams: the driver sends each one
            a.outbox.append((relay.address, b"abcdefgh", 3))
            assert net.run_until(lambda: len(a.inbox) == 3, timeout=5.0)
    assert b.inbox == [b"abc", b"def", b"gh"]
    assert sorted(a.inbox) == [b"re:cba", b"re:fed", b"re:hg"]


def test_core_endpoints_transfer_byte_exact_through_the_relay() -> None:
    endpoint_module = pytest.importorskip("collectives.transport.endpoint")
    from collectives.auth import ClusterKey
    from collectives.transport.config import TransportConfig
    from collectives.transport.events import MessageReceived, MessageSent, PeerConnected

    key = ClusterKey("relay-test-key-0123456789abcdef")
    config = TransportConfig(
        frame_bytes=16 * 1024, window_bytes=1 << 20, max_meta=1024, peer_timeout=10.0
    )
    eps = [
        endpoint_module.Endpoint(
            rank=r, size=2, comm_id=3, epoch=1, key=key, config=config, now=time.monotonic()
        )
        for r in range(2)
    ]
    rng = random.Random(5)
    bodies = [rng.randbytes(n) for n in (1, 1000, 100_000, 3 << 20, 7)]
    link = RelayLink(loss=0.03, delay=0.01, jitter=0.002, bandwidth=200e6)
    with SocketNet() as net:
        net.add_node("r0", eps[0])
        b_addr = net.add_node("r1", eps[1])
        with LossyRelay(b_addr, link, seed=2) as relay:
            eps[0].add_peer(1, relay.address, net.now)
            eps[1].add_peer(0, None, net.now)
            assert net.run_until(
                lambda: bool(
                    net.events_of("r0", PeerConnected) and net.events_of("r1", PeerConnected)
                ),
                timeout=10.0,
            )
            ids = [
                eps[0].send(1, 0, b"m%d" % i, [memoryview(b)], net.now)
                for i, b in enumerate(bodies)
            ]
            reply = eps[1].send(0, 1, b"back", [memoryview(bodies[2])], net.now)
            assert net.run_until(
                lambda: (
                    len(net.events_of("r1", MessageReceived)) == len(bodies)
                    and len(net.events_of("r0", MessageSent)) == len(bodies)
                    and bool(net.events_of("r0", MessageReceived))
                ),
                timeout=60.0,
            ), "transfer through the relay did not finish"
    stats = relay.stats()
    got = net.events_of("r1", MessageReceived)
    assert [e.meta for e in got] == [b"m%d" % i for i in range(len(bodies))]
    assert [bytes(e.body) for e in got] == bodies
    assert [e.message_id for e in got] == ids
    assert sorted(e.message_id for e in net.events_of("r0", MessageSent)) == sorted(ids)
    back = net.events_of("r0", MessageReceived)
    assert [(e.message_id, bytes(e.body)) for e in back] == [(reply, bodies[2])]
    assert stats["forward"].lost > 0  # the relay did lose, and the transfer still completed
    assert eps[0].stats()["retransmitted_segments"] > 0
