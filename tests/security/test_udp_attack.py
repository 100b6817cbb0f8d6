"""Attacks on a live udp rank with a raw socket: what a process without the key can send it.

Every datagram here is dropped without an answer and without a session, and counted by cause in
``comm.stats()``; a captured datagram sent again is dropped as a replay; the world keeps working
afterwards.  Insecure mode exists only by explicit opt-in.
"""

from __future__ import annotations

import os
import socket
import threading
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from collectives.auth import ClusterKey
from collectives.backends import udp_peers
from collectives.communicator import Communicator
from collectives.errors import ConfigurationError, RendezvousTimeoutError
from collectives.transport.crypto import cluster_tag
from collectives.transport.header import Header, PacketType
from collectives.world import init

KEY_TEXT = "udp-attack-test-key-0123456789abcdef"
DROPS = (
    "dropped_malformed",
    "dropped_wrong_cluster",
    "dropped_unknown_session",
    "dropped_auth",
    "dropped_replay",
    "dropped_duplicate",
)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _env(n: int, **extra: str) -> dict[str, str]:
    hosts = ",".join(f"127.0.0.1:{_free_port()}" for _ in range(n))
    return {udp_peers.MODE_ENV: "static", udp_peers.HOSTNAMES_ENV: hosts, **extra}


def _on_each(comms: list[Communicator], fn: Callable[[Communicator], Any]) -> list[Any]:
    out: list[Any] = [None] * len(comms)
    errors: list[BaseException] = []

    def run(i: int) -> None:
        try:
            out[i] = fn(comms[i])
        except BaseException as err:
            errors.append(err)

    threads = [threading.Thread(target=run, args=(i,), daemon=True) for i in range(len(comms))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30.0)
    assert not any(t.is_alive() for t in threads), "a rank hung"
    if errors:
        raise errors[0]
    return out


def _make(env: dict[str, str], timeout: float = 20.0) -> list[Communicator]:
    comms: list[Any] = [None, None]

    def make(rank: int) -> Communicator:
        return init("udp", rank=rank, size=2, environ=env, timeout=timeout)

    placeholders = [type("R", (), {"rank": r})() for r in range(2)]
    comms = _on_each(placeholders, lambda p: make(p.rank))  # type: ignore[arg-type,attr-defined]
    return comms


@pytest.fixture
def world() -> Iterator[list[Communicator]]:
    comms = _make(_env(2, COMFY_CLUSTER_KEY=KEY_TEXT))
    yield comms
    for comm in comms:
        comm.close()


@pytest.fixture
def attacker() -> Iterator[socket.socket]:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    sock.settimeout(0.5)
    yield sock
    sock.close()


def _address(comm: Communicator) -> tuple[str, int]:
    return comm.engine._engine.sock.address  # type: ignore[attr-defined,no-any-return]


def _drops(comm: Communicator) -> dict[str, int]:
    stats = comm.stats()
    return {name: int(stats[name]) for name in DROPS}


def _header(ptype: int, tag: bytes, session: int, number: int = 5, length: int = 64) -> bytes:
    return Header(ptype, 0, tag, session, number, 0, 1, length).pack()


def _no_answer(sock: socket.socket) -> None:
    with pytest.raises(TimeoutError):
        sock.recvfrom(65535)


def _still_works(comms: list[Communicator]) -> None:
    assert _on_each(comms, lambda c: c.allgather(c.rank)) == [[0, 1], [0, 1]]


KEY = ClusterKey(KEY_TEXT)
FOREIGN = ClusterKey("some-other-cluster-key-000000000")


@pytest.mark.parametrize(
    ("name", "datagram", "counter"),
    [
        ("empty", lambda: b"", "dropped_malformed"),
        ("truncated header", lambda: b"\x01\x03" + bytes(10), "dropped_malformed"),
        ("random bytes", lambda: os.urandom(1200), "dropped_malformed"),
        (
            "wrong cluster",
            lambda: _header(PacketType.SEGMENT, b"XXXX", 1) + os.urandom(64),
            "dropped_wrong_cluster",
        ),
        (
            "a HELLO under another key",
            lambda: _header(PacketType.HELLO, cluster_tag(FOREIGN), 0) + os.urandom(64),
            "dropped_wrong_cluster",
        ),
        (
            "a forged HELLO with the public cluster tag",
            lambda: _header(PacketType.HELLO, cluster_tag(KEY), 0, length=96) + os.urandom(96),
            "dropped_auth",
        ),
        (
            "a segment of a session that does not exist",
            lambda: _header(PacketType.SEGMENT, cluster_tag(KEY), 0x1234) + os.urandom(64),
            "dropped_unknown_session",
        ),
    ],
)
def test_a_keyless_datagram_gets_no_answer_and_no_state(
    world: list[Communicator],
    attacker: socket.socket,
    name: str,
    datagram: Callable[[], bytes],
    counter: str,
) -> None:
    target = world[1]
    before = _drops(target)
    handshakes = target.stats()["handshakes"]
    for _ in range(3):
        attacker.sendto(datagram(), _address(target))
    _no_answer(attacker)
    after = _drops(target)
    assert after[counter] - before[counter] == 3, (name, before, after)
    # Nothing else counted them.  Not ``dropped_duplicate``: a peer's spurious retransmission
    # (its ACK came late on this busy box) is dropped there, and is no attack.
    noise = after["dropped_duplicate"] - before["dropped_duplicate"]
    assert sum(after.values()) - sum(before.values()) - noise == 3, (name, before, after)
    assert target.stats()["handshakes"] == handshakes
    assert target.peers() == {0: "ok"}
    _still_works(world)


def _capture(comm: Communicator) -> list[tuple[tuple[str, int], bytes, int]]:
    """Record every datagram batch ``comm`` sends from now on."""
    sock = comm.engine._engine.sock  # type: ignore[attr-defined]
    seen: list[tuple[tuple[str, int], bytes, int]] = []
    original = sock.send_batch

    def recording(addr: tuple[str, int], payload: memoryview, segment: int) -> int:
        seen.append((addr, bytes(payload), segment))
        return int(original(addr, payload, segment))

    sock.send_batch = recording
    return seen


def _split(batches: list[tuple[tuple[str, int], bytes, int]]) -> list[bytes]:
    out = []
    for _, payload, segment in batches:
        out += [payload[i : i + segment] for i in range(0, len(payload), segment)]
    return out


def test_a_replayed_datagram_is_dropped(world: list[Communicator], attacker: socket.socket) -> None:
    sender, target = world
    captured = _capture(sender)
    _on_each(world, lambda c: c.send(b"secret", 1) if c.rank == 0 else c.recv(0))
    datagrams = _split(captured)
    assert datagrams, "nothing was captured"
    before = _drops(target)
    moved = target.stats()["address_changes"]
    for data in datagrams:
        attacker.sendto(data, _address(target))
    _no_answer(attacker)
    after = _drops(target)
    replays = after["dropped_replay"] + after["dropped_duplicate"]
    assert replays - before["dropped_replay"] - before["dropped_duplicate"] >= 1, (before, after)
    assert sum(after.values()) - sum(before.values()) == len(datagrams)
    assert target.stats()["address_changes"] == moved  # a replay does not move the peer
    assert not target.engine._has_message(0, "p0")  # type: ignore[attr-defined]
    _still_works(world)


def test_a_tampered_datagram_is_dropped(world: list[Communicator], attacker: socket.socket) -> None:
    sender, target = world
    captured = _capture(sender)
    _on_each(world, lambda c: c.send(b"x" * 100, 1) if c.rank == 0 else c.recv(0))
    before = _drops(target)
    for data in _split(captured):
        forged = bytearray(data)
        forged[-1] ^= 0x40
        attacker.sendto(bytes(forged), _address(target))
    _no_answer(attacker)
    after = _drops(target)
    assert sum(after.values()) > sum(before.values())
    assert not target.engine._has_message(0, "p0")  # type: ignore[attr-defined]
    _still_works(world)


def test_ranks_with_different_keys_never_form_a_world() -> None:
    env = _env(2)
    errors: list[BaseException] = []

    def rank(r: int, key: str) -> None:
        try:
            init("udp", rank=r, size=2, environ={**env, "COMFY_CLUSTER_KEY": key}, timeout=1.5)
        except BaseException as err:
            errors.append(err)

    threads = [
        threading.Thread(target=rank, args=(0, KEY_TEXT), daemon=True),
        threading.Thread(target=rank, args=(1, FOREIGN.text), daemon=True),
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(20.0)
    assert len(errors) == 2
    assert all(isinstance(e, RendezvousTimeoutError) for e in errors), errors
    assert all("COMFY_CLUSTER_KEY" in str(e) for e in errors)


def test_insecure_mode_is_only_an_explicit_opt_in() -> None:
    with pytest.raises(ConfigurationError, match="COMFY_CLUSTER_INSECURE"):
        init("udp", rank=0, size=2, environ=_env(2), timeout=2.0)
    comms = _make(_env(2, COMFY_CLUSTER_INSECURE="1"))
    try:
        _still_works(comms)
    finally:
        for comm in comms:
            comm.close()


def test_refused_datagrams_are_reported_in_the_log(
    world: list[Communicator], attacker: socket.socket, caplog: pytest.LogCaptureFixture
) -> None:
    """The counters say how many; the log tells an operator to look (once per interval)."""
    import time

    target = world[1]
    engine = target.engine._engine  # type: ignore[attr-defined]
    with caplog.at_level("WARNING", logger="collectives.backends.udp_io"):
        for _ in range(3):
            attacker.sendto(
                _header(PacketType.SEGMENT, b"XXXX", 1) + os.urandom(64), _address(target)
            )
        _no_answer(attacker)
        with engine.lock:
            engine._drops_next = 0.0  # the next IO turn may log at once
        engine.wake()
        deadline = time.monotonic() + 10.0
        while time.monotonic() < deadline and "refused" not in caplog.text:
            time.sleep(0.05)
    assert "refused" in caplog.text and "wrong_cluster" in caplog.text, caplog.text
    assert "COMFY_CLUSTER_KEY" in caplog.text
