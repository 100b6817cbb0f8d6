"""Benchmarks, apart from the tests: ``python -m benchmarks <subcommand> ...``.

Subcommands live in their own modules, each with a ``main(argv) -> int | None``, and are listed in
:data:`SUBCOMMANDS`; a registered module that is not there yet shows up as unavailable instead of
breaking the others.  To add one::

    from benchmarks import register
    register("e2e", "benchmarks.e2e_bench", "a whole workflow over a real cluster")

Benchmarks print tables and write JSON/PNG; timings are never pass/fail.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class Subcommand:
    name: str
    module: str  # imported only when the subcommand runs
    summary: str
    function: str = "main"

    def available(self) -> bool:
        try:
            return importlib.util.find_spec(self.module) is not None
        except ModuleNotFoundError:
            return False

    def run(self, argv: Sequence[str]) -> int:
        entry = getattr(importlib.import_module(self.module), self.function)
        # argparse names itself after argv[0]; make that the command the user typed.
        saved = sys.argv
        sys.argv = [f"python -m benchmarks {self.name}", *argv]
        try:
            code = entry(list(argv))
        finally:
            sys.argv = saved
        return int(code or 0)


SUBCOMMANDS: dict[str, Subcommand] = {}


def register(name: str, module: str, summary: str, function: str = "main") -> None:
    """Make ``python -m benchmarks NAME`` call ``module.function(argv)``."""
    SUBCOMMANDS[name] = Subcommand(name, module, summary, function)


register(
    "collectives",
    "benchmarks.collectives_bench",
    "our collectives vs the raw engine (gloo, MPI, memcpy) in the same processes",
)
register("codec", "benchmarks.codec_bench", "the message codec: encode/decode throughput")
register("e2e", "benchmarks.e2e_bench", "end to end: a workflow spread over a cluster")
register(
    "p2p",
    "benchmarks.p2p_bench",
    "point-to-point goodput: ours vs the engine's send/recv and plain TCP/UDP sockets",
)
register("wan", "benchmarks.wan_bench", "the udp backend over an emulated WAN (loss, delay)")

__all__ = ["SUBCOMMANDS", "Subcommand", "register"]
