"""Collectives for backends that only move point-to-point messages.

Every message carries an envelope naming the operation and its sequence number; a receiver that
finds another op's message where it expected its own raises ``CollectiveMismatchError`` rather
than feeding the wrong bytes into the wrong call (the original design's worst failure).
"""

from __future__ import annotations

import abc
from typing import TYPE_CHECKING, NamedTuple

from collectives import algorithms
from collectives.backends.base import Backend, OpContext
from collectives.codec import Encoded, decode, encode
from collectives.errors import CollectiveMismatchError
from collectives.reduce_op import ReduceOp

if TYPE_CHECKING:
    import torch

    from collectives.deadline import Deadline

COLLECTIVE_CHANNEL = "c"


def p2p_channel(tag: int) -> str:
    return f"p{tag}"


class Envelope(NamedTuple):
    op: str
    seq: int


class P2PBackend(Backend):
    """Implements every collective with :mod:`collectives.algorithms`; subclasses move messages."""

    @abc.abstractmethod
    def _post(self, dst: int, channel: str, env: Envelope, msg: Encoded, dl: Deadline) -> None:
        """Deliver ``msg`` to ``dst``'s queue for ``channel`` (FIFO per sender and channel)."""

    @abc.abstractmethod
    def _take(self, src: int, channel: str, dl: Deadline) -> tuple[Envelope, Encoded]:
        """Next message from ``src`` on ``channel``; raise ``dl.error([src])`` at the deadline."""

    @abc.abstractmethod
    def _has_message(self, src: int, channel: str) -> bool: ...

    # -- point to point ------------------------------------------------------------------------
    def send(self, msg: Encoded, dst: int, tag: int, ctx: OpContext) -> None:
        self._post(dst, p2p_channel(tag), Envelope("send", 0), msg, ctx.deadline)

    def recv(self, src: int, tag: int, ctx: OpContext) -> Encoded:
        return self._take(src, p2p_channel(tag), ctx.deadline)[1]

    def send_buffer(self, tensor: torch.Tensor, dst: int, tag: int, ctx: OpContext) -> None:
        self.send(encode(tensor), dst, tag, ctx)

    def recv_into(self, tensor: torch.Tensor, src: int, tag: int, ctx: OpContext) -> None:
        place_block(tensor, self.recv(src, tag, ctx), src, ctx)

    # -- collectives ---------------------------------------------------------------------------
    def _link(self, ctx: OpContext) -> _CollectiveLink:
        return _CollectiveLink(self, ctx)

    def broadcast(self, msg: Encoded | None, root: int, ctx: OpContext) -> Encoded:
        return algorithms.broadcast(self._link(ctx), msg, root)

    def gather(self, msg: Encoded, root: int, ctx: OpContext) -> list[Encoded] | None:
        return algorithms.gather(self._link(ctx), msg, root)

    def scatter(self, msgs: list[Encoded] | None, root: int, ctx: OpContext) -> Encoded:
        return algorithms.scatter(self._link(ctx), msgs, root)

    def allgather(self, msg: Encoded, ctx: OpContext) -> list[Encoded]:
        return algorithms.allgather(self._link(ctx), msg)

    def barrier(self, ctx: OpContext) -> None:
        algorithms.barrier(self._link(ctx))

    def allreduce(self, tensor: torch.Tensor, op: ReduceOp, ctx: OpContext) -> None:
        algorithms.allreduce_tensor(self._link(ctx), tensor, op)

    def reduce(self, tensor: torch.Tensor, root: int, op: ReduceOp, ctx: OpContext) -> None:
        algorithms.reduce_tensor(self._link(ctx), tensor, root, op)

    def broadcast_into(self, tensor: torch.Tensor, root: int, ctx: OpContext) -> None:
        msg = algorithms.broadcast(
            self._link(ctx), encode(tensor) if self.rank == root else None, root
        )
        if self.rank != root:
            place_block(tensor, msg, root, ctx)

    def gather_into(
        self, out: torch.Tensor | None, tensor: torch.Tensor, root: int, ctx: OpContext
    ) -> None:
        msgs = algorithms.gather(self._link(ctx), encode(tensor), root)
        if msgs is not None:
            assert out is not None
            blocks = out.view(self.size, *tensor.shape)
            for src, msg in enumerate(msgs):
                if src != self.rank:
                    place_block(blocks[src], msg, src, ctx)
                else:
                    blocks[src].copy_(tensor)

    def allgather_into(self, out: torch.Tensor, tensor: torch.Tensor, ctx: OpContext) -> None:
        msgs = algorithms.allgather(self._link(ctx), encode(tensor))
        blocks = out.view(self.size, *tensor.shape)
        for src, msg in enumerate(msgs):
            if src != self.rank:
                place_block(blocks[src], msg, src, ctx)
            else:
                blocks[src].copy_(tensor)

    def scatter_into(
        self, out: torch.Tensor, tensor: torch.Tensor | None, root: int, ctx: OpContext
    ) -> None:
        msgs = None
        if self.rank == root:
            assert tensor is not None
            msgs = [encode(block) for block in tensor.view(self.size, *out.shape)]
        msg = algorithms.scatter(self._link(ctx), msgs, root)
        if self.rank == root:
            assert tensor is not None
            out.copy_(tensor.view(self.size, *out.shape)[root])
        else:
            place_block(out, msg, root, ctx)


class _CollectiveLink:
    """Binds the shared algorithms to one collective: its envelope and its deadline."""

    def __init__(self, backend: P2PBackend, ctx: OpContext) -> None:
        self._backend = backend
        self._ctx = ctx
        self._env = Envelope(ctx.name, ctx.seq)
        self.rank = backend.rank
        self.size = backend.size
        self.deadline = ctx.deadline

    def send(self, dst: int, msg: Encoded) -> None:
        self._backend._post(dst, COLLECTIVE_CHANNEL, self._env, msg, self.deadline)

    def recv(self, src: int) -> Encoded:
        env, msg = self._backend._take(src, COLLECTIVE_CHANNEL, self.deadline)
        if env != self._env:
            raise CollectiveMismatchError(
                f"rank {self.rank} is in {self._env.op} (collective #{self._env.seq}) but rank "
                f"{src} sent for {env.op} (collective #{env.seq}): every rank must call the same "
                "collectives in the same order",
                ranks=(self.rank, src),
            )
        return msg

    def has_message(self, src: int) -> bool:
        return self._backend._has_message(src, COLLECTIVE_CHANNEL)


def received_block(msg: Encoded, out: torch.Tensor, src: int, ctx: OpContext) -> torch.Tensor:
    """Decode a block received for ``out``, refusing one of another dtype or element count."""
    import torch

    value = decode(msg.header, msg.buffers)
    if (
        not isinstance(value, torch.Tensor)
        or value.dtype != out.dtype
        or value.numel() != out.numel()
    ):
        got = (
            f"{value.dtype} {tuple(value.shape)}"
            if isinstance(value, torch.Tensor)
            else type(value).__name__
        )
        raise CollectiveMismatchError(
            f"{ctx.name}: rank {src} sent {got} but this rank's buffer is {out.dtype} "
            f"{tuple(out.shape)}: the buffers of every rank taking part must match",
            ranks=(src,),
        )
    return value


def place_block(out: torch.Tensor, msg: Encoded, src: int, ctx: OpContext) -> None:
    """Put a received block into ``out``; no copy when it was received straight into it."""
    got = received_block(msg, out, src, ctx)
    if got.data_ptr() != out.data_ptr() or got.device != out.device:
        out.copy_(got.view(out.shape))


__all__ = [
    "COLLECTIVE_CHANNEL",
    "Envelope",
    "P2PBackend",
    "p2p_channel",
    "place_block",
    "received_block",
]
