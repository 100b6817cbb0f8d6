"""``Endpoint.unreachable``: an ICMP port unreachable is a hint, never proof (ICMP is not
authenticated).  A dead peer is lost within ``unreachable_grace``; a live one answers the PING
the hint triggers and stays, whoever forged the ICMP error."""

from __future__ import annotations

from collectives.transport import PeerConnected, PeerLost, TransportConfig
from tests.transport.pairs import Mesh, addr_of


def _connected(mesh: Mesh) -> None:
    assert mesh.run_until(lambda: bool(mesh.of(0, PeerConnected) and mesh.of(1, PeerConnected)))
    assert mesh.run_until(lambda: False, max_time=mesh.now + 0.5) is False  # settle the ACKs


def test_a_dead_peer_is_lost_within_the_grace_not_the_peer_timeout() -> None:
    dead = {"on": False}
    mesh = Mesh(2, tamper=lambda src, dst, data: [] if dead["on"] and src == 1 else [data])
    _connected(mesh)
    dead["on"] = True  # rank 1's process is gone: nothing comes from it any more
    hinted_at = mesh.now
    mesh.endpoints[0].unreachable(addr_of(1), mesh.now)
    assert mesh.run_until(lambda: bool(mesh.of(0, PeerLost)), max_time=hinted_at + 10)
    [lost] = mesh.of(0, PeerLost)
    assert lost.peer == 1 and "port is closed" in lost.reason
    assert mesh.now - hinted_at < 1.5  # unreachable_grace 1 s, not peer_timeout 30 s
    assert mesh.endpoints[0].stats()["unreachable_hints"] == 1


def test_a_forged_hint_does_not_drop_a_live_peer() -> None:
    """The attacker's test: an ICMP error is trivial to forge on a LAN.  The live peer answers
    the PING, so the session stays, idle or busy."""
    mesh = Mesh(2, TransportConfig(unreachable_grace=0.2))
    _connected(mesh)
    for _ in range(5):
        mesh.endpoints[0].unreachable(addr_of(1), mesh.now)
        assert not mesh.run_until(lambda: bool(mesh.of(0, PeerLost)), max_time=mesh.now + 1.0)
    mesh.endpoints[0].send(1, 0, b"m", [memoryview(b"x" * 100_000)], mesh.now)
    mesh.endpoints[0].unreachable(addr_of(1), mesh.now)
    assert not mesh.run_until(lambda: bool(mesh.of(0, PeerLost)), max_time=mesh.now + 3.0)
    assert mesh.endpoints[0].stats()["unreachable_hints"] == 6


def test_a_hint_for_another_address_or_before_the_handshake_is_ignored() -> None:
    mesh = Mesh(2, TransportConfig(unreachable_grace=0.1), connect=False)
    mesh.endpoints[0].add_peer(1, addr_of(1), mesh.now)
    # Rank 1 has not started yet: its port is closed while rank 0 sends HELLOs.  That is no
    # reason to give up on it (formation waits for late ranks).
    mesh.endpoints[0].unreachable(addr_of(1), mesh.now)
    mesh.endpoints[0].unreachable(("127.0.0.1", 9), mesh.now)
    mesh.endpoints[1].add_peer(0, addr_of(0), mesh.now)
    _connected(mesh)
    assert not mesh.of(0, PeerLost)
    mesh.endpoints[0].unreachable(("127.0.0.1", 9), mesh.now)  # nobody of ours lives there
    assert not mesh.run_until(lambda: bool(mesh.of(0, PeerLost)), max_time=mesh.now + 2.0)
    assert mesh.endpoints[0].stats()["unreachable_hints"] == 1  # the pre-handshake one counted
