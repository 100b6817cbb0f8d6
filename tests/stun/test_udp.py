"""The UDP port of a real server: STUN binding (plain and authenticated, with aioice's codec),
the relay between registered sockets, punch hints, and every drop counted."""

from __future__ import annotations

import base64
import socket
import time
import uuid

import httpx
from aioice import stun

from .server_proc import ADMIN_KEY, ALPHA_KEY, KEYS, Rank, StunProcess


def _udp_socket() -> socket.socket:
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind(("127.0.0.1", 0))
    s.settimeout(2.0)
    return s


def _join(http: httpx.Client, ranks: list[Rank], cluster: str = "alpha") -> Rank:
    iid = "u-" + uuid.uuid4().hex[:10]
    r = http.post(
        f"/v1/clusters/{cluster}/join",
        json={"instance_id": iid},
        headers={"X-Cluster-Key": KEYS[cluster]},
    )
    assert r.status_code == 200, r.text
    body = r.json()
    rank = Rank(
        cluster,
        iid,
        base64.urlsafe_b64decode(body["token"]),
        bytes.fromhex(body["handle"]),
        _udp_socket(),
    )
    ranks.append(rank)
    return rank


def _stats(http: httpx.Client) -> dict[str, int]:
    return dict(http.get("/v1/stats", headers={"X-Admin-Key": ADMIN_KEY}).json()["udp"])


def _binding(
    server: StunProcess, rank: Rank, key: bytes | None = None, wait: float = 2.0
) -> stun.Message | None:
    req = stun.Message(
        stun.Method.BINDING,
        stun.Class.REQUEST,
        attributes={"USERNAME": f"{rank.cluster}:{rank.instance_id}"},
    )
    req.add_message_integrity(key if key is not None else rank.token)
    rank.sock.sendto(bytes(req), ("127.0.0.1", server.udp_port))
    return _stun_answer(rank.sock, wait)


def _stun_answer(sock: socket.socket, wait: float = 2.0) -> stun.Message | None:
    sock.settimeout(wait)
    try:
        while True:
            data = sock.recv(4096)
            if data[:1] != b"\xcc":  # punch hints may arrive too
                return stun.parse_message(data)
    except TimeoutError:
        return None


def _recv_kind(sock: socket.socket, kind: int, wait: float = 2.0) -> bytes | None:
    sock.settimeout(wait)
    try:
        while True:
            data = sock.recv(4096)
            if data[:2] == bytes([0xCC, kind]):
                return data
    except TimeoutError:
        return None


def _reflexive(http: httpx.Client, rank: Rank) -> list[dict[str, object]]:
    deadline = time.monotonic() + 2
    while True:
        members = http.get(
            f"/v1/clusters/{rank.cluster}/members", headers={"X-Cluster-Key": KEYS[rank.cluster]}
        ).json()
        (me,) = [m for m in members["members"] if m["instance_id"] == rank.instance_id]
        found = [c for c in me["candidates"] if c["kind"] == "reflexive"]
        if found or time.monotonic() > deadline:
            return found
        time.sleep(0.02)


def test_plain_binding_answers_the_mapped_address(server: StunProcess) -> None:
    with _udp_socket() as s:
        req = stun.Message(stun.Method.BINDING, stun.Class.REQUEST)
        s.sendto(bytes(req), ("127.0.0.1", server.udp_port))
        answer = _stun_answer(s)
        assert answer is not None and answer.transaction_id == req.transaction_id
        assert answer.message_class == stun.Class.RESPONSE
        assert answer.attributes["XOR-MAPPED-ADDRESS"] == s.getsockname()


def test_authenticated_binding_records_the_reflexive_candidate(
    server: StunProcess, http: httpx.Client, ranks: list[Rank]
) -> None:
    me = _join(http, ranks)
    answer = _binding(server, me)
    assert answer is not None and answer.attributes["XOR-MAPPED-ADDRESS"] == me.addr
    assert answer.check_message_integrity(me.token)  # the server proves it knows the token
    assert _reflexive(http, me) == [{"host": me.addr[0], "port": me.addr[1], "kind": "reflexive"}]


def test_a_wrong_integrity_is_dropped_and_counted(
    server: StunProcess, http: httpx.Client, ranks: list[Rank]
) -> None:
    me = _join(http, ranks)
    before = _stats(http)["stun_bad_integrity"]
    assert _binding(server, me, key=b"x" * 16, wait=0.5) is None
    # an unknown user: the same silence
    ghost = Rank("alpha", "nobody", b"y" * 16, b"", me.sock)
    assert _binding(server, ghost, wait=0.5) is None
    assert _stats(http)["stun_bad_integrity"] == before + 2
    members = http.get("/v1/clusters/alpha/members", headers={"X-Cluster-Key": ALPHA_KEY}).json()
    (mine,) = [m for m in members["members"] if m["instance_id"] == me.instance_id]
    assert [c["kind"] for c in mine["candidates"]] == []


def test_relay_forwards_between_registered_sockets(
    server: StunProcess, http: httpx.Client, ranks: list[Rank]
) -> None:
    a, b = _join(http, ranks), _join(http, ranks)
    assert _binding(server, a) is not None
    assert _binding(server, b) is not None
    _reflexive(http, a), _reflexive(http, b)
    payload = b"sealed end to end" * 50
    a.sock.sendto(bytes([0xCC, 0x01]) + b.handle + payload, ("127.0.0.1", server.udp_port))
    got = _recv_kind(b.sock, 0x01)
    assert (
        got == bytes([0xCC, 0x01]) + a.handle + payload
    )  # the source's handle, not the destination's
    stats = _stats(http)
    assert stats["relay_forwarded"] >= 1 and stats["relay_bytes"] >= len(payload)


def test_relay_drops_strangers_foreign_clusters_and_oversize(
    server: StunProcess, http: httpx.Client, ranks: list[Rank]
) -> None:
    a, b = _join(http, ranks), _join(http, ranks)
    other = _join(http, ranks, cluster="beta")
    for r in (a, b, other):
        assert _binding(server, r) is not None
    _reflexive(http, b), _reflexive(http, other)
    before = _stats(http)
    frame = bytes([0xCC, 0x01]) + b.handle + b"payload"
    with _udp_socket() as stranger:  # knows b's handle, never bound: not a relay address
        stranger.sendto(frame, ("127.0.0.1", server.udp_port))
    other.sock.sendto(frame, ("127.0.0.1", server.udp_port))  # a member of beta, to alpha's b
    a.sock.sendto(bytes([0xCC, 0x01]) + b.handle + b"x" * 3000, ("127.0.0.1", server.udp_port))
    a.sock.sendto(b"\x7fgarbage", ("127.0.0.1", server.udp_port))
    a.sock.sendto(bytes([0xCC, 0x01, 1, 2]), ("127.0.0.1", server.udp_port))
    assert _recv_kind(b.sock, 0x01, wait=0.5) is None
    after = _stats(http)
    assert after["relay_unknown_source"] == before["relay_unknown_source"] + 1
    assert after["relay_unknown_destination"] == before["relay_unknown_destination"] + 1
    assert after["oversize"] == before["oversize"] + 1
    assert after["unknown_kind"] == before["unknown_kind"] + 1
    assert after["relay_malformed"] == before["relay_malformed"] + 1
    assert after["relay_forwarded"] == before["relay_forwarded"]


def test_punch_hints_go_to_both_members_of_a_pair(
    server: StunProcess, http: httpx.Client, ranks: list[Rank]
) -> None:
    a, b = _join(http, ranks), _join(http, ranks)
    assert _binding(server, a) is not None
    _reflexive(http, a)
    assert _binding(server, b) is not None
    to_a, to_b = _recv_kind(a.sock, 0x02), _recv_kind(b.sock, 0x02)
    assert to_a == bytes([0xCC, 0x02]) + b.handle + socket.inet_aton(b.addr[0]) + b.addr[
        1
    ].to_bytes(2, "big")
    assert to_b == bytes([0xCC, 0x02]) + a.handle + socket.inet_aton(a.addr[0]) + a.addr[
        1
    ].to_bytes(2, "big")
