"""Fan-out, fan-in, gather and broadcast of IMAGE, MASK and LATENT values over the cluster.

* fan-out: the leader's batch is split (:mod:`comfy_nodes.partition`); every rank returns its
  own slice.  Followers' inputs are ignored.
* fan-in: every rank passes its slice; the leader returns them concatenated in rank order, the
  other ranks return their own slice unchanged.
* gather: like fan-in, but every rank returns the whole batch.
* broadcast: the leader's value on every rank, unchanged (batch dimension included).

Values travel bit-exactly with their dtype (fp16/bf16 included) unless the caller picks the lossy
8-bit PNG codec for images; that codec is then applied to every rank's slice, the leader's own
included, so that the result does not depend on which rank had which item.  With a world of one
rank every operation returns its input unchanged.  A rank without items still takes part: its
slice is empty, with the trailing shape and the dtype of the batch.

Every payload is ``(kind, value)``: ``"raw"`` tensor, ``"png"`` frame, ``"obj"`` anything else, or
``"error"`` text.  A rank that cannot prepare its part (the leader's input is missing, a file does
not exist) sends the error instead, so that its peers fail at once rather than at the
communicator's timeout.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

import torch

from . import collective, recycled
from .cluster import LEADER
from .fan_in import gather_batch_to_leader
from .partition import resolve_weights, split_ranges
from .tensors import (
    Latent,
    as_batch,
    concat_batches,
    latent_samples,
    merge_latents,
    slice_latent,
)

if TYPE_CHECKING:
    from collectives import Communicator

LOSSLESS = "lossless"
PNG8 = "png (lossy 8-bit)"
CODECS = (LOSSLESS, PNG8)

Wire = tuple[str, Any]


def _lossy(codec: str) -> bool:
    if codec not in CODECS:
        raise ValueError(f"codec {codec!r} is not one of {list(CODECS)}")
    return codec == PNG8


_PLAIN = (str, int, float, bool, type(None), bytes)
_MAX_DEPTH = 64


def check_sendable(value: Any, tag: str, where: str = "the value", depth: int = 0) -> None:
    """Raise ``TypeError`` naming the node (``tag``) and the type unless ``value`` is made of
    tensors, dicts, lists, tuples, numbers, strings, bytes and None: the pack never pickles, so
    nothing else can reach the other ranks (better said here than as a codec error)."""
    if depth > _MAX_DEPTH:
        raise TypeError(f"{tag}: {where} is nested more than {_MAX_DEPTH} deep (a cycle?)")
    kind = type(value)
    if kind in _PLAIN or kind is torch.Tensor:
        return
    if kind is dict:
        for key, item in value.items():
            if type(key) not in _PLAIN:
                raise TypeError(
                    f"{tag}: {where} has a dict key of type {_type_name(key)}; the cluster "
                    "sends only str, int, float, bool or None keys"
                )
            check_sendable(item, tag, f"{where}[{key!r}]", depth + 1)
        return
    if kind in (list, tuple):
        for i, item in enumerate(value):
            check_sendable(item, tag, f"{where}[{i}]", depth + 1)
        return
    raise TypeError(
        f"{tag}: {where} is a {_type_name(value)}, which the cluster does not send (never "
        "pickled): it sends tensors, dicts, lists, tuples, numbers, strings, bytes and None"
    )


def _type_name(value: Any) -> str:
    kind = type(value)
    if kind.__module__ == "builtins":
        return kind.__qualname__
    return f"{kind.__module__}.{kind.__qualname__}"


def _codec(**kwargs: Any) -> Any:
    from collectives import CodecOptions

    return CodecOptions(**kwargs)  # never pickles: allow_pickle is False by default


def _to_wire(value: Any, lossy: bool = False, tag: str = "cluster node") -> Wire:
    if not isinstance(value, torch.Tensor):
        check_sendable(value, tag)
        return ("obj", value)
    if not lossy:
        return ("raw", value)
    from collectives import dumps

    # Tensors that are not image batches (rank, channels, dtype) travel raw inside the frame.
    return ("png", dumps(value, _codec(image_codec="png")))


def _error_wire(err: BaseException) -> Wire:
    return ("error", f"{type(err).__name__}: {err}")


def _from_wire(wire: Any, what: str, src: int) -> Any:
    kind, payload = wire
    if kind == "error":
        raise collective.PeerNodeError(f"{what}: rank {src} failed: {payload}", rank=src)
    if kind == "png":
        from collectives import loads

        if not isinstance(payload, bytes | bytearray | memoryview):
            raise collective.PeerNodeError(f"{what}: rank {src} sent a malformed frame", rank=src)
        return loads(payload, _codec())
    return payload


# -- generic --------------------------------------------------------------------------------------
def _scatter_from_leader(comm: Communicator, make_items: Callable[[], list[Wire]], tag: str) -> Any:
    """Scatter the leader's items; if making them fails, every rank fails with the reason."""
    items: list[Wire] | None = None
    failure: BaseException | None = None
    if comm.rank == LEADER:
        try:
            items = make_items()
        except Exception as err:
            failure = err
            items = [_error_wire(err)] * comm.size
    got = collective.scatter(comm, items, tag)
    if failure is not None:
        raise failure
    return _from_wire(got, tag, LEADER)


def _broadcast_from_leader(comm: Communicator, make: Callable[[], Wire], tag: str) -> Any:
    wire: Wire | None = None
    failure: BaseException | None = None
    if comm.rank == LEADER:
        try:
            wire = make()
        except Exception as err:
            failure = err
            wire = _error_wire(err)
    got = collective.broadcast(comm, wire, tag)
    if failure is not None:
        raise failure
    return _from_wire(got, tag, LEADER)


def _prepare(make: Callable[[], Wire]) -> tuple[Wire, BaseException | None]:
    try:
        return make(), None
    except Exception as err:
        return _error_wire(err), err


def _collect(
    comm: Communicator, make: Callable[[], Wire], tag: str, everywhere: bool
) -> list[Any] | None:
    """Every rank's part, in rank order, on the leader (or everywhere); errors re-raised."""
    wire, failure = _prepare(make)
    parts = (
        collective.allgather(comm, wire, tag) if everywhere else collective.gather(comm, wire, tag)
    )
    if failure is not None:
        raise failure
    if parts is None:
        return None
    return [_from_wire(p, tag, src) for src, p in enumerate(parts)]


# -- IMAGE / MASK / any batch-first tensor -------------------------------------------------------
def fan_out_batch(
    comm: Communicator,
    x: torch.Tensor | None,
    tag: str,
    weights: str | None = None,
    codec: str = LOSSLESS,
) -> torch.Tensor:
    """The leader's batch split over the ranks; every rank returns its own slice."""
    lossy = _lossy(codec)
    if comm.size == 1:
        return as_batch(x, tag)

    def make_items() -> list[Wire]:
        batch = as_batch(x, tag)
        ranges = split_ranges(batch.shape[0], comm.size, resolve_weights(weights, comm.size))
        return [_to_wire(batch[a:b], lossy) for a, b in ranges]

    mine = as_batch(_scatter_from_leader(comm, make_items, tag), tag)
    if comm.rank == LEADER and not lossy:
        # The leader's own slice is a view of its input, which it must not alias downstream.
        # Copied only now: the followers wait for their slices, not for this copy.  Into
        # recycled memory: a clone's fresh pages cost the leader 1-45 ms of faults per prompt.
        mine = _copy(mine)
    return mine


def _copy(x: torch.Tensor) -> torch.Tensor:
    """A copy of ``x`` that aliases nothing; a CPU one in recycled memory."""
    if x.device.type != "cpu":
        return x.clone()
    out = recycled.empty(x.shape, x.dtype)
    out.copy_(x)
    return out


def fan_in_batch(
    comm: Communicator, x: torch.Tensor, tag: str, codec: str = LOSSLESS
) -> torch.Tensor:
    """The leader returns every rank's slice concatenated in rank order; others their own."""
    lossy = _lossy(codec)
    if comm.size == 1:
        return as_batch(x, tag)
    if not lossy:
        return gather_batch_to_leader(comm, x, tag)
    parts = _collect(comm, lambda: _to_wire(as_batch(x, tag), lossy), tag, everywhere=False)
    if parts is None:
        return x
    return concat_batches([as_batch(p, tag) for p in parts], comm.rank, tag)


def gather_batch(
    comm: Communicator, x: torch.Tensor, tag: str, codec: str = LOSSLESS
) -> torch.Tensor:
    """Every rank returns every rank's slice concatenated in rank order."""
    lossy = _lossy(codec)
    if comm.size == 1:
        return as_batch(x, tag)
    parts = _collect(comm, lambda: _to_wire(as_batch(x, tag), lossy), tag, everywhere=True)
    assert parts is not None
    return concat_batches([as_batch(p, tag) for p in parts], comm.rank, tag)


def broadcast_value(comm: Communicator, value: Any, tag: str, codec: str = LOSSLESS) -> Any:
    """The leader's value, whatever it is (IMAGE, LATENT, MASK, ...), on every rank.

    Tensors keep their batch dimension.  The lossy codec applies only to tensors.
    """
    lossy = _lossy(codec)
    if comm.size == 1:
        return value

    def make() -> Wire:
        if value is None:
            raise ValueError(
                f"{tag}: the leader (rank {LEADER}) has no value to broadcast; connect its input"
            )
        return _to_wire(value, lossy, tag)

    # The leader decodes its own payload too: with the lossy codec every rank sees equal values.
    return _broadcast_from_leader(comm, make, tag)


def broadcast_loaded(
    comm: Communicator,
    load: Callable[[], tuple[torch.Tensor, torch.Tensor]],
    tag: str,
    codec: str = LOSSLESS,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``load()`` runs on the leader only; its (IMAGE, MASK) reaches every rank."""
    lossy = _lossy(codec)
    if comm.size == 1:
        return load()

    def make() -> Wire:
        image, mask = load()
        return ("obj", (_to_wire(image, lossy), mask))

    image_wire, mask = _broadcast_from_leader(comm, make, tag)
    return as_batch(_from_wire(image_wire, tag, LEADER), tag), as_batch(mask, tag)


# -- LATENT --------------------------------------------------------------------------------------
def fan_out_latent(
    comm: Communicator, latent: Mapping[str, Any] | None, tag: str, weights: str | None = None
) -> Latent:
    """The leader's LATENT split over the ranks; every rank returns its own slice."""
    if comm.size == 1:
        latent_samples(latent, tag)
        assert latent is not None
        return dict(latent)

    def make_items() -> list[Wire]:
        batch = latent_samples(latent, tag).shape[0]
        assert latent is not None
        ranges = split_ranges(batch, comm.size, resolve_weights(weights, comm.size))
        items = [slice_latent(latent, a, b, tag) for a, b in ranges]
        return [_to_wire(item, tag=tag) for item in items]

    got = dict(_scatter_from_leader(comm, make_items, tag))
    samples = latent_samples(got, tag)
    if comm.rank == LEADER:
        # As in fan_out_batch: the leader's slice stops aliasing its input once the others' are
        # on their way.
        got["samples"] = samples.clone()
    return got


def fan_in_latent(comm: Communicator, latent: Mapping[str, Any], tag: str) -> Latent:
    """The leader returns the whole LATENT in rank order; the other ranks their own slice."""
    if comm.size == 1:
        latent_samples(latent, tag)
        return dict(latent)

    def make() -> Wire:
        latent_samples(latent, tag)
        return _to_wire(dict(latent), tag=tag)

    parts = _collect(comm, make, tag, everywhere=False)
    if parts is None:
        return dict(latent)
    return merge_latents(parts, comm.rank, tag)


def gather_latents(comm: Communicator, latent: Mapping[str, Any], tag: str) -> Latent:
    """Every rank returns the whole LATENT (one LATENT, not a list of them), in rank order."""
    if comm.size == 1:
        latent_samples(latent, tag)
        return dict(latent)

    def make() -> Wire:
        latent_samples(latent, tag)
        return _to_wire(dict(latent), tag=tag)

    parts = _collect(comm, make, tag, everywhere=True)
    assert parts is not None
    return merge_latents(parts, comm.rank, tag)
