"""How a large in-place broadcast moves, chosen from how the ranks sit on hosts and cores.

MPICH's non-blocking ``Ibcast`` of 1 MiB and more at 3+ ranks ran 1.2-1.5x its blocking
``Bcast`` in barrier-started timings (busiest rank's median), on the 2-core CI box and on a
16-core host alike.  Two replacements, each measured in the same runs against ``Bcast``:

- ``tree``: a binomial tree of whole-buffer ``Isend``/``Irecv``.  Best where the ranks outnumber
  the cores they may run on: 4 ranks on 2 cores, 0.73-0.99x at 1 MiB (0.74-1.18x at 4 MiB),
  where the scatter-allgather below ran 0.95-1.76x.  With a core per rank it is no better than
  ``Ibcast`` (1.0-1.5x at 4 ranks, 1.7-2.0x at 8), because its steps run one after another.
- ``scatter_allgather``: the root sends each rank a ``1/size`` piece, then an in-place
  ``Iallgather`` completes every copy (van de Geijn's broadcast, which MPICH's blocking ``Bcast``
  also uses for long messages).  With a core per rank: 0.70-0.98x at 1 MiB and 4 ranks,
  0.64-0.71x at 4 MiB, 0.65-0.86x at 8 ranks.

So: ``tree`` when on some host the ranks outnumber the CPUs they may use (the union of their
affinity masks), else ``scatter_allgather``.  The choice must be the same on every rank (the two
exchange different messages), so the ranks agree on it at start-up: crowded anywhere means tree
everywhere.  ``COMFY_CLUSTER_MPI_BROADCAST`` overrides it (``auto``, ``tree``,
``scatter_allgather``, or ``native`` for MPICH's ``Ibcast``); ranks that were given different
values refuse to start.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from collectives.errors import ConfigurationError

ENV = "COMFY_CLUSTER_MPI_BROADCAST"
PLANS = ("native", "tree", "scatter_allgather")  # indices travel in the agreement
AUTO = "auto"


def broadcast_plan(mpi: Any, world: Any) -> str:
    """The large-broadcast plan of every rank of ``world``; collective over ``world``."""
    wanted = os.environ.get(ENV, AUTO).strip().lower() or AUTO
    if wanted != AUTO and wanted not in PLANS:
        raise ConfigurationError(
            f"{ENV}={wanted!r} is not one of: {AUTO}, {', '.join(PLANS)} (unset it for {AUTO})"
        )
    crowded = _crowded_here(mpi, world)
    code = -1 if wanted == AUTO else PLANS.index(wanted)
    # One allreduce answers three questions: crowded anywhere, and the lowest and highest wish
    # (elementwise, so a buffer: the object allreduce would compare whole lists).
    agreed = np.array([int(crowded), code, -code], dtype=np.int64)
    world.Allreduce(mpi.IN_PLACE, agreed, op=mpi.MAX)
    if agreed[1] != -agreed[2]:
        raise ConfigurationError(
            f"{ENV} differs between ranks (this rank has {wanted!r}): set the same value on "
            "every rank, or unset it everywhere"
        )
    if agreed[1] >= 0:
        return PLANS[int(agreed[1])]
    return "tree" if agreed[0] else "scatter_allgather"


def _crowded_here(mpi: Any, world: Any) -> bool:
    """Whether this rank's host runs more of ``world``'s ranks than they have CPUs to run on."""
    node = world.Split_type(mpi.COMM_TYPE_SHARED)
    try:
        cpus = set().union(*node.allgather(sorted(usable_cpus())))
        return bool(node.Get_size() > len(cpus))
    finally:
        node.Free()


def usable_cpus() -> set[int]:
    """The CPUs this process may run on (all of them where the OS cannot say)."""
    try:
        return set(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        return set(range(os.cpu_count() or 1))


__all__ = ["AUTO", "ENV", "PLANS", "broadcast_plan", "usable_cpus"]
