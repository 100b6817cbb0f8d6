"""Reduction operators and how they combine tensors locally."""

from __future__ import annotations

import enum
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from collectives.errors import ConfigurationError

if TYPE_CHECKING:
    import torch


class ReduceOp(enum.Enum):
    SUM = "sum"
    PROD = "prod"
    MIN = "min"
    MAX = "max"
    AVG = "avg"
    BAND = "band"
    BOR = "bor"
    BXOR = "bxor"

    # Members are singletons compared by identity, so the identity hash agrees with equality;
    # Enum's own __hash__ is Python code, run on every dict lookup keyed by an op (per op call).
    __hash__ = object.__hash__

    @classmethod
    def parse(cls, op: ReduceOp | str) -> ReduceOp:
        if isinstance(op, ReduceOp):
            return op
        # A dict lookup: ``cls(value)`` goes through EnumMeta.__call__, a microsecond per op.
        found = _BY_NAME.get(op) if isinstance(op, str) else None
        if found is not None:
            return found
        try:
            return cls(str(op).lower())
        except ValueError:
            names = ", ".join(m.value for m in cls)
            raise ConfigurationError(f"unknown reduce op {op!r}: use one of {names}") from None


_BY_NAME: dict[str, ReduceOp] = {m.value: m for m in ReduceOp}
# Names and members to members, for callers that look up inline before falling back to parse().
PARSED: dict[object, ReduceOp] = {**{m: m for m in ReduceOp}}
PARSED.update(_BY_NAME)
# Module constants: ``ReduceOp.X`` is an EnumMeta attribute lookup, slow enough to show per op.
_SUM, _AVG = ReduceOp.SUM, ReduceOp.AVG
_BITWISE = frozenset((ReduceOp.BAND, ReduceOp.BOR, ReduceOp.BXOR))
_ORDERED = frozenset((ReduceOp.MIN, ReduceOp.MAX))


def check_reducible(tensor: torch.Tensor, op: ReduceOp) -> None:
    """Refuse combinations whose result would be ill-defined before any byte is sent."""
    if op is _SUM:  # the common case: defined for every dtype
        return
    if op is _AVG and not (tensor.is_floating_point() or tensor.is_complex()):
        raise ConfigurationError(f"op 'avg' needs a floating tensor, got {tensor.dtype}")
    if op in _BITWISE and (tensor.is_floating_point() or tensor.is_complex()):
        raise ConfigurationError(f"bitwise op {op.value!r} needs an integer or bool tensor")
    if op in _ORDERED and tensor.is_complex():
        raise ConfigurationError(f"op {op.value!r} is undefined for complex tensors")


def combine_(acc: torch.Tensor, other: torch.Tensor, op: ReduceOp) -> None:
    """acc <- acc (op) other, in place.  AVG accumulates a sum; the caller divides at the end."""
    import torch

    if acc.dtype == torch.bool:
        # Sum and prod of booleans are "any" and "all", as in torch.distributed.
        if op in (ReduceOp.SUM, ReduceOp.MAX, ReduceOp.BOR):
            acc.logical_or_(other)
        elif op in (ReduceOp.PROD, ReduceOp.MIN, ReduceOp.BAND):
            acc.logical_and_(other)
        elif op is ReduceOp.BXOR:
            acc.logical_xor_(other)
        return
    if _needs_upcast(acc):
        # float8 has no arithmetic kernels: compute in float32 and round once per step.
        wide = acc.float()
        combine_(wide, other.float(), op)
        acc.copy_(wide.to(acc.dtype))
        return
    if acc.dtype in (torch.uint16, torch.uint32):
        # No CPU kernels for these: int64 holds every value; the cast back wraps modulo 2**n,
        # exactly as native unsigned arithmetic would.
        wide = acc.to(torch.int64)
        combine_(wide, other.to(torch.int64), op)
        acc.copy_(wide.to(acc.dtype))
        return
    if acc.dtype == torch.uint64:
        # Two's complement: sum, product and bitwise ops are the same bits on an int64 view;
        # flipping the top bit maps unsigned order onto signed order for min and max.
        flip = op in (ReduceOp.MIN, ReduceOp.MAX)
        a, b = acc.view(torch.int64), other.to(acc.dtype).view(torch.int64)
        if flip:
            a.bitwise_xor_(_SIGN)
            b = b ^ _SIGN
        combine_(a, b, op)
        if flip:
            a.bitwise_xor_(_SIGN)
        return
    if op in (ReduceOp.SUM, ReduceOp.AVG):
        acc.add_(other)
    elif op is ReduceOp.PROD:
        acc.mul_(other)
    elif op is ReduceOp.MIN:
        torch.minimum(acc, other, out=acc)
    elif op is ReduceOp.MAX:
        torch.maximum(acc, other, out=acc)
    elif op is ReduceOp.BAND:
        acc.bitwise_and_(other)
    elif op is ReduceOp.BOR:
        acc.bitwise_or_(other)
    else:
        acc.bitwise_xor_(other)


def out_combiner(op: ReduceOp, like: torch.Tensor) -> Callable[..., Any] | None:
    """A torch function ``f(lower, upper, out=dst)`` that writes ``lower (op) upper`` into
    ``dst`` with the same bits as :func:`combine_` on a copy of ``lower``, for the ops and
    dtypes that :func:`combine_` runs as one plain kernel; None for the others (bool, float8,
    uint16/32/64), which take :func:`combine_`.  Saves a reduction the copy of each step."""
    import torch

    dtype = like.dtype
    if dtype == torch.bool or _needs_upcast(like):
        return None
    if dtype in (torch.uint16, torch.uint32, torch.uint64):
        return None
    if not _OUT_FUNCS:
        _OUT_FUNCS.update(
            {
                ReduceOp.SUM: torch.add,
                ReduceOp.AVG: torch.add,
                ReduceOp.PROD: torch.mul,
                ReduceOp.MIN: torch.minimum,
                ReduceOp.MAX: torch.maximum,
                ReduceOp.BAND: torch.bitwise_and,
                ReduceOp.BOR: torch.bitwise_or,
                ReduceOp.BXOR: torch.bitwise_xor,
            }
        )
    return _OUT_FUNCS[op]


_OUT_FUNCS: dict[ReduceOp, Callable[..., Any]] = {}


def finish_(acc: torch.Tensor, op: ReduceOp, world_size: int) -> None:
    """Apply the once-per-reduction step (AVG's division) on the final accumulator."""
    if op is ReduceOp.AVG:
        if _needs_upcast(acc):
            acc.copy_((acc.float() / world_size).to(acc.dtype))
        else:
            acc.div_(world_size)


_SIGN = -(2**63)  # int64 with only the top bit set


def _needs_upcast(t: torch.Tensor) -> bool:
    return t.dtype.is_floating_point and t.element_size() == 1
