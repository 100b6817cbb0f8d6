"""The ``udp`` backend: reliable, encrypted, congestion-controlled messages over UDP.

Three layers (docs/udp-transport.md): the sans-IO core (:mod:`collectives.transport`), the IO
driver (:mod:`collectives.backends.udp_io`, sockets in :mod:`~collectives.backends.udp_socket`,
discovery in :mod:`~collectives.backends.udp_peers`), and this module, the
:class:`~collectives.backends.p2p.P2PBackend` seam: every collective comes from there.

Messages.  A message's *meta* is the 56-byte :class:`Envelope` followed by the codec header; its
*body* is the codec buffers back to back.  Channels map to integers: ``"c"`` 0, ``"k"`` 1 and
user tag ``t`` (any int) ``2 + zigzag(t)``, so no two tags share a channel.

Posting (eager, see the seam contract).  The core reads a body until its last byte is sealed
into frames (``MessageFramed``; resends use the sealed frames).  A body of at most
:data:`COPY_LIMIT` bytes is copied and the post returns at once: the copy costs less than
waiting for the window to take it.  A bigger body is sent from the caller's buffers without a
copy, and the post waits (within its deadline) until every byte is sealed: a copy of a large
tensor into fresh memory costs about as much as sealing it (page faults), and the sealing is
the copy the transport makes anyway.  The post never waits for an acknowledgement, nor for the
peer to *take* the message (its IO thread receives into its own buffers).  To a rank of the same
host that may read this process, a body of ``cma.MIN_BYTES`` or more goes as a *far message*
instead (:mod:`~collectives.backends.udp_cma`): the peer copies it out of this process on
arrival, and the post waits for its answer; a fan-out (``_post_each``) posts all of them first.

Security.  On by default: the transport uses the cluster key (``COMFY_CLUSTER_KEY`` or
``COMFY_CLUSTER_KEY_FILE``).  Without one, a rank whose traffic would leave loopback refuses to
start, naming the variable, unless ``COMFY_CLUSTER_INSECURE=1`` opts out of encryption; on
loopback with ``env`` discovery, rank 0 makes a random key for the world and hands it out
through the (loopback-only) rendezvous store; ``static`` and ``broadcast`` discovery have no
such channel and need the key (or the opt-out) even on loopback.
"""

from __future__ import annotations

import atexit
import dataclasses
import logging
import os
import time
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from collectives import _compiled
from collectives.auth import INSECURE_ENV, KEY_ENV, ClusterKey, insecure_allowed, require_key
from collectives.backends import cma, udp_peers, udp_rendezvous, udp_shm
from collectives.backends.base import BackendConfig, close_at_exit, register_backend
from collectives.backends.envelope import Envelope
from collectives.backends.p2p import (
    AGREEMENT_CHANNEL,
    COLLECTIVE_CHANNEL,
)
from collectives.backends.udp_arena import ArenaCollectives
from collectives.backends.udp_peers import Announcer, Plan
from collectives.backends.udp_socket import (
    DEFAULT_DATAGRAM,
    MTU_ENV,
    Address,
    UdpSocket,
    max_datagram_for,
)
from collectives.errors import ConfigurationError, InvalidArgumentError
from collectives.rendezvous.env import read_rank_env

if TYPE_CHECKING:
    from collectives.backends.udp_io import Engine
    from collectives.backends.udp_nat import NatDriver
    from collectives.backends.udp_rendezvous import StunRendezvous
    from collectives.codec import Encoded
    from collectives.deadline import Deadline
    from collectives.rendezvous.stun_client import Joined

log = logging.getLogger(__name__)

COPY_LIMIT = 256 << 10
PEER_TIMEOUT_ENV = "COMFY_CLUSTER_UDP_PEER_TIMEOUT"
_CLOSE_LINGER_S = 10.0
_MAX_CHANNEL = (1 << 32) - 1


def channel_id(channel: str) -> int:
    """The core's channel number of a seam channel name (see the module docstring)."""
    if channel == COLLECTIVE_CHANNEL:
        return 0
    if channel == AGREEMENT_CHANNEL:
        return 1
    tag = int(channel[1:])
    number = 2 + (2 * tag if tag >= 0 else -2 * tag - 1)
    if number > _MAX_CHANNEL:
        raise InvalidArgumentError(f"tag={tag} is too large for the udp backend (|tag| < 2**30)")
    return number


class UdpBackend(ArenaCollectives):
    name = "udp"

    def __init__(
        self,
        rank: int,
        size: int,
        *,
        world: str,
        epoch: int,
        engine: Engine | None,
        announcer: Announcer | None = None,
        mode: str = "env",
    ) -> None:
        super().__init__(rank, size, world=world, epoch=epoch)
        self._engine = engine
        self._announcer = announcer
        self.mode = mode
        self._closed = False
        self._peer_timeout: float | None = None
        self._rendezvous: StunRendezvous | None = None
        # Messages are delivered by this process (eager posts sit in the core until
        # acknowledged): a program that exits without close() would take its last ones with it,
        # where a TCP engine's kernel still sends them.  Close (bounded linger) at exit instead.
        self._at_exit = close_at_exit(self)

    @classmethod
    def is_available(cls) -> bool:
        return _missing() is None

    @classmethod
    def unavailable_reason(cls) -> str:
        missing = _missing()
        if missing == "cryptography":
            return "the udp backend needs the cryptography package: pip install cryptography"
        return f"the udp transport core does not import here ({missing})"

    @classmethod
    def create(cls, config: BackendConfig) -> UdpBackend:
        environ: Mapping[str, str] = config.environ or os.environ
        # stun discovery without RANK: the rendezvous server assigns the rank and world size.
        config, environ = udp_rendezvous.claim_unranked(config, environ)
        rank, size = _rank_and_size(config, environ)
        deadline = time.monotonic() + config.timeout
        p = udp_peers.plan(rank, size, environ)
        key, make_world_key = _security(p, size, environ)
        if size == 1:
            return cls(rank, 1, world=config.world, epoch=config.epoch, engine=None)
        datagram = max_datagram_for(p.bind[0], environ)
        if p.mode == "stun" and not environ.get(MTU_ENV, "").strip():
            # Relayed datagrams cross the open Internet and the server's size cap.
            datagram = min(datagram, DEFAULT_DATAGRAM)
        sock = UdpSocket(*p.bind, max_datagram=datagram)
        if p.mode != "stun":
            # A dead peer's port answers ICMP port unreachable: noticed within a second, not
            # after the peer timeout (NAT probes to dead candidates draw such errors too).
            sock.report_unreachable()
        announcer: Announcer | None = None
        rendezvous: StunRendezvous | None = None
        nat: NatDriver | None = None
        try:
            me = sock.address
            table: dict[int, Address]
            if p.mode == "static":
                table = p.static
            elif p.mode == "stun":
                assert key is not None  # _security insists on it
                rendezvous, nat, table = udp_rendezvous.form(
                    p, sock, rank=rank, size=size, comm=_comm(config.world), epoch=config.epoch,
                    key=key, environ=environ, deadline=deadline, timeout=config.timeout,
                )  # fmt: skip
            elif p.mode == "broadcast":
                assert p.broadcast is not None
                announcer = Announcer(
                    p.broadcast, me=(p.advertise or me[0], me[1]), rank=rank, size=size,
                    comm=_comm(config.world), epoch=config.epoch, key=key,
                )  # fmt: skip
                announcer.start()
                table = announcer.wait(deadline, config.timeout)
            else:
                table, world_key = udp_peers.exchange_env(
                    p, me, rank=rank, size=size, world=config.world, store_key=key,
                    deadline=deadline, timeout=config.timeout, make_world_key=make_world_key,
                )  # fmt: skip
                if world_key is not None:
                    key = ClusterKey(world_key)
            backend = cls(
                rank, size, world=config.world, epoch=config.epoch, engine=None,
                announcer=announcer, mode=p.mode,
            )  # fmt: skip
            backend._peer_timeout = _peer_timeout(environ)
            backend._rendezvous = rendezvous
            backend._start(sock, table, key, deadline, config.timeout, nat=nat)
        except BaseException:
            if rendezvous is not None:
                rendezvous.stop(leave=True)
            if announcer is not None:
                announcer.stop()
            sock.close()
            raise
        if announcer is not None:
            announcer.stop()  # every peer is connected: nobody needs our address any more
        if rendezvous is not None:
            backend._watch(rendezvous)
        else:
            backend._probe_cma(config.timeout)
        return backend

    def _probe_cma(self, timeout: float) -> None:
        """Which peers share this host and may read each other (udp_cma), probed once.  Not
        under ``stun`` discovery: a rejoining rank there may come back with another pid.  Every
        other rank probes, one with cross-memory attach off too (with an empty descriptor)."""
        engine = self._engine
        assert engine is not None
        try:
            cma.probe_world(self, timeout, engine)
            udp_shm.attach_world(self, timeout, engine)
            self._arena = engine.arena
        except BaseException:
            self.abort("the same-host probe failed")
            self.close()
            raise

    def _watch(self, rendezvous: StunRendezvous) -> None:
        """Heartbeat the server and hand new candidates (and a rejoin's token) to the engine."""
        engine = self._engine
        assert engine is not None and engine.nat is not None
        nat = engine.nat

        def update(found: dict[int, tuple[bytes, list[tuple[Address, str]]]]) -> None:
            with engine.lock:
                now = engine.clock()
                for peer, (handle, cands) in found.items():
                    if peer in nat.paths.peers:
                        nat.paths.add_peer(peer, handle, now)
                        nat.paths.learn(peer, cands, now)
            engine.wake()

        def rejoined(joined: Joined) -> None:
            with engine.lock:
                nat.rejoined(joined.token, engine.clock())
            engine.wake()

        rendezvous.on_rejoin = rejoined
        rendezvous.start(update)

    def _start(
        self,
        sock: UdpSocket,
        table: Mapping[int, Address],
        key: ClusterKey | None,
        deadline: float,
        timeout: float,
        *,
        nat: NatDriver | None = None,
    ) -> None:
        from collectives.backends.udp_io import Engine
        from collectives.transport.config import TransportConfig
        from collectives.transport.endpoint import Endpoint

        tconfig = TransportConfig(max_datagram=sock.info.max_datagram, insecure=key is None)
        if self._peer_timeout is not None:
            tconfig = dataclasses.replace(
                tconfig,
                peer_timeout=self._peer_timeout,
                heartbeat_interval=min(tconfig.heartbeat_interval, self._peer_timeout / 4),
            )

        def make(allocate: Any) -> Endpoint:
            now = time.monotonic()
            ep = Endpoint(
                rank=self.rank, size=self.size, comm_id=self.comm_id, epoch=self.epoch,
                key=key, config=tconfig, now=now, allocate=allocate,
            )  # fmt: skip
            for peer in range(self.size):
                if peer != self.rank:
                    ep.add_peer(peer, table.get(peer), now)
            return ep

        engine = Engine(
            sock, make, rank=self.rank, size=self.size, codec=lambda: self.codec, nat=nat
        )
        self._engine = engine
        try:
            engine.wait_connected(deadline, timeout)
        except BaseException:
            engine.abort("the udp world did not form")
            engine.close(0.0)
            raise

    # -- the seam --------------------------------------------------------------------------------
    def _post(
        self,
        dst: int,
        channel: str,
        env: Envelope,
        msg: Encoded,
        dl: Deadline,
        *,
        hold: bool = False,
    ) -> None:
        engine = self._require_engine(dl.op)
        meta = env.pack() + bytes(msg.header)
        _send(engine, dst, channel_id(channel), meta, _bytes(msg), dl=dl, hold=hold)

    def _post_each(
        self, posts: Sequence[tuple[int, Encoded]], channel: str, env: Envelope, dl: Deadline
    ) -> None:
        # Far messages (udp_cma) first, without waiting: the receivers copy at the same time.
        if not posts:
            return  # a world of one: no engine, nothing to send
        engine = self._require_engine(dl.op)
        cid, envelope, far = channel_id(channel), env.pack(), []
        try:
            for dst, msg in posts:
                meta, body = envelope + bytes(msg.header), _bytes(msg)
                nbytes = sum(b.nbytes for b in body)
                if _far(engine, dst, nbytes):
                    far.append((dst, engine.post_far(dst, cid, meta, body, dl)))
                else:
                    _send_near(engine, dst, cid, meta, body, nbytes=nbytes, dl=dl)
        except BaseException:
            engine.forget_far(far)  # the op failed: nobody waits for their answers
            raise
        if far:
            engine.wait_far(far, dl)

    def _post_soon(self, dst: int, channel: str, env: Envelope, msg: Encoded, dl: Deadline) -> None:
        # Queued in the core without a send: the next post's frame carries it (one seal, one
        # datagram, one wakeup of the peer instead of two), or the next take sends it.
        self._post(dst, channel, env, msg, dl, hold=True)

    def _flush(self) -> None:
        if self._engine is not None:
            self._engine.flush()

    def _take(
        self, src: int, channel: str, dl: Deadline, into: memoryview | None = None
    ) -> tuple[Envelope, Encoded]:
        return self._require_engine(dl.op).take(src, channel_id(channel), dl, into)

    def _offer(self, src: int, channel: str, into: memoryview) -> Callable[[], None] | None:
        engine = self._engine
        if engine is None:
            return None
        key = (src, channel_id(channel))
        engine.offer([(*key, into)])
        return lambda: engine.withdraw([key])

    def _has_message(self, src: int, channel: str) -> bool:
        return self._engine is not None and self._engine.has_message(src, channel_id(channel))

    def _require_engine(self, op: str) -> Engine:
        if self._engine is None:
            raise InvalidArgumentError(f"{op} on rank {self.rank}: a world of one has no peers")
        return self._engine

    # -- lifetime and health ---------------------------------------------------------------------
    def abort(self, reason: str) -> None:
        if self._engine is not None:
            self._engine.abort(reason)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        atexit.unregister(self._at_exit)
        if self._announcer is not None:
            self._announcer.stop()
        if self._engine is not None:
            self._engine.close(_CLOSE_LINGER_S)
        if self._rendezvous is not None:
            self._rendezvous.stop(leave=True)

    def peers(self) -> dict[int, str]:
        engine = self._engine
        if engine is None:
            return {}
        with engine.lock:
            return {
                r: "lost" if r in engine.lost else "ok" if r in engine.connected else "unknown"
                for r in range(self.size)
                if r != self.rank
            }

    def paths(self) -> dict[int, dict[str, Any]]:
        """Each peer's network path: ``path`` (``direct``: a local address; ``punched``: through
        a NAT; ``relayed``: through the rendezvous server; ``direct`` for every peer outside
        ``stun`` discovery) and ``address`` (where its datagrams go)."""
        engine = self._engine
        if engine is None:
            return {}
        with engine.lock:
            if engine.nat is not None:
                return {r: dict(info) for r, info in engine.nat.peer_info().items()}
            return {r: {"path": "direct", "address": None} for r in engine.outstanding}

    def stats(self) -> dict[str, Any]:
        """The core's counters, the driver's, and what the socket got from the kernel."""
        # "compiled" (mypyc) or "python": collectives/_compiled.py
        out: dict[str, Any] = {"mode": self.mode, "core": _compiled.status()["mode"]}
        if self._engine is not None:
            out.update(self._engine.stats())
            out["same_host"] = sorted(self._engine.cma_sources)  # peers copied from (udp_cma)
            out["shm_peers"] = self._engine.shm_peers()  # peers written to through a ring
            if self._engine.nat is not None:
                out["paths"] = self.paths()
        out["arena"] = self._arena is not None  # small collectives in shared memory (udp_arena)
        out["arena_ops"] = self._arena_ops
        if self._announcer is not None:
            out.update(self._announcer.dropped)
        return out


def _send(
    engine: Engine,
    dst: int,
    channel: int,
    meta: bytes,
    body: list[memoryview],
    *,
    dl: Deadline,
    hold: bool = False,
) -> None:
    """One post (see the module docstring): a far message, a copy, or a borrowed body."""
    nbytes = sum(b.nbytes for b in body)
    if _far(engine, dst, nbytes):
        engine.send_far(dst, channel, meta, body, dl)  # udp_cma
        return
    _send_near(engine, dst, channel, meta, body, nbytes=nbytes, dl=dl, hold=hold)


def _send_near(
    engine: Engine,
    dst: int,
    channel: int,
    meta: bytes,
    body: list[memoryview],
    *,
    nbytes: int,
    dl: Deadline,
    hold: bool = False,
) -> None:
    """A post through the socket: ``body`` (``nbytes`` in all) copied, or borrowed until it is
    sealed."""
    if nbytes <= COPY_LIMIT:
        owned = [memoryview(b"".join(body))] if nbytes else []
        engine.send(dst, channel, meta, owned, hold=hold)
        return
    mid = engine.send(dst, channel, meta, body, borrowed=True)
    engine.wait_framed(dst, mid, dl)


def _far(engine: Engine, dst: int, nbytes: int) -> bool:
    """Whether a body of ``nbytes`` goes to ``dst`` as a far message (udp_cma): a large one, to
    a rank that may read this process."""
    return dst in engine.cma_readers and nbytes >= cma.MIN_BYTES


def _bytes(msg: Encoded) -> list[memoryview]:
    """``msg``'s buffers as flat byte views."""
    return [b if b.format == "B" and b.ndim == 1 else b.cast("B") for b in msg.buffers]


def _missing() -> str | None:
    """What keeps the backend from running here (an import), or None."""
    try:
        import cryptography  # noqa: F401
    except ImportError:
        return "cryptography"
    try:
        from collectives.transport import endpoint  # noqa: F401
    except ImportError as err:
        return str(err)
    return None


def _peer_timeout(environ: Mapping[str, str]) -> float | None:
    """``COMFY_CLUSTER_UDP_PEER_TIMEOUT``: seconds without an authenticated datagram before a
    peer is declared lost (heartbeats then go at least every quarter of it); None: the core's
    default."""
    raw = environ.get(PEER_TIMEOUT_ENV, "").strip()
    if not raw:
        return None
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not 0.2 <= value <= 3600:
        raise ConfigurationError(f"{PEER_TIMEOUT_ENV}={raw!r} must be seconds in 0.2..3600")
    return value


def _comm(world: str) -> int:
    from collectives.backends.envelope import comm_id

    return comm_id(world)


def _rank_and_size(config: BackendConfig, environ: Mapping[str, str]) -> tuple[int, int]:
    rank, size = config.rank, config.size
    env = read_rank_env(environ)
    if env is not None:
        rank = env.rank if rank is None else rank
        size = env.world_size if size is None else size
    if size is None:
        size = 1 if rank in (None, 0) else None
    if size is None or rank is None:
        if size == 1:
            return 0, 1
        raise ConfigurationError(
            "backend 'udp': RANK and WORLD_SIZE are not set: set them (or "
            "COMFY_CLUSTER_INSTANCE_INDEX/COUNT), pass rank=/size=, or launch with "
            "comfycluster-launch"
        )
    if size < 1 or not 0 <= rank < size:
        raise ConfigurationError(f"backend 'udp': rank {rank} is not in a world of size {size}")
    return rank, size


def _security(p: Plan, size: int, environ: Mapping[str, str]) -> tuple[ClusterKey | None, bool]:
    """The key the transport starts with, and whether rank 0 must make one for the world.

    None with False: insecure by explicit opt-in.  See the module docstring for the rules.
    """
    key = ClusterKey.from_env(environ)
    if key is not None:
        return key, False
    if p.mode == "stun":
        raise ConfigurationError(
            f"udp backend: {udp_peers.MODE_ENV}=stun needs {KEY_ENV}: the rendezvous server "
            "authenticates instances with it (and the transport is sealed with it)"
        )
    if insecure_allowed(environ):
        log.warning("udp backend: %s=1: the transport is neither encrypted nor authenticated",
                    INSECURE_ENV)  # fmt: skip
        return None, False
    for host in p.hosts:
        require_key(host, f"the udp backend ({p.mode} discovery)", environ)
    if size == 1:
        return ClusterKey.generate(), False
    if p.mode == "env":
        return None, True  # store_key None: the loopback store; the world key comes from it
    raise ConfigurationError(
        f"udp backend: {udp_peers.MODE_ENV}={p.mode} has no way to share a key, so it needs "
        f"{KEY_ENV} (the same secret on every rank) even on loopback, or {INSECURE_ENV}=1 on a "
        "network you trust"
    )


register_backend("udp", UdpBackend)

__all__ = ["COPY_LIMIT", "UdpBackend", "channel_id"]
