"""Lossless fan-in of a batch: every slice lands straight in its place in the leader's output.

A plain gather would receive each rank's slice into fresh memory and ``torch.cat`` would then
copy every byte again into the output (a fresh allocation too: for large batches both the copy
and the page faults show, about 3-4 ms per 8 images of 512x512 here, much more at 32).  Instead:

1. a labelled gather of each rank's slice *description* (shape and dtype, or the error that kept
   the rank from producing one), a few hundred bytes per rank;
2. the leader allocates the output batch and hands one view per rank to
   :meth:`collectives.Communicator.gatherv_into`, which receives each slice into its view (a
   blocking call on the leader's own thread: every rank has reached this step by then).  A
   follower issues both steps at once: it needs nothing back from the first.

Ranks whose slices do not fit one batch (mixed dtypes, or trailing shapes that differ) are
received into their own tensors and reassembled by :func:`~comfy_nodes.tensors.concat_batches`,
with its promotion rules and errors.  A rank that failed sends an empty slice, so every rank
always takes part in both steps and the ranks stay in step; the leader then raises naming it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, NamedTuple

import torch

from . import collective, recycled
from .cluster import LEADER
from .tensors import as_batch, concat_batches

if TYPE_CHECKING:
    from collectives import Communicator

_NOTHING = torch.empty(0, dtype=torch.uint8)  # what a rank without a slice sends


def gather_batch_to_leader(comm: Communicator, x: Any, tag: str) -> torch.Tensor:
    """The leader returns every rank's slice of ``x`` in rank order; the others ``x`` itself."""
    try:
        mine: torch.Tensor | None = as_batch(x, tag).contiguous()
        failure: BaseException | None = None
    except Exception as err:
        mine, failure = None, err
    send = mine if mine is not None else _NOTHING
    if comm.rank != LEADER:
        # A follower needs nothing back from the first step: its slice is queued right behind
        # its description, so the communicator's thread goes on to send it without waiting
        # for this thread to wake up and issue it.
        described = collective.start_gather(comm, _describe(mine, failure), tag)
        sent = comm.igatherv_into(None, send, LEADER)
        collective.run(comm, lambda: described)
        collective.run(comm, lambda: sent)
        if failure is not None:
            raise failure
        return x  # type: ignore[no-any-return]
    infos = collective.gather(comm, _describe(mine, failure), tag)
    assert infos is not None
    landing = _Landing(infos, mine, tag)
    # Every rank has described its slice, so every rank is sending now: this step waits for
    # transfers only, and runs on this thread (no hand-off; collective.run_now).
    collective.run_now(comm, lambda: comm.gatherv_into(landing.blocks, send, LEADER))
    if failure is not None:
        raise failure
    if landing.peer_error is not None:
        raise landing.peer_error
    if landing.batch is not None:
        return landing.batch
    return concat_batches(landing.blocks, comm.rank, tag)


def _describe(mine: torch.Tensor | None, failure: BaseException | None) -> tuple[Any, ...]:
    if mine is None:
        return ("error", f"{type(failure).__name__}: {failure}")
    return ("batch", tuple(mine.shape), str(mine.dtype).removeprefix("torch."))


class _Slice(NamedTuple):
    shape: tuple[int, ...]
    dtype: torch.dtype


class _Landing:
    """The leader's receive buffer for each rank: views into one output batch when the slices
    fit one (``batch``), else a tensor of its own per rank."""

    def __init__(self, infos: list[Any], mine: torch.Tensor | None, tag: str) -> None:
        device = mine.device if mine is not None else torch.device("cpu")
        self.peer_error: collective.PeerNodeError | None = None
        self.batch: torch.Tensor | None = None
        slices: list[_Slice | None] = []
        for src, item in enumerate(infos):
            described = _parse(item)
            if described is None and self.peer_error is None:
                what = f"failed: {item[1]}" if _is_error(item) else f"sent {item!r}"
                self.peer_error = collective.PeerNodeError(f"{tag}: rank {src} {what}", rank=src)
            slices.append(described)
        filled = [s for s in slices if s is not None and s.shape[0] > 0]
        # One batch when every non-empty slice has the first one's trailing shape and dtype;
        # otherwise concat_batches promotes them, or refuses naming the rank.
        if (
            filled
            and all(s.shape[1:] == filled[0].shape[1:] for s in filled)
            and all(s.dtype == filled[0].dtype for s in filled)
        ):
            shape = (sum(s.shape[0] for s in filled), *filled[0].shape[1:])
            if device.type == "cpu":
                self.batch = recycled.empty(shape, filled[0].dtype)  # warm pages: see module
            else:
                self.batch = torch.empty(shape, dtype=filled[0].dtype, device=device)
        self.blocks: list[torch.Tensor] = []
        start = 0
        for s in slices:
            if s is None:
                self.blocks.append(_NOTHING)
            elif self.batch is not None and s.shape[0] > 0:  # its rows of the batch
                self.blocks.append(self.batch[start : start + s.shape[0]])
                start += s.shape[0]
            else:  # a tensor of its own (an empty slice keeps its shape and dtype)
                self.blocks.append(torch.empty(s.shape, dtype=s.dtype, device=device))


def _is_error(item: Any) -> bool:
    return isinstance(item, tuple | list) and len(item) == 2 and item[0] == "error"


def _parse(item: Any) -> _Slice | None:
    """A peer's slice description, checked before the leader allocates anything for it."""
    try:
        kind, shape, dtype_name = item
        dims = tuple(int(n) for n in shape)
        dtype = getattr(torch, str(dtype_name))
    except (TypeError, ValueError, AttributeError):
        return None
    if kind != "batch" or not isinstance(dtype, torch.dtype) or not dims or min(dims) < 0:
        return None
    return _Slice(dims, dtype)
