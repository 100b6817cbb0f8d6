"""Find out which rank this process is, from whatever launcher started it.

Several launchers describe the same three facts (rank, world size, local rank) with different
variable names.  One table lists them, in precedence order: an explicit torchrun-style setting wins
over the ComfyUI_Cluster names, which win over what an MPI launcher or Slurm exported, because the
more explicit a setting is, the more likely somebody set it on purpose (``comfycluster-launch`` run
inside a Slurm allocation exports ``RANK`` to its children, and those must not read
``SLURM_PROCID``).

Empty values count as unset: container and compose files often write ``RANK=`` to mean "no value".
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

from collectives.errors import ConfigurationError

Role = Literal["leader", "follower"]


@dataclass(frozen=True)
class RankEnv:
    """This process's place in the job, as its launcher described it."""

    rank: int
    world_size: int
    local_rank: int
    master_addr: str | None
    master_port: int | None
    role: Role
    source: str  # "torchrun", "comfy-cluster", "openmpi", "mpich", or "slurm"


@dataclass(frozen=True)
class _Source:
    name: str
    rank: str
    size: tuple[str, ...]  # first one set wins
    local_rank: str | None


# Order is precedence.  Slurm's step task count is right inside ``srun`` even when the allocation
# is larger; SLURM_NTASKS / SLURM_NPROCS cover older versions and batch steps.
_SOURCES = (
    _Source("torchrun", "RANK", ("WORLD_SIZE",), "LOCAL_RANK"),
    _Source(
        "openmpi", "OMPI_COMM_WORLD_RANK", ("OMPI_COMM_WORLD_SIZE",), "OMPI_COMM_WORLD_LOCAL_RANK"
    ),
    _Source("mpich", "PMI_RANK", ("PMI_SIZE",), "MPI_LOCALRANKID"),
    _Source(
        "slurm",
        "SLURM_PROCID",
        ("SLURM_STEP_NUM_TASKS", "SLURM_NTASKS", "SLURM_NPROCS"),
        "SLURM_LOCALID",
    ),
)

COMFY_INDEX = "COMFY_CLUSTER_INSTANCE_INDEX"
COMFY_COUNT = "COMFY_CLUSTER_INSTANCE_COUNT"
COMFY_ROLE = "COMFY_CLUSTER_ROLE"

# Any of these means mpirun/mpiexec (Open MPI, MPICH/Hydra, Intel MPI) or a PMIx-aware srun started
# us, so MPI_Init will find its peers.  Hydra exports HYDI_CONTROL_FD / PMI_FD before PMI_RANK is
# known to the process, and some setups export only the local rank id or only the size.
_MPI_MARKERS = (
    "OMPI_COMM_WORLD_SIZE",
    "OMPI_COMM_WORLD_RANK",
    "PMI_RANK",
    "PMI_SIZE",
    "PMI_FD",
    "HYDI_CONTROL_FD",
    "MPI_LOCALRANKID",
    "PMIX_RANK",
)


def detect_mpi_launcher(environ: Mapping[str, str] | None = None) -> bool:
    """True when an MPI launcher (mpirun/mpiexec, or srun with PMIx) started this process."""
    env = os.environ if environ is None else environ
    return any(env.get(name) for name in _MPI_MARKERS)


def read_rank_env(environ: Mapping[str, str] | None = None) -> RankEnv | None:
    """This process's rank as its launcher exported it, or None when no launcher did.

    Raises :class:`ConfigurationError` (one line, naming the variable and the fix) when a source is
    present but incomplete or inconsistent.
    """
    env = _Env(os.environ if environ is None else environ)
    torchrun = _SOURCES[0]
    if env.has(torchrun.rank) or env.has(*torchrun.size):
        return _from_source(env, torchrun)
    if env.has(COMFY_INDEX, COMFY_COUNT, COMFY_ROLE):
        return _from_comfy(env)
    for source in _SOURCES[1:]:
        if env.has(source.rank) or env.has(*source.size):
            return _from_source(env, source)
    return None


class _Env:
    """Typed, message-producing access to the environment."""

    def __init__(self, environ: Mapping[str, str]) -> None:
        self._environ = environ

    def get(self, name: str) -> str | None:
        value = self._environ.get(name, "").strip()
        return value or None

    def has(self, *names: str) -> bool:
        return any(self.get(name) is not None for name in names)

    def integer(self, name: str, fix: str) -> int:
        raw = self.get(name)
        if raw is None:
            raise ConfigurationError(f"{name} is missing: {fix}")
        try:
            value = int(raw)
        except ValueError:
            raise ConfigurationError(f"{name}={raw!r} is not an integer: {fix}") from None
        if value < 0:
            raise ConfigurationError(f"{name}={value} is negative: {fix}")
        return value


def _from_source(env: _Env, source: _Source) -> RankEnv:
    size_name = next((name for name in source.size if env.has(name)), source.size[0])
    if not env.has(source.rank):
        raise ConfigurationError(
            f"{size_name} is set but {source.rank} is missing: "
            f"set {source.rank} to this process's 0-based rank"
        )
    if not env.has(size_name):
        raise ConfigurationError(
            f"{source.rank} is set but {size_name} is missing: "
            f"set {size_name} to the number of ranks"
        )
    rank = env.integer(source.rank, "set it to this process's 0-based rank")
    world_size = _world_size(env, size_name, rank, source.rank)
    local_rank = rank  # single-node assumption when the launcher does not say
    if source.local_rank is not None and env.has(source.local_rank):
        local_rank = env.integer(
            source.local_rank, "set it to this process's 0-based rank on its node"
        )
        if local_rank >= world_size:
            raise ConfigurationError(
                f"{source.local_rank}={local_rank} is not < {size_name}={world_size}: "
                f"set it to this process's 0-based rank on its node"
            )
    return _rank_env(env, rank, world_size, local_rank, source.name)


def _from_comfy(env: _Env) -> RankEnv:
    if not env.has(COMFY_INDEX):
        raise ConfigurationError(
            f"{COMFY_INDEX} is missing while other COMFY_CLUSTER_* rank variables are set: "
            f"set it to this instance's 0-based index"
        )
    if not env.has(COMFY_COUNT):
        raise ConfigurationError(
            f"{COMFY_INDEX} is set but {COMFY_COUNT} is missing: "
            f"set {COMFY_COUNT} to the number of instances"
        )
    index = env.integer(COMFY_INDEX, "set it to this instance's 0-based index")
    count = _world_size(env, COMFY_COUNT, index, COMFY_INDEX)
    role_raw = env.get(COMFY_ROLE)
    if role_raw is not None:
        role = role_raw.upper()
        if role not in ("LEADER", "FOLLOWER"):
            raise ConfigurationError(f"{COMFY_ROLE}={role_raw!r} is not LEADER or FOLLOWER: fix it")
        expected = "LEADER" if index == 0 else "FOLLOWER"
        if role != expected:
            raise ConfigurationError(
                f"{COMFY_ROLE}={role_raw} disagrees with {COMFY_INDEX}={index}: index 0 is the "
                f"LEADER and every other index a FOLLOWER; set {COMFY_ROLE}={expected} or unset it"
            )
    return _rank_env(env, index, count, index, "comfy-cluster")


def _world_size(env: _Env, name: str, rank: int, rank_name: str) -> int:
    size = env.integer(name, "set it to the number of ranks")
    if size == 0:
        raise ConfigurationError(f"{name}=0 must be at least 1: set it to the number of ranks")
    if rank >= size:
        raise ConfigurationError(
            f"{rank_name}={rank} is not < {name}={size}: indices are 0-based; "
            f"set it to 0..{size - 1}"
        )
    return size


def _rank_env(env: _Env, rank: int, world_size: int, local_rank: int, source: str) -> RankEnv:
    port: int | None = None
    if env.has("MASTER_PORT"):
        port = env.integer("MASTER_PORT", "set it to a TCP port in 1..65535")
        if not 1 <= port <= 65535:
            raise ConfigurationError(
                f"MASTER_PORT={port} is out of range: set it to a TCP port in 1..65535"
            )
    return RankEnv(
        rank=rank,
        world_size=world_size,
        local_rank=local_rank,
        master_addr=env.get("MASTER_ADDR"),
        master_port=port,
        role="leader" if rank == 0 else "follower",
        source=source,
    )


__all__ = ["RankEnv", "Role", "detect_mpi_launcher", "read_rank_env"]
