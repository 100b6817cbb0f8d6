"""The control channel between instances: sealed UDP datagrams, request and reply, and what an
attacker on the network can send it (real sockets on 127.0.0.1).

Every datagram that is forged, replayed, sealed with another key, oversized, truncated or stale
is dropped and counted, and never reaches the handler."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

from collectives.auth import ClusterKey
from collectives.errors import PeerUnreachableError
from comfy_nodes.server.carrier import Address, ControlUnreachableError, UdpCarrier
from comfy_nodes.server.seal import MAX_DATAGRAM, Envelope, Refusal, Seal
from comfy_nodes.server.states import Event, MembershipStateError, State, next_state

KEY = ClusterKey("c" * 40)
PORT_ENV = "COMFY_CLUSTER_CONTROL_PORT"


class _Endpoint:
    """A carrier whose handler records what it acted on."""

    def __init__(self, rank: int, key: ClusterKey | None = KEY) -> None:
        self.acted: list[tuple[int, str, dict[str, Any]]] = []
        self.carrier = UdpCarrier(rank, ("127.0.0.1", 0), Seal(key), self.handle, port_env=PORT_ENV)

    def handle(self, envelope: Envelope, source: Address) -> dict[str, Any]:
        self.acted.append((envelope.sender, envelope.kind, envelope.body))
        return {"ok": True, "echo": envelope.body}


@pytest.fixture
def pair() -> Iterator[tuple[_Endpoint, _Endpoint]]:
    a, b = _Endpoint(0), _Endpoint(1)
    yield a, b
    a.carrier.close()
    b.carrier.close()


def _raw_send(datagram: bytes, to: Address) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.sendto(datagram, to)


def _wait_dropped(endpoint: _Endpoint, reason: str, count: int = 1) -> None:
    deadline = time.monotonic() + 5
    while endpoint.carrier.dropped[reason] < count and time.monotonic() < deadline:
        time.sleep(0.01)
    assert endpoint.carrier.dropped[reason] == count, endpoint.carrier.dropped


def test_a_request_gets_its_reply(pair: tuple[_Endpoint, _Endpoint]) -> None:
    a, b = pair
    reply = a.carrier.request(1, b.carrier.address, "abort", {"epoch": 3}, timeout=5)
    assert reply == {"ok": True, "echo": {"epoch": 3}}
    assert b.acted == [(0, "abort", {"epoch": 3})]
    assert sum(b.carrier.dropped.values()) == 0


def test_a_silent_peer_is_a_typed_error_naming_it() -> None:
    a = _Endpoint(0)
    try:
        start = time.monotonic()
        with pytest.raises(ControlUnreachableError) as err:
            a.carrier.request(2, ("127.0.0.1", 9), "epoch", {}, timeout=0.5)
        assert time.monotonic() - start < 3
        assert isinstance(err.value, PeerUnreachableError) and err.value.rank == 2
        assert "rank 2 at udp 127.0.0.1:9 did not answer a 'epoch'" in str(err.value)
    finally:
        a.carrier.close()


def test_a_replayed_request_is_dropped_and_not_acted_on_again(
    pair: tuple[_Endpoint, _Endpoint],
) -> None:
    _, b = pair
    datagram = Seal(KEY).seal(Envelope(0, "m1", "abort", False, {"epoch": 1}))
    _raw_send(datagram, b.carrier.address)
    deadline = time.monotonic() + 5
    while not b.acted and time.monotonic() < deadline:
        time.sleep(0.01)
    _raw_send(datagram, b.carrier.address)
    _wait_dropped(b, "replayed")
    assert b.acted == [(0, "abort", {"epoch": 1})]


@pytest.mark.parametrize(
    ("make", "reason"),
    [
        (lambda: Seal(ClusterKey("w" * 40)).seal(Envelope(0, "m", "abort", False, {})), "auth"),
        (lambda: Seal(None).seal(Envelope(0, "m", "abort", False, {})), "auth"),
        (lambda: Seal(KEY).seal(Envelope(0, "m", "abort", False, {}))[:-1], "auth"),  # truncated
        (lambda: _flipped(Seal(KEY).seal(Envelope(0, "m", "abort", False, {}))), "auth"),
        (lambda: b"CCC1" + b"\0" * 20, "malformed"),  # shorter than nonce and tag
        (lambda: b"GET / HTTP/1.1\r\n\r\n" + b"x" * 40, "malformed"),
        (lambda: b"CCC1" + b"\0" * MAX_DATAGRAM, "oversized"),
        (
            lambda: Seal(KEY).seal(Envelope(0, "m", "abort", False, {}), now=time.time() - 120),
            "expired",
        ),
    ],
    ids=["wrong-key", "no-key", "truncated", "forged", "short", "not-ours", "oversized", "stale"],
)
def test_hostile_datagrams_are_dropped_and_counted(
    pair: tuple[_Endpoint, _Endpoint], make: Any, reason: str
) -> None:
    _, b = pair
    _raw_send(make(), b.carrier.address)
    _wait_dropped(b, reason)
    assert b.acted == []
    assert sum(b.carrier.dropped.values()) == 1


def _flipped(datagram: bytes) -> bytes:
    body = bytearray(datagram)
    body[30] ^= 1
    return bytes(body)


def test_an_envelope_of_the_wrong_shape_is_malformed_even_when_sealed() -> None:
    seal = Seal(KEY)
    nonce = b"\1" * 12
    from comfy_nodes.server import seal as seal_module

    plain = b'{"from": "zero", "id": 1}'
    datagram = seal_module.MAGIC + nonce + seal._aead.encrypt(nonce, plain, seal_module.MAGIC)
    with pytest.raises(Refusal) as refused:
        seal.open(datagram)
    assert refused.value.reason == "malformed"


def test_a_retransmitted_request_runs_once() -> None:
    """A reply lost on the way back: the sender retransmits (a fresh seal, the same id), and the
    receiver answers again without acting twice."""
    calls: list[str] = []
    release = threading.Event()

    def slow(envelope: Envelope, source: Address) -> dict[str, Any]:
        calls.append(envelope.msg_id)
        release.wait(1.0)  # several retransmissions arrive meanwhile
        return {"ok": True}

    a = _Endpoint(0)
    b = UdpCarrier(1, ("127.0.0.1", 0), Seal(KEY), slow, port_env=PORT_ENV)
    try:
        assert a.carrier.request(1, b.address, "failed", {"epoch": 0}, timeout=5) == {"ok": True}
        assert len(calls) == 1
    finally:
        release.set()
        a.carrier.close()
        b.close()


def test_a_port_in_use_names_the_variable() -> None:
    a = _Endpoint(0)
    try:
        with pytest.raises(Exception, match=f"set {PORT_ENV} to a free port"):
            UdpCarrier(1, a.carrier.address, Seal(KEY), a.handle, port_env=PORT_ENV)
    finally:
        a.carrier.close()


def test_a_message_too_large_to_seal_is_refused_before_sending() -> None:
    with pytest.raises(ValueError, match="larger than"):
        Seal(KEY).seal(Envelope(0, "m", "heartbeat", False, {"status": "x" * MAX_DATAGRAM}))


# -- the membership's transition table ------------------------------------------------------------
def test_the_transition_table() -> None:
    assert next_state("idle", Event.JOIN) is State.JOINING
    assert next_state(State.JOINING, Event.JOINED) is State.READY
    assert next_state(State.JOINING, Event.JOIN_FAILED) is State.FAILED
    assert next_state(State.JOINING, Event.JOIN) is State.JOINING  # superseded by a newer world
    assert next_state(State.READY, Event.FAIL) is State.FAILED
    assert next_state(State.FAILED, Event.JOIN) is State.JOINING


@pytest.mark.parametrize(
    ("state", "event"),
    [
        (State.IDLE, Event.JOINED),
        (State.READY, Event.JOINED),
        (State.FAILED, Event.FAIL),
        (State.IDLE, Event.FAIL),
        (State.READY, Event.JOIN_FAILED),
    ],
)
def test_an_event_the_table_does_not_list_is_an_error(state: State, event: Event) -> None:
    with pytest.raises(MembershipStateError, match=f"{event.value!r} in state {state.value!r}"):
        next_state(state, event)
