"""Two or three Endpoints in memory (tests/transport/pairs.py) under a manual clock."""

from __future__ import annotations

import random

import pytest

from collectives.errors import ConfigurationError, InvalidArgumentError, LocalProtocolError
from collectives.transport import (
    Endpoint,
    MessageReceived,
    MessageSent,
    PeerAddressChanged,
    PeerConnected,
    PeerLost,
    TransportConfig,
)
from collectives.transport.header import HEADER_SIZE, PacketType, parse_header
from tests.transport.pairs import KEY, Mesh, addr_of


def received(mesh: Mesh, rank: int) -> list[MessageReceived]:
    return mesh.of(rank, MessageReceived)


def test_handshake_connects_both_sides() -> None:
    mesh = Mesh(2)
    assert mesh.run_until(lambda: bool(mesh.of(0, PeerConnected) and mesh.of(1, PeerConnected)))
    assert mesh.of(0, PeerConnected) == [PeerConnected(1, addr_of(1))]
    assert mesh.of(1, PeerConnected) == [PeerConnected(0, addr_of(0))]
    assert mesh.endpoints[0].stats()["handshakes"] == 1


@pytest.mark.parametrize("size", [0, 1, 3_000_000, 16 * 1024 * 1024])
def test_message_arrives_whole_and_is_acknowledged(size: int) -> None:
    mesh = Mesh(2)
    body = random.Random(size).randbytes(size)
    mid = mesh.endpoints[0].send(1, 3, b"meta", [memoryview(body)], mesh.now)
    assert mesh.run_until(lambda: bool(mesh.of(0, MessageSent)), max_time=60)
    [msg] = received(mesh, 1)
    assert (msg.peer, msg.channel, msg.message_id, msg.meta) == (0, 3, mid, b"meta")
    assert msg.body == body
    assert mesh.of(0, MessageSent) == [MessageSent(1, mid)]


def test_body_of_many_views_and_higher_rank_sending_first() -> None:
    mesh = Mesh(2)
    parts = [bytes([i]) * (1000 * i + 1) for i in range(20)]
    mesh.endpoints[1].send(0, 0, b"", [memoryview(p) for p in parts], mesh.now)
    assert mesh.run_until(lambda: bool(received(mesh, 0)))
    assert received(mesh, 0)[0].body == b"".join(parts)


def test_fifo_per_channel_with_allocate_in_order() -> None:
    calls: list[tuple[int, int, bytes, int]] = []

    def allocate(peer: int, channel: int, meta: bytes, n: int) -> memoryview:
        calls.append((peer, channel, meta, n))
        return memoryview(bytearray(n))

    mesh = Mesh(2, allocate=allocate)
    sizes = [50_000, 10, 200_000, 0, 70_000, 5]
    for i, n in enumerate(sizes):
        mesh.endpoints[0].send(1, i % 2, b"%d" % i, [memoryview(bytes(n))], mesh.now)
    assert mesh.run_until(lambda: len(received(mesh, 1)) == len(sizes))
    for channel in (0, 1):
        metas = [e.meta for e in received(mesh, 1) if e.channel == channel]
        assert metas == [b"%d" % i for i in range(channel, len(sizes), 2)]
        assert [c[2] for c in calls if c[1] == channel] == metas


def lossy(seed: int, loss: float, dup: float = 0.0, reorder: float = 0.0):  # type: ignore[no-untyped-def]
    rng = random.Random(seed)
    held: list[bytes] = []

    def tamper(src: int, dst: int, data: bytes) -> list[bytes]:
        r = rng.random()
        if r < loss:
            return []
        out = [data, data] if r < loss + dup else [data]
        if rng.random() < reorder:
            held.append(data)
            return []
        if held and rng.random() < 0.5:
            out.append(held.pop(0))
        return out

    return tamper


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_loss_duplication_and_reordering_lose_nothing(seed: int) -> None:
    mesh = Mesh(2, tamper=lossy(seed, loss=0.05, dup=0.03, reorder=0.05))
    rng = random.Random(seed)
    bodies = [rng.randbytes(n) for n in (1_000_000, 10, 0, 300_000, 4000)]
    for i, b in enumerate(bodies):
        mesh.endpoints[0].send(1, i % 3, b"%d" % i, [memoryview(b)], mesh.now)
        mesh.endpoints[1].send(0, 9, b"%d" % i, [memoryview(b)], mesh.now)
    n = len(bodies)
    assert mesh.run_until(
        lambda: len(mesh.of(0, MessageSent)) == n and len(mesh.of(1, MessageSent)) == n,
        max_time=600,
    )
    for rank in (0, 1):
        got = received(mesh, rank)
        assert len(got) == n
        for e in got:
            assert e.body == bodies[int(e.meta)]
    stats = mesh.endpoints[0].stats()
    assert stats["retransmitted_segments"] > 0
    assert stats["dropped_duplicate"] > 0 or mesh.endpoints[1].stats()["dropped_duplicate"] > 0


def test_corrupted_segment_is_rejected_and_its_frame_resent() -> None:
    state = {"hit": 0}

    def tamper(src: int, dst: int, data: bytes) -> list[bytes]:
        header = parse_header(data)
        first_hit = state["hit"] == 0 and header.segment == 2
        if src == 0 and header.type == PacketType.SEGMENT and header.segments > 3 and first_hit:
            state["hit"] = 1
            flipped = bytearray(data)
            flipped[HEADER_SIZE + 5] ^= 0x40
            return [bytes(flipped)]
        return [data]

    mesh = Mesh(2, tamper=tamper)
    body = random.Random(5).randbytes(500_000)
    mesh.endpoints[0].send(1, 0, b"x", [memoryview(body)], mesh.now)
    assert mesh.run_until(lambda: bool(mesh.of(0, MessageSent)))
    assert received(mesh, 1)[0].body == body
    assert mesh.endpoints[1].stats()["dropped_auth"] == 1
    assert mesh.endpoints[0].stats()["retransmitted_segments"] > 0


def test_datagrams_of_another_cluster_comm_or_epoch_are_dropped() -> None:
    from collectives.auth import ClusterKey

    mesh = Mesh(2)
    others = [
        Mesh(2, key=ClusterKey("another-cluster-key-0123456789")),
        Mesh(2, comm_id=8),
        Mesh(2, epoch=2),
    ]
    for other in others:
        other.endpoints[0].send(1, 0, b"", [memoryview(b"evil")], other.now)
        # Capture the foreign world's datagrams (HELLO first, then its segments) into ours.
        for _ in range(5):
            for src, ep in enumerate(other.endpoints):
                for _addr, payload, seg in ep.datagrams_to_send(other.now):
                    data = bytes(payload)
                    for i in range(0, len(data), seg):
                        d = data[i : i + seg]
                        mesh.endpoints[1 - src].receive(d, addr_of(src), mesh.now)
                        other.endpoints[1 - src].receive(d, addr_of(src), other.now)
    stats = mesh.endpoints[1].stats()
    assert stats["dropped_wrong_cluster"] > 0
    assert stats["dropped_foreign"] >= 2
    mesh.endpoints[0].send(1, 0, b"", [memoryview(b"good")], mesh.now)
    assert mesh.run_until(lambda: bool(received(mesh, 1)))
    assert [e.body.tobytes() for e in received(mesh, 1)] == [b"good"]


def test_replayed_datagrams_never_deliver_twice() -> None:
    captured: list[tuple[int, bytes]] = []

    def tamper(src: int, dst: int, data: bytes) -> list[bytes]:
        captured.append((src, data))
        return [data]

    mesh = Mesh(2, tamper=tamper)
    mesh.endpoints[0].send(1, 0, b"a", [memoryview(b"first")], mesh.now)
    assert mesh.run_until(lambda: bool(mesh.of(0, MessageSent)))
    before = mesh.endpoints[1].stats()
    for src, data in captured:
        mesh.endpoints[1 - src].receive(data, addr_of(src), mesh.now)
    mesh.step()
    assert len(received(mesh, 1)) == 1
    after = mesh.endpoints[1].stats()
    assert after["dropped_duplicate"] + after["dropped_replay"] > before["dropped_duplicate"]
    assert mesh.endpoints[1].stats()["handshakes"] == 1  # the replayed HELLO made no new session


def test_address_change_by_session_id() -> None:
    mesh = Mesh(2)
    assert mesh.run_until(lambda: bool(mesh.of(1, PeerConnected)))
    new_addr = ("127.0.0.2", 5555)
    mesh.aliases[new_addr] = 0

    def rebind(src: int, dst: int, data: bytes) -> list[bytes]:
        mesh.endpoints[dst].receive(data, new_addr if src == 0 else addr_of(src), mesh.now)
        return []

    mesh.tamper = rebind
    body = bytes(100_000)
    mesh.endpoints[0].send(1, 0, b"", [memoryview(body)], mesh.now)
    mesh.run_until(lambda: bool(received(mesh, 1)))
    assert mesh.of(1, PeerAddressChanged)[0] == PeerAddressChanged(0, addr_of(0), new_addr)
    assert received(mesh, 1)[0].body == body


def test_peer_timeout_and_close() -> None:
    config = TransportConfig(peer_timeout=5.0, heartbeat_interval=1.0)
    mesh = Mesh(2, config)
    assert mesh.run_until(lambda: bool(mesh.of(1, PeerConnected)))
    # Heartbeats keep an idle session alive past peer_timeout.
    assert not mesh.run_until(lambda: bool(mesh.of(0, PeerLost)), max_time=20)
    mesh.endpoints[0].close(mesh.now)
    with pytest.raises(LocalProtocolError):
        mesh.endpoints[0].send(1, 0, b"", [], mesh.now)
    assert mesh.run_until(lambda: bool(mesh.of(1, PeerLost)), max_time=30)
    assert "closed" in mesh.of(1, PeerLost)[0].reason


def test_silent_peer_is_lost_after_timeout() -> None:
    config = TransportConfig(peer_timeout=3.0)
    mesh = Mesh(2, config, tamper=lambda s, d, data: [])
    assert mesh.run_until(lambda: bool(mesh.of(0, PeerLost)), max_time=10)
    assert mesh.of(0, PeerLost)[0].peer == 1
    assert mesh.endpoints[0].stats()["peers_lost"] == 1


def test_abort_reaches_every_peer_with_its_reason() -> None:
    mesh = Mesh(3)
    assert mesh.run_until(lambda: all(len(mesh.of(r, PeerConnected)) == 2 for r in range(3)))
    mesh.endpoints[1].abort("boom", mesh.now)
    assert mesh.run_until(lambda: bool(mesh.of(0, PeerLost) and mesh.of(2, PeerLost)))
    assert all("boom" in e.reason for r in (0, 2) for e in mesh.of(r, PeerLost))


def test_arguments_are_checked() -> None:
    with pytest.raises(ConfigurationError):
        Endpoint(rank=0, size=2, comm_id=1, epoch=0, key=None, config=TransportConfig(), now=0)
    ep = Endpoint(rank=0, size=2, comm_id=1, epoch=0, key=KEY, config=TransportConfig(), now=0)
    with pytest.raises(InvalidArgumentError):
        ep.add_peer(1, None, 0.0)  # the lower rank must know where to send HELLO
    with pytest.raises(InvalidArgumentError):
        ep.add_peer(0, addr_of(0), 0.0)
    ep.add_peer(1, addr_of(1), 0.0)
    with pytest.raises(InvalidArgumentError):
        ep.send(1, 0, bytes(TransportConfig().max_meta + 1), [], 0.0)


def test_insecure_mode_moves_data() -> None:
    mesh = Mesh(2, TransportConfig(insecure=True), key=None)
    body = bytes(range(256)) * 1000
    mesh.endpoints[0].send(1, 0, b"m", [memoryview(body)], mesh.now)
    assert mesh.run_until(lambda: bool(mesh.of(0, MessageSent)))
    assert received(mesh, 1)[0].body == body


def test_gro_batches_are_split() -> None:
    mesh = Mesh(2, TransportConfig(max_datagram=1200), gro=True)
    body = bytes(range(200)) * 2000
    mesh.endpoints[0].send(1, 0, b"", [memoryview(body)], mesh.now)
    assert mesh.run_until(lambda: bool(mesh.of(0, MessageSent)))
    assert received(mesh, 1)[0].body == body
    stats = mesh.endpoints[1].stats()
    assert stats["datagrams_in"] > len(body) // 1200  # counted one by one, not per batch
