"""Collectives written once over point-to-point messages.

Backends without a native collective (the in-process and UDP backends, and the MPI/torch
backends for dtypes their engines cannot reduce) run these.  Each function talks through a
:class:`Link`, which the backend binds to one operation: its identity (for mismatch detection) and
its deadline.  Shapes follow MPICH's classic choices: binomial trees for broadcast and reduce,
a ring for allgather, direct sends for gather and scatter, dissemination for the barrier.
"""

from collectives.algorithms.link import Link
from collectives.algorithms.reduction import allreduce_tensor, reduce_tensor
from collectives.algorithms.ring import allgather
from collectives.algorithms.rooted import broadcast, gather, scatter
from collectives.algorithms.sync import barrier

__all__ = [
    "Link",
    "allgather",
    "allreduce_tensor",
    "barrier",
    "broadcast",
    "gather",
    "reduce_tensor",
    "scatter",
]
