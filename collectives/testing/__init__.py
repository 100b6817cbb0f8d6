"""Reusable test support: run SPMD functions on any backend, and the backend conformance suite.

Shipped with the library so that a third-party backend can prove itself with the same checks::

    from collectives.testing import CHECKS, run_spmd
    for check in CHECKS.values():
        run_spmd("mybackend", 3, check)

How a new backend joins the conformance suite:

1. Register it: ``collectives.backends.base.register_backend("mybackend", MyBackend)``.  A
   transport that only moves messages subclasses
   :class:`collectives.backends.p2p.P2PBackend` and implements its three-method contract
   (the module docstring); every collective comes with it.
2. Say how its worlds start.  Ranks that are threads of one process (they meet through
   ``BackendConfig.world``): :func:`register_in_process`.  Ranks that are processes: nothing to
   do when ``comfycluster-launch --backend mybackend`` (the ``launchers`` package: torchrun-style
   ``RANK``/``WORLD_SIZE``/``MASTER_ADDR``/``MASTER_PORT``) is how they start; otherwise
   :func:`register_launcher` with a function ``(size, command) -> launcher command``.
3. Run :data:`CHECKS` through :func:`run_spmd` at world sizes 1-4 (one world per check), or, for
   process worlds, run every check in one world with ``python -m collectives.testing.runner``
   under the launcher (as ``tests/conformance/worlds.py`` does) and read its per-rank reports.
   :data:`SCENARIOS` (mismatched calls, a silent rank) each need a fresh world;
   ``tests/conformance/scenario_asserts.py`` states what every backend must show.
"""

from collectives.testing.conformance import CHECKS, SCENARIOS
from collectives.testing.local import run_local
from collectives.testing.payloads import PAYLOADS, assert_same, payload
from collectives.testing.spmd import (
    launch_command,
    register_in_process,
    register_launcher,
    run_spmd,
)

__all__ = [
    "CHECKS",
    "PAYLOADS",
    "SCENARIOS",
    "assert_same",
    "launch_command",
    "payload",
    "register_in_process",
    "register_launcher",
    "run_local",
    "run_spmd",
]
