"""Reductions for the mpi backend: MPI's own where MPI has the type, else reduce-scatter by hand.

MPI reduces the standard C types (see :func:`native_reduction`).  For the types it lacks
(bfloat16, float16, float8, complex32) each rank receives segment ``rank`` of every rank's tensor
with one ``Ialltoallv``, combines the blocks *in rank order* with
:func:`collectives.reduce_op.combine_` (the same arithmetic as every other backend), and the
reduced segments are gathered back with ``Iallgatherv`` (allreduce) or ``Igatherv`` (reduce).
Every element is reduced exactly once, by one rank, so all ranks end with the same bits; traffic
is 2(N-1)/N of the tensor per rank, as in MPI's own large-message allreduce, and the scratch
space is one tensor's worth.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from collectives.backends.mpi_core import host_bytes
from collectives.reduce_op import ReduceOp, combine_, finish_

if TYPE_CHECKING:
    import torch

    from collectives.backends.base import OpContext
    from collectives.backends.mpi_core import Engine

TYPE_NAMES = {
    "float32": "FLOAT",
    "float64": "DOUBLE",
    "int8": "INT8_T",
    "int16": "INT16_T",
    "int32": "INT32_T",
    "int64": "INT64_T",
    "uint8": "UINT8_T",
    "uint16": "UINT16_T",
    "uint32": "UINT32_T",
    "uint64": "UINT64_T",
    "bool": "C_BOOL",
    "complex64": "C_FLOAT_COMPLEX",
    "complex128": "C_DOUBLE_COMPLEX",
}
_OP_NAMES = {
    ReduceOp.SUM: "SUM",
    ReduceOp.AVG: "SUM",  # divided once afterwards by finish_
    ReduceOp.PROD: "PROD",
    ReduceOp.MIN: "MIN",
    ReduceOp.MAX: "MAX",
    ReduceOp.BAND: "BAND",
    ReduceOp.BOR: "BOR",
    ReduceOp.BXOR: "BXOR",
}
# Booleans reduce logically, as combine_ does: sum/max/bor = any, prod/min/band = all.
_BOOL_OP_NAMES = {
    ReduceOp.SUM: "LOR",
    ReduceOp.MAX: "LOR",
    ReduceOp.BOR: "LOR",
    ReduceOp.PROD: "LAND",
    ReduceOp.MIN: "LAND",
    ReduceOp.BAND: "LAND",
    ReduceOp.BXOR: "LXOR",
}

_cache: dict[tuple[int, object, ReduceOp], tuple[Any, Any] | None] = {}


def native_reduction(mpi: Any, dtype: torch.dtype, op: ReduceOp) -> tuple[Any, Any] | None:
    """``(MPI datatype, MPI op)`` when MPI can reduce ``dtype`` itself, else None (cached)."""
    key = (id(mpi), dtype, op)
    try:
        return _cache[key]
    except KeyError:
        pass
    import torch

    found = None
    mpi_type = TYPE_NAMES.get(str(dtype).removeprefix("torch."))
    if mpi_type is not None and hasattr(mpi, mpi_type):
        names = _BOOL_OP_NAMES if dtype == torch.bool else _OP_NAMES
        mpi_op = names.get(op)
        if mpi_op is not None:
            found = (getattr(mpi, mpi_type), getattr(mpi, mpi_op))
    _cache[key] = found
    return found


def _segments(numel: int, size: int) -> tuple[list[int], list[int]]:
    base, extra = divmod(numel, size)
    counts = [base + (1 if r < extra else 0) for r in range(size)]
    displs = [0] * size
    for r in range(1, size):
        displs[r] = displs[r - 1] + counts[r - 1]
    return counts, displs


def _vspec(mpi: Any, flat: torch.Tensor, counts: list[int], displs: list[int]) -> list[Any]:
    """``flat`` as an MPI vector buffer of byte segments (element counts scaled to bytes)."""
    item = flat.element_size()
    return [host_bytes(flat), ([c * item for c in counts], [d * item for d in displs]), mpi.BYTE]


def _reduce_my_segment(
    engine: Engine, flat: torch.Tensor, op: ReduceOp, ctx: OpContext
) -> tuple[torch.Tensor, list[int], list[int]]:
    """Reduce-scatter: segment ``rank`` of the result (a new tensor), and the segment layout."""
    import torch

    mpi = engine.MPI
    size, rank, item = engine.size, engine.rank, flat.element_size()
    counts, displs = _segments(flat.numel(), size)
    mine = counts[rank]
    scratch = np.empty(size * mine * item, dtype=np.uint8)
    send = _vspec(mpi, flat, counts, displs)
    recv = [scratch, ([mine * item] * size, [r * mine * item for r in range(size)]), mpi.BYTE]
    req = engine.coll.Ialltoallv(send, recv)
    engine.wait([req], ctx, keep=(flat, scratch))
    if mine == 0:  # fewer elements than ranks
        return flat[:0].clone(), counts, displs
    blocks = torch.from_numpy(scratch).view(flat.dtype).view(size, mine)
    acc = blocks[0].clone()
    for r in range(1, size):
        combine_(acc, blocks[r], op)
    finish_(acc, op, size)
    return acc, counts, displs


def allreduce(engine: Engine, t: torch.Tensor, op: ReduceOp, ctx: OpContext) -> None:
    """Allreduce of a dtype MPI cannot reduce; bit-identical on every rank."""
    mpi = engine.MPI
    flat = t.view(-1)
    acc, counts, displs = _reduce_my_segment(engine, flat, op, ctx)
    start = displs[engine.rank]
    flat[start : start + acc.numel()].copy_(acc)
    req = engine.coll.Iallgatherv(mpi.IN_PLACE, _vspec(mpi, flat, counts, displs))
    engine.wait([req], ctx, keep=flat)


def reduce(engine: Engine, t: torch.Tensor, root: int, op: ReduceOp, ctx: OpContext) -> None:
    """Reduce of a dtype MPI cannot reduce; other ranks' tensors are left unchanged."""
    mpi = engine.MPI
    flat = t.view(-1)
    acc, counts, displs = _reduce_my_segment(engine, flat, op, ctx)
    if engine.rank == root:
        start = displs[root]
        flat[start : start + acc.numel()].copy_(acc)
        req = engine.coll.Igatherv(mpi.IN_PLACE, _vspec(mpi, flat, counts, displs), root)
        engine.wait([req], ctx, keep=flat)
    else:
        seg = host_bytes(acc)
        req = engine.coll.Igatherv([seg, mpi.BYTE], None, root)
        engine.wait([req], ctx, [root], keep=(acc, seg))
