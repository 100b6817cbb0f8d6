"""``--join TOKEN``: claim this machine's ranks on the rendezvous server, then hand them over.

A machine that joins with an invite does not know its global ranks.  Before starting anything,
the launcher joins the cluster once per process it will start, with ``rank`` null (the server
assigns the lowest free ranks) or, with ``--node-rank-offset``, the ranks asked for, and no
candidates.  Each child then gets ``RANK``, ``WORLD_SIZE`` and ``COMFY_CLUSTER_INSTANCE_ID`` (the
claim's instance id): the udp backend's ``stun`` discovery joins again under that id, which
replaces the launcher's record with the rank's own (its socket's candidates, its heartbeats).

While the launcher runs, :class:`ClaimKeeper` heartbeats every claim (see there why also after
a child has taken its record over).  When the launcher ends, the claims are deleted (the
children are stopped by then).

Variables each rank sees (on top of the launcher's usual ones, docs/invite-and-doctor.md):
``COMFY_CLUSTER_BACKEND=udp`` (any other ``--backend`` is refused), ``COMFY_CLUSTER_KEY_FILE``
empty,
``COMFY_CLUSTER_REGISTRATION_MODE=stun``, ``COMFY_CLUSTER_STUN_SERVER``,
``COMFY_CLUSTER_CLUSTER_ID``, ``COMFY_CLUSTER_KEY``, ``COMFY_CLUSTER_INSTANCE_ID``, ``RANK``,
``WORLD_SIZE``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import re
import secrets
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import TextIO, TypeVar

from collectives.auth import KEY_FILE_ENV, ClusterKey
from collectives.errors import ConfigurationError, RendezvousError
from collectives.rendezvous.stun_client import (
    CA_FILE_ENV,
    INSTANCE_ID_ENV,
    InstanceExpiredError,
    Joined,
    StunClient,
    StunConflictError,
)

from .comfyui_config import ComfyClusterConfig
from .config import LaunchConfig, RankSlot
from .invite import Invite, parse_token

log = logging.getLogger(__name__)

JOIN_BACKEND = "udp"  # the backend whose ``stun`` discovery uses the rendezvous server
_POLL_S = 5.0  # one members long-poll of the keeper
_LABEL = re.compile(r"[^A-Za-z0-9_.-]+")


@dataclass
class Claim:
    """The ranks this launcher holds on the server, and the instance ids the children use."""

    invite: Invite
    world_size: int
    ranks: list[int]
    instance_ids: dict[int, str]  # rank -> instance id
    heartbeat_interval_s: float
    client: StunClient = field(repr=False)

    def env(self) -> dict[str, str]:
        """Variables every child gets: the invite's, and an empty ``COMFY_CLUSTER_KEY_FILE``
        (a key file inherited from this shell would clash with the invite's key)."""
        return {**self.invite.env(), KEY_FILE_ENV: ""}

    def rank_env(self, rank: int) -> dict[str, str]:
        return {INSTANCE_ID_ENV: self.instance_ids[rank]}


def load_invite(token: str, environ: Mapping[str, str] | None = None) -> Invite:
    """``--join``'s value: the token itself, or ``@FILE`` holding it (keeps it out of ``ps``)."""
    text = token.strip()
    if text.startswith("@"):
        path = text[1:]
        try:
            with open(path, encoding="utf-8") as f:
                text = f.read(8192)
        except OSError as err:
            raise ConfigurationError(
                f"--join @{path}: cannot read the token file ({err.strerror or err})"
            ) from None
    return parse_token(text)


def client_for(invite: Invite, environ: Mapping[str, str], timeout: float = 10.0) -> StunClient:
    ca = (environ.get(CA_FILE_ENV) or "").strip()
    return StunClient(
        invite.server,
        invite.cluster_id,
        ClusterKey(invite.key),
        timeout=timeout,
        verify=ca or True,
        environ=environ,
    )


def claim_ranks(
    invite: Invite,
    nproc: int,
    *,
    world_size: int | None = None,
    first_rank: int | None = None,
    environ: Mapping[str, str] | None = None,
    timeout: float = 10.0,
) -> Claim:
    """Claim ``nproc`` ranks (see the module docstring); ConfigurationError naming the option
    to change when the cluster cannot take them."""
    env = os.environ if environ is None else environ
    client = client_for(invite, env, timeout)
    try:
        members = client.members()  # also checks the key before anything is claimed
        size = world_size or invite.world_size or members.world_size
        if size is None:
            raise ConfigurationError(
                f"cluster {invite.cluster_id!r} has no world size yet: pass --world-size W (the "
                "ranks over all machines), or make the invite with --world-size"
            )
        if members.world_size is not None and size != members.world_size:
            raise ConfigurationError(
                f"--world-size {size} differs from cluster {invite.cluster_id!r}'s world size "
                f"{members.world_size} on the rendezvous server: drop --world-size or fix it"
            )
        if first_rank is not None and first_rank + nproc > size:
            raise ConfigurationError(
                f"--node-rank-offset {first_rank} + --nproc {nproc} exceeds the world size "
                f"{size}: fix one of them"
            )
        label = _host_label()
        tag = secrets.token_hex(3)
        ids: dict[int, str] = {}
        interval = 20.0
        try:
            for i in range(nproc):
                instance = f"{label}-{tag}-{i}"
                rank = None if first_rank is None else first_rank + i
                joined = _join(client, instance, rank, size, nproc=nproc, held=ids)
                ids[joined.rank] = instance
                interval = joined.heartbeat_interval_s
        except BaseException:
            release(client, ids.values())
            raise
        return Claim(invite, size, sorted(ids), ids, interval, client)
    except BaseException:
        client.close()
        raise


def _join(
    client: StunClient, instance: str, rank: int | None, size: int, *, nproc: int,
    held: Mapping[int, str],
) -> Joined:  # fmt: skip
    try:
        joined = client.join(instance, rank=rank, world_size=size, candidates=[], role="follower")
    except StunConflictError as err:
        what = f"rank {rank}" if rank is not None else f"a rank ({len(held)} of {nproc} claimed)"
        raise ConfigurationError(
            f"the rendezvous server refused {what} of cluster {client.cluster_id!r} ({err}): "
            "the cluster is full or the rank is taken: start fewer processes (--nproc), pick "
            "other ranks (--node-rank-offset), or stop the machine holding them"
        ) from None
    return joined


class ClaimKeeper:
    """Heartbeats every claim while the launcher runs; :meth:`release` ends it and deletes every
    claim.

    Also after a child has taken its record over: a rank waiting for the rest of the world
    heartbeats nothing itself until the world has formed, and a home PC may join minutes after
    the cloud's ranks.  A record that is gone once its rank had it (the rank left) is dropped; a
    claim that expired before its rank took it (a restarted server) is claimed again.
    """

    def __init__(self, claim: Claim) -> None:
        self.claim = claim
        self.live = dict(claim.instance_ids)  # rank -> instance id, still heartbeaten
        self.pending = set(claim.instance_ids.values())
        self.handed_over: dict[str, float] = {}  # instance id -> s after start it was taken
        self._started = time.monotonic()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="join-claims", daemon=True)

    def start(self) -> ClaimKeeper:
        self._thread.start()
        return self

    def _run(self) -> None:
        beat_every = max(min(self.claim.heartbeat_interval_s, 10.0), 0.5)
        next_beat = time.monotonic() + beat_every
        generation: int | None = None
        while self.live and not self._stop.is_set():
            try:
                wait = max(min(_POLL_S, next_beat - time.monotonic()), 0.0)
                if self.pending:
                    generation = self._watch(generation, wait)
                else:
                    self._stop.wait(wait)
                if time.monotonic() >= next_beat and not self._stop.is_set():
                    self._beat()
                    next_beat = time.monotonic() + beat_every
            except RendezvousError as err:
                if self._stop.is_set():
                    return
                log.warning("--join: keeping the claimed ranks alive failed: %s", err)
                self._stop.wait(1.0)

    def _watch(self, generation: int | None, wait: float) -> int:
        """Long-poll the members; a record listing candidates has been taken by its rank."""
        members = self.claim.client.members(after_generation=generation, timeout_s=wait)
        for m in members.members:
            if m.instance_id in self.pending and m.candidates:
                self.pending.discard(m.instance_id)
                self.handed_over[m.instance_id] = time.monotonic() - self._started
        return members.generation

    def _beat(self) -> None:
        client = self.claim.client
        for rank, instance in list(self.live.items()):
            try:
                client.heartbeat(instance)
            except InstanceExpiredError:
                if instance not in self.pending:
                    del self.live[rank]  # its rank left (or will join again itself)
                    continue
                log.info("--join: the claim of rank %d expired on the server; claiming again", rank)
                client.join(instance, rank=rank, world_size=self.claim.world_size, candidates=[],
                            role="follower")  # fmt: skip

    def release(self) -> None:
        self._stop.set()
        release(self.claim.client, self.claim.instance_ids.values())
        self.claim.client.close()  # also ends a long-poll in flight
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(timeout=1.0)

    def __enter__(self) -> ClaimKeeper:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.release()


def release(client: StunClient, instances: Iterable[str]) -> None:
    """Delete claims; a record already gone (the child left) is not an error."""
    for instance in list(instances):
        with contextlib.suppress(RendezvousError):
            client.leave(instance)


def _host_label() -> str:
    name = _LABEL.sub("-", socket.gethostname()).strip("-.")[:40]
    return name or "host"


ConfigT = TypeVar("ConfigT", LaunchConfig, ComfyClusterConfig)


def check_backend(backend: str | None) -> None:
    if backend is not None and backend.strip().lower() != JOIN_BACKEND:
        raise ConfigurationError(
            f"--join works with the {JOIN_BACKEND} backend (its stun discovery uses the "
            f"rendezvous server), not --backend {backend}: drop --backend"
        )


@contextlib.contextmanager
def joining(
    token: str,
    *,
    nproc: int,
    world_size: int | None,
    first_rank: int | None,
    backend: str | None,
    log_to: TextIO | None = None,
) -> Iterator[Claim]:
    """Claim the ranks for ``--join TOKEN`` and keep them until the block ends (see the module
    docstring); the claims are deleted on the way out, whatever happened."""
    check_backend(backend)
    invite = load_invite(token)
    claim = claim_ranks(invite, nproc, world_size=world_size, first_rank=first_rank)
    keeper = ClaimKeeper(claim).start()
    try:
        out = sys.stderr if log_to is None else log_to
        print(
            f"[launcher] joined cluster {invite.cluster_id!r} at {invite.server} as rank(s) "
            f"{', '.join(map(str, claim.ranks))} of {claim.world_size}",
            file=out,
            flush=True,
        )
        yield claim
    finally:
        keeper.release()


def apply_claim(config: ConfigT, claim: Claim) -> ConfigT:
    """``config`` with the claimed ranks, the world size and the stun discovery variables (the
    invite's win over ``--env``: a second server or key could only break the join)."""
    prior = config.per_rank_env

    def per_rank(slot: RankSlot) -> dict[str, str]:
        env = dict(prior(slot)) if prior is not None else {}
        env.update(claim.rank_env(slot.rank))
        return env

    return dataclasses.replace(
        config,
        ranks=list(claim.ranks),
        world_size=claim.world_size,
        rank_offset=0,
        backend=config.backend or JOIN_BACKEND,
        env={**config.env, **claim.env()},
        per_rank_env=per_rank,
    )


__all__ = [
    "JOIN_BACKEND",
    "Claim",
    "ClaimKeeper",
    "apply_claim",
    "check_backend",
    "claim_ranks",
    "client_for",
    "joining",
    "load_invite",
]


def run_joined(
    config: ConfigT, token: str | None, first_rank: int | None, run: Callable[[ConfigT], int]
) -> int:
    """``run(config)``; with an invite ``token``, on the ranks claimed from its server, the
    claims held (heartbeated) while it runs and released after."""
    if token is None:
        return run(config)
    with joining(
        token, nproc=config.nproc, world_size=config.world_size, first_rank=first_rank,
        backend=config.backend,
    ) as claim:  # fmt: skip
        return run(apply_claim(config, claim))
