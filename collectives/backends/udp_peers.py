"""How ranks of the ``udp`` backend find each other's UDP addresses.

``COMFY_CLUSTER_REGISTRATION_MODE`` picks one of four ways:

``env`` (the default)
    The launcher's RANK/WORLD_SIZE/MASTER_ADDR/MASTER_PORT (or the MPI/Slurm/ComfyUI_Cluster
    variables :mod:`collectives.rendezvous.env` reads).  Rank 0 runs the authenticated
    rendezvous store on exactly MASTER_ADDR:MASTER_PORT (the same per-process server the torch
    backends use, so worlds, epochs and :func:`collectives.cancel_init` behave alike), every rank
    publishes its UDP address there under the world's key space and reads everyone's.  The
    socket binds to the address this host routes MASTER_ADDR through.
``static``
    ``COMFY_CLUSTER_UDP_HOSTNAMES=host:port,...`` lists every rank's address in rank order; this
    rank binds its own entry.
``broadcast``
    Each rank announces ``(world, epoch, rank, size, address)`` on the LAN's broadcast address
    (``COMFY_CLUSTER_UDP_BROADCAST``: ``true`` for 255.255.255.255, or an address such as
    192.168.1.255; port ``COMFY_CLUSTER_BROADCAST_PORT``, 9997) until every peer is connected.
    Each announcement carries a timestamp, a random nonce and an HMAC under the cluster key:
    a forged one fails the MAC, a stale one the 30 s window, a replayed one the nonce cache.
    Spoofing an address could only delay a world: the transport's handshake is authenticated.

``stun``
    The rendezvous server (``COMFY_CLUSTER_STUN_SERVER``, ``COMFY_CLUSTER_CLUSTER_ID``, the
    cluster key): every rank joins with its socket's local address, learns its reflexive
    address by STUN, and reaches each peer over the server's relay first, then directly once a
    hole is punched (:mod:`~collectives.backends.udp_nat`, docs/udp-transport.md "NAT
    traversal").  The socket binds to the address this host routes the server through.  On
    RunPod (``RUNPOD_POD_ID`` set) the advertised local address is ``<id>.runpod.internal``.

In every mode ``COMFY_CLUSTER_LISTEN_ADDRESS`` overrides the address bound,
``COMFY_CLUSTER_DIRECT_LISTEN_PORT`` the port (default: any free one, or the static entry), and
``COMFY_CLUSTER_INSTANCE_ADDRESS`` the address published for others (a NAT's public side).
"""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
import select
import socket
import struct
import threading
import time
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass, field

from collectives.auth import ClusterKey
from collectives.backends import torch_rendezvous as rdv
from collectives.errors import ConfigurationError, RendezvousTimeoutError
from collectives.rendezvous.store import StoreClient, resolve

log = logging.getLogger(__name__)

MODE_ENV = "COMFY_CLUSTER_REGISTRATION_MODE"
HOSTNAMES_ENV = "COMFY_CLUSTER_UDP_HOSTNAMES"
BROADCAST_ENV = "COMFY_CLUSTER_UDP_BROADCAST"
BROADCAST_PORT_ENV = "COMFY_CLUSTER_BROADCAST_PORT"
LISTEN_ENV = "COMFY_CLUSTER_LISTEN_ADDRESS"
PORT_ENV = "COMFY_CLUSTER_DIRECT_LISTEN_PORT"
INSTANCE_ENV = "COMFY_CLUSTER_INSTANCE_ADDRESS"
RUNPOD_ENV = "RUNPOD_POD_ID"
MODES = ("env", "static", "broadcast", "stun")
DEFAULT_BROADCAST_PORT = 9997

Address = tuple[str, int]


@dataclass
class Plan:
    """Where to bind, and how the addresses will be found (decided before the socket exists)."""

    mode: str
    bind: Address
    # Every host this rank's traffic touches: a key is required unless all are loopback.
    hosts: list[str] = field(default_factory=list)
    static: dict[int, Address] = field(default_factory=dict)
    master: Address | None = None
    broadcast: Address | None = None
    advertise: str | None = None
    stun_server: str | None = None  # the rendezvous server's base URL (``stun`` mode)


def plan(rank: int, size: int, environ: Mapping[str, str]) -> Plan:
    """The discovery plan of ``rank`` of ``size`` from ``environ``; ConfigurationError naming
    the variable when something is missing or malformed."""
    mode = (environ.get(MODE_ENV) or "env").strip().lower()
    if mode not in MODES:
        raise ConfigurationError(
            f"{MODE_ENV}={mode!r} is not supported by the udp backend: use one of "
            f"{', '.join(MODES)}"
        )
    listen = (environ.get(LISTEN_ENV) or "").strip() or None
    port = _port(environ, PORT_ENV, 0)
    advertise = (environ.get(INSTANCE_ENV) or "").strip() or None
    if mode == "static":
        table = _static_table(environ.get(HOSTNAMES_ENV, ""), size)
        mine = table[rank]
        bind = (listen or mine[0], port or mine[1])
        hosts = [bind[0], *(host for host, _ in table.values())]
        return Plan(mode, bind, hosts, static=table, advertise=advertise)
    if mode == "broadcast":
        target = _broadcast_address(environ)
        bind = (listen or _route_source(target[0], broadcast=True), port)
        return Plan(mode, bind, [bind[0], target[0]], broadcast=target, advertise=advertise)
    if mode == "stun":
        return _stun_plan(environ, listen, port, advertise)
    if size == 1 and not environ.get("MASTER_ADDR", "").strip():
        return Plan(mode, (listen or "127.0.0.1", port), [listen or "127.0.0.1"])
    master = _master(environ)
    _, sockaddr = resolve(master[0], master[1], "MASTER_ADDR")
    source = listen or _route_source(str(sockaddr[0]))
    return Plan(
        mode, (source, port), [source, str(sockaddr[0])], master=master, advertise=advertise
    )


def _stun_plan(
    environ: Mapping[str, str], listen: str | None, port: int, advertise: str | None
) -> Plan:
    from urllib.parse import urlsplit

    from collectives.rendezvous.stun_client import CLUSTER_ID_ENV, SERVER_ENV, server_url

    if not environ.get(SERVER_ENV, "").strip():
        raise ConfigurationError(
            f"{MODE_ENV}=stun needs {SERVER_ENV}: the rendezvous server's URL, e.g. "
            "https://stun.example.org:8089"
        )
    url = server_url(environ.get(SERVER_ENV, ""), environ)
    if not environ.get(CLUSTER_ID_ENV, "").strip():
        raise ConfigurationError(
            f"{MODE_ENV}=stun needs {CLUSTER_ID_ENV}: the id every instance of this cluster "
            f"uses on the rendezvous server ({SERVER_ENV})"
        )
    host = urlsplit(url).hostname or ""
    server = _numeric(host, SERVER_ENV)
    source = listen or _route_source(server)
    pod = (environ.get(RUNPOD_ENV) or "").strip()
    if advertise is None and pod:
        advertise = f"{pod}.runpod.internal"  # RunPod's private network name of this pod
    return Plan("stun", (source, port), [source, server], advertise=advertise, stun_server=url)


def _port(environ: Mapping[str, str], name: str, default: int) -> int:
    raw = (environ.get(name) or "").strip()
    if not raw:
        return default
    try:
        value = int(raw)
    except ValueError:
        value = -1
    if not 0 <= value < 65536:
        raise ConfigurationError(f"{name}={raw!r} is not a UDP port number (0..65535)")
    return value


def parse_hostport(text: str, what: str) -> Address:
    """``host:port`` or ``[v6]:port``; ConfigurationError naming ``what``."""
    host, sep, port = text.strip().rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigurationError(f"{what}: {text.strip()!r} is not HOST:PORT")
    return host, int(port)


def _static_table(raw: str, size: int) -> dict[int, Address]:
    entries = [e for e in raw.split(",") if e.strip()]
    if len(entries) != size:
        raise ConfigurationError(
            f"{HOSTNAMES_ENV} lists {len(entries)} address(es) but the world has {size} ranks: "
            "list every rank's HOST:PORT, in rank order"
        )
    table = {}
    for rank, entry in enumerate(entries):
        host, port = parse_hostport(entry, f"{HOSTNAMES_ENV} entry {rank}")
        table[rank] = (_numeric(host, f"{HOSTNAMES_ENV} entry {rank}"), port)
    return table


def _numeric(host: str, what: str) -> str:
    try:
        infos = socket.getaddrinfo(host, None, type=socket.SOCK_DGRAM)
    except (socket.gaierror, UnicodeError) as err:
        raise ConfigurationError(f"{what}: {host!r} does not resolve ({err})") from None
    return str(infos[0][4][0])


def _broadcast_address(environ: Mapping[str, str]) -> Address:
    raw = (environ.get(BROADCAST_ENV) or "true").strip()
    port = _port(environ, BROADCAST_PORT_ENV, DEFAULT_BROADCAST_PORT) or DEFAULT_BROADCAST_PORT
    if raw.lower() in ("1", "true", "yes", "on"):
        return "255.255.255.255", port
    if raw.lower() in ("0", "false", "no", "off"):
        raise ConfigurationError(
            f"{MODE_ENV}=broadcast needs broadcasts, but {BROADCAST_ENV}={raw}: set it to true "
            "(or to the LAN's broadcast address), or use another registration mode"
        )
    try:
        socket.inet_aton(raw)
    except OSError:
        raise ConfigurationError(
            f"{BROADCAST_ENV}={raw!r} is neither true nor an IPv4 broadcast address"
        ) from None
    return raw, port


def _master(environ: Mapping[str, str]) -> Address:
    addr = (environ.get("MASTER_ADDR") or "").strip()
    if not addr:
        raise ConfigurationError(
            f"MASTER_ADDR is not set: set it to rank 0's address, {rdv.LAUNCH_HINT} (backend "
            f"'udp', {MODE_ENV}=env), or use {MODE_ENV}=static with {HOSTNAMES_ENV}"
        )
    raw = (environ.get("MASTER_PORT") or "").strip()
    if not raw:
        raise ConfigurationError(
            f"MASTER_PORT is not set: set it to a free TCP port on rank 0, {rdv.LAUNCH_HINT}"
        )
    port = _port(environ, "MASTER_PORT", 0)
    if port == 0:
        raise ConfigurationError(f"MASTER_PORT={raw!r} is not a TCP port number (1..65535)")
    return addr, port


def _route_source(target: str, *, broadcast: bool = False) -> str:
    """The address this host sends to ``target`` from (no packet is sent)."""
    family = socket.AF_INET6 if ":" in target else socket.AF_INET
    try:
        with socket.socket(family, socket.SOCK_DGRAM) as probe:
            if broadcast:
                probe.setsockopt(socket.SOL_SOCKET, socket.SO_BROADCAST, 1)
            probe.connect((target, 9))
            return str(probe.getsockname()[0])
    except OSError as err:
        raise ConfigurationError(
            f"udp backend: no route to {target} ({err.strerror or err}): set {LISTEN_ENV} to "
            "the address of this host's interface towards the other ranks"
        ) from None


# -- env mode: the rendezvous store ------------------------------------------------------------
_KEY_LABEL = "udp-world-key"


def exchange_env(
    p: Plan,
    me: Address,
    *,
    rank: int,
    size: int,
    world: str,
    store_key: ClusterKey | None,
    deadline: float,
    timeout: float,
    make_world_key: bool,
) -> tuple[dict[int, Address], str | None]:
    """Publish ``me`` in rank 0's store and read every rank's address.

    ``make_world_key``: no cluster key is set and every address is loopback, so rank 0 makes a
    random key for this world and hands it out through the (loopback-only) store: the transport
    stays encrypted without anyone opting out.  Returns the addresses and that key (or None).
    """
    assert p.master is not None
    addr, port = p.master
    address = resolve(addr, port, "MASTER_ADDR")
    prefix = f"{rdv._checkin_prefix(world)}udp/"
    keys = [f"{prefix}{r}" for r in range(size)]
    rdv._set_waiting(world, [0] if rank != 0 else [r for r in range(1, size)])
    client: StoreClient | None = None
    try:
        if rank == 0:
            rdv._serve(addr, port, store_key, address, world)
        client = rdv._connect(
            addr, port, store_key, address, rank=rank, deadline=deadline, timeout=timeout,
            world=world,
        )  # fmt: skip
        if client.add(f"{prefix}claims/{rank}", 1) > 1:
            raise ConfigurationError(
                f"two processes claim rank {rank} at {addr}:{port}: give each one its own RANK"
            )
        if rank == 0 and make_world_key:
            client.set(f"{prefix}{_KEY_LABEL}", secrets.token_urlsafe(32).encode())
        client.set(keys[rank], _format(p.advertise or me[0], me[1]))
        _wait_keys(client, keys, rank=rank, size=size, world=world, deadline=deadline,
                   timeout=timeout, where=f"{addr}:{port}")  # fmt: skip
        table = {r: parse_hostport(client.get(keys[r]).decode(), f"rank {r}") for r in range(size)}
        world_key = None
        if make_world_key:
            client.wait([f"{prefix}{_KEY_LABEL}"], max(deadline - time.monotonic(), 0.0))
            world_key = client.get(f"{prefix}{_KEY_LABEL}").decode()
        return table, world_key
    finally:
        rdv._set_waiting(world, None)
        if client is not None:
            client.close()


def _format(host: str, port: int) -> bytes:
    return (f"[{host}]:{port}" if ":" in host else f"{host}:{port}").encode()


def _wait_keys(
    client: StoreClient,
    keys: list[str],
    *,
    rank: int,
    size: int,
    world: str,
    deadline: float,
    timeout: float,
    where: str,
) -> None:
    """Wait for every rank's address, in slices, naming the ranks that never publish one."""
    while True:
        rdv._check_cancelled(world, rank)
        remaining = deadline - time.monotonic()
        try:
            client.wait(keys, max(min(0.25, remaining), 0.0))
            return
        except RendezvousTimeoutError:
            pass
        missing = [r for r in range(size) if not client.check([keys[r]])]
        rdv._set_waiting(world, missing)
        if time.monotonic() >= deadline and missing:
            raise RendezvousTimeoutError(
                f"udp rendezvous at {where} timed out after {timeout:g} s on rank {rank}: "
                f"rank(s) {', '.join(map(str, missing))} of {size} never arrived; start them with "
                "the same MASTER_ADDR/MASTER_PORT/WORLD_SIZE, or raise COMFY_CLUSTER_TIMEOUT"
            )


# -- broadcast mode ----------------------------------------------------------------------------
_ANNOUNCE_LABEL = b"udp-announce"
_ANNOUNCE = struct.Struct("!4sBxxxQIIIH")
_MAGIC = b"CCUA"
_NONCE = 16
_MAC = 32
REPLAY_WINDOW_S = 30.0
_INSECURE_ANNOUNCE_KEY = ClusterKey("comfy-cluster-insecure-announcements")


class Announcer:
    """Broadcast discovery: announces this rank and collects everyone else's announcements.

    Runs one daemon thread from :meth:`start` until :meth:`stop`; ``key`` None (insecure mode)
    MACs with a public key, which authenticates nothing.  Counters of what it refused are in
    :attr:`dropped` (shown by ``comm.stats()``).
    """

    def __init__(
        self,
        target: Address,
        *,
        me: Address,
        rank: int,
        size: int,
        comm: int,
        epoch: int,
        key: ClusterKey | None,
    ) -> None:
        self._target = target
        self._me = me
        self._rank, self._size, self._comm, self._epoch = rank, size, comm, epoch
        self._key = key or _INSECURE_ANNOUNCE_KEY
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_BROADCAST, 1)
        # Bound to the broadcast address itself: it hears broadcasts and nothing sent to this
        # host directly (255.255.255.255 included).
        try:
            self._sock.bind(target)
        except OSError as err:
            self._sock.close()
            raise ConfigurationError(
                f"udp broadcast discovery cannot listen on {target[0]}:{target[1]} "
                f"({err.strerror or err}): set {BROADCAST_PORT_ENV} to a free port"
            ) from None
        self._lock = threading.Lock()
        self._found: dict[int, Address] = {rank: me}
        self._changed = threading.Condition(self._lock)
        self._seen: OrderedDict[bytes, float] = OrderedDict()
        self.dropped = {"announce_dropped_auth": 0, "announce_dropped_replay": 0,
                        "announce_dropped_other": 0}  # fmt: skip
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="udp-announce", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def wait(self, deadline: float, timeout: float) -> dict[int, Address]:
        """Every rank's address, once each has announced; RendezvousTimeoutError naming the
        silent ranks at ``deadline``."""
        with self._lock:
            while len(self._found) < self._size:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    missing = sorted(set(range(self._size)) - set(self._found))
                    raise RendezvousTimeoutError(
                        f"udp broadcast discovery on rank {self._rank} timed out after "
                        f"{timeout:g} s: rank(s) {', '.join(map(str, missing))} never announced "
                        f"on {self._target[0]}:{self._target[1]} (same {BROADCAST_PORT_ENV}, "
                        "world size and cluster key everywhere? broadcasts blocked?)"
                    )
                self._changed.wait(remaining)
            return dict(self._found)

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(timeout=2.0)
        self._sock.close()

    def announcement(self, now: float | None = None, nonce: bytes | None = None) -> bytes:
        host = self._me[0].encode()
        body = (
            _ANNOUNCE.pack(_MAGIC, 1, self._comm, self._epoch, self._rank, self._size, self._me[1])
            + bytes([len(host)])
            + host
            + struct.pack("!d", time.time() if now is None else now)
        )
        body += nonce or secrets.token_bytes(_NONCE)
        return body + self._key.mac(_ANNOUNCE_LABEL, body)

    def _run(self) -> None:
        pause, next_send = 0.05, 0.0
        while not self._stop.is_set():
            now = time.monotonic()
            if now >= next_send:
                with contextlib.suppress(OSError):
                    self._sock.sendto(self.announcement(), self._target)
                next_send, pause = now + pause, min(pause * 1.5, 0.5)
            try:
                ready, _, _ = select.select([self._sock], [], [], max(next_send - now, 0.0))
                if ready:
                    data, src = self._sock.recvfrom(512)
                    self.consider(data, (str(src[0]), int(src[1])))
            except (OSError, ValueError):
                if self._stop.is_set():
                    return
                time.sleep(0.05)

    def consider(self, data: bytes, src: Address, now: float | None = None) -> bool:
        """Take one received announcement; whether it was accepted (else it is counted)."""
        fixed = _ANNOUNCE.size + 1
        if len(data) < fixed + 8 + _NONCE + _MAC:
            return self._drop("announce_dropped_other")
        body, tag = data[:-_MAC], data[-_MAC:]
        if not self._key.verify(_ANNOUNCE_LABEL, tag, body):
            return self._drop("announce_dropped_auth")
        magic, version, comm, epoch, rank, size, port = _ANNOUNCE.unpack_from(body)
        host_len = body[_ANNOUNCE.size]
        if magic != _MAGIC or version != 1 or len(body) != fixed + host_len + 8 + _NONCE:
            return self._drop("announce_dropped_other")
        if (comm, epoch, size) != (self._comm, self._epoch, self._size) or not 0 <= rank < size:
            return self._drop("announce_dropped_other")  # another world: not an attack
        host = body[fixed : fixed + host_len].decode("ascii", "replace") or src[0]
        (stamp,) = struct.unpack_from("!d", body, fixed + host_len)
        nonce = body[-_NONCE:]
        wall = time.time() if now is None else now
        if not abs(wall - stamp) <= REPLAY_WINDOW_S:
            return self._drop("announce_dropped_replay")
        with self._lock:
            while self._seen and next(iter(self._seen.values())) < wall - REPLAY_WINDOW_S:
                self._seen.popitem(last=False)
            if nonce in self._seen or len(self._seen) >= 65536:
                self.dropped["announce_dropped_replay"] += 1
                return False
            self._seen[nonce] = wall
            if rank != self._rank:
                old = self._found.get(rank)
                if old is not None and old != (host, port):
                    log.warning("udp: rank %d announced %s, earlier %s", rank, (host, port), old)
                self._found[rank] = (host, port)
                self._changed.notify_all()
        return True

    def _drop(self, counter: str) -> bool:
        with self._lock:
            self.dropped[counter] += 1
        return False


def environ_or_os(environ: Mapping[str, str]) -> Mapping[str, str]:
    return environ or os.environ


__all__ = [
    "BROADCAST_ENV",
    "BROADCAST_PORT_ENV",
    "HOSTNAMES_ENV",
    "INSTANCE_ENV",
    "LISTEN_ENV",
    "MODE_ENV",
    "PORT_ENV",
    "RUNPOD_ENV",
    "Announcer",
    "Plan",
    "exchange_env",
    "parse_hostport",
    "plan",
]
