"""The object API and user point-to-point messages of the torch backends.

Everything travels as envelope-led messages (:mod:`collectives.backends.torch_messages`) on one
tag per op: binomial-tree broadcast and dissemination barrier from :mod:`collectives.algorithms`,
direct gather and scatter, and an all-to-all allgather (one round; gloo's own allgather is
several times slower here).  User ``send``/``recv`` use the user's tag (shifted into its own tag
space); a receive that times out can be resumed by the next receive on the same channel.

The rooted ops (broadcast, gather, scatter) also exchange envelopes between every pair of ranks
alongside their data once the world has three ranks or more (see ``Link``'s vote), so that ranks
naming different roots all fail instead of some of them returning data.  Every received header is
held to the communicator's codec limits before anything is allocated for it; decoding (with the
same options) is the communicator's.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from collectives import algorithms
from collectives.backends.envelope import NO_ROOT, user_envelope
from collectives.backends.torch_messages import Incoming, link, outgoing
from collectives.errors import CollectiveTimeoutError, TransportError

if TYPE_CHECKING:
    import torch

    from collectives.backends.base import OpContext
    from collectives.backends.torch_engine import Engine
    from collectives.codec import CodecOptions, Encoded


def broadcast(
    engine: Engine,
    msg: Encoded | None,
    root: int,
    ctx: OpContext,
    tag: int,
    *,
    codec: CodecOptions,
) -> Encoded:
    with link(engine, ctx, tag, root=root, codec=codec, agree=True) as lk:
        return algorithms.broadcast(lk, msg, root)


def gather(
    engine: Engine, msg: Encoded, root: int, ctx: OpContext, tag: int, *, codec: CodecOptions
) -> list[Encoded] | None:
    got = _gather(engine, msg, root, ctx, tag, codec=codec, direct=None, agree=True)
    return None if got is None else [msg if r == root else got[r] for r in range(engine.size)]


def gather_direct(
    engine: Engine,
    msg: Encoded,
    root: int,
    ctx: OpContext,
    tag: int,
    *,
    codec: CodecOptions,
    direct: Mapping[int, torch.Tensor] | None,
) -> dict[int, Encoded] | None:
    """:func:`gather` whose message from ``src`` lands in ``direct[src]`` (uint8) if it fits;
    the root gets the other ranks' messages by rank, the others None (``gatherv_into``: an
    in-place op, so no vote)."""
    return _gather(engine, msg, root, ctx, tag, codec=codec, direct=direct, agree=False)


def _gather(
    engine: Engine,
    msg: Encoded,
    root: int,
    ctx: OpContext,
    tag: int,
    *,
    codec: CodecOptions,
    direct: Mapping[int, torch.Tensor] | None,
    agree: bool,
) -> dict[int, Encoded] | None:
    """Every other rank's message by rank on the root (``direct``: see :func:`gather_direct`;
    ``agree``: the rooted op's vote), None elsewhere."""
    with link(engine, ctx, tag, root=root, codec=codec, agree=agree) as lk:
        if engine.rank != root:
            lk.send(root, msg)
            return None
        return lk.recv_many([r for r in range(engine.size) if r != root], direct)


def scatter(
    engine: Engine,
    msgs: list[Encoded] | None,
    root: int,
    ctx: OpContext,
    tag: int,
    *,
    codec: CodecOptions,
) -> Encoded:
    with link(engine, ctx, tag, root=root, codec=codec, agree=True) as lk:
        if engine.rank != root:
            return lk.recv(root)
        assert msgs is not None and len(msgs) == engine.size
        for k in range(1, engine.size):
            dst = (root + k) % engine.size
            lk.send(dst, msgs[dst])
        return msgs[root]


def allgather(
    engine: Engine, msg: Encoded, ctx: OpContext, tag: int, *, codec: CodecOptions
) -> list[Encoded]:
    rank, size = engine.rank, engine.size
    with link(engine, ctx, tag, root=NO_ROOT, codec=codec) as lk:
        for k in range(1, size):
            lk.send((rank + k) % size, msg)
        got = lk.recv_many([(rank - k) % size for k in range(1, size)])
        return [msg if r == rank else got[r] for r in range(size)]


def barrier(engine: Engine, ctx: OpContext, tag: int, *, codec: CodecOptions) -> None:
    with link(engine, ctx, tag, root=NO_ROOT, codec=codec) as lk:
        algorithms.barrier(lk)


# -- user point-to-point ---------------------------------------------------------------------------
def send(engine: Engine, msg: Encoded, dst: int, tag: int, ctx: OpContext) -> None:
    parts = outgoing(msg, user_envelope(engine.comm, engine.epoch)).parts
    works: list[tuple[Any, int]] = []
    try:
        with engine.channel_lock("send", dst, tag):
            for part in parts:
                works.append((engine.post_send(part, dst, tag, ctx), dst))
        engine.wait_all(works, ctx)
    except BaseException:
        engine.bury(parts, works)
        raise


def recv(
    engine: Engine,
    src: int,
    tag: int,
    ctx: OpContext,
    *,
    codec: CodecOptions,
    direct: torch.Tensor | None = None,
) -> tuple[Encoded, bool]:
    """The next message on (src, tag) and whether it landed in ``direct`` itself.

    A receive that times out leaves its posted receives in place, still waited for until
    ``GRACE_S`` past its deadline; a receive on the same channel in that window resumes it, so
    a late message is delivered rather than misread.  After that window gloo has given up on
    those receives but may still fill them, so the channel is refused from then on.
    """
    key = (src, tag)
    with engine.channel_lock("recv", src, tag):
        if key in engine.poisoned:
            raise _poisoned(engine, src, tag, ctx)
        inc = engine.resumable.pop(key, None)
        if inc is not None and inc.expired():
            engine.poisoned.add(key)
            inc.abandon()
            raise _poisoned(engine, src, tag, ctx)
        if inc is None:
            inc = Incoming(
                engine,
                src,
                tag,
                ctx,
                expect=user_envelope(engine.comm, engine.epoch),
                codec=codec,
                direct=direct,
            )
        try:
            inc.advance(ctx)
            msg = inc.finish(ctx)
        except CollectiveTimeoutError:
            engine.resumable[key] = inc
            raise
        except BaseException:
            inc.abandon()
            raise
        return msg, inc.used_direct and inc.direct is direct


def _poisoned(engine: Engine, src: int, tag: int, ctx: OpContext) -> TransportError:
    return TransportError(
        f"{ctx.name} on rank {engine.rank}: the channel from rank {src} with tag {tag >> 2} is "
        "unusable: an earlier receive on it timed out and gloo may still deliver that message "
        "into the abandoned buffer; use another tag (or a new communicator)"
    )


__all__ = ["allgather", "barrier", "broadcast", "gather", "recv", "scatter", "send"]
