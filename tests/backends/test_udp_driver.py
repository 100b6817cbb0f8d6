"""The udp backend's IO driver: the socket (GSO/GRO, buffers, datagram size), discovery (static,
env, broadcast on loopback), the channel map, the key policy, then in-process worlds of real
endpoints driven by the IO thread (messages, landing, deadlines, abort, close, a silent peer)."""

from __future__ import annotations

import select
import socket
import sys
import threading
import time
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest

from collectives import _compiled
from collectives.auth import ClusterKey
from collectives.backends import udp_peers
from collectives.backends.udp import UdpBackend, channel_id
from collectives.backends.udp_peers import Announcer
from collectives.backends.udp_socket import (
    DEFAULT_DATAGRAM,
    LOOPBACK_DATAGRAM,
    MTU_ENV,
    UdpSocket,
    max_datagram_for,
)
from collectives.communicator import Communicator
from collectives.errors import (
    CollectiveTimeoutError,
    CommunicatorAbortedError,
    ConfigurationError,
    ConnectionLostError,
    RendezvousTimeoutError,
)
from collectives.world import init
from tests.backends.udp_worlds import run_world

KEY_TEXT = "udp-driver-test-key-0123456789abcdef"


# -- the socket --------------------------------------------------------------------------------
def test_datagram_size_follows_the_address_and_the_variable() -> None:
    assert max_datagram_for("127.0.0.1", {}) == LOOPBACK_DATAGRAM
    assert max_datagram_for("::1", {}) == LOOPBACK_DATAGRAM
    assert max_datagram_for("10.1.2.3", {}) == DEFAULT_DATAGRAM
    assert max_datagram_for("127.0.0.1", {MTU_ENV: "1400"}) == 1400
    for bad in ("abc", "100", "70000"):
        with pytest.raises(ConfigurationError, match=MTU_ENV):
            max_datagram_for("127.0.0.1", {MTU_ENV: bad})


def test_socket_binds_exactly_the_address_given() -> None:
    sock = UdpSocket("127.0.0.2", 0, max_datagram=1200)
    try:
        assert sock.address[0] == "127.0.0.2"
        assert sock.address[1] > 0
        assert sock.info.rcvbuf > 0 and sock.info.sndbuf > 0
    finally:
        sock.close()


def test_binding_a_foreign_address_names_the_variables() -> None:
    with pytest.raises(ConfigurationError, match="COMFY_CLUSTER_LISTEN_ADDRESS"):
        UdpSocket("192.0.2.123", 0, max_datagram=1200)


def _collect(sock: UdpSocket, total: int, timeout: float = 5.0) -> list[Any]:
    reads: list[Any] = []
    end = time.monotonic() + timeout
    while sum(len(r[0]) for r in reads) < total and time.monotonic() < end:
        select.select([sock.sock], [], [], 0.1)
        reads += sock.receive(64)
    return reads


@pytest.mark.parametrize("gso", [True, False])
def test_a_batch_arrives_whole_with_or_without_gso(gso: bool) -> None:
    a = UdpSocket("127.0.0.1", 0, max_datagram=1200)
    b = UdpSocket("127.0.0.1", 0, max_datagram=1200)
    try:
        if gso and not a.info.gso:
            pytest.skip("this kernel has no UDP GSO")
        a.info.gso = gso
        payload = bytes(range(256)) * 50  # 12800 bytes: 10 segments of 1200 and one of 800
        assert a.send_batch(b.address, memoryview(payload), 1200) == len(payload)
        reads = _collect(b, len(payload))
        assert b"".join(r[0] for r in reads) == payload
        assert all(r[1] == a.address for r in reads)
        for data, _, segment in reads:
            if segment is None:
                assert len(data) in (1200, 800)
            else:
                assert segment == 1200 and len(data) > 1200
        if b.info.gro and gso:
            # GRO coalesced at least part of what GSO sent as one super-datagram.
            assert any(r[2] == 1200 for r in reads)
    finally:
        a.close()
        b.close()


# -- channels ----------------------------------------------------------------------------------
def test_port_unreachable_names_the_destination_and_leaves_the_socket_quiet() -> None:
    """IP_RECVERR: a datagram to a closed port comes back as an ICMP error with the destination
    it concerns; reading it empties the error queue, so the socket is not readable forever (a
    driver waiting in select would spin), whether a read or a send met the error first."""
    sock = UdpSocket("127.0.0.1", 0, max_datagram=1200)
    gone = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    gone.bind(("127.0.0.1", 0))
    dead = gone.getsockname()
    gone.close()
    try:
        if not sys.platform.startswith("linux"):
            pytest.skip("IP_RECVERR is Linux's")
        assert sock.report_unreachable()
        buf = bytearray(70_000)
        sock.send_batch(dead, memoryview(b"x" * 100), 100)
        assert select.select([sock.sock], [], [], 2.0)[0]
        got = sock.read_into(buf)
        assert got is not None and got[0] == -1
        assert sock.unreachable == [dead]
        assert not select.select([sock.sock], [], [], 0.0)[0]
        sock.unreachable.clear()
        # Now the error meets a send first (it takes the socket's pending error).
        sock.send_batch(dead, memoryview(b"y" * 100), 100)
        time.sleep(0.05)
        sock.send_batch(dead, memoryview(b"z" * 100), 100)
        while sock.read_into(buf) is not None:
            pass
        assert dead in sock.unreachable
        assert not select.select([sock.sock], [], [], 0.0)[0]
    finally:
        sock.close()


def test_channels_map_to_distinct_numbers() -> None:
    names = ["c", "k", *(f"p{t}" for t in range(-300, 300))]
    numbers = [channel_id(n) for n in names]
    assert numbers[:2] == [0, 1]
    assert len(set(numbers)) == len(numbers)
    assert all(0 <= n < 1 << 32 for n in numbers)


# -- discovery plans ---------------------------------------------------------------------------
def test_static_plan_binds_its_own_entry() -> None:
    env = {udp_peers.MODE_ENV: "static", udp_peers.HOSTNAMES_ENV: "127.0.0.1:9000,[::1]:9001"}
    p = udp_peers.plan(1, 2, env)
    assert p.mode == "static"
    assert p.bind == ("::1", 9001)
    assert p.static == {0: ("127.0.0.1", 9000), 1: ("::1", 9001)}


@pytest.mark.parametrize(
    ("env", "names"),
    [
        ({udp_peers.MODE_ENV: "stun"}, udp_peers.MODE_ENV),
        ({udp_peers.MODE_ENV: "static", udp_peers.HOSTNAMES_ENV: "127.0.0.1:1"}, "HOSTNAMES"),
        ({udp_peers.MODE_ENV: "static", udp_peers.HOSTNAMES_ENV: "a,b"}, "HOSTNAMES"),
        ({}, "MASTER_ADDR"),
        ({"MASTER_ADDR": "127.0.0.1"}, "MASTER_PORT"),
        ({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "x"}, "MASTER_PORT"),
        ({udp_peers.PORT_ENV: "99999", "MASTER_ADDR": "127.0.0.1"}, udp_peers.PORT_ENV),
        ({udp_peers.MODE_ENV: "broadcast", udp_peers.BROADCAST_ENV: "no"}, "BROADCAST"),
        ({udp_peers.MODE_ENV: "broadcast", udp_peers.BROADCAST_ENV: "x.y"}, "BROADCAST"),
    ],
)
def test_bad_discovery_settings_name_the_variable(env: dict[str, str], names: str) -> None:
    with pytest.raises(ConfigurationError, match=names):
        udp_peers.plan(0, 2, env)


# -- broadcast announcements -------------------------------------------------------------------
def _free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _announcer(rank: int, size: int, port: int, key: ClusterKey | None) -> Announcer:
    target = ("127.255.255.255", port)
    me = ("127.0.0.1", 20000 + rank)
    return Announcer(target, me=me, rank=rank, size=size, comm=7, epoch=1, key=key)


def test_announcements_find_every_rank_on_loopback() -> None:
    port = _free_udp_port()
    key = ClusterKey(KEY_TEXT)
    group = [_announcer(r, 3, port, key) for r in range(3)]
    try:
        for a in group:
            a.start()
        found = [a.wait(time.monotonic() + 10.0, 10.0) for a in group]
    finally:
        for a in group:
            a.stop()
    expected = {r: ("127.0.0.1", 20000 + r) for r in range(3)}
    assert found == [expected] * 3


def test_forged_stale_and_replayed_announcements_are_refused() -> None:
    port = _free_udp_port()
    key = ClusterKey(KEY_TEXT)
    listener, sender = _announcer(0, 2, port, key), _announcer(1, 2, port, key)
    forger = _announcer(1, 2, port, ClusterKey("a-different-cluster-key-00000"))
    try:
        src = ("127.0.0.1", 1)
        good = sender.announcement()
        assert listener.consider(good, src)
        assert not listener.consider(good, src)  # the same bytes again: a replay
        assert listener.dropped["announce_dropped_replay"] == 1
        assert not listener.consider(sender.announcement(now=time.time() - 3600), src)
        assert listener.dropped["announce_dropped_replay"] == 2
        assert not listener.consider(forger.announcement(), src)
        flipped = bytearray(sender.announcement())
        flipped[20] ^= 1
        assert not listener.consider(bytes(flipped), src)
        assert listener.dropped["announce_dropped_auth"] == 2
        assert not listener.consider(good[:30], src)
        assert listener.dropped["announce_dropped_other"] == 1
    finally:
        for a in (listener, sender, forger):
            a.stop()


def test_a_missing_rank_is_named_when_discovery_times_out() -> None:
    a = _announcer(0, 3, _free_udp_port(), ClusterKey(KEY_TEXT))
    try:
        a.start()
        with pytest.raises(RendezvousTimeoutError, match=r"rank\(s\) 1, 2"):
            a.wait(time.monotonic() + 0.3, 0.3)
    finally:
        a.stop()


# -- the key policy ----------------------------------------------------------------------------
def _static_env(n: int, **extra: str) -> dict[str, str]:
    ports = [_free_udp_port() for _ in range(n)]
    hosts = ",".join(f"127.0.0.1:{p}" for p in ports)
    return {udp_peers.MODE_ENV: "static", udp_peers.HOSTNAMES_ENV: hosts, **extra}


def test_static_mode_without_a_key_refuses_even_on_loopback() -> None:
    with pytest.raises(ConfigurationError, match=r"COMFY_CLUSTER_KEY.*COMFY_CLUSTER_INSECURE"):
        init("udp", rank=0, size=2, environ=_static_env(2), timeout=5.0)


def test_a_non_loopback_address_without_a_key_refuses_to_start() -> None:
    env = {udp_peers.MODE_ENV: "static", udp_peers.HOSTNAMES_ENV: "10.9.9.9:9,10.9.9.8:9"}
    with pytest.raises(ConfigurationError, match="COMFY_CLUSTER_KEY"):
        init("udp", rank=0, size=2, environ=env, timeout=5.0)


def test_a_world_of_one_needs_nothing() -> None:
    comm = init("udp", rank=0, size=1, environ={"PATH": ""}, timeout=5.0)
    try:
        assert comm.broadcast({"x": 1}) == {"x": 1}
        assert comm.allgather(3) == [3]
        assert comm.stats()["mode"] == "env"
        assert comm.stats()["core"] == _compiled.status()["mode"]  # compiled or python
    finally:
        comm.close()


# -- in-process worlds of real endpoints (tests/backends/udp_worlds.py) --------------------------
def keyed(n: int, **extra: str) -> dict[str, str]:
    return _static_env(n, COMFY_CLUSTER_KEY=KEY_TEXT, **extra)


def _objects(comm: Communicator) -> Any:
    got = comm.broadcast({"from": comm.rank} if comm.rank == 0 else None)
    everyone = comm.allgather(comm.rank * 10)
    if comm.rank == 0:
        comm.send(b"tagged", 1, tag=-7)
    elif comm.rank == 1:
        assert comm.recv(0, tag=-7) == b"tagged"
    return got, everyone, comm.stats()


def test_objects_move_between_three_ranks() -> None:
    results = run_world(3, keyed(3), _objects)
    for got, everyone, stats in results:
        assert got == {"from": 0}
        assert everyone == [0, 10, 20]
        assert stats["datagrams_in"] > 0 and stats["max_datagram"] == LOOPBACK_DATAGRAM
        assert {"rcvbuf", "sndbuf", "gso", "gro", "handshakes"} <= set(stats)


def _big_buffers(comm: Communicator) -> Any:
    import torch

    data = torch.arange(3 << 20, dtype=torch.uint8)  # 3 MiB: sent without a copy, acknowledged
    out = torch.zeros_like(data)
    engine = comm.engine._engine  # type: ignore[attr-defined]
    if comm.rank == 0:
        comm.recv(1, tag=5)  # rank 1's receive is waiting with its buffer
        comm.send_buffer(data, 1)
        comm.broadcast_into(data, root=0)
        return None
    before = comm.stats()["landed"]  # the world's formation (its probe) landed some already
    work = comm.irecv_into(out, 0)
    end = time.monotonic() + 10.0
    while not engine.landings and time.monotonic() < end:
        time.sleep(0.01)
    comm.send("ready", 0, tag=5)
    work.wait()
    assert torch.equal(out, data)
    landed = comm.stats()["landed"] - before
    out.zero_()
    comm.broadcast_into(out, root=0)
    assert torch.equal(out, data)
    return landed


def test_big_buffers_land_whole() -> None:
    # The receive that waited with its buffer got the body written straight into it.
    assert run_world(2, keyed(2), _big_buffers)[1] == 1


def _eager(comm: Communicator) -> Any:
    big = np.full(1 << 20, 7, dtype=np.uint8)
    if comm.rank == 0:
        comm.send(big, 1)  # returns although rank 1 takes it only after the barrier
        comm.send(b"small", 1)
        comm.barrier()
        return None
    comm.barrier()
    return int(comm.recv(0).sum()), comm.recv(0)


def test_posting_never_waits_for_the_peer_to_take() -> None:
    assert run_world(2, keyed(2), _eager)[1] == (7 << 20, b"small")


def _deadline(comm: Communicator) -> Any:
    if comm.rank == 1:
        start = time.monotonic()
        with pytest.raises(CollectiveTimeoutError, match="rank\\(s\\) 0"):
            comm.recv(0, timeout=0.3)
        return time.monotonic() - start
    time.sleep(0.6)
    return None


def test_a_receive_ends_at_its_deadline() -> None:
    elapsed = run_world(2, keyed(2), _deadline)[1]
    assert 0.3 <= elapsed < 5.0


def _abort_unblocks(comm: Communicator) -> Any:
    if comm.rank == 0:
        comm.barrier()
        time.sleep(1.5)  # stay: rank 1's receive must end by its abort, not by our CLOSE
        return None
    comm.barrier()
    failure: list[BaseException] = []

    def waiter() -> None:
        try:
            comm.engine._take(0, "p0", _dl(30.0))  # type: ignore[attr-defined]
        except BaseException as err:
            failure.append(err)

    t = threading.Thread(target=waiter, daemon=True)
    t.start()
    time.sleep(0.2)
    comm.engine.abort("test")
    t.join(5.0)
    return failure


def _dl(timeout: float) -> Any:
    from collectives.deadline import Deadline

    return Deadline.start(timeout, "recv", 1)


def test_abort_unblocks_a_waiting_receive() -> None:
    failure = run_world(2, keyed(2), _abort_unblocks)[1]
    assert len(failure) == 1 and isinstance(failure[0], CommunicatorAbortedError)


def _silent_peer(comm: Communicator) -> Any:
    comm.barrier()
    engine = comm.engine._engine  # type: ignore[attr-defined]
    if comm.rank == 1:
        # Rank 1 goes silent as a crashed host would: nothing it sends leaves any more.
        engine.sock.send_batch = lambda addr, payload, segment: payload.nbytes
        time.sleep(3.0)
        return None
    start = time.monotonic()
    with pytest.raises(ConnectionLostError, match="rank 1") as info:
        comm.recv(1, timeout=20.0)
    assert info.value.ranks == (1,)
    return time.monotonic() - start


def test_a_silent_peer_is_named_lost_after_the_peer_timeout() -> None:
    env = keyed(2, COMFY_CLUSTER_UDP_PEER_TIMEOUT="1.0")
    elapsed = run_world(2, env, _silent_peer)[0]
    assert elapsed < 10.0


def test_close_is_idempotent_and_joins_the_io_thread() -> None:
    def fn(comm: Communicator) -> Any:
        comm.barrier()
        engine = comm.engine._engine  # type: ignore[attr-defined]
        comm.close()
        comm.close()
        comm.engine.close()
        return engine._thread.is_alive()

    assert run_world(2, keyed(2), fn) == [False, False]


def test_insecure_mode_runs_only_when_asked_for() -> None:
    env = _static_env(2, COMFY_CLUSTER_INSECURE="1")
    results = run_world(2, env, lambda comm: (comm.allgather(comm.rank), comm.stats()))
    assert [r[0] for r in results] == [[0, 1], [0, 1]]


def test_env_discovery_through_the_store_without_a_key_on_loopback() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
    results = run_world(3, env, lambda comm: comm.allgather(comm.rank))
    assert results == [[0, 1, 2]] * 3


def test_broadcast_discovery_forms_a_world_on_loopback() -> None:
    env = {
        udp_peers.MODE_ENV: "broadcast",
        udp_peers.BROADCAST_ENV: "127.255.255.255",
        udp_peers.BROADCAST_PORT_ENV: str(_free_udp_port()),
        udp_peers.LISTEN_ENV: "127.0.0.1",
        "COMFY_CLUSTER_KEY": KEY_TEXT,
    }
    results = run_world(3, env, lambda comm: (comm.allgather(comm.rank), comm.stats()["mode"]))
    assert results == [([0, 1, 2], "broadcast")] * 3


@pytest.fixture(autouse=True)
def _no_leaked_threads() -> Iterator[None]:
    before = {t.name for t in threading.enumerate()}
    yield
    deadline = time.monotonic() + 5.0
    while time.monotonic() < deadline:
        leaked = {t.name for t in threading.enumerate()} - before
        if not any(name.startswith(("udp-io", "udp-announce")) for name in leaked):
            return
        time.sleep(0.05)
    pytest.fail(f"udp threads still running: {leaked}")


def test_backend_class_is_registered() -> None:
    from collectives.backends.base import get_backend_class

    assert get_backend_class("udp") is UdpBackend


def _late_receive(comm: Communicator) -> Any:
    import torch

    data = torch.arange(1 << 20, dtype=torch.int32).view(torch.uint8)  # 4 MiB: pool-sized
    if comm.rank == 0:
        for _ in range(2):
            comm.send_buffer(data, 1)  # acknowledged: rank 1's IO thread read it all
        comm.barrier()
        return None
    before = comm.stats()  # the world's formation (its probe) counted some already
    comm.barrier()  # both messages are whole in rank 1's mailbox before either receive
    out = torch.zeros_like(data)
    got = []
    for _ in range(2):
        out.zero_()
        comm.recv_into(out, 0)
        got.append(torch.equal(out, data))
    stats = comm.stats()
    return got, stats["copied_in"] - before["copied_in"], stats["landed"] - before["landed"]


def test_a_receive_that_comes_late_gets_a_copy_in_its_buffer() -> None:
    got, copied, landed = run_world(2, keyed(2), _late_receive)[1]
    assert got == [True, True]
    assert copied == 2 and landed == 0


def _callers_drive(comm: Communicator) -> Any:
    for _ in range(20):
        comm.broadcast(b"x" * 100)
    return comm.stats()["caller_turns"]


def test_a_waiting_caller_reads_the_socket_itself() -> None:
    assert all(turns > 0 for turns in run_world(2, keyed(2), _callers_drive))


def _peer_closed(comm: Communicator) -> Any:
    comm.barrier()
    engine = comm.engine._engine  # type: ignore[attr-defined]
    if comm.rank == 1:
        time.sleep(1.0)
        return None
    engine.sock.send_batch = lambda addr, payload, segment: payload.nbytes  # nothing arrives
    mid = engine.send(1, 9, b"", [memoryview(b"z" * 100)])

    def closed() -> None:
        time.sleep(0.3)
        with engine.lock:
            engine.lost[1] = "peer closed"  # what the core reports on the peer's CLOSE
        engine.wake()

    threading.Thread(target=closed, daemon=True).start()
    engine.wait_sent(1, mid, _dl(10.0))  # the peer left in order: the post is done
    with pytest.raises(ConnectionLostError):
        engine.take(1, 9, _dl(10.0), None)
    return True


def test_a_post_to_a_peer_that_closed_is_done() -> None:
    assert run_world(2, keyed(2), _peer_closed)[0] is True


def _fan_in(comm: Communicator) -> Any:
    import torch

    n = 1 << 20  # 4 MiB per rank: pool-sized, sent without a copy
    mine = torch.full((n,), float(comm.rank))
    comm.barrier()
    if comm.rank != 0:
        time.sleep(0.3)  # the root is inside gatherv_into, its blocks offered, before we send
        comm.gatherv_into(None, mine)
        return None
    before = comm.stats()
    batch = torch.empty(comm.size, n)
    comm.gatherv_into(list(batch), mine)
    after = comm.stats()
    ok = batch[:, 0].tolist() == batch[:, -1].tolist() == [float(r) for r in range(comm.size)]
    return ok, after["landed"] - before["landed"], after["copied_in"] - before["copied_in"]


def test_a_fan_in_lands_every_peer_in_its_block() -> None:
    # Each peer's body is written into its block of the batch while the root waits for another
    # peer: no pool buffer, no copy afterwards.
    ok, landed, copied = run_world(4, keyed(4), _fan_in)[0]
    assert ok
    assert (landed, copied) == (3, 0)
