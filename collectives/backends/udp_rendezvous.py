"""``stun`` discovery of the udp backend: the rendezvous server's HTTP side
(docs/rendezvous-protocol.md).

:class:`StunRendezvous` joins the cluster with the udp socket's local candidates, waits until
every rank of the world is a member whose relay address the server knows (its reflexive
candidate is listed: its authenticated STUN binding arrived), then keeps the instance alive
(:class:`~collectives.rendezvous.stun_client.Heartbeat`) and long-polls the member list so new
candidates (a reflexive address that moved after a NAT rebinding) reach the path selection.
Candidate host names (``<pod>.runpod.internal``) are resolved here, on this thread, never on
the IO thread.

Without ``RANK`` (:func:`claim_unranked`) the instance first joins with ``rank`` null and no
candidates: the server assigns the lowest free rank and says the world size (the cluster's, set
by the first member that gave one, an invite's ``--world-size`` or the server's
``COMFY_CLUSTER_STUN_WORLD_SIZE``); the world then forms as if ``RANK``/``WORLD_SIZE`` had said
so, under the same instance id: form() takes that record over (a heartbeat gives it the socket's
candidates) rather than joining again, which would make the server forget the world size of a
cluster whose only member it is.

A restarted server (soft state) answers the next heartbeat with 404: the instance joins again
under the same instance id and rank, the NAT driver binds at once with the new token, and the
relay forwards again as soon as the server has seen that binding.
"""

from __future__ import annotations

import logging
import socket
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

from collectives.errors import ConfigurationError, RendezvousError, RendezvousTimeoutError
from collectives.rendezvous.stun_client import (
    CLUSTER_ID_ENV,
    INSTANCE_ID_ENV,
    SERVER_ENV,
    Candidate,
    Heartbeat,
    Joined,
    Members,
    StunClient,
)

if TYPE_CHECKING:
    from collectives.auth import ClusterKey
    from collectives.backends.base import BackendConfig
    from collectives.backends.udp_nat import NatDriver
    from collectives.backends.udp_peers import Plan
    from collectives.backends.udp_socket import UdpSocket

log = logging.getLogger(__name__)

Address = tuple[str, int]
CandidateList = list[tuple[Address, str]]
_POLL_S = 10.0  # one members long-poll (the server caps it at 30 s)
# Records claim_unranked() made, by (server, cluster, instance id), for form() to take over.
_claims: dict[tuple[str, str, str], Joined] = {}
_claims_lock = threading.Lock()


class StunRendezvous:
    """Join, wait for the world, then watch it (see the module docstring)."""

    def __init__(
        self,
        client: StunClient,
        instance_id: str,
        *,
        rank: int,
        size: int,
        candidates: list[Candidate],
    ) -> None:
        self.client = client
        self.instance_id = instance_id
        self.rank = rank
        self.size = size
        self.candidates = candidates
        self.joined: Joined | None = None
        self.members: Members | None = None
        self._heartbeat: Heartbeat | None = None
        self._stop = threading.Event()
        self._watcher: threading.Thread | None = None
        self._resolved: dict[str, str | None] = {}
        self.joined_at = 0.0
        self.rejoins = 0
        # Called (on the heartbeat thread) after a rejoin: a new token and handle.
        self.on_rejoin: Callable[[Joined], None] | None = None

    def join(self) -> Joined:
        self.joined = self.client.join(
            self.instance_id, rank=self.rank, world_size=self.size, candidates=self.candidates
        )
        self.joined_at = time.monotonic()
        size = self.joined.world_size
        if self.joined.rank != self.rank or size not in (None, self.size):
            raise RendezvousError(
                f"the rendezvous server placed instance {self.instance_id} as rank "
                f"{self.joined.rank} of {self.joined.world_size}, not {self.rank} of {self.size}: "
                f"is another world using {CLUSTER_ID_ENV}={self.client.cluster_id!r}?"
            )
        return self.joined

    def adopt(self, joined: Joined) -> Joined:
        """Take over the record :func:`claim_unranked` made: the socket's candidates go to the
        server with a heartbeat."""
        self.joined, self.joined_at = joined, time.monotonic()
        self.client.heartbeat(self.instance_id, self.candidates)
        return joined

    def wait_world(self, deadline: float, timeout: float) -> Members:
        """Every rank joined and bound (its reflexive candidate is listed)."""
        generation: int | None = None
        while True:
            left = deadline - time.monotonic()
            members = self.client.members(
                after_generation=generation, timeout_s=max(min(left, _POLL_S), 0.0)
            )
            self.members = members
            missing = self._missing(members)
            if not missing:
                return members
            if time.monotonic() >= deadline:
                raise RendezvousTimeoutError(
                    f"udp stun discovery on rank {self.rank} timed out after {timeout:g} s: "
                    f"rank(s) {', '.join(map(str, missing))} of {self.size} never joined (or never "
                    f"reached the server's UDP port) at {SERVER_ENV}={self.client.base} as "
                    f"cluster {self.client.cluster_id!r}; start them with the same "
                    f"{CLUSTER_ID_ENV}, WORLD_SIZE and key, or raise COMFY_CLUSTER_TIMEOUT"
                )
            generation = members.generation

    def _missing(self, members: Members) -> list[int]:
        table = members.by_rank()
        return [
            r for r in range(self.size)
            if r not in table or not any(c.kind == "reflexive" for c in table[r].candidates)
        ]  # fmt: skip

    def candidates_of(self, members: Members) -> dict[int, tuple[bytes, CandidateList]]:
        """Each peer's relay handle and direct candidates (host names resolved)."""
        out: dict[int, tuple[bytes, CandidateList]] = {}
        for m in members.members:
            if m.rank == self.rank or not 0 <= m.rank < self.size:
                continue
            cands: CandidateList = []
            for c in m.candidates:
                host = self._resolve(c.host)
                if host is not None and 0 < c.port < 65536:
                    cands.append(((host, c.port), c.kind))
            out[m.rank] = (m.handle, cands)
        return out

    def _resolve(self, host: str) -> str | None:
        if host not in self._resolved:
            try:
                infos = socket.getaddrinfo(host, None, socket.AF_INET, socket.SOCK_DGRAM)
                self._resolved[host] = str(infos[0][4][0])
            except (OSError, UnicodeError):
                log.info("udp nat: candidate host %r does not resolve; skipped", host)
                self._resolved[host] = None
        return self._resolved[host]

    def start_heartbeat(self) -> None:
        """Heartbeat from now on: from the join, not from the world's forming, or a rank that
        waits longer than the server's TTL for a late peer expires there, and the late peer
        never sees it."""
        assert self.joined is not None
        if self._heartbeat is None:
            self._heartbeat = Heartbeat(
                self.client, self.instance_id, self.joined.heartbeat_interval_s, self._rejoin
            )
            self._heartbeat.start()

    def start(self, update: Callable[[dict[int, tuple[bytes, CandidateList]]], None]) -> None:
        """Heartbeat, and long-poll the members, handing their candidates to ``update``."""
        self.start_heartbeat()
        self._watcher = threading.Thread(
            target=self._watch, args=(update,), name="stun-members", daemon=True
        )
        self._watcher.start()

    def _rejoin(self) -> None:
        joined = self.join()
        self.rejoins += 1
        log.info("udp nat: rank %d joined %s again as %s", self.rank, self.client.base,
                 self.instance_id)  # fmt: skip
        if self.on_rejoin is not None:
            self.on_rejoin(joined)

    def _watch(self, update: Callable[[dict[int, tuple[bytes, CandidateList]]], None]) -> None:
        generation = self.members.generation if self.members is not None else None
        while not self._stop.is_set():
            try:
                members = self.client.members(after_generation=generation, timeout_s=_POLL_S)
            except RendezvousError as err:
                if self._stop.is_set():
                    return  # stop() closed the client under the poll
                log.info("udp nat: members poll failed: %s", err)
                self._stop.wait(1.0)
                continue
            if self._stop.is_set():
                return
            if members.generation != generation:
                generation = members.generation
                self.members = members
                update(self.candidates_of(members))

    def stop(self, leave: bool = True) -> None:
        self._stop.set()
        if self._heartbeat is not None:
            self._heartbeat.stop()
        if leave and self.joined is not None:
            try:
                self.client.leave(self.instance_id)
            except RendezvousError as err:
                log.info("udp nat: leave failed: %s", err)
        self.client.close()  # ends a long-poll in flight
        if self._watcher is not None and self._watcher is not threading.current_thread():
            self._watcher.join(timeout=0.2)  # a daemon: a long-poll in flight ends alone


@dataclass(frozen=True)
class Claimed:
    """What the server assigned an instance that joined without ``RANK``."""

    rank: int
    size: int
    instance_id: str


def claim_unranked(
    config: BackendConfig, environ: Mapping[str, str]
) -> tuple[BackendConfig, Mapping[str, str]]:
    """``stun`` discovery without ``RANK`` (or without a world size): ``config`` and ``environ``
    with the rank and world size the server assigned and the instance id it holds them under
    (see the module docstring).  Unchanged in any other case."""
    import dataclasses

    from collectives.auth import ClusterKey
    from collectives.backends.udp_peers import MODE_ENV
    from collectives.rendezvous.env import read_rank_env

    if (environ.get(MODE_ENV) or "").strip().lower() != "stun":
        return config, environ
    rank, size = config.rank, config.size
    if rank is None or size is None:
        found = read_rank_env(environ)
        if found is not None:
            rank = found.rank if rank is None else rank
            size = found.world_size if size is None else size
    if rank is not None and size is not None:
        return config, environ
    client = StunClient.from_env(environ, ClusterKey.from_env(environ))
    try:
        claimed = _claim(client, environ, rank, size)
    finally:
        client.close()
    log.info("udp nat: the rendezvous server assigned rank %d of %d (instance %s)",
             claimed.rank, claimed.size, claimed.instance_id)  # fmt: skip
    config = dataclasses.replace(config, rank=claimed.rank, size=claimed.size)
    return config, {**environ, INSTANCE_ID_ENV: claimed.instance_id}


def _claim(
    client: StunClient, environ: Mapping[str, str], rank: int | None, size: int | None
) -> Claimed:
    import secrets

    from collectives.rendezvous.stun_client import check_instance_id

    instance = environ.get(INSTANCE_ID_ENV, "").strip()
    instance = check_instance_id(instance) if instance else f"inst-{secrets.token_hex(6)}"
    members = client.members()
    held = next((m for m in members.members if m.instance_id == instance), None)
    size = size if size is not None else members.world_size
    if held is not None and size is not None and rank in (None, held.rank):
        # A record under our id (a launcher's claim): its rank is ours, form() joins under it.
        return Claimed(held.rank, size, instance)
    # No candidates yet: the socket does not exist; form() gives them to this record.
    joined = client.join(instance, rank=rank, world_size=size, candidates=[])
    if joined.world_size is None:
        client.leave(instance)
        raise ConfigurationError(
            f"{INSTANCE_ID_ENV}={instance} joined cluster {client.cluster_id!r} without RANK, but "
            "neither this instance nor the rendezvous server knows the world size: set RANK and "
            "WORLD_SIZE, pass size= to collectives.init, make the invite with --world-size, or "
            "start the server with COMFY_CLUSTER_STUN_WORLD_SIZE"
        )
    if joined.world_size == 1:
        client.leave(instance)  # a world of one needs no server
    else:
        with _claims_lock:
            _claims[(client.base, client.cluster_id, instance)] = joined
    return Claimed(joined.rank, joined.world_size, instance)


def form(
    plan: Plan,
    sock: UdpSocket,
    *,
    rank: int,
    size: int,
    comm: int,
    epoch: int,
    key: ClusterKey,
    environ: Mapping[str, str],
    deadline: float,
    timeout: float,
) -> tuple[StunRendezvous, NatDriver, dict[int, Address]]:
    """``stun`` discovery up to a world whose every peer is reachable over the relay: join,
    bind (STUN from ``sock``), wait for every rank; the rendezvous (not yet watching), the NAT
    driver for the engine and the core's address table (virtual addresses)."""
    from collectives.backends.udp_nat import (
        Binding,
        NatDriver,
        bind_now,
        direct_allowed,
        keepalive_s,
        new_instance_id,
    )
    from collectives.backends.udp_nat_wire import ProbeCodec
    from collectives.backends.udp_paths import Paths, virtual
    from collectives.rendezvous.stun_client import INSTANCE_ID_ENV

    client = StunClient.from_env(environ, key)
    me = sock.address
    hosts = [h for h in (plan.advertise, me[0]) if h and h not in ("0.0.0.0", "::")]
    candidates = [Candidate(h, me[1]) for h in dict.fromkeys(hosts)]
    instance = environ.get(INSTANCE_ID_ENV, "").strip() or new_instance_id(rank)
    rdz = StunRendezvous(client, instance, rank=rank, size=size, candidates=candidates)
    with _claims_lock:
        claimed = _claims.pop((client.base, client.cluster_id, instance), None)
    try:
        if claimed is not None and (claimed.rank, claimed.world_size) == (rank, size):
            joined = rdz.adopt(claimed)
        else:
            joined = rdz.join()
        if joined.udp is None:
            raise RendezvousError(
                f"the rendezvous server {client.base} runs without its UDP port (STUN and "
                "relay), which the udp backend needs: start it with --udp-port"
            )
        rdz.start_heartbeat()
        server = _server_udp(joined.udp, client.base)
        binding = Binding(server, f"{client.cluster_id}:{instance}", joined.token)
        bind_now(sock.sock, binding, deadline)
        members = rdz.wait_world(deadline, timeout)
        paths = Paths(rank, ProbeCodec(key, comm, epoch), allow_direct=direct_allowed(environ))
        now = time.monotonic()
        for peer, (handle, cands) in rdz.candidates_of(members).items():
            paths.add_peer(peer, handle, now)
            paths.learn(peer, cands, now)
        nat = NatDriver(paths, binding, keepalive=keepalive_s(environ), now=now)
    except BaseException:
        rdz.stop(leave=True)
        raise
    took = time.monotonic() - rdz.joined_at
    log.info("udp nat: rank %d joined %s as %s, reflexive %s, world in %.3f s", rank,
             client.base, instance, binding.reflexive, took)  # fmt: skip
    return rdz, nat, {peer: virtual(peer) for peer in range(size) if peer != rank}


def _server_udp(udp: Address, base: str) -> Address:
    """The server's STUN/relay address, numeric (datagrams are matched against it)."""
    from urllib.parse import urlsplit

    host = udp[0]
    if host in ("", "0.0.0.0", "::"):
        host = urlsplit(base).hostname or "127.0.0.1"
    try:
        infos = socket.getaddrinfo(host, udp[1], socket.AF_INET, socket.SOCK_DGRAM)
    except (OSError, UnicodeError) as err:
        raise RendezvousError(
            f"the rendezvous server's UDP address {host!r} does not resolve ({err})"
        ) from None
    return str(infos[0][4][0]), udp[1]


__all__ = ["Claimed", "StunRendezvous", "claim_unranked", "form"]
