"""How a batch of ``total`` items is divided among ``size`` ranks: contiguous, deterministic.

Rank ``r`` gets the half-open range ``ranges[r] = (start, stop)``; ranges are in rank order and
cover ``0..total`` exactly.  Without weights every rank gets ``total // size`` items and the first
``total % size`` ranks one more.  With weights (mixed GPUs: ``"3,1"`` gives rank 0 three times
rank 1's share) the shares are apportioned by the largest-remainder method in exact rational
arithmetic, ties going to the lower rank, so equal weights give exactly the unweighted split.
A rank may get zero items; it still takes part in every collective.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from fractions import Fraction

WEIGHTS_ENV = "COMFY_CLUSTER_WEIGHTS"

Range = tuple[int, int]


def parse_weights(spec: str | Sequence[float | int | str] | None, size: int) -> list[Fraction]:
    """Weights from ``"1,1,2"`` (commas or spaces) or a sequence; one non-negative per rank."""
    if spec is None:
        return [Fraction(1)] * size
    if isinstance(spec, str):
        parts = [p for p in spec.replace(",", " ").split() if p]
        if not parts:
            return [Fraction(1)] * size
    else:
        parts = [str(p) for p in spec]
    weights: list[Fraction] = []
    for part in parts:
        try:
            value = Fraction(part)
        except (ValueError, ZeroDivisionError):
            raise ValueError(f"weight {part!r} is not a number (weights look like '3,1')") from None
        if value < 0:
            raise ValueError(f"weight {part!r} is negative; weights must be >= 0")
        weights.append(value)
    if len(weights) != size:
        raise ValueError(
            f"{len(weights)} weight(s) {spec!r} for a world of {size} rank(s): give one per rank"
        )
    if not any(weights):
        raise ValueError(f"weights {spec!r} are all zero: at least one rank must get work")
    return weights


def resolve_weights(
    node_value: str | None, size: int, environ: Mapping[str, str] | None = None
) -> list[Fraction]:
    """The node's own weights if given, else ``COMFY_CLUSTER_WEIGHTS``, else equal weights."""
    if node_value is not None and node_value.strip():
        return parse_weights(node_value, size)
    env = os.environ if environ is None else environ
    raw = env.get(WEIGHTS_ENV, "").strip()
    if raw:
        try:
            return parse_weights(raw, size)
        except ValueError as err:
            raise ValueError(f"{WEIGHTS_ENV}={raw!r}: {err}") from None
    return [Fraction(1)] * size


def split_counts(total: int, weights: Sequence[Fraction | int]) -> list[int]:
    """Items per rank: largest remainder over ``weights`` (ties to the lower rank)."""
    if total < 0:
        raise ValueError(f"cannot split {total} items")
    if not weights:
        raise ValueError("cannot split over zero ranks")
    ws = [Fraction(w) for w in weights]
    if any(w < 0 for w in ws) or not any(ws):
        raise ValueError(f"weights {[str(w) for w in ws]} must be >= 0 and not all zero")
    whole = sum(ws)
    quotas = [total * w / whole for w in ws]
    counts = [int(q) for q in quotas]  # floor: quotas are non-negative
    left = total - sum(counts)
    by_remainder = sorted(range(len(ws)), key=lambda r: (-(quotas[r] - counts[r]), r))
    for r in by_remainder[:left]:
        counts[r] += 1
    return counts


def split_ranges(
    total: int, size: int, weights: Sequence[Fraction | int] | None = None
) -> list[Range]:
    """Contiguous ``(start, stop)`` per rank, in rank order."""
    if size < 1:
        raise ValueError(f"world size {size} must be >= 1")
    counts = split_counts(total, [1] * size if weights is None else weights)
    if len(counts) != size:
        raise ValueError(f"{len(counts)} weights for a world of {size} ranks")
    ranges: list[Range] = []
    start = 0
    for count in counts:
        ranges.append((start, start + count))
        start += count
    return ranges
