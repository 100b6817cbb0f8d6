"""Temporary shim; the env reader moves here from launchers.env."""

from launchers.env import RankEnv, detect_mpi_launcher, read_rank_env

__all__ = ["RankEnv", "detect_mpi_launcher", "read_rank_env"]
