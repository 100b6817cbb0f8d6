"""What to launch: one dataclass, checked up front so a mistake costs one line, not N crashes."""

from __future__ import annotations

import dataclasses
import errno
import math
import os
import socket
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

from collectives.auth import ClusterKey, require_key
from collectives.errors import ConfigurationError
from collectives.rendezvous.store import Address, resolve


@dataclass(frozen=True)
class RankSlot:
    """One process this node starts: its global and node-local place in the job."""

    rank: int
    local_rank: int
    world_size: int
    local_world_size: int


def is_multi_node(nproc: int, rank_offset: int, world_size: int | None) -> bool:
    """Whether a launcher starting ``nproc`` ranks from ``rank_offset`` of ``world_size`` (None:
    just its own) leaves some ranks to other launchers."""
    total = world_size if world_size is not None else rank_offset + nproc
    return rank_offset > 0 or total > nproc


def lacks_cluster_key(environ: Mapping[str, str]) -> bool:
    """Whether ranks started with ``environ`` would have no cluster key (a blank one is none)."""
    return ClusterKey.from_env(environ) is None


@dataclass
class LaunchConfig:
    """Start ``nproc`` copies of ``command`` as ranks ``rank_offset .. rank_offset+nproc-1``.

    ``world_size`` defaults to ``nproc`` (one node).  For several nodes, run the launcher once per
    node with the same ``world_size``, ``master_addr`` and ``master_port`` and disjoint offsets.

    ``per_rank_env`` and ``per_rank_command`` customise single ranks (a port or GPU per rank, say);
    they run in the launcher, once per rank, before anything starts.

    ``timeout_s`` is enforced by :func:`launchers.launch.launch`; code that uses ``start`` directly
    passes its own timeout to ``LaunchedGroup.wait``.

    ``cluster_key`` is the ``COMFY_CLUSTER_KEY`` the ranks get when the environment sets none
    (see :func:`with_cluster_key`); it never shows in ``repr``.
    """

    nproc: int
    command: list[str]
    backend: str | None = None
    master_addr: str = "127.0.0.1"
    master_port: int | None = None  # None: pick a free port on master_addr
    rank_offset: int = 0
    world_size: int | None = None
    env: dict[str, str] = field(default_factory=dict)
    prefix_output: bool = True
    kill_grace_s: float = 5.0
    timeout_s: float | None = None
    cwd: str | None = None
    per_rank_env: Callable[[RankSlot], Mapping[str, str]] | None = None
    per_rank_command: Callable[[RankSlot], Sequence[str]] | None = None
    cluster_key: str | None = field(default=None, repr=False)
    # Explicit global ranks of this node's processes, in order (a ``--join`` launch: the
    # rendezvous server assigned them, not necessarily consecutive); overrides ``rank_offset``.
    ranks: list[int] | None = None

    @property
    def total_world_size(self) -> int:
        return self.world_size if self.world_size is not None else self.rank_offset + self.nproc

    @property
    def runs_rank0(self) -> bool:
        return self.rank_offset == 0

    @property
    def multi_node(self) -> bool:
        """Whether other launchers start some of the ranks (they must share one key)."""
        return is_multi_node(self.nproc, self.rank_offset, self.world_size)

    def slots(self) -> list[RankSlot]:
        world = self.total_world_size
        if self.ranks is not None:
            return [RankSlot(r, i, world, self.nproc) for i, r in enumerate(self.ranks)]
        return [RankSlot(self.rank_offset + i, i, world, self.nproc) for i in range(self.nproc)]

    def validate(self) -> None:
        """Raise :class:`ConfigurationError` (one line, with the fix) for the first problem."""
        self._validate_counts()
        self._validate_times()
        if isinstance(self.command, str):
            raise ConfigurationError(
                f"command {self.command!r} is a string: pass a list of arguments, "
                f"e.g. {self.command.split()!r}"
            )
        if not self.command or not self.command[0]:
            raise ConfigurationError(
                "no command given: put the program after '--', "
                "e.g. comfycluster-launch --nproc 2 -- python train.py"
            )
        if self.backend is not None and not self.backend.strip():
            raise ConfigurationError("--backend is empty: name a backend or leave it unset")
        for key in self.env:
            if not key or "=" in key or "\0" in key:
                raise ConfigurationError(f"environment name {key!r} is invalid: use NAME=VALUE")
        if self.cwd is not None and not os.path.isdir(self.cwd):
            raise ConfigurationError(f"cwd {self.cwd!r} is not a directory: fix the path")
        self._validate_master()
        check_cluster_key(self.master_addr, self.multi_node, {**os.environ, **self.env})

    def _validate_counts(self) -> None:
        if self.nproc < 1:
            raise ConfigurationError(
                f"--nproc {self.nproc} must be at least 1: pass the number of processes to start"
            )
        if self.ranks is not None:
            self._validate_ranks()
            return
        if self.rank_offset < 0:
            raise ConfigurationError(
                f"--node-rank-offset {self.rank_offset} is negative: "
                f"pass the global rank of this node's first process"
            )
        if self.world_size is None:
            if self.rank_offset > 0:
                raise ConfigurationError(
                    f"--node-rank-offset {self.rank_offset} needs --world-size: "
                    f"pass the total number of ranks over all nodes"
                )
            return
        last = self.rank_offset + self.nproc - 1
        if last >= self.world_size:
            raise ConfigurationError(
                f"--node-rank-offset {self.rank_offset} + --nproc {self.nproc} exceeds "
                f"--world-size {self.world_size}: this node would run ranks "
                f"{self.rank_offset}..{last} of 0..{self.world_size - 1}; fix one of them"
            )

    def _validate_ranks(self) -> None:
        assert self.ranks is not None
        if self.world_size is None or len(self.ranks) != self.nproc:
            raise ConfigurationError(
                f"explicit ranks {self.ranks} need --world-size and one rank per process "
                f"(--nproc {self.nproc})"
            )
        bad = [r for r in self.ranks if not 0 <= r < self.world_size]
        if bad or len(set(self.ranks)) != len(self.ranks):
            raise ConfigurationError(
                f"explicit ranks {self.ranks} must be distinct and in 0..{self.world_size - 1}"
            )

    def _validate_times(self) -> None:
        if not math.isfinite(self.kill_grace_s) or self.kill_grace_s < 0:
            raise ConfigurationError(
                f"--kill-grace {self.kill_grace_s} must be a finite number of seconds >= 0"
            )
        if self.timeout_s is not None and not (
            math.isfinite(self.timeout_s) and self.timeout_s > 0
        ):
            raise ConfigurationError(
                f"--timeout {self.timeout_s} must be a positive number of seconds, "
                f"or unset for no limit"
            )

    def _validate_master(self) -> None:
        if not self.master_addr:
            raise ConfigurationError("--master-addr is empty: pass the host that runs rank 0")
        if self.master_port is None:
            if not self.runs_rank0:
                # A free port here says nothing about the master node: all nodes must agree.
                raise ConfigurationError(
                    "--master-port is required when this node does not run rank 0: "
                    "pass the port used on the node with --node-rank-offset 0"
                )
            return
        if not 1 <= self.master_port <= 65535:
            raise ConfigurationError(
                f"--master-port {self.master_port} is out of range: pass a TCP port in 1..65535"
            )
        # Only the node running rank 0 listens on the port; elsewhere it is meant to be in use.
        if self.runs_rank0 and port_in_use(self.master_addr, self.master_port):
            raise ConfigurationError(
                f"MASTER_PORT {self.master_port} is in use on {self.master_addr}: pick another "
                f"with --master-port or leave it unset to choose a free one"
            )


def check_cluster_key(master_addr: str, multi_node: bool, environ: Mapping[str, str]) -> None:
    """Refuse a multi-node launch on a non-loopback master without a shared cluster key.

    A single-node launch gets a key made up for it (:func:`with_cluster_key`); nodes started by
    separate launchers cannot agree on one that way, so the user must set it on every node.
    """
    if multi_node:
        require_key(master_addr, "this multi-node launch (--master-addr)", environ)
    else:
        ClusterKey.from_env(environ)  # a key that is set but unusable: one line now


def with_cluster_key(config: LaunchConfig, base: Mapping[str, str] | None = None) -> LaunchConfig:
    """``config`` with a fresh random ``cluster_key`` when its ranks would otherwise get none.

    Only where this launcher starts the whole world: with several launchers each would invent a
    different key.  A key already in the environment (``base``, default ``os.environ``, and
    ``config.env``: ``COMFY_CLUSTER_KEY`` or ``COMFY_CLUSTER_KEY_FILE``) is inherited as it is.
    """
    env = {**(os.environ if base is None else base), **config.env}
    if config.cluster_key is not None or config.multi_node or not lacks_cluster_key(env):
        return config
    return dataclasses.replace(config, cluster_key=ClusterKey.generate().text)


def _address(host: str, port: int) -> Address:
    return resolve(host, port, "--master-addr", "pass a host name or IP that every node can reach")


def port_in_use(host: str, port: int) -> bool:
    """Whether something already listens on ``host:port`` (as far as binding it here can tell).

    An address that is not local to this machine cannot be probed and counts as free.
    """
    family, sockaddr = _address(host, port)
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        # SO_REUSEADDR like the real listener will use, so TIME_WAIT leftovers do not count.
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(sockaddr)
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                return True
            if exc.errno == errno.EADDRNOTAVAIL:
                return False
            raise
    return False


def pick_free_port(host: str) -> int:
    """A TCP port that is free on ``host`` now (another process may still take it before use)."""
    family, sockaddr = _address(host, 0)
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        try:
            probe.bind(sockaddr)
        except OSError as exc:
            if exc.errno != errno.EADDRNOTAVAIL:
                raise
            # master_addr is not ours (NAT, a DNS name for a public IP): any local port will do.
            probe.bind(("::", 0) if family == socket.AF_INET6 else ("", 0))
        port: int = probe.getsockname()[1]
        return port


__all__ = [
    "LaunchConfig",
    "RankSlot",
    "check_cluster_key",
    "is_multi_node",
    "lacks_cluster_key",
    "pick_free_port",
    "port_in_use",
    "with_cluster_key",
]
