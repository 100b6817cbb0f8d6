"""HELLO / HELLO_ACK: MAC'd, refused when forged, foreign, stale or replayed."""

from __future__ import annotations

from collectives.auth import ClusterKey
from collectives.transport import Endpoint, PeerConnected, TransportConfig, handshake
from collectives.transport._pb import transport_pb2 as pb
from collectives.transport.crypto import cluster_tag
from collectives.transport.header import PacketType, parse_header
from tests.transport.pairs import KEY, Mesh, addr_of

WALL = 1_000_000.0


def server(**kw: object) -> Endpoint:
    args: dict = dict(
        rank=1, size=2, comm_id=7, epoch=1, key=KEY, config=TransportConfig(), now=0.0
    )  # type: ignore[type-arg]
    args.update(kw)
    return Endpoint(**args, wall_clock=lambda: WALL)


def hello(key: ClusterKey = KEY, **fields: object) -> bytes:
    msg = pb.Hello(
        cluster_tag=int.from_bytes(cluster_tag(key), "big"),
        from_rank=0,
        to_rank=1,
        comm_id=7,
        epoch=1,
        client_nonce=b"n" * 16,
        client_session_id=99,
        timestamp=WALL,
        window_bytes=1 << 20,
    )
    for name, value in fields.items():
        setattr(msg, name, value)
    return handshake.build(key, cluster_tag(key), PacketType.HELLO, 0, msg)


def test_a_valid_hello_is_answered_and_connects() -> None:
    ep = server()
    ep.receive(hello(), addr_of(0), 0.0)
    assert ep.next_event() == PeerConnected(0, addr_of(0))
    [(addr, payload, _)] = ep.datagrams_to_send(0.0)
    assert addr == addr_of(0)
    header = parse_header(payload)
    assert header.type == PacketType.HELLO_ACK and header.session_id == 99
    body = handshake.open_body(KEY, memoryview(payload), header)
    assert body is not None and body.client_nonce == b"n" * 16


def test_the_same_hello_again_gets_the_same_answer_and_no_new_session() -> None:
    ep = server()
    ep.receive(hello(), addr_of(0), 0.0)
    first = bytes(ep.datagrams_to_send(0.0)[0][1])
    ep.receive(hello(), addr_of(0), 0.1)
    again = ep.datagrams_to_send(0.1)
    assert [bytes(p) for _, p, _ in again] == [first]
    assert ep.stats()["handshakes"] == 1


def test_bad_hellos_get_no_answer_and_no_state() -> None:
    tampered = bytearray(hello())
    tampered[40] ^= 1
    cases = {
        "dropped_auth": [
            bytes(tampered),
            hello()[:-1],
            hello(key=ClusterKey("other-key-but-same-tag-0123456"))[:4]
            + hello()[4:8]
            + hello(key=ClusterKey("other-key-but-same-tag-0123456"))[8:],
        ],
        "dropped_foreign": [
            hello(comm_id=8),
            hello(epoch=2),
            hello(to_rank=0),
            hello(from_rank=1),
        ],
        "dropped_replay": [hello(timestamp=WALL - 1000), hello(timestamp=WALL + 1000)],
        "dropped_wrong_cluster": [hello(key=ClusterKey("another-cluster-key-012345"))],
    }
    for counter, datagrams in cases.items():
        ep = server()
        for d in datagrams:
            ep.receive(d, addr_of(0), 0.0)
        assert ep.stats()[counter] == len(datagrams), counter
        assert ep.next_event() is None
        assert ep.datagrams_to_send(0.0) == []
        assert ep._sessions == {} and ep._by_id == {}


def test_a_replayed_hello_cannot_replace_a_confirmed_session() -> None:
    captured: list[bytes] = []

    def tamper(src: int, dst: int, data: bytes) -> list[bytes]:
        captured.append(data)
        return [data]

    mesh = Mesh(2, tamper=tamper)
    mesh.endpoints[0].send(1, 0, b"", [memoryview(b"x")], mesh.now)
    assert mesh.run_until(lambda: bool(mesh.endpoints[1]._sessions[0].confirmed))
    the_hello = next(d for d in captured if parse_header(d).type == PacketType.HELLO)
    session = mesh.endpoints[1]._sessions[0]
    before = session.local_id
    mesh.endpoints[1].receive(the_hello, addr_of(0), mesh.now)
    assert session.local_id == before
    # A fresh HELLO (new nonce) for a confirmed session is stale too.
    mesh.endpoints[1].receive(hello(timestamp=0.0), addr_of(0), mesh.now)
    assert session.local_id == before and mesh.endpoints[1].stats()["handshakes"] == 1


def test_nonce_cache_refuses_a_replay_and_stays_bounded() -> None:
    guard = handshake.ReplayGuard(window=10.0, max_nonces=3)
    assert guard.accept(b"a", 100.0, 100.0)
    assert not guard.accept(b"a", 100.0, 101.0)
    assert guard.accept(b"b", 100.0, 101.0) and guard.accept(b"c", 100.0, 101.0)
    assert not guard.accept(b"d", 100.0, 101.0)  # full of unexpired nonces: refuse, not forget
    assert guard.accept(b"d", 112.0, 112.0)  # the old ones expired
    assert len(guard) == 1
    assert not guard.accept(b"e", 80.0, 112.0)
