"""The mpi backend's fast paths: ``allreduce`` and ``broadcast_into`` in one frame each.

Right after a 1 MiB op the caches hold its data, not our code, and every Python frame, attribute
read and torch call before the engine call costs several µs; with two ranks per core the op then
ends about twice that later.  Through the general path (``Communicator.allreduce`` ->
``_reducible`` -> ``_now`` -> ``MPIBackend.allreduce`` -> ``host_buffer`` -> ``wait_one``) a 1 MiB
allreduce at 4 ranks on 2 cores took 38-62 µs longer than mpi4py's blocking ``Allreduce``
(1.08-1.12x); this closure does the same checks and bookkeeping with everything it needs bound
in advance and took 22-41 µs longer (docs/backend-mpi.md).

``broadcast_into`` gets the same treatment where it is one ``Ibcast``.  Each runs only the
common case: a contiguous CPU tensor (for ``allreduce``, of a dtype and op that MPI reduces
itself, not ``avg``, which divides afterwards), on a usable communicator with nothing queued.
Anything else returns False and the communicator takes its general path, which checks the call
and raises the right error, so the two paths cannot disagree on what is accepted.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from collectives.backends import mpi_reduce
from collectives.backends.base import FastLane, FastOp, OpContext
from collectives.backends.mpi_core import spin
from collectives.deadline import Deadline, check_timeout
from collectives.errors import ConfigurationError
from collectives.reduce_op import PARSED, ReduceOp, check_reducible

if TYPE_CHECKING:
    import torch

    from collectives.backends.mpi_core import Engine


def reduction_table(mpi: Any) -> dict[tuple[torch.dtype, object], tuple[Any, Any]]:
    """``(dtype, op as a caller may spell it)`` -> MPI's ``(datatype, op)``, for exactly the
    combinations the fast path runs: defined (:func:`check_reducible`), reduced by MPI itself,
    and not ``avg``."""
    import torch

    table: dict[tuple[torch.dtype, object], tuple[Any, Any]] = {}
    for name in mpi_reduce.TYPE_NAMES:
        dtype = getattr(torch, name)
        probe = torch.empty(0, dtype=dtype)
        for spelling, rop in PARSED.items():
            if rop is ReduceOp.AVG:
                continue
            try:
                check_reducible(probe, rop)
            except ConfigurationError:
                continue
            native = mpi_reduce.native_reduction(mpi, dtype, rop)
            if native is not None:
                table[dtype, spelling] = native
    return table


def make_fast_allreduce(engine: Engine, lane: FastLane) -> FastOp:
    """``run(tensor, op, timeout)``: the closure :meth:`MPIBackend.fast_path` hands the
    communicator for ``allreduce``."""
    import torch

    mpi = engine.MPI
    table = reduction_table(mpi)
    iallreduce = engine.coll.Iallreduce
    fromaddress = mpi.buffer.fromaddress
    in_place = mpi.IN_PLACE
    mpi_error = mpi.Exception
    tensor_type = torch.Tensor
    lock = lane.lock
    monotonic = time.monotonic
    tuple_new = tuple.__new__

    def allreduce(tensor: Any, op: object, timeout: float | None) -> bool:
        if type(tensor) is not tensor_type or not lane.open or engine.halted:
            return False
        try:
            native = table[tensor.dtype, op]
        except (KeyError, TypeError):  # not natively reducible, or an op to parse (or refuse)
            return False
        if not tensor.is_contiguous() or not tensor.is_cpu or tensor.is_conj() or tensor.is_neg():
            return False
        wait_s = lane.timeout if timeout is None else check_timeout(timeout)
        with lock:
            if not lane.open:  # an async op was queued meanwhile: keep the order
                return False
            seq = lane.take()
            # The tuples are built directly, as Communicator._deadline does (no Python __new__).
            deadline = tuple_new(Deadline, (monotonic() + wait_s, wait_s, "allreduce", lane.rank))
            ctx = tuple_new(OpContext, ("allreduce", seq, deadline))
            try:
                spec = [fromaddress(tensor.data_ptr(), tensor.nbytes), native[0]]
                req = iallreduce(in_place, spec, native[1])
                if not spin(engine, req, deadline.at):
                    engine.wait([req], ctx, (), keep=tensor)
            except mpi_error as err:
                raise engine.failed(err, ctx, ()) from None
        return True

    return allreduce


def make_fast_broadcast_into(engine: Engine, lane: FastLane, direct_min_bytes: int) -> FastOp:
    """``run(tensor, root, timeout)`` for ``broadcast_into``: the broadcasts that go as one
    ``Ibcast`` (under ``direct_min_bytes``, or at most 2 ranks); larger ones follow the world's
    broadcast plan on the general path."""
    import torch

    mpi = engine.MPI
    size, rank = engine.size, engine.rank
    ibcast = engine.coll.Ibcast
    fromaddress = mpi.buffer.fromaddress
    mpi_error = mpi.Exception
    tensor_type = torch.Tensor
    lock = lane.lock
    monotonic = time.monotonic
    tuple_new = tuple.__new__
    any_size = size <= 2
    roots = {r: (() if r == rank else (r,)) for r in range(size)}  # whom a timeout names

    def broadcast_into(tensor: Any, root: object, timeout: float | None) -> bool:
        if type(tensor) is not tensor_type or not lane.open or engine.halted:
            return False
        peers = roots.get(root) if type(root) is int else None
        if peers is None or not tensor.is_contiguous() or not tensor.is_cpu:
            return False
        nbytes = tensor.nbytes
        if not (any_size or nbytes < direct_min_bytes) or tensor.is_conj() or tensor.is_neg():
            return False
        wait_s = lane.timeout if timeout is None else check_timeout(timeout)
        with lock:
            if not lane.open:
                return False
            seq = lane.take()
            deadline = tuple_new(Deadline, (monotonic() + wait_s, wait_s, "broadcast_into", rank))
            ctx = tuple_new(OpContext, ("broadcast_into", seq, deadline))
            try:
                req = ibcast(fromaddress(tensor.data_ptr(), nbytes), root)
                if not spin(engine, req, deadline.at):
                    engine.wait([req], ctx, peers, keep=tensor)
            except mpi_error as err:
                raise engine.failed(err, ctx, peers) from None
        return True

    return broadcast_into
