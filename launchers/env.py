"""The launcher reads ranks with the library's own reader (one table of variable names)."""

from collectives.rendezvous.env import RankEnv, Role, detect_mpi_launcher, read_rank_env

__all__ = ["RankEnv", "Role", "detect_mpi_launcher", "read_rank_env"]
