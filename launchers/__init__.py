"""A torchrun-like launcher: start N ranks with their rank variables set, fail fast, stop cleanly.

- :func:`launch` runs a :class:`LaunchConfig` to completion and returns an exit code;
  :func:`start` returns the running :class:`LaunchedGroup` for code that supervises it itself.
- :func:`read_rank_env` is the other side: a rank finding out who it is, from this launcher,
  torchrun, ComfyUI_Cluster's variables, mpirun/mpiexec or Slurm.
"""

from .config import LaunchConfig, RankSlot
from .env import RankEnv, detect_mpi_launcher, read_rank_env
from .group import LaunchedGroup
from .launch import TIMEOUT_EXIT, child_env, launch, start

__all__ = [
    "TIMEOUT_EXIT",
    "LaunchConfig",
    "LaunchedGroup",
    "RankEnv",
    "RankSlot",
    "child_env",
    "detect_mpi_launcher",
    "launch",
    "read_rank_env",
    "start",
]
