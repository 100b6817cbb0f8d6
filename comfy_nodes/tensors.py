"""ComfyUI's IMAGE, MASK and LATENT values as batches: checks, slicing, reassembly.

* IMAGE: float tensor ``[B, H, W, C]``.  MASK: ``[B, H, W]`` (``[H, W]`` is a batch of one).
  Any batch-first tensor is handled the same way.
* LATENT: ``{"samples": [B, C, H, W], "noise_mask"?: ..., "batch_index"?: list[int], ...}``.
  Slicing keeps every per-batch key consistent: ``samples`` and ``noise_mask`` are sliced (a
  one-item mask is kept whole, as ComfyUI repeats it), ``batch_index`` holds the items' global
  indices so that KSampler draws each item's own noise; other keys are copied unchanged.

No communication here (see :mod:`comfy_nodes.distribute`); values and dtypes are never altered.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch

Latent = dict[str, Any]

SYNTHETIC_BATCH_INDEX = "cluster_synthetic_batch_index"
"""Records a ``batch_index`` that slicing made up (the input had none), so reassembly can drop it
again: ComfyUI draws noise differently with and without ``batch_index`` for latents whose item
size is not a multiple of 16 elements, and a fan-out/fan-in round trip must change nothing."""


# -- checks ---------------------------------------------------------------------------------------
def as_batch(value: Any, what: str) -> torch.Tensor:
    """A batch-first tensor, or a clear error naming the node input at fault."""
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{what}: expected a tensor, got {type(value).__name__}")
    if value.dim() < 1:
        raise ValueError(f"{what}: a 0-d tensor has no batch dimension")
    return value


def as_mask_batch(value: Any, what: str) -> torch.Tensor:
    """MASK as ``[B, H, W]``: a single ``[H, W]`` mask becomes a batch of one."""
    mask = as_batch(value, what)
    return mask.unsqueeze(0) if mask.dim() == 2 else mask


def latent_samples(latent: Any, what: str) -> torch.Tensor:
    if not isinstance(latent, Mapping) or "samples" not in latent:
        raise TypeError(
            f"{what}: expected a LATENT (a dict with 'samples'), got {type(latent).__name__}"
        )
    return as_batch(latent["samples"], f"{what}['samples']")


def concat_batches(parts: Sequence[torch.Tensor], own: int, what: str) -> torch.Tensor:
    """Concatenate rank-ordered batches on the device of part ``own`` (this rank's).

    Empty parts (ranks without items) are skipped, whatever their trailing shape.  Mixed float
    dtypes are promoted by ``torch.cat``, exactly (fp16 and bf16 values fit in fp32).
    """
    device = parts[own].device
    filled = [(r, p) for r, p in enumerate(parts) if p.shape[0] > 0]
    if not filled:
        return parts[own]
    first_rank, first = filled[0]
    for rank, part in filled[1:]:
        if part.shape[1:] != first.shape[1:]:
            raise ValueError(
                f"{what}: rank {rank}'s items are {tuple(part.shape[1:])} but rank {first_rank}'s "
                f"are {tuple(first.shape[1:])}; every rank must produce items of the same size"
            )
    if len(filled) == 1:
        return filled[0][1].to(device)
    return torch.cat([p.to(device) for _, p in filled], dim=0)


# -- LATENT --------------------------------------------------------------------------------------
def _slice_mask(mask: torch.Tensor, start: int, stop: int) -> torch.Tensor:
    """The noise mask items ``start..stop`` use.

    ComfyUI repeats a mask of M items to the batch (item i uses mask i mod M) and truncates a
    longer one, so a one-item or unbatched mask is kept whole and the others are indexed.
    """
    if mask.dim() <= 2 or mask.shape[0] <= 1:
        return mask
    count = mask.shape[0]
    if count >= stop:
        return mask[start:stop]
    index = torch.tensor([i % count for i in range(start, stop)], dtype=torch.long)
    return mask.index_select(0, index.to(mask.device))


def slice_latent(latent: Mapping[str, Any], start: int, stop: int, what: str = "LATENT") -> Latent:
    """Items ``start..stop`` of a LATENT, every per-batch key sliced, other keys kept."""
    samples = latent_samples(latent, what)
    batch = samples.shape[0]
    out: Latent = dict(latent)
    out["samples"] = samples[start:stop]
    mask = latent.get("noise_mask")
    if isinstance(mask, torch.Tensor):
        out["noise_mask"] = _slice_mask(mask, start, stop)
    index = latent.get("batch_index")
    if index is not None:
        index = [int(i) for i in index]
        if len(index) != batch:
            raise ValueError(f"{what}: batch_index has {len(index)} entries for {batch} samples")
    synthetic = latent.get(SYNTHETIC_BATCH_INDEX)
    out.pop("batch_index", None)
    out.pop(SYNTHETIC_BATCH_INDEX, None)
    if stop <= start:
        # ComfyUI's prepare_noise fails on an empty batch_index; without one an empty batch
        # gets empty noise.  Reassembly gives this slice no index either way.
        return out
    if index is None:
        out["batch_index"] = list(range(start, stop))
        out[SYNTHETIC_BATCH_INDEX] = list(range(start, stop))
    else:
        out["batch_index"] = index[start:stop]
        if synthetic is not None and list(synthetic) == index:
            out[SYNTHETIC_BATCH_INDEX] = index[start:stop]
    return out


def _repeat_to_batch(t: torch.Tensor, n: int) -> torch.Tensor:
    """ComfyUI's ``repeat_to_batch_size``: truncate, or repeat cyclically, to ``n`` items."""
    have = t.shape[0]
    if have >= n:
        return t[:n]
    if have == 0:
        raise ValueError("cannot repeat an empty noise_mask to a batch")
    return torch.cat([t] * math.ceil(n / have), dim=0)[:n]


def _merge_masks(
    masks: list[torch.Tensor | None], counts: list[int], own: int
) -> torch.Tensor | None:
    present = [m for m in masks if m is not None]
    if not present:
        return None
    first = present[0]
    unbatched = all(m is not None and (m.dim() <= 2 or m.shape[0] == 1) for m in masks)
    if unbatched and all(
        m.shape == first.shape and m.dtype == first.dtype and torch.equal(m, first.to(m.device))
        for m in present
    ):
        return first  # one mask for every item, as fan-out passed it on
    if all(
        m is not None and m.dim() >= 3 and m.shape[0] == n
        for m, n in zip(masks, counts, strict=True)
    ):
        return concat_batches([m for m in masks if m is not None], own, "noise_mask")
    # Mixed forms: normalise as ComfyUI does (reshape to [-1, 1, H, W], repeat to the batch).
    height, width = first.shape[-2], first.shape[-1]
    own_mask = masks[own]
    device = (own_mask if own_mask is not None else first).device
    pieces = []
    for m, n in zip(masks, counts, strict=True):
        if n == 0:
            continue
        if m is None:
            pieces.append(torch.ones((n, 1, height, width), dtype=first.dtype, device=device))
        else:
            pieces.append(_repeat_to_batch(m.reshape(-1, 1, height, width), n).to(device))
    if not pieces:
        return first
    return torch.cat(pieces, dim=0)


def merge_latents(parts: Sequence[Mapping[str, Any]], own: int, what: str = "LATENT") -> Latent:
    """Rank-ordered LATENT slices as one LATENT (other keys from the first part)."""
    samples = [latent_samples(p, f"{what} of rank {r}") for r, p in enumerate(parts)]
    counts = [s.shape[0] for s in samples]
    out: Latent = dict(parts[0])
    out["samples"] = concat_batches(samples, own, what)

    masks = [
        p.get("noise_mask") if isinstance(p.get("noise_mask"), torch.Tensor) else None
        for p in parts
    ]
    merged_mask = _merge_masks(masks, counts, own)
    if merged_mask is None:
        out.pop("noise_mask", None)
    else:
        out["noise_mask"] = merged_mask

    out.pop("batch_index", None)
    out.pop(SYNTHETIC_BATCH_INDEX, None)

    def synthetic(p: Mapping[str, Any]) -> bool:
        if "batch_index" not in p:
            return SYNTHETIC_BATCH_INDEX not in p
        marker = p.get(SYNTHETIC_BATCH_INDEX)
        return marker is not None and list(marker) == list(p["batch_index"])

    if any("batch_index" in p for p in parts) and not all(synthetic(p) for p in parts):
        index: list[int] = []
        offset = 0
        for p, n in zip(parts, counts, strict=True):
            own_index = p.get("batch_index")
            index.extend(range(offset, offset + n) if own_index is None else own_index)
            offset += n
        if len(index) == sum(counts):
            out["batch_index"] = [int(i) for i in index]
    return out


# -- local slicing (no communication) ----------------------------------------------------------
def take_latent(latent: Mapping[str, Any], indices: Sequence[int], what: str = "LATENT") -> Latent:
    """The LATENT made of items ``indices`` (in that order), each keeping its noise and mask."""
    samples = latent_samples(latent, what)
    batch = samples.shape[0]
    order = [int(i) for i in indices]
    if any(not 0 <= i < batch for i in order):
        raise IndexError(f"{what}: indices {order} out of range for a batch of {batch}")
    out: Latent = dict(latent)
    picker = torch.tensor(order, dtype=torch.long)
    out["samples"] = samples.index_select(0, picker.to(samples.device))
    mask = latent.get("noise_mask")
    if isinstance(mask, torch.Tensor) and mask.dim() >= 3 and mask.shape[0] > 1:
        full = _repeat_to_batch(mask, batch)
        out["noise_mask"] = full.index_select(0, picker.to(full.device))
    index = latent.get("batch_index")
    known = list(range(batch)) if index is None else [int(i) for i in index]
    if len(known) != batch:
        raise ValueError(f"{what}: batch_index has {len(known)} entries for {batch} samples")
    out["batch_index"] = [known[i] for i in order]
    if order != list(range(batch)):
        out.pop(SYNTHETIC_BATCH_INDEX, None)
    elif index is None:
        return dict(latent)
    return out
