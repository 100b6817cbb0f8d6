"""The rendezvous store: its wire codec on whole and broken buffers, then a real server on
loopback (handshake, every op, bounds, garbage), then the torch ``Store`` adapter."""

from __future__ import annotations

import contextlib
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterator

import pytest

from collectives.auth import ClusterKey
from collectives.errors import (
    AuthenticationError,
    ConfigurationError,
    RemoteProtocolError,
    RendezvousTimeoutError,
)
from collectives.rendezvous import store_wire as wire
from collectives.rendezvous.store import StoreClient, StoreServer
from collectives.rendezvous.store_wire import Op, Request

KEY = ClusterKey("unit-test-cluster-key-0123456789")
OTHER = ClusterKey("another-cluster-key-9876543210")


# -- codec -------------------------------------------------------------------------------------

ALL_REQUESTS = [
    Request(Op.SET, ("k",), (b"v",)),
    Request(Op.GET, ("k",)),
    Request(Op.ADD, ("k",), amount=-3),
    Request(Op.CHECK, ("a", "b", "c")),
    Request(Op.CHECK, ()),
    Request(Op.WAIT, ("a", "b"), timeout_ms=1500),
    Request(Op.COMPARE_SET, ("k",), (b"", b"new")),
    Request(Op.DELETE, ("k",)),
    Request(Op.NUM_KEYS),
]


@pytest.mark.parametrize("request_", ALL_REQUESTS, ids=lambda r: r.op.name)
def test_requests_round_trip(request_: Request) -> None:
    assert Request.decode(request_.encode()) == request_


@pytest.mark.parametrize("request_", ALL_REQUESTS, ids=lambda r: r.op.name)
def test_every_truncation_is_a_protocol_error(request_: Request) -> None:
    data = request_.encode()
    for cut in range(len(data)):
        try:
            got = Request.decode(data[:cut])
        except RemoteProtocolError:
            continue
        # A cut on a field boundary may still be a valid, different request (CHECK of fewer
        # keys); it must never decode to the original one.
        assert got != request_


@pytest.mark.parametrize(
    "payload",
    [
        b"",
        b"\x63",  # unknown op
        wire.pack_fields(Op.SET, b"k"),  # missing value
        wire.pack_fields(Op.SET, b"k", b"v", b"extra"),
        wire.pack_fields(Op.SET, b"", b"v"),  # empty key
        wire.pack_fields(Op.SET, b"\xff\xfe", b"v"),  # not UTF-8
        wire.pack_fields(Op.SET, b"k" * (wire.MAX_KEY_BYTES + 1), b"v"),
        wire.pack_fields(Op.SET, b"k", b"v" * (wire.MAX_VALUE_BYTES + 1)),
        wire.pack_fields(Op.ADD, b"k", b"\x01\x02"),  # not an i64
        bytes([Op.GET]) + struct.pack("<I", 1000) + b"short",
    ],
)
def test_malformed_requests_are_refused(payload: bytes) -> None:
    with pytest.raises(RemoteProtocolError):
        Request.decode(payload)


def test_frames_are_bound_to_session_direction_and_order() -> None:
    session = wire.session_key(KEY, b"s" * 32, b"c" * 32)
    sender, receiver = wire.FrameSealer(session, b"c"), wire.FrameSealer(session, b"c")
    first, second = sender.seal(b"one"), sender.seal(b"two")

    def split(frame: bytes) -> tuple[bytes, bytes]:
        n = wire.frame_length(frame[:4])
        return frame[4 : 4 + n], frame[4 + n :]

    with pytest.raises(AuthenticationError):
        receiver.open(*split(second))  # out of order
    assert receiver.open(*split(first)) == b"one"
    with pytest.raises(AuthenticationError):
        receiver.open(*split(first))  # replayed
    _, tag = split(second)
    with pytest.raises(AuthenticationError):
        receiver.open(b"tw0", tag)  # altered
    with pytest.raises(AuthenticationError):  # reflected back in the other direction
        wire.FrameSealer(session, b"s").open(*split(wire.FrameSealer(session, b"c").seal(b"x")))
    with pytest.raises(RemoteProtocolError):
        wire.frame_length(struct.pack("<I", wire.MAX_FRAME_BYTES + 1))


def test_handshake_proof_needs_the_key() -> None:
    server_nonce, client_nonce = b"s" * 32, b"c" * 32
    good = wire.proof(KEY, server_nonce, client_nonce)
    assert wire.check_proof(KEY, server_nonce, good) == client_nonce
    with pytest.raises(AuthenticationError, match="wrong cluster key"):
        wire.check_proof(KEY, server_nonce, wire.proof(OTHER, server_nonce, client_nonce))
    with pytest.raises(AuthenticationError):  # a proof for another challenge (replay)
        wire.check_proof(KEY, b"x" * 32, good)
    with pytest.raises(AuthenticationError):
        wire.check_proof(KEY, server_nonce, good[:-1])
    with pytest.raises(AuthenticationError, match="does not speak"):
        wire.parse_hello(b"HTTP/1.1 400 Bad Request\r\n\r\n"[: wire.HELLO_BYTES])


# -- server and client on loopback -------------------------------------------------------------


@pytest.fixture
def server() -> Iterator[StoreServer]:
    with StoreServer("127.0.0.1", 0, KEY, handshake_timeout_s=1.0) as srv:
        yield srv


@pytest.fixture
def client(server: StoreServer) -> Iterator[StoreClient]:
    c = StoreClient("127.0.0.1", server.port, KEY)
    yield c
    c.close()


def test_every_op(client: StoreClient) -> None:
    client.set("a", b"1")
    assert client.get("a") == b"1"
    with pytest.raises(KeyError):
        client.get("missing")
    assert client.add("n", 2) == 2
    assert client.add("n", 5) == 7
    assert client.get("n") == b"7"  # stored as text, like TCPStore
    assert client.check(["a", "n"]) and not client.check(["a", "b"])
    # compare_set follows TCPStore: a missing key equals an empty expected value.
    assert client.compare_set("c", b"", b"x") == b"x"
    assert client.compare_set("c", b"nope", b"y") == b"x"
    assert client.compare_set("c", b"x", b"y") == b"y"
    assert client.compare_set("d", b"want", b"z") == b"want" and not client.check(["d"])
    assert client.num_keys() == 3
    assert client.delete_key("c") and not client.delete_key("c")
    assert client.num_keys() == 2


def test_wait_blocks_until_another_client_sets(server: StoreServer, client: StoreClient) -> None:
    other = StoreClient("127.0.0.1", server.port, KEY)
    setter = threading.Timer(0.2, other.set, args=("late", b"x"))
    setter.start()
    client.wait(["late"], timeout_s=10)
    assert client.get("late") == b"x"
    setter.join()
    other.close()
    start = time.monotonic()
    with pytest.raises(RendezvousTimeoutError):
        client.wait(["never"], timeout_s=0.2)
    assert time.monotonic() - start < 5
    client.set("after", b"ok")  # a timed-out wait leaves the connection usable
    assert client.get("after") == b"ok"


@pytest.mark.parametrize(
    ("key", "match"),
    [(None, "has none: set COMFY_CLUSTER_KEY"), (OTHER, "refused this process's cluster key")],
)
def test_clients_without_the_key_are_refused(
    server: StoreServer, client: StoreClient, key: ClusterKey | None, match: str
) -> None:
    client.set("secret", b"10.0.0.1")
    with pytest.raises(AuthenticationError, match=match):
        StoreClient("127.0.0.1", server.port, key)
    assert client.get("secret") == b"10.0.0.1"  # the server lives on


def test_a_server_without_the_key_is_not_trusted() -> None:
    # An impostor on the port accepts every proof, but cannot answer with the key's MAC.
    with socket.create_server(("127.0.0.1", 0)) as listener:

        def impostor() -> None:
            conn, _ = listener.accept()
            with conn:
                conn.sendall(wire.hello(b"n" * wire.NONCE_BYTES))
                conn.recv(wire.PROOF_BYTES)
                conn.sendall(wire.ACCEPT + b"\x00" * wire.TAG_BYTES)
                conn.recv(1)

        thread = threading.Thread(target=impostor)
        thread.start()
        with pytest.raises(AuthenticationError, match="could not prove it holds the cluster key"):
            StoreClient("127.0.0.1", listener.getsockname()[1], KEY)
        thread.join()
    with StoreServer("127.0.0.1", 0, None) as keyless:
        with pytest.raises(AuthenticationError):
            StoreClient("127.0.0.1", keyless.port, KEY)
        # Keyless on both sides: the same protocol, for loopback use without a key.
        plain = StoreClient("127.0.0.1", keyless.port, None)
        plain.set("k", b"v")
        assert plain.get("k") == b"v"
        plain.close()


def test_garbage_and_silence_do_not_take_the_server_down(
    server: StoreServer, client: StoreClient
) -> None:
    garbage = [
        b"",
        b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",
        b"\x00" * wire.PROOF_BYTES,
        b"\xff" * 100_000,
        wire.MAGIC + bytes([wire.VERSION]) + b"\x00" * 10,  # truncated proof
    ]
    for data in garbage:
        with socket.create_connection(("127.0.0.1", server.port), timeout=5) as sock:
            assert sock.recv(wire.HELLO_BYTES)[:4] == wire.MAGIC
            if data:
                with contextlib.suppress(OSError):  # it may hang up before taking it all
                    sock.sendall(data)
    # A silent connection is dropped after the handshake timeout (1 s here).
    with socket.create_connection(("127.0.0.1", server.port), timeout=5) as silent:
        silent.recv(wire.HELLO_BYTES)
        start = time.monotonic()
        assert silent.recv(16) == b""
        assert time.monotonic() - start < 4
    client.set("still", b"alive")
    fresh = StoreClient("127.0.0.1", server.port, KEY)
    assert fresh.get("still") == b"alive"
    fresh.close()


def test_a_key_holder_sending_a_malformed_request_loses_only_its_connection(
    server: StoreServer, client: StoreClient
) -> None:
    rogue = StoreClient("127.0.0.1", server.port, KEY)
    sock = rogue._sock
    assert sock is not None
    sock.sendall(rogue._outbound.seal(b"\x63junk"))
    assert sock.recv(16) == b""
    client.set("fine", b"1")
    assert client.get("fine") == b"1"


def test_bounds_are_enforced() -> None:
    with StoreServer("127.0.0.1", 0, KEY, max_keys=3, max_bytes=10_000) as srv:
        c = StoreClient("127.0.0.1", srv.port, KEY)
        for i in range(3):
            c.set(f"k{i}", b"x")
        with pytest.raises(RemoteProtocolError, match="store full"):
            c.set("k3", b"x")
        c.set("k0", b"y")  # overwriting needs no new key
        with pytest.raises(RemoteProtocolError, match="store full"):
            c.set("k1", b"x" * 20_000)
        assert c.get("k1") == b"x"
        c.close()


def test_server_binds_exactly_the_given_address(server: StoreServer) -> None:
    assert server._sock.getsockname()[0] == "127.0.0.1"
    with pytest.raises(ConfigurationError, match=r"MASTER_PORT=\d+ is already in use"):
        StoreServer("127.0.0.1", server.port, KEY)
    with pytest.raises(ConfigurationError, match=r"MASTER_ADDR='no-such-host\.invalid' does not"):
        StoreServer("no-such-host.invalid", 0, KEY)


# -- the torch Store adapter -------------------------------------------------------------------


def test_torch_adapter(server: StoreServer, client: StoreClient) -> None:
    dist = pytest.importorskip("torch.distributed")
    from datetime import timedelta

    from collectives.rendezvous.torch_store import AuthenticatedStore

    store = AuthenticatedStore(client, timedelta(seconds=5))
    prefixed = dist.PrefixStore("p", store)  # torch calls through C++, as init_process_group does
    prefixed.set("a", "text")
    assert prefixed.get("a") == b"text"
    assert prefixed.add("n", 3) == 3
    assert prefixed.check(["a", "n"])
    assert prefixed.compare_set("c", "", "v") == b"v"
    assert prefixed.num_keys() == 3
    assert prefixed.delete_key("c")
    prefixed.wait(["a"], timedelta(seconds=1))
    with pytest.raises(dist.DistStoreError):
        prefixed.wait(["never"], timedelta(seconds=0.2))
    assert client.get("p/a") == b"text"


def test_a_resolved_address_is_used_as_it_is() -> None:
    from collectives.rendezvous.store import resolve

    with StoreServer("127.0.0.1", 0, KEY, address=resolve("127.0.0.1", 0)) as srv:
        assert srv._sock.getsockname()[0] == "127.0.0.1"
        # The host is only named in messages: the address given is what is connected to.
        c = StoreClient("unused.invalid", srv.port, KEY, address=resolve("127.0.0.1", srv.port))
        c.set("k", b"v")
        assert c.get("k") == b"v"
        c.close()


def test_delete_prefix_and_connection_count(server: StoreServer, client: StoreClient) -> None:
    for key in ("w/a/0", "w/a/claims/0", "w/ab/0", "other"):
        client.set(key, b"x")
    assert server.delete_prefix("w/a/") == 2
    assert client.check(["w/ab/0", "other"]) and not client.check(["w/a/0"])
    assert client.num_keys() == 2
    client.set("w/a/0", b"y")  # the byte count stayed right: the table is not full
    assert server.connections == 1
    client.close()
    _until(lambda: server.connections == 0)


def _until(condition: Callable[[], bool], timeout_s: float = 5.0) -> None:
    limit = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < limit, "condition not met in time"
        time.sleep(0.01)


# -- the gloo rendezvous on rank 0's store -----------------------------------------------------


def test_uses_gloo() -> None:
    from collectives.backends.torch_rendezvous import uses_gloo

    assert uses_gloo("gloo") and uses_gloo("cpu:gloo,cuda:nccl") and uses_gloo("cuda:nccl, gloo")
    assert not uses_gloo("nccl") and not uses_gloo("cuda:nccl") and not uses_gloo("mpi")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@pytest.mark.gloo
def test_re_formed_worlds_do_not_pile_up_on_rank_0s_store() -> None:
    # The node pack re-forms a world per epoch in one process: each world's connection to the
    # store must go with it, and the previous world's keys too.
    dist = pytest.importorskip("torch.distributed")
    from collectives.backends import torch_rendezvous as tr
    from collectives.backends.base import BackendConfig
    from collectives.backends.torch_dist import TorchBackend

    assert not dist.is_initialized()
    port = _free_port()
    env = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
    keys = []
    for epoch in range(4):
        config = BackendConfig(
            rank=0, size=1, environ=env, timeout=10, world=f"comfy-cluster-e{epoch}", epoch=epoch
        )
        backend = TorchBackend.create(config)
        server = tr._STORES[("127.0.0.1", port)]
        assert server.connections == 1
        keys.append(set(server._table._data))
        backend.close()
        assert not dist.is_initialized()
        _until(lambda: tr._STORES[("127.0.0.1", port)].connections == 0)
    # Every world wrote the same number of keys, and only the last one's are left.
    assert len({len(k) for k in keys}) == 1
    assert set(server._table._data) == keys[-1]
    assert all("comfy-cluster-e3/" in k for k in keys[-1])


@pytest.mark.gloo
def test_a_failed_init_closes_its_store_connection(monkeypatch: pytest.MonkeyPatch) -> None:
    dist = pytest.importorskip("torch.distributed")
    from collectives.backends import torch_rendezvous as tr
    from collectives.backends.base import BackendConfig
    from collectives.errors import RendezvousConnectionError

    def failing_init(*args: object, **kwargs: object) -> None:
        raise RendezvousConnectionError("gloo could not connect")

    monkeypatch.setattr(tr, "_init", failing_init)
    port = _free_port()
    env = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
    config = BackendConfig(rank=0, size=1, environ=env, timeout=10, world="fails")
    with pytest.raises(RendezvousConnectionError):
        tr.join(config, name="gloo", torch_backend="gloo")
    assert not dist.is_initialized()
    server = tr._STORES[("127.0.0.1", port)]
    _until(lambda: server.connections == 0)


@pytest.mark.gloo
@pytest.mark.parametrize("rank", [0, 1])
def test_a_cancelled_rendezvous_gives_up_at_once(rank: int) -> None:
    # Rank 0 waits at check-in for a rank that never comes; rank 1 waits for a rank 0 that never
    # opens its store.  Either would wait its whole timeout (60 s here) unless cancelled.
    dist = pytest.importorskip("torch.distributed")
    import collectives
    from collectives.backends import torch_rendezvous as tr
    from collectives.backends.base import BackendConfig
    from collectives.errors import RendezvousClosedError

    env = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port())}
    world = f"cancelled-{rank}"
    config = BackendConfig(rank=rank, size=2, environ=env, timeout=60, world=world)
    outcome: list[BaseException] = []

    def join() -> None:
        try:
            tr.join(config, name="gloo", torch_backend="gloo")
        except BaseException as err:
            outcome.append(err)

    thread = threading.Thread(target=join, daemon=True)
    thread.start()
    _until(lambda: tr.waiting_for(world) != [])
    collectives.cancel_init(world)
    thread.join(timeout=30)
    assert not thread.is_alive(), "the cancelled rendezvous kept waiting"
    assert len(outcome) == 1 and isinstance(outcome[0], RendezvousClosedError), outcome
    assert not dist.is_initialized()
