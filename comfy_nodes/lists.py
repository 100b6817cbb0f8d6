"""List and batch utilities (no communication).

ComfyUI hands list-aware nodes (``INPUT_IS_LIST``) a Python list of values.  Rule shared by the
nodes here: when that list holds exactly one batched value (an IMAGE/MASK tensor or a LATENT),
the node works on the items of its batch and returns one batch; otherwise it works on the list.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from . import tensors
from .partition import resolve_weights, split_ranges


def is_batch(value: Any) -> bool:
    """A batch-first tensor (IMAGE, MASK, ...) or a LATENT."""
    if isinstance(value, torch.Tensor):
        return value.dim() >= 1
    return isinstance(value, Mapping) and isinstance(value.get("samples"), torch.Tensor)


def batch_len(value: Any) -> int:
    if isinstance(value, Mapping):
        return int(tensors.latent_samples(value, "batch").shape[0])
    return int(tensors.as_batch(value, "batch").shape[0])


def take(value: Any, indices: Sequence[int]) -> Any:
    """Items ``indices`` of a batch, in that order."""
    if isinstance(value, Mapping):
        return tensors.take_latent(value, indices)
    tensor = tensors.as_batch(value, "batch")
    order = [int(i) for i in indices]
    if order == list(range(tensor.shape[0])):
        return tensor
    picker = torch.tensor(order, dtype=torch.long, device=tensor.device)
    return tensor.index_select(0, picker)


def concat(values: Sequence[Any]) -> Any:
    """Batches of one kind as one batch, in order."""
    if all(isinstance(v, Mapping) for v in values):
        return tensors.merge_latents(values, 0)
    parts = [tensors.as_batch(v, "batch") for v in values]
    return tensors.concat_batches(parts, 0, "batch")


def split_batch_to_list(value: Any) -> list[Any]:
    """One single-item batch per item (a LATENT item keeps its ``batch_index``)."""
    if isinstance(value, Mapping):
        return [tensors.slice_latent(value, i, i + 1) for i in range(batch_len(value))]
    tensor = tensors.as_batch(value, "batch")
    return [tensor[i : i + 1] for i in range(tensor.shape[0])]


def flatten(values: Sequence[Any]) -> list[Any]:
    """Nested lists flattened and every batch split into single items, in order."""
    out: list[Any] = []
    for value in values:
        if isinstance(value, list | tuple):
            out.extend(flatten(value))
        elif is_batch(value):
            out.extend(split_batch_to_list(value))
        else:
            out.append(value)
    return out


def _single_batch(values: Sequence[Any]) -> bool:
    return len(values) == 1 and is_batch(values[0])


def instance_share(
    values: Sequence[Any], rank: int, size: int, offset: int = 0, weights: str | None = None
) -> list[Any]:
    """This rank's contiguous share of a list (or of a single batch).

    ``offset`` rotates the assignment: rank r takes share ``(r + offset) mod size``; with as many
    items as ranks, rank r gets item ``(r + offset) mod size``.
    """
    which = (rank + offset) % size
    if _single_batch(values):
        batch = values[0]
        a, b = split_ranges(batch_len(batch), size, resolve_weights(weights, size))[which]
        if size == 1:
            return [batch]
        if isinstance(batch, Mapping):
            return [tensors.slice_latent(batch, a, b)]
        return [batch[a:b]]
    a, b = split_ranges(len(values), size, resolve_weights(weights, size))[which]
    return list(values[a:b])


def insert_at_index(values: Sequence[Any], items: Sequence[Any], index: int) -> list[Any]:
    """``items`` inserted before position ``index`` (Python semantics: negative counts from the
    end, out-of-range clamps).  A single batch receives a single batch's items."""
    if _single_batch(values) and _single_batch(items):
        batch, item = values[0], items[0]
        n = batch_len(batch)
        at = _clamp(index, n)
        before, after = take(batch, range(at)), take(batch, range(at, n))
        return [concat([before, item, after])]
    out = list(values)
    at = _clamp(index, len(out))
    out[at:at] = list(items)
    return out


def _clamp(index: int, n: int) -> int:
    return max(0, min(n, index + n if index < 0 else index))


def strided_order(n: int, stride: int) -> list[int]:
    """Every ``stride``-th index from 0, then from 1, ...: ``[0, s, 2s, ..., 1, 1+s, ...]``.

    Turns rank-major results (``[r0 i0, r0 i1, r1 i0, r1 i1]``) item-major with stride = items
    per rank; with ``n = a*b`` the order for stride ``b`` undoes the order for stride ``a``.
    """
    if stride < 1:
        raise ValueError(f"stride {stride} must be >= 1")
    return [i for start in range(stride) for i in range(start, n, stride)]


def strided_reorder(values: Sequence[Any], stride: int) -> list[Any]:
    if _single_batch(values):
        return [take(values[0], strided_order(batch_len(values[0]), stride))]
    return [values[i] for i in strided_order(len(values), stride)]
