"""Control requests through the rendezvous server's events mailbox, with a real ``python -m stun``
process on 127.0.0.1 and real UDP control endpoints whose peers' ports never answer (a UDP
socket bound and never read: what a NAT or a firewall in front of a peer looks like).

The attacker here is the server, or anyone on the path to it: it can post any event, replay
one it stored, rewrite an event's plain fields; it cannot read or seal a control envelope.
"""

from __future__ import annotations

import base64
import json
import os
import socket
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from collectives.auth import ClusterKey
from collectives.errors import ConfigurationError
from collectives.rendezvous.stun_client import Candidate, StunClient
from comfy_nodes.server.carrier import Address, ControlUnreachableError, UdpCarrier
from comfy_nodes.server.carrier_mailbox import (
    EVENT_KIND,
    KIND_PREFIX,
    MAILBOX_ADDRESS,
    FallbackCarrier,
    MailboxCarrier,
    with_mailbox,
)
from comfy_nodes.server.messages import SENDERS, Refused, check_sender
from comfy_nodes.server.seal import MAGIC, Envelope, Seal
from comfy_nodes.server.settings import Settings
from tests.stun.server_proc import ALPHA_KEY, StunProcess, serving

KEY = ClusterKey(ALPHA_KEY)
CLUSTER = "alpha"


@pytest.fixture(scope="module")
def server() -> Iterator[StunProcess]:
    with serving() as proc:
        yield proc


def stun_client(server: StunProcess) -> StunClient:
    return StunClient(server.url, CLUSTER, KEY, timeout=5.0)


@pytest.fixture
def raw(server: StunProcess) -> Iterator[StunClient]:
    """The cluster's members as the udp backend registers them (the mailbox takes events only
    from a live member), and a client to play the attacker with."""
    client = stun_client(server)
    for rank in (0, 1):
        client.join(
            f"rank{rank}-test", rank=rank, world_size=2, candidates=[Candidate("127.0.0.1", 9)]
        )
    yield client
    for rank in (0, 1):
        client.leave(f"rank{rank}-test")
    client.close()


@pytest.fixture
def dead() -> Iterator[Address]:
    """A UDP port that takes datagrams and never answers."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    sock.setblocking(False)
    yield sock.getsockname()
    sock.close()


class _Rank:
    """One instance's control endpoints: UDP, the mailbox, and the two together."""

    def __init__(self, server: StunProcess, rank: int, key: ClusterKey = KEY) -> None:
        self.handled: list[tuple[int, str, dict[str, Any], Address]] = []
        seal = Seal(key)

        def handler(envelope: Envelope, source: Address) -> dict[str, Any]:
            self.handled.append((envelope.sender, envelope.kind, envelope.body, source))
            return {"ok": True, "echo": envelope.body.get("x"), "by": rank}

        self.udp = UdpCarrier(
            rank, ("127.0.0.1", 0), seal, handler, port_env="COMFY_CLUSTER_CONTROL_PORT"
        )
        factory: Callable[[], StunClient] = lambda: stun_client(server)  # noqa: E731
        self.mailbox = MailboxCarrier(
            rank, seal, handler, factory, poll_s=2.0, exchange=self.udp.exchange
        )
        self.carrier = FallbackCarrier(self.udp, self.mailbox)
        assert self.mailbox.ready.wait(10.0)


@pytest.fixture
def ranks(server: StunProcess, raw: StunClient) -> Iterator[Callable[[int], _Rank]]:
    made: list[_Rank] = []

    def make(rank: int) -> _Rank:
        made.append(_Rank(server, rank))
        return made[-1]

    yield make
    for r in made:
        r.carrier.close()


def wait_for(check: Callable[[], bool], seconds: float = 10.0) -> None:
    deadline = time.monotonic() + seconds
    while not check():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def control_events(raw: StunClient) -> list[dict[str, Any]]:
    return [e.body for e in raw.events() if e.kind == EVENT_KIND]


def test_a_request_its_udp_peer_cannot_take_goes_through_the_mailbox(
    ranks: Callable[[int], _Rank], dead: Address, raw: StunClient
) -> None:
    leader, follower = ranks(0), ranks(1)
    reply = leader.carrier.request(1, dead, "epoch", {"x": "secret-marker-1"}, timeout=15.0)
    assert reply == {"ok": True, "echo": "secret-marker-1", "by": 1}
    assert leader.carrier.via == {"udp": 0, "mailbox": 1}
    assert leader.carrier.route(1) == "mailbox"
    # The handler saw the message as UDP would deliver it, from the mailbox.
    assert follower.handled == [(0, "epoch", {"x": "secret-marker-1"}, MAILBOX_ADDRESS)]
    # The next request skips the dead port: the peer is known to answer only there.
    assert leader.carrier.request(1, dead, "epoch", {"x": "2"}, timeout=15.0)["echo"] == "2"
    assert leader.carrier.via == {"udp": 0, "mailbox": 2}
    # A follower reaches the leader the same way (its reply also through the mailbox).
    back = follower.carrier.request(0, MAILBOX_ADDRESS, "heartbeat", {"x": "3"}, timeout=15.0)
    assert back["by"] == 0 and follower.carrier.via == {"udp": 0, "mailbox": 1}


def test_the_server_stores_only_sealed_bytes(
    ranks: Callable[[int], _Rank], raw: StunClient
) -> None:
    leader, _ = ranks(0), ranks(1)
    secret = "secret-marker-" + os.urandom(4).hex()
    big = secret + "y" * 6000  # more than one event's worth: it travels in parts
    leader.carrier.request(1, MAILBOX_ADDRESS, "abort", {"x": big}, timeout=15.0)
    events = control_events(raw)
    assert events and max(e["n"] for e in events) > 1
    for body in events:
        assert set(body) == {"to", "m", "i", "n", "d"}
        assert len(json.dumps(body)) < 4096
    assert secret not in json.dumps(events)
    by_set: dict[str, dict[int, bytes]] = {}
    for body in events:
        by_set.setdefault(body["m"], {})[body["i"]] = base64.b64decode(body["d"])
    for parts in by_set.values():
        datagram = b"".join(parts[i] for i in sorted(parts))
        assert datagram.startswith(MAGIC) and secret.encode() not in datagram


def test_udp_first_when_the_peer_answers_there(ranks: Callable[[int], _Rank]) -> None:
    leader, follower = ranks(0), ranks(1)
    reply = leader.carrier.request(1, follower.udp.address, "epoch", {"x": "u"}, timeout=5.0)
    assert reply["echo"] == "u" and leader.carrier.via == {"udp": 1, "mailbox": 0}
    assert follower.handled[0][3] == leader.udp.address
    assert leader.mailbox.posted == 0


def post(raw: StunClient, to: int, datagram: bytes, **fields: Any) -> None:
    body = {"to": to, "m": os.urandom(4).hex(), "i": 0, "n": 1}
    body["d"] = base64.b64encode(datagram).decode()
    raw.post_event("rank0-test", EVENT_KIND, {**body, **fields})


def test_forged_replayed_and_misdirected_events_are_dropped_and_counted(
    ranks: Callable[[int], _Rank], raw: StunClient
) -> None:
    leader, follower = ranks(0), ranks(1)
    start = raw.events()[-1].seq if raw.events() else 0
    assert leader.mailbox.request(1, MAILBOX_ADDRESS, "epoch", {"x": "once"}, timeout=15.0)
    assert len(follower.handled) == 1
    dropped = follower.mailbox.dropped

    def request(sealer: Seal, to: int = 1, **kw: Any) -> bytes:
        envelope = Envelope(0, os.urandom(8).hex(), KIND_PREFIX + "epoch", False,
                            {"to": to, "body": {"x": "forged"}})  # fmt: skip
        return sealer.seal(envelope, **kw)

    # Replayed: the request's own events, posted again by the server (or whoever saw them).
    replays = [e.body for e in raw.events(after=start) if e.kind == EVENT_KIND]
    replays = [body for body in replays if body["to"] == 1]
    for body in replays:
        raw.post_event("rank0-test", EVENT_KIND, body)
    wait_for(lambda: dropped["replayed"] == len(replays) > 0)
    # Forged: bytes that look sealed, and a datagram sealed under another cluster's key.
    post(raw, 1, MAGIC + os.urandom(60))
    post(raw, 1, request(Seal(ClusterKey("another-cluster-key-0123456789"))))
    wait_for(lambda: dropped["auth"] == 2)
    # Sealed for rank 2, its outer "to" rewritten to rank 1.
    post(raw, 1, request(Seal(KEY), to=2))
    wait_for(lambda: dropped["misdirected"] == 1)
    # Too old, and the wrong shapes: bounded before anything is decoded.
    post(raw, 1, request(Seal(KEY), now=time.time() - 120))
    wait_for(lambda: dropped["expired"] == 1)
    post(raw, 1, b"", d="A" * 3600)
    wait_for(lambda: dropped["oversized"] == 1)
    post(raw, 1, b"x", i=3)
    post(raw, 1, b"x", d="not base64!")
    post(raw, 1, b"x", n=1000)
    wait_for(lambda: dropped["malformed"] == 3)
    # A UDP datagram replayed into the mailbox is not a mailbox envelope.
    post(raw, 1, Seal(KEY).seal(Envelope(0, "u1", "epoch", False, {"x": "udp"})))
    wait_for(lambda: dropped["malformed"] == 4)
    # Events for another rank are not this rank's to judge; none of it reached a handler.
    post(raw, 0, MAGIC + os.urandom(60))
    wait_for(lambda: leader.mailbox.dropped["auth"] == 1)
    assert dropped["auth"] == 2 and len(follower.handled) == 1


def test_a_mailbox_envelope_is_a_kind_no_rank_takes_over_udp() -> None:
    """Replayed at a UDP control port, a mailbox datagram opens, and the table refuses it."""
    for kind in SENDERS:
        for me in (0, 1):
            with pytest.raises(Refused, match="does not take"):
                check_sender(KIND_PREFIX + kind, me, 2, 1 - me)


def test_no_answer_names_the_mailbox_and_the_variable(
    ranks: Callable[[int], _Rank], dead: Address
) -> None:
    leader = ranks(0)
    started = time.monotonic()
    with pytest.raises(ControlUnreachableError, match="COMFY_CLUSTER_STUN_SERVER") as err:
        leader.carrier.request(1, dead, "epoch", {}, timeout=1.5)
    assert err.value.rank == 1 and 1.4 < time.monotonic() - started < 4.0
    assert leader.carrier.route(1) == "udp"  # a failed mailbox gives the peer back to UDP


def test_without_a_live_member_the_error_says_so(server: StunProcess) -> None:
    rank = _Rank(server, 0)
    try:
        with pytest.raises(ControlUnreachableError, match="no live member"):
            rank.mailbox.request(1, MAILBOX_ADDRESS, "epoch", {}, timeout=1.0)
    finally:
        rank.carrier.close()


def test_stun_discovery_turns_the_mailbox_on() -> None:
    env = {"RANK": "1", "WORLD_SIZE": "2"}
    assert not _settings(env).stun_mailbox
    stun = {**env, "COMFY_CLUSTER_REGISTRATION_MODE": "stun"}
    assert _settings(stun).stun_mailbox
    assert not _settings({**stun, "COMFY_CLUSTER_CONTROL_MAILBOX": "0"}).stun_mailbox
    with pytest.raises(ConfigurationError, match="COMFY_CLUSTER_CONTROL_MAILBOX"):
        _settings({**stun, "COMFY_CLUSTER_CONTROL_MAILBOX": "maybe"})


def test_with_mailbox_names_the_missing_variable() -> None:
    udp = UdpCarrier(1, ("127.0.0.1", 0), Seal(KEY), lambda e, s: {}, port_env="X")
    try:
        with pytest.raises(ConfigurationError, match="COMFY_CLUSTER_CLUSTER_ID"):
            with_mailbox(udp, 1, Seal(KEY), lambda e, s: {}, key=KEY, environ={})
    finally:
        udp.close()


def _settings(env: dict[str, str]) -> Settings:
    settings = Settings.from_env(env)
    assert settings is not None
    return settings
