"""Collectives written once over point-to-point messages.

Backends without a native collective (the in-process and UDP backends, and the MPI/torch
backends for dtypes their engines cannot reduce) run these.  Each function talks through a
:class:`Link`, which the backend binds to one operation: its identity (for mismatch detection) and
its deadline.  Small messages take latency-bound shapes: a binomial tree for broadcast and
reduce, recursive doubling for allreduce.  Large ones take bandwidth-bound shapes, so no rank
sends or receives more than about two copies of the payload whatever the world size: broadcast
as scatter + ring allgather (:mod:`.large_broadcast`), allreduce and reduce as a ring
reduce-scatter followed by a ring allgather or a gather (:mod:`.ring_reduce`).  In a world of
up to four ranks, broadcast and reduce stay on their trees whatever the size (at most two
copies through the root either way, in fewer hops: :data:`.large_broadcast.TREE_MAX_RANKS`,
:func:`.reduction.reduce_tensor`).  Allgather is a ring, gather and scatter are direct, the
barrier is dissemination.
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
