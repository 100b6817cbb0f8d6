"""``comfycluster-launch``: a thin command line over :func:`launchers.launch.launch`.

Subcommands register in ``SUBCOMMANDS`` under their first word (``comfyui``: see
:mod:`launchers.comfyui`); the word may follow the launcher options it shares, so
``--nproc 2 comfyui ...`` and ``comfyui --nproc 2 ...`` are the same.  Anything else is the plain
launcher, so ``comfycluster-launch --nproc 2 -- python x.py`` keeps working.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from typing import NoReturn

from collectives.errors import ConfigurationError, RendezvousError

from .config import LaunchConfig
from .launch import launch

PROG = "comfycluster-launch"
USAGE_EXIT = 2

# name -> handler(remaining argv) -> exit code; a subcommand module adds itself when imported
SUBCOMMANDS: dict[str, Callable[[list[str]], int]] = {}


class UsageError(Exception):
    """A command-line mistake; printed as one line, exit status 2."""


class _Parser(argparse.ArgumentParser):
    # argparse prints the whole usage block before its message; one line is easier to act on.
    def error(self, message: str) -> NoReturn:
        raise UsageError(message)


def build_parser(prog: str = PROG) -> argparse.ArgumentParser:
    parser = _Parser(
        prog=prog,
        description="Start N ranks of a program with the torchrun and COMFY_CLUSTER_* rank "
        "variables set; stop them all when one fails.",
        usage=f"{prog} --nproc N [options] -- COMMAND [ARG ...]",
    )
    parser.add_argument(
        "--nproc",
        "--nproc-per-node",
        type=int,
        required=True,
        metavar="N",
        help="processes to start on this node",
    )
    parser.add_argument("--backend", help="exported to the ranks as COMFY_CLUSTER_BACKEND")
    parser.add_argument(
        "--master-addr",
        default="127.0.0.1",
        metavar="HOST",
        help="host that runs rank 0 (default: %(default)s)",
    )
    parser.add_argument(
        "--master-port",
        type=int,
        metavar="PORT",
        help="rendezvous port (default: a free one, single node only)",
    )
    parser.add_argument(
        "--node-rank-offset",
        type=int,
        metavar="K",
        help="global rank of this node's first process (multi-node; default 0, or with --join "
        "the lowest free ranks the rendezvous server assigns)",
    )
    parser.add_argument(
        "--join",
        metavar="TOKEN",
        help="join the cluster of an invite token (`comfycluster invite`; @FILE reads it from "
        "FILE): ranks, world size and the rendezvous server come from the token",
    )
    parser.add_argument(
        "--world-size", type=int, metavar="W", help="ranks over all nodes (default: --nproc)"
    )
    parser.add_argument(
        "--timeout",
        type=float,
        metavar="SECONDS",
        help="stop everything after this long and exit 124",
    )
    parser.add_argument(
        "--kill-grace",
        type=float,
        default=5.0,
        metavar="SECONDS",
        help="between SIGTERM and SIGKILL when stopping ranks (default: %(default)s)",
    )
    parser.add_argument(
        "--env",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="extra environment variable for every rank (repeatable)",
    )
    parser.add_argument(
        "--no-prefix",
        action="store_true",
        help="let ranks write to the terminal directly, without '[rank N] '",
    )
    parser.add_argument("command", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    return parser


def parse_args(argv: Sequence[str]) -> LaunchConfig:
    """The launch configuration for ``argv`` (without the program name); raises UsageError."""
    return parse_command(argv)[0]


def parse_command(argv: Sequence[str]) -> tuple[LaunchConfig, argparse.Namespace]:
    """:func:`parse_args` and the parsed options (``join``, ``node_rank_offset`` as given)."""
    args = list(argv)
    parser = build_parser()
    if "--" in args:
        cut = args.index("--")
        ns = parser.parse_args(args[:cut])
        # A "--" after the command started belongs to the command (python x.py -- --flag).
        command = [*ns.command, *args[cut:]] if ns.command else args[cut + 1 :]
    else:
        ns = parser.parse_args(args)
        command = list(ns.command)
    env: dict[str, str] = {}
    for item in ns.env:
        name, sep, value = item.partition("=")
        if not sep or not name:
            raise UsageError(f"argument --env: expected NAME=VALUE, got {item!r}")
        env[name] = value
    return LaunchConfig(
        nproc=ns.nproc,
        command=command,
        backend=ns.backend,
        master_addr=ns.master_addr,
        master_port=ns.master_port,
        rank_offset=ns.node_rank_offset or 0,
        world_size=ns.world_size,
        env=env,
        prefix_output=not ns.no_prefix,
        kill_grace_s=ns.kill_grace,
        timeout_s=ns.timeout,
    ), ns


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``comfycluster-launch`` and ``python -m launchers``; returns the exit code."""
    args = list(sys.argv[1:] if argv is None else argv)
    # Imported on first use, not at the top: launchers.comfyui imports this module (UsageError,
    # PROG) and registers its subcommand in SUBCOMMANDS as it is imported.
    from .comfyui import hoist_subcommand

    args = hoist_subcommand(args, SUBCOMMANDS)
    if args and args[0] in SUBCOMMANDS:
        return SUBCOMMANDS[args[0]](args[1:])
    try:
        config, ns = parse_command(args)
        if ns.join is None:
            return launch(config)
        from .join import run_joined

        return run_joined(config, ns.join, ns.node_rank_offset, launch)
    except (UsageError, ConfigurationError) as exc:
        message = " ".join(str(exc).split())  # one line, whatever the message held
        print(f"{PROG}: error: {message}", file=sys.stderr)
        return USAGE_EXIT
    except RendezvousError as exc:  # --join: the rendezvous server refused or did not answer
        print(f"{PROG}: error: {' '.join(str(exc).split())}", file=sys.stderr)
        return 1
    except SystemExit as exc:  # --help
        return exc.code if isinstance(exc.code, int) else 0


__all__ = [
    "PROG",
    "SUBCOMMANDS",
    "UsageError",
    "build_parser",
    "main",
    "parse_args",
    "parse_command",
]
