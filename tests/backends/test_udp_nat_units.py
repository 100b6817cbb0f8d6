"""The pieces of the udp backend's NAT traversal, alone: the STUN binding codec (aioice) and its
forgeries, relay framing and hints, probes, path selection (verified paths only, no flip-flop
under reordering, fallback), the driver's demultiplexing, and the core's additive path API."""

from __future__ import annotations

import pytest
from aioice import stun

from collectives.auth import ClusterKey
from collectives.backends.udp_nat import Binding, NatDriver
from collectives.backends.udp_nat_wire import (
    PING,
    PONG,
    RELAY_HEADER,
    ProbeCodec,
    binding_answer,
    binding_request,
    hint,
    is_stun,
    parse_hint,
    relay_header,
    unwrap_batch,
    wrap_batch,
)
from collectives.backends.udp_paths import DEAD_S, Paths, virtual
from collectives.backends.udp_peers import plan
from collectives.errors import ConfigurationError
from collectives.transport.config import TransportConfig
from collectives.transport.endpoint import Endpoint

KEY = ClusterKey("nat-units-key-0123456789abcdef")
TOKEN = bytes(range(16))
SERVER = ("198.51.100.1", 3478)
PEER_HANDLE = bytes.fromhex("00112233aabbccdd")


def _answer(tid: bytes, mapped: tuple[str, int], token: bytes | None) -> bytes:
    msg = stun.Message(stun.Method.BINDING, stun.Class.RESPONSE, tid,
                       {"XOR-MAPPED-ADDRESS": mapped})  # fmt: skip
    if token is not None:
        msg.add_message_integrity(token)
    return bytes(msg)


# -- STUN --------------------------------------------------------------------------------------
def test_binding_request_round_trips_through_aioice() -> None:
    data, tid = binding_request("cluster:inst", TOKEN)
    assert is_stun(data)
    msg = stun.parse_message(data)
    assert msg.transaction_id == tid
    assert msg.attributes["USERNAME"] == "cluster:inst"
    assert msg.check_message_integrity(TOKEN)
    assert not msg.check_message_integrity(bytes(16))
    got = binding_answer(_answer(tid, ("203.0.113.7", 40000), TOKEN), {tid}, TOKEN)
    assert got == (tid, ("203.0.113.7", 40000))


def test_forged_stun_answers_are_refused() -> None:
    _, tid = binding_request("c:i", TOKEN)
    mapped = ("203.0.113.66", 1)
    assert binding_answer(_answer(tid, mapped, None), {tid}, TOKEN) is None  # no integrity
    assert binding_answer(_answer(tid, mapped, bytes(16)), {tid}, TOKEN) is None  # wrong key
    assert binding_answer(_answer(b"x" * 12, mapped, TOKEN), {tid}, TOKEN) is None  # unasked
    assert binding_answer(b"\x01\x01" + bytes(30), {tid}, TOKEN) is None  # garbage
    assert binding_answer(bytes(4000), {tid}, TOKEN) is None  # oversized
    binding = Binding(SERVER, "c:i", TOKEN)
    request = stun.parse_message(binding.request(0.0))
    assert not binding.answer(_answer(request.transaction_id, mapped, bytes(16)), 0.0)
    assert binding.reflexive is None and binding.counters["stun_dropped"] == 1
    good = _answer(request.transaction_id, ("203.0.113.7", 5), TOKEN)
    assert binding.answer(good, 1.0) and binding.reflexive == ("203.0.113.7", 5)
    assert not binding.answer(good, 2.0)  # a replay: the transaction is done


# -- relay framing and hints -------------------------------------------------------------------
def test_relay_framing_and_hints() -> None:
    assert relay_header(PEER_HANDLE) == b"\xcc\x01" + PEER_HANDLE
    assert len(relay_header(PEER_HANDLE)) == RELAY_HEADER
    h = parse_hint(hint(PEER_HANDLE, ("203.0.113.9", 4242)))
    assert h is not None and h.handle == PEER_HANDLE and h.addr == ("203.0.113.9", 4242)
    assert parse_hint(hint(PEER_HANDLE, ("203.0.113.9", 4242))[:-1]) is None
    assert parse_hint(b"\xcc\x01" + bytes(14)) is None


# -- probes and paths --------------------------------------------------------------------------
def _pair() -> tuple[Paths, Paths]:
    a = Paths(0, ProbeCodec(KEY, 7, 0))
    b = Paths(1, ProbeCodec(KEY, 7, 0))
    a.add_peer(1, PEER_HANDLE, 0.0)
    b.add_peer(0, bytes(8), 0.0)
    return a, b


def test_probe_codec_refuses_forgeries() -> None:
    codec = ProbeCodec(KEY, 7, 0)
    ping = codec.seal(PING, 1, 0, b"n" * 16)
    assert codec.open(ping, 0) is not None
    assert codec.open(ping, 2) is None  # not addressed to us
    assert ProbeCodec(ClusterKey("another-key-0123456789abcdef"), 7, 0).open(ping, 0) is None
    assert ProbeCodec(KEY, 7, 1).open(ping, 0) is None  # another epoch
    tampered = bytearray(ping)
    tampered[-40] ^= 1
    assert codec.open(bytes(tampered), 0) is None


def test_a_verified_pong_moves_traffic_and_nothing_else_does() -> None:
    a, b = _pair()
    b_addr, a_addr = ("203.0.113.2", 2000), ("203.0.113.1", 1000)
    a.learn(1, [(b_addr, "reflexive")], 0.0)
    assert a.route(1) is None  # relay first
    (dst, ping), = a.poll(0.0)  # fmt: skip
    assert dst == b_addr
    # A spoofed punch hint and an attacker's pong do not move traffic.
    a.learn(1, [(("198.18.0.66", 6666), "hint")], 0.01)
    forged = ProbeCodec(ClusterKey("attacker-key-0123456789abcdef"), 7, 0).seal(
        PONG, 1, 0, b"z" * 16, ping[24:40]
    )
    assert a.on_probe(forged, ("198.18.0.66", 6666), 0.02) == []
    # The real pong, replayed from elsewhere, does not either.
    (back, pong), = b.on_probe(ping, a_addr, 0.03)  # fmt: skip
    assert back == a_addr
    assert a.on_probe(pong, ("198.18.0.66", 6666), 0.04) == [] and a.route(1) is None
    assert a.counters["pongs_unmatched"] == 1
    # From the address pinged, it does.
    a.on_probe(pong, b_addr, 0.05)
    assert a.route(1) == b_addr and a.peers[1].path == "punched"
    assert a.changes == [(1, "relayed", "punched")]
    # Its replay changes nothing more.
    a.on_probe(pong, b_addr, 0.06)
    assert a.changes == [(1, "relayed", "punched")]


def test_a_ping_triggers_a_check_but_no_storm() -> None:
    a, b = _pair()
    src = ("203.0.113.2", 2000)
    ping = b.codec.seal(PING, 1, 0, b"p" * 16)
    for i in range(50):
        a.on_probe(ping, src, 0.001 * i)
    pings = [d for d in a.poll(0.05) if d[0] == src]
    assert len(pings) == 1  # one triggered check, not one per ping received
    assert a.by_addr[src] == 1 and a.route(1) is None


def test_local_beats_reflexive_and_the_path_never_flips_back() -> None:
    a, b = _pair()
    lan, wan = ("10.0.0.2", 2000), ("203.0.113.2", 2000)
    a.learn(1, [(wan, "reflexive")], 0.0)

    def verify(addr: tuple[str, int], now: float) -> None:
        for dst, ping in a.poll(now):
            if dst == addr:
                (_, pong), = b.on_probe(ping, ("203.0.113.1", 1000), now)  # fmt: skip
                a.on_probe(pong, addr, now)

    verify(wan, 0.0)
    assert a.route(1) == wan
    a.learn(1, [(lan, "local")], 0.1)
    verify(lan, 0.1)
    assert a.route(1) == lan and a.peers[1].path == "direct"
    # A pong of the worse path, verified later, does not take the traffic back.
    _, ping = a._ping(a.peers[1], wan, 1.0)
    (_, pong), = b.on_probe(ping, ("203.0.113.1", 1000), 1.0)  # fmt: skip
    a.on_probe(pong, wan, 1.0)
    assert a.peers[1].candidates[wan].verified_at == 1.0
    assert a.route(1) == lan and a.changes[-1] == (1, "punched", "direct")


def test_a_silent_direct_path_falls_back_to_the_relay() -> None:
    a, b = _pair()
    wan = ("203.0.113.2", 2000)
    a.learn(1, [(wan, "reflexive")], 0.0)
    (_, ping), = a.poll(0.0)  # fmt: skip
    (_, pong), = b.on_probe(ping, ("203.0.113.1", 1000), 0.0)  # fmt: skip
    a.on_probe(pong, wan, 0.01)
    assert a.route(1) == wan
    a.changes.clear()
    a.poll(DEAD_S + 0.1)  # keepalive pings went unanswered
    assert a.route(1) is None and a.changes == [(1, "punched", "relayed")]


# -- the driver's demultiplexing ---------------------------------------------------------------
def _driver() -> NatDriver:
    paths = Paths(0, ProbeCodec(KEY, 7, 0))
    paths.add_peer(1, PEER_HANDLE, 0.0)
    return NatDriver(paths, Binding(SERVER, "c:i", TOKEN), keepalive=10.0, now=0.0)


def test_relay_datagrams_from_unknown_handles_or_sources_are_not_the_peer() -> None:
    nat = _driver()
    payload = b"\x01" + bytes(50)
    got = list(nat.inbound(memoryview(relay_header(PEER_HANDLE) + payload), SERVER, None, 0.0))
    assert [(bytes(d), a) for d, a, _ in got] == [(payload, virtual(1))]
    # An unknown handle is dropped and counted.
    assert list(nat.inbound(memoryview(relay_header(bytes(8)) + payload), SERVER, None, 0.0)) == []
    assert nat.counters["relay_dropped"] == 1
    # A relay-framed datagram from anywhere but the server is not unwrapped: the core gets it
    # under its real source and refuses it (it is no transport datagram).
    stranger = ("198.18.0.66", 3478)
    got = list(nat.inbound(memoryview(relay_header(PEER_HANDLE) + payload), stranger, None, 0.0))
    assert [a for _, a, _ in got] == [stranger]


def test_outbound_goes_relayed_until_verified() -> None:
    nat = _driver()
    data = memoryview(bytes(range(100)) * 30)
    addr, out, segment = nat.outbound(virtual(1), data, 1200)
    assert addr == SERVER and segment == 1200 + RELAY_HEADER
    assert bytes(out[:RELAY_HEADER]) == relay_header(PEER_HANDLE)
    assert bytes(out[RELAY_HEADER : RELAY_HEADER + 1200]) == bytes(data[:1200])
    assert len(out) == len(data) + 3 * RELAY_HEADER
    nat.paths.peers[1].direct, nat.paths.peers[1].direct_kind = ("203.0.113.2", 9), "reflexive"
    assert nat.outbound(virtual(1), data, 1200) == (("203.0.113.2", 9), data, 1200)


def _relayed_batch(handles: list[bytes], size: int = 100, last: int = 40) -> bytes:
    n = len(handles)
    return b"".join(
        relay_header(h) + bytes([i]) * (size if i < n - 1 else last) for i, h in enumerate(handles)
    )


def test_wrap_and_unwrap_batch_round_trip() -> None:
    payload = b"".join(bytes([i]) * 100 for i in range(5)) + bytes([5]) * 40
    wrapped = wrap_batch(relay_header(PEER_HANDLE), memoryview(payload), 100)
    assert bytes(wrapped) == _relayed_batch([PEER_HANDLE] * 6)
    into = bytearray(65535)
    assert unwrap_batch(wrapped, 110, into) == (PEER_HANDLE, len(payload))
    assert bytes(into[: len(payload)]) == payload
    exact = wrap_batch(relay_header(PEER_HANDLE), memoryview(payload[:500]), 100)
    assert bytes(exact) == _relayed_batch([PEER_HANDLE] * 5, last=100)  # no short last one


def test_a_relayed_gro_batch_reaches_the_core_as_one_batch() -> None:
    nat = _driver()
    batch = _relayed_batch([PEER_HANDLE] * 6)
    (got,) = nat.inbound(memoryview(batch), SERVER, 110, 0.0)
    data, addr, segment = got
    assert bytes(data) == b"".join(bytes([i]) * 100 for i in range(5)) + bytes([5]) * 40
    assert addr == virtual(1) and segment == 100
    assert nat.counters["relayed_in"] == 6
    # A uniform batch under an unknown handle is dropped whole.
    assert list(nat.inbound(memoryview(_relayed_batch([bytes(8)] * 4)), SERVER, 110, 0.0)) == []
    assert nat.counters["relay_dropped"] == 4


def test_a_mixed_or_malformed_relayed_batch_goes_datagram_by_datagram() -> None:
    nat = _driver()
    # Another source in the middle (the server's flow carries every peer's relayed traffic).
    mixed = _relayed_batch([PEER_HANDLE, bytes(8), PEER_HANDLE])
    got = list(nat.inbound(memoryview(mixed), SERVER, 110, 0.0))
    assert [(bytes(d), a, s) for d, a, s in got] == [
        (bytes([0]) * 100, virtual(1), None),
        (bytes([2]) * 40, virtual(1), None),
    ]
    assert nat.counters["relay_dropped"] == 1
    # A datagram of another kind in the middle, and a last one with a header only.
    odd = bytearray(_relayed_batch([PEER_HANDLE] * 3))
    odd[111] = 0x02  # a "punch hint" of the wrong size
    got = list(nat.inbound(memoryview(bytes(odd)), SERVER, 110, 0.0))
    assert [bytes(d) for d, _, _ in got] == [bytes([0]) * 100, bytes([2]) * 40]
    headless = _relayed_batch([PEER_HANDLE] * 2, last=0)
    got = list(nat.inbound(memoryview(headless), SERVER, 110, 0.0))
    assert [bytes(d) for d, _, _ in got] == [bytes([0]) * 100]
    assert nat.counters["relay_dropped"] == 3
    assert nat.counters["relayed_in"] == 5


# -- the core's additive path API --------------------------------------------------------------
def test_core_keeps_the_drivers_address_and_resets_its_model_on_a_path_change() -> None:
    config = TransportConfig()
    eps = [Endpoint(rank=r, size=2, comm_id=1, epoch=0, key=KEY, config=config, now=0.0)
           for r in range(2)]  # fmt: skip
    eps[0].add_peer(1, virtual(1), 0.0)
    eps[1].add_peer(0, None, 0.0)
    now = 0.0
    for _ in range(20):  # handshake: datagrams arrive by "different paths" in turn
        for i, ep in enumerate(eps):
            for _, payload, _ in ep.datagrams_to_send(now):
                src = virtual(i) if now % 0.002 < 0.001 else ("203.0.113.9", 5000 + i)
                eps[1 - i].receive(payload, src, now)
        now += 0.001
    session = eps[0]._sessions[1]
    eps[0].set_peer_address(1, virtual(1))
    assert session.addr == virtual(1)
    assert session.out is not None
    rec = session.out.recovery
    old_cc = rec.congestion
    eps[0].reset_path(1, now)
    assert rec.congestion is not old_cc and rec.rtt.has_sample is False


def test_plan_of_stun_mode_names_its_variables_and_uses_runpod() -> None:
    base = {"COMFY_CLUSTER_REGISTRATION_MODE": "stun"}
    with pytest.raises(ConfigurationError, match="COMFY_CLUSTER_STUN_SERVER"):
        plan(0, 2, base)
    env = {**base, "COMFY_CLUSTER_STUN_SERVER": "http://127.0.0.1:8089"}
    with pytest.raises(ConfigurationError, match="COMFY_CLUSTER_CLUSTER_ID"):
        plan(0, 2, env)
    env["COMFY_CLUSTER_CLUSTER_ID"] = "c"
    p = plan(0, 2, {**env, "RUNPOD_POD_ID": "abc123"})
    assert p.mode == "stun" and p.advertise == "abc123.runpod.internal"
    assert p.bind[0] == "127.0.0.1" and p.stun_server == "http://127.0.0.1:8089"
    assert plan(0, 2, {**env, "COMFY_CLUSTER_INSTANCE_ADDRESS": "10.9.9.9",
                       "RUNPOD_POD_ID": "abc"}).advertise == "10.9.9.9"  # fmt: skip
