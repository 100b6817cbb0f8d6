"""Tensor views, dtype tables and point-to-point block moves of the torch backends.

Non-reducing ops hand gloo the tensor itself when gloo moves its dtype, else a uint8 view of the
same memory (float8, int16, uint16/32/64, complex): one ``view`` call, nothing else, because every
extra intermediate tensor was measured to add ~0.1 ms to a gloo op on this kind of machine.
Reductions map :class:`~collectives.reduce_op.ReduceOp` onto gloo's ops where the result is the
one :func:`~collectives.reduce_op.combine_` defines, and return None where it would not be.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from collectives.backends.torch_engine import RAW_SPACE, op_tag
from collectives.reduce_op import ReduceOp

if TYPE_CHECKING:
    import torch

    from collectives.backends.base import OpContext
    from collectives.backends.torch_engine import Engine


def flat_bytes(t: torch.Tensor) -> torch.Tensor:
    """The tensor's own memory as a contiguous uint8 tensor (the communicator checked contiguity).

    One ``view`` and nothing else: extra intermediate tensors (``detach().reshape(-1)``) were
    measured to add ~0.1 ms to every gloo op here.
    """
    import torch

    if t.requires_grad:
        t = t.detach()
    if t.dtype == torch.uint8:
        return t
    if t.dim() == 0:
        t = t.reshape(1)
    return t.view(torch.uint8)


def nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def wire(t: torch.Tensor) -> torch.Tensor:
    """What to hand the engine for a non-reducing op: the tensor itself when gloo moves its
    dtype (no new tensor object at all), else its bytes."""
    if t.dtype in movable_dtypes():
        return t.detach() if t.requires_grad else t
    return flat_bytes(t)


def blocks(t: torch.Tensor, size: int, like: torch.Tensor) -> torch.Tensor:
    """``t`` as ``size`` blocks shaped like the wire tensor ``like``; block ``r`` is rank r's."""
    return wire(t).view(size, *like.shape)


def staged(fn: Callable[[list[Any]], None], *tensors: torch.Tensor | None) -> None:
    """Run ``fn`` on host copies of device tensors the engine cannot take, then copy back."""
    hosts = [t.cpu() if t is not None else None for t in tensors]
    fn(hosts)
    for t, h in zip(tensors, hosts, strict=True):
        if t is not None and h is not None:
            t.copy_(h)


def reduce_plan(t: torch.Tensor, op: ReduceOp, *, cuda: bool) -> tuple[torch.Tensor, Any] | None:
    """The view and native op that reduce ``t`` exactly as :func:`combine_` would, or None."""
    import torch
    from torch.distributed import ReduceOp as Native

    if t.dtype == torch.bool:
        # torch's bool sum/prod mean "any"/"all"; gloo's bool sum would store 2 in a bool.
        if cuda and op in (ReduceOp.BAND, ReduceOp.BOR, ReduceOp.BXOR):
            return None
        as_max = (ReduceOp.SUM, ReduceOp.MAX, ReduceOp.BOR)
        as_min = (ReduceOp.PROD, ReduceOp.MIN, ReduceOp.BAND)
        native = Native.MAX if op in as_max else Native.MIN if op in as_min else Native.BXOR
        return flat_bytes(t), native
    if t.is_complex():
        if op in (ReduceOp.SUM, ReduceOp.AVG) and t.dtype in (torch.complex64, torch.complex128):
            return torch.view_as_real(t.detach() if t.requires_grad else t), Native.SUM
        return None
    if t.dtype not in native_dtypes():
        return None
    if cuda and op in (ReduceOp.BAND, ReduceOp.BOR, ReduceOp.BXOR):
        return None  # NCCL has no bitwise reductions
    return (t.detach() if t.requires_grad else t), native_ops()[op]


def native_ops() -> dict[ReduceOp, Any]:
    """Our ops as gloo's (AVG sums; the caller divides once at the end, as the fallback does)."""
    mapping = _MODULES.get("ops")
    if mapping is None:
        from torch.distributed import ReduceOp as Native

        mapping = _MODULES["ops"] = {
            ReduceOp.SUM: Native.SUM,
            ReduceOp.AVG: Native.SUM,
            ReduceOp.PROD: Native.PRODUCT,
            ReduceOp.MIN: Native.MIN,
            ReduceOp.MAX: Native.MAX,
            ReduceOp.BAND: Native.BAND,
            ReduceOp.BOR: Native.BOR,
            ReduceOp.BXOR: Native.BXOR,
        }
    return mapping


class DirectReductions(dict[tuple[Any, ReduceOp], Any]):
    """``(dtype, op)`` -> gloo's op where a CPU tensor of that dtype reduces as it is (the real
    dtypes gloo knows, bool aside), else None.  Filled on first use, then one dict lookup: the
    fast path of :class:`~collectives.backends.torch_dist.TorchBackend`'s reductions."""

    def __missing__(self, key: tuple[Any, ReduceOp]) -> Any:
        import torch

        dtype, op = key
        found = None
        if dtype in native_dtypes() and dtype != torch.bool:
            found = native_ops()[op]
        self[key] = found
        return found


_DTYPES: dict[str, frozenset[Any]] = {}
_MODULES: dict[str, Any] = {}


def c10d() -> Any:
    """``torch._C._distributed_c10d`` (the option classes), imported on first use."""
    module = _MODULES.get("c10d")
    if module is None:
        import torch._C._distributed_c10d as module

        _MODULES["c10d"] = module
    return module


def native_dtypes() -> frozenset[torch.dtype]:
    """dtypes gloo reduces (measured on torch 2.13; see docs/backend-torch.md)."""
    found = _DTYPES.get("reduce")
    if found is None:
        import torch

        found = _DTYPES["reduce"] = frozenset(
            {
                torch.float32,
                torch.float64,
                torch.float16,
                torch.bfloat16,
                torch.int8,
                torch.uint8,
                torch.int32,
                torch.int64,
            }
        )
    return found


def movable_dtypes() -> frozenset[torch.dtype]:
    """dtypes gloo moves as they are in every op (complex fails in gather: sent as bytes)."""
    found = _DTYPES.get("move")
    if found is None:
        import torch

        found = _DTYPES["move"] = native_dtypes() | {torch.bool}
    return found


# -- large gather/allgather blocks, point to point straight into ``out`` ---------------------------
def gather_p2p(
    engine: Engine, blocks: torch.Tensor | None, mine: torch.Tensor, root: int, ctx: OpContext
) -> None:
    """Every rank sends its block to the root, which receives each straight into ``blocks``."""
    tag = op_tag(RAW_SPACE, ctx.seq)
    works: list[tuple[Any, int]] = []
    try:
        if engine.rank != root:
            works.append((engine.post_send(mine, root, tag, ctx), root))
        else:
            assert blocks is not None
            for k in range(1, engine.size):
                src = (root + k) % engine.size
                works.append((engine.post_recv(blocks[src], src, tag, ctx), src))
            blocks[root].copy_(mine)
        engine.wait_all(works, ctx)
    except BaseException:
        engine.bury(works, blocks, mine)
        raise


def allgather_p2p(engine: Engine, blocks: torch.Tensor, mine: torch.Tensor, ctx: OpContext) -> None:
    """All to all in one round: every rank sends its block to every other rank."""
    tag = op_tag(RAW_SPACE, ctx.seq)
    rank, size = engine.rank, engine.size
    works: list[tuple[Any, int]] = []
    try:
        for k in range(1, size):
            src = (rank - k) % size
            works.append((engine.post_recv(blocks[src], src, tag, ctx), src))
        for k in range(1, size):
            dst = (rank + k) % size
            works.append((engine.post_send(mine, dst, tag, ctx), dst))
        blocks[rank].copy_(mine)
        engine.wait_all(works, ctx)
    except BaseException:
        engine.bury(works, blocks, mine)
        raise


__all__ = [
    "allgather_p2p",
    "DirectReductions",
    "blocks",
    "c10d",
    "flat_bytes",
    "gather_p2p",
    "movable_dtypes",
    "native_dtypes",
    "native_ops",
    "nbytes",
    "reduce_plan",
    "staged",
    "wire",
]
