"""ClusterInfo's text: this rank, the world, each peer's health and path, and what the doctor
finds wrong on this machine.

A peer's path is the backend's (``Communicator.paths()``; the udp backend: ``direct``,
``punched`` or ``relayed`` and where its datagrams go).  The doctor (collectives.doctor) runs
only where it has something to say: the udp backend, or a discovery mode set in the environment
(``COMFY_CLUSTER_REGISTRATION_MODE``).  Only its failed checks are shown, one line each with its
fix.  It runs inside a node, so it is bounded: each probe gets :data:`DOCTOR_PROBE_S`, the whole
:data:`DOCTOR_TIMEOUT_S`, after which the node reports that it did not finish and goes on.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from collectives import Communicator
    from comfy_nodes.cluster import ClusterStatus

log = logging.getLogger("comfy_cluster")

DOCTOR_PROBE_S = 0.5
DOCTOR_TIMEOUT_S = 2.0


def peer_paths(comm: Communicator) -> dict[int, dict[str, Any]]:
    """``comm``'s path to each peer, ``{}`` where the backend chooses none (or cannot say now:
    a world being torn down)."""
    try:
        paths = comm.paths() if hasattr(comm, "paths") else comm.stats().get("paths")
    except Exception as err:  # the report goes on without paths
        log.debug("paths: %s: %s", type(err).__name__, err)
        return {}
    if not isinstance(paths, dict):
        return {}
    return {r: info for r, info in paths.items() if isinstance(r, int) and isinstance(info, dict)}


def path_text(info: Mapping[str, Any] | None) -> str | None:
    """``direct 10.0.0.2:40000``, ``punched 203.0.113.7:51820``, ``relayed via 198.51.100.1:3478``;
    None for no path."""
    if not info or not isinstance(info.get("path"), str):
        return None
    path, where = info["path"], info.get("address")
    if isinstance(where, list | tuple) and len(where) == 2:
        return f"{path} {'via ' if path == 'relayed' else ''}{where[0]}:{where[1]}"
    return str(path)


def doctor_problems(
    backend: str,
    environ: Mapping[str, str] | None = None,
    *,
    timeout: float = DOCTOR_TIMEOUT_S,
) -> list[str]:
    """The doctor's failed checks as lines (``PROBLEM  name: detail -> fix: ...``), or a line
    saying it did not finish within ``timeout``; none where the doctor has nothing to check."""
    from collectives.backends.udp_peers import MODE_ENV, PORT_ENV

    env = dict(os.environ if environ is None else environ)
    if backend != "udp" and not env.get(MODE_ENV, "").strip():
        return []
    # The backend holds this rank's UDP port: the doctor binds another to test the machine.
    env[PORT_ENV] = "0"
    box: list[list[str]] = []

    def run() -> None:
        from collectives import doctor

        try:
            checks = doctor.run_checks(env, timeout=DOCTOR_PROBE_S)
            box.append([c.line() for c in checks if not c.ok])
        except Exception as err:  # a doctor bug must not fail the node
            box.append([f"PROBLEM  doctor: {type(err).__name__}: {err} -> fix: report it"])

    thread = threading.Thread(target=run, name="cluster-info-doctor", daemon=True)
    thread.start()
    thread.join(timeout)
    if not box:
        return [
            f"PROBLEM  doctor: the checks did not finish within {timeout:g} s -> fix: run "
            "`comfycluster doctor` on this machine for the full report"
        ]
    return box[0]


def info_text(
    status: ClusterStatus, comm: Communicator, environ: Mapping[str, str] | None = None
) -> str:
    """What ClusterInfo shows (see the module)."""
    role = "leader" if status.rank == 0 else "follower"
    paths = peer_paths(comm)
    lines = [
        f"rank {status.rank} of {status.size} ({role}), backend {status.backend}",
        f"connected: {status.connected}/{status.size}",
    ]
    for peer, health in sorted(status.peers.items()):
        path = path_text(paths.get(peer))
        lines.append(f"  rank {peer}: {health}" + (f", path {path}" if path else ""))
    problems = doctor_problems(status.backend, environ)
    if problems:
        lines.append(f"doctor: {len(problems)} problem(s)")
        lines += [f"  {line}" for line in problems]
    return "\n".join(lines)
