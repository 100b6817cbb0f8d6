"""Which modules ship compiled, and when their source runs instead.

The udp transport's sans-IO core (:mod:`collectives.transport`) is strictly typed Python that
``setup.py`` also compiles with mypyc where a C compiler is at hand: the same code, run as C,
costs about a third of the CPU per small message and ~15 % less per bulk frame
(docs/udp-transport.md, "A compiled core").  Each compiled module is an extension file next to
its source, which Python's import prefers.  The source runs instead, for every module of the list
at once (compiled modules call one another directly, so one stale module would keep running
inside the others):

- ``COMFY_CLUSTER_PURE_PYTHON=1``: to debug or profile the core (py-spy sees no frames inside
  compiled code) or to compare;
- in a source checkout whose compiled files are older than a source file (edited since the last
  ``scripts/setup.sh``), with a warning: the edit must not be silently ignored.

It imports nothing from the package; ``setup.py`` reads :data:`COMPILED` from its text.
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType

log = logging.getLogger(__name__)

PURE_ENV = "COMFY_CLUSTER_PURE_PYTHON"

COMPILED = (
    "collectives.transport.bbr_params",
    "collectives.transport.config",
    "collectives.transport.congestion",
    "collectives.transport.control_fields",
    "collectives.transport.crypto",
    "collectives.transport.endpoint",
    "collectives.transport.events",
    "collectives.transport.frames",
    "collectives.transport.handshake",
    "collectives.transport.header",
    "collectives.transport.outbound",
    "collectives.transport.pacing",
    "collectives.transport.ranges",
    "collectives.transport.rate_sample",
    "collectives.transport.receiving",
    "collectives.transport.recovery",
    "collectives.transport.rtt",
    "collectives.transport.sending",
    "collectives.transport.sent_packet",
    "collectives.transport.session",
    "collectives.transport.states",
)
"""The modules ``setup.py`` compiles (a test keeps this equal to collectives/transport)."""

SHARED = "collectives.transport._core__mypyc"
"""The library that holds their code (setup.py's group name + ``__mypyc``)."""

_ROOT = Path(__file__).resolve().parent.parent  # the folder that holds collectives/


def source_path(name: str, root: Path = _ROOT) -> Path:
    return root.joinpath(*name.split(".")).with_suffix(".py")


def extension_path(name: str, root: Path = _ROOT) -> Path | None:
    """The compiled file of module ``name`` next to its source, if built."""
    stem = source_path(name, root).with_suffix("")
    for suffix in importlib.machinery.EXTENSION_SUFFIXES:
        candidate = stem.with_name(stem.name + suffix)
        if candidate.is_file():
            return candidate
    return None


def stale(names: Sequence[str], root: Path = _ROOT) -> list[str]:
    """Modules whose source changed after their compiled file was built, in a checkout (an
    installed wheel's file times say nothing about build order)."""
    if not (root / ".git").exists():
        return []
    out = []
    for name in names:
        ext = extension_path(name, root)
        if ext is not None and source_path(name, root).stat().st_mtime > ext.stat().st_mtime:
            out.append(name)
    return out


class _SourceFinder:
    """A meta path finder that loads the listed modules from their ``.py`` files."""

    def __init__(self, names: Sequence[str]) -> None:
        self.names = frozenset(names)

    def find_spec(
        self, name: str, path: object = None, target: ModuleType | None = None
    ) -> importlib.machinery.ModuleSpec | None:
        if name not in self.names:
            return None
        return importlib.util.spec_from_file_location(name, source_path(name))


_state: dict[str, str] = {}


def install() -> None:
    """Decide once, before the first of these modules is imported, whether they run compiled;
    load their source where :data:`PURE_ENV` asks for it or a compiled file is stale."""
    if _state:
        return
    built = [name for name in COMPILED if extension_path(name) is not None]
    if not built:
        _state.update(
            mode="python",
            why="not compiled (no C compiler at install, or built pure)",
            hint="install with a C compiler at hand to compile it (1 KiB ops up to 25 % faster)",
        )
        return
    hint = "reinstall (pip install -e . in a checkout) to build it whole"
    if os.environ.get(PURE_ENV, "") not in ("", "0"):
        why, hint = f"{PURE_ENV} is set", f"unset {PURE_ENV} to run the compiled build"
    elif len(built) != len(COMPILED) or extension_path(SHARED) is None:
        missing = sorted(set(COMPILED) - set(built)) or [SHARED]
        why = "compiled only in part, missing " + ", ".join(missing)
    elif old := stale(built):
        why = "compiled files are older than " + ", ".join(old)
        hint = "run scripts/setup.sh (or pip install -e . again) to rebuild it"
        log.warning(
            "collectives: the compiled transport is older than its source (%s); running the "
            "source. Run scripts/setup.sh to rebuild it.",
            ", ".join(old),
        )
    else:
        _state.update(mode="compiled", why="mypyc", hint="")
        return
    sys.meta_path.insert(0, _SourceFinder(COMPILED))
    _state.update(mode="python", why=why, hint=hint)


def status() -> dict[str, str]:
    """``{"mode": "compiled" | "python", "why": ..., "hint": what would compile it}``; in
    ``comm.stats()`` of the udp backend and ``comfycluster doctor``."""
    install()
    return dict(_state)


install()  # on import, which collectives/__init__.py does first
