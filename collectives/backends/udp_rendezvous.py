"""``stun`` discovery of the udp backend: the rendezvous server's HTTP side
(docs/rendezvous-protocol.md).

:class:`StunRendezvous` joins the cluster with the udp socket's local candidates, waits until
every rank of the world is a member whose relay address the server knows (its reflexive
candidate is listed: its authenticated STUN binding arrived), then keeps the instance alive
(:class:`~collectives.rendezvous.stun_client.Heartbeat`) and long-polls the member list so new
candidates (a reflexive address that moved after a NAT rebinding) reach the path selection.
Candidate host names (``<pod>.runpod.internal``) are resolved here, on this thread, never on
the IO thread.
"""

from __future__ import annotations

import logging
import socket
import threading
import time
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING

from collectives.errors import RendezvousError, RendezvousTimeoutError
from collectives.rendezvous.stun_client import (
    CLUSTER_ID_ENV,
    SERVER_ENV,
    Candidate,
    Heartbeat,
    Joined,
    Members,
    StunClient,
)

if TYPE_CHECKING:
    from collectives.auth import ClusterKey
    from collectives.backends.udp_nat import NatDriver
    from collectives.backends.udp_peers import Plan
    from collectives.backends.udp_socket import UdpSocket

log = logging.getLogger(__name__)

Address = tuple[str, int]
CandidateList = list[tuple[Address, str]]
_POLL_S = 10.0  # one members long-poll (the server caps it at 30 s)


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

    def start(self, update: Callable[[dict[int, tuple[bytes, CandidateList]]], None]) -> None:
        """Heartbeat, and long-poll the members, handing their candidates to ``update``."""
        assert self.joined is not None
        self._heartbeat = Heartbeat(
            self.client, self.instance_id, self.joined.heartbeat_interval_s, self._rejoin
        )
        self._heartbeat.start()
        self._watcher = threading.Thread(
            target=self._watch, args=(update,), name="stun-members", daemon=True
        )
        self._watcher.start()

    def _rejoin(self) -> None:
        joined = self.join()
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
    try:
        joined = rdz.join()
        if joined.udp is None:
            raise RendezvousError(
                f"the rendezvous server {client.base} runs without its UDP port (STUN and "
                "relay), which the udp backend needs: start it with --udp-port"
            )
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


__all__ = ["StunRendezvous", "form"]
