"""The point-to-point seam: what a transport implements, and every collective built above it.

A backend that can only move messages (the in-process ``local`` backend, a UDP transport)
subclasses :class:`P2PBackend` and implements three methods; every collective, the envelope
checks, the decoding and the buffer API come from here and from :mod:`collectives.algorithms`.

The contract
------------
Messages travel on *channels* between ordered pairs of ranks: ``COLLECTIVE_CHANNEL`` for the
data of collectives, ``AGREEMENT_CHANNEL`` for their agreement round (below), and
``p2p_channel(tag)`` for user point-to-point.  Each message is an :class:`Envelope` plus an
:class:`~collectives.codec.Encoded` (a codec header and its buffers).

``_post(dst, channel, env, msg, dl)``
    Queue ``msg`` for ``dst`` and return **without waiting for ``dst`` to take it** (eager
    send): posting into a peer that never receives must not block.  Before returning, the
    transport has copied ``msg`` or otherwise made it its own; the caller may then reuse or
    overwrite ``msg``'s buffers at once, and the transport never touches them again.  ``dl``
    bounds only what the transport itself may wait for (flow control, a full socket buffer);
    it raises :class:`~collectives.errors.CollectiveTimeoutError` (``dl.error([dst])``) or
    :class:`~collectives.errors.ConnectionLostError` when the peer is known gone.
``_take(src, channel, dl, into=None)``
    The next message from ``src`` on ``channel`` as ``(envelope, message)``; messages from one
    sender on one channel arrive in the order they were posted (FIFO), channels and senders are
    independent.  Raises ``dl.error([src])`` at the deadline, ``ConnectionLostError`` when
    ``src`` is gone, :class:`~collectives.errors.CommunicatorAbortedError` after ``abort``.
    ``into`` is a writable, contiguous byte view (``memoryview`` of format ``"B"``) of the
    caller's destination buffer.  When the message is one uncompressed tensor/array buffer of
    exactly ``into.nbytes`` bytes (:func:`lands_in`), the transport *may* write the payload
    straight into ``into`` and return a message whose only buffer is ``into`` itself; otherwise
    it returns the message in its own buffers, which then belong to the caller.  The caller
    checks the envelope and the header afterwards: when they do not match, the op fails and
    ``into`` holds unspecified bytes (as an MPI receive buffer after an error).
``_has_message(src, channel)``
    Whether ``_take`` would return at once; used only to name every silent rank in a timeout.

Two optional methods let a transport put several small messages in one datagram:
``_post_soon(dst, channel, env, msg, dl)`` is ``_post`` except that the transport may hold the
message until this rank's next ``_post``, ``_take`` or ``_flush``, and ``_flush()`` sends what
is held.  The defaults post at once and hold nothing; the agreement round (below) uses them for
its first token, which the collective's first data message then carries along.

Envelopes are compared, never interpreted by the transport: an in-process transport may hand the
:class:`Envelope` object over as it is, a byte transport sends :meth:`Envelope.pack` (56 bytes)
and parses it with :meth:`Envelope.unpack_from`.  Each collective's envelope names its op, its
sequence number, its root (``NO_ROOT`` for rootless ops), the communicator id
(:func:`~collectives.backends.envelope.comm_id` of ``BackendConfig.world``) and the world's
epoch; the receiving side applies :meth:`Envelope.expect`, so a rank in another collective, with
another root, or from another world or incarnation raises a typed error instead of handing over
the wrong data.

Agreement.  In a rooted collective some ranks never receive (a broadcast's root, a gather's
senders), so a rank that disagrees about the op or its root could go unnoticed by them.  Every
rooted collective therefore also runs a dissemination exchange of its envelope on
``AGREEMENT_CHANNEL`` (ceil(log2 size) rounds of empty messages; the first is posted before the
data moves, the rest overlap its tail): no rank returns from a rooted collective unless every
rank called the same op with the same root, otherwise each raises
:class:`~collectives.errors.CollectiveMismatchError` or times out.  Rootless collectives need
no extra messages: each rank's result depends on a message from every other rank.

Decoding.  Every decode here uses the backend's :attr:`~collectives.backends.base.Backend.codec`
(the communicator's options), and every receive into a buffer refuses a message that is not a
tensor/array before decoding any of it (:func:`decode_block`), so a peer cannot make a buffer
receive unpickle.
"""

from __future__ import annotations

import abc
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from collectives import algorithms
from collectives.algorithms.blocks import known_fit, landing_key, remember_fit
from collectives.algorithms.sync import TOKEN, dissemination
from collectives.backends.base import Backend, OpContext, copy_own_block
from collectives.backends.envelope import NO_ROOT, Envelope, comm_id, op_envelope, user_envelope
from collectives.codec import CodecOptions, Encoded, decode_array, encode
from collectives.codec.frames import CODEC_NONE, Header, Kind
from collectives.errors import CodecError, CollectiveMismatchError
from collectives.reduce_op import ReduceOp

if TYPE_CHECKING:
    import torch

    from collectives.deadline import Deadline

COLLECTIVE_CHANNEL = "c"
AGREEMENT_CHANNEL = "k"


def p2p_channel(tag: int) -> str:
    return f"p{tag}"


class P2PBackend(Backend):
    """Implements every collective with :mod:`collectives.algorithms`; subclasses move messages
    (see the module docstring for the contract of ``_post``, ``_take`` and ``_has_message``)."""

    def __init__(self, rank: int, size: int, *, world: str = "default", epoch: int = 0) -> None:
        super().__init__(rank, size)
        self.comm_id = comm_id(world)
        self.epoch = epoch

    @abc.abstractmethod
    def _post(self, dst: int, channel: str, env: Envelope, msg: Encoded, dl: Deadline) -> None:
        """Queue ``msg`` for ``dst`` without waiting for it; own it before returning."""

    @abc.abstractmethod
    def _take(
        self, src: int, channel: str, dl: Deadline, into: memoryview | None = None
    ) -> tuple[Envelope, Encoded]:
        """Next message from ``src`` on ``channel`` (FIFO), possibly landed in ``into``."""

    @abc.abstractmethod
    def _has_message(self, src: int, channel: str) -> bool: ...

    def _post_soon(self, dst: int, channel: str, env: Envelope, msg: Encoded, dl: Deadline) -> None:
        """``_post`` that may be held until the next ``_post``, ``_take`` or ``_flush``."""
        self._post(dst, channel, env, msg, dl)

    def _post_each(
        self, posts: Sequence[tuple[int, Encoded]], channel: str, env: Envelope, dl: Deadline
    ) -> None:
        """``_post`` of each ``(dst, msg)`` in order, which a transport may overlap (see
        ``algorithms.link.send_each``)."""
        for dst, msg in posts:
            self._post(dst, channel, env, msg, dl)

    def _flush(self) -> None:
        """Send what ``_post_soon`` held back (nothing, unless a transport holds)."""

    def _offer(self, src: int, channel: str, into: memoryview) -> Callable[[], None] | None:
        """Offer ``into`` to the next message from ``src`` on ``channel`` ahead of its take
        (which passes the same ``into``); returns what withdraws the offer, or None when none
        was made (the default: a transport that only receives inside ``_take``)."""
        return None

    def envelope(self, op: str, seq: int, root: int = NO_ROOT) -> Envelope:
        """The envelope of ``op`` number ``seq`` in this communicator and epoch."""
        return op_envelope(op, seq, root, self.comm_id, self.epoch)

    # -- point to point ------------------------------------------------------------------------
    def send(self, msg: Encoded, dst: int, tag: int, ctx: OpContext) -> None:
        # User messages carry the user envelope (sequence 0: not ordered against collectives).
        self._post(dst, p2p_channel(tag), self._user_envelope(), msg, ctx.deadline)

    def recv(self, src: int, tag: int, ctx: OpContext) -> Encoded:
        return self._take_p2p(src, tag, ctx, None)

    def send_buffer(self, tensor: torch.Tensor, dst: int, tag: int, ctx: OpContext) -> None:
        self.send(encode(tensor), dst, tag, ctx)

    def recv_into(self, tensor: torch.Tensor, src: int, tag: int, ctx: OpContext) -> None:
        into = byte_view(tensor)
        msg = self._take_p2p(src, tag, ctx, into)
        place_block(tensor, msg, src, ctx, codec=self.codec, into=into)

    def _take_p2p(self, src: int, tag: int, ctx: OpContext, into: memoryview | None) -> Encoded:
        env, msg = self._take(src, p2p_channel(tag), ctx.deadline, into)
        self._user_envelope().expect(env, rank=self.rank, src=src)
        return msg

    def _user_envelope(self) -> Envelope:
        return user_envelope(self.comm_id, self.epoch)

    # -- collectives ---------------------------------------------------------------------------
    def _link(self, ctx: OpContext, root: int = NO_ROOT) -> _CollectiveLink:
        return _CollectiveLink(self, ctx, root)

    def broadcast(self, msg: Encoded | None, root: int, ctx: OpContext) -> Encoded:
        with _Agreement(self._link(ctx, root)) as link:
            return algorithms.broadcast(link, msg, root)

    def gather(self, msg: Encoded, root: int, ctx: OpContext) -> list[Encoded] | None:
        with _Agreement(self._link(ctx, root)) as link:
            return algorithms.gather(link, msg, root)

    def scatter(self, msgs: list[Encoded] | None, root: int, ctx: OpContext) -> Encoded:
        with _Agreement(self._link(ctx, root)) as link:
            return algorithms.scatter(link, msgs, root)

    def allgather(self, msg: Encoded, ctx: OpContext) -> list[Encoded]:
        return algorithms.allgather(self._link(ctx), msg)

    def barrier(self, ctx: OpContext) -> None:
        algorithms.barrier(self._link(ctx))

    def allreduce(self, tensor: torch.Tensor, op: ReduceOp, ctx: OpContext) -> None:
        algorithms.allreduce_tensor(self._link(ctx), tensor, op, into=byte_view(tensor))

    def reduce(self, tensor: torch.Tensor, root: int, op: ReduceOp, ctx: OpContext) -> None:
        with _Agreement(self._link(ctx, root)) as link:
            algorithms.reduce_tensor(link, tensor, root, op)

    def broadcast_into(self, tensor: torch.Tensor, root: int, ctx: OpContext) -> None:
        mine = encode(tensor) if self.rank == root else None
        into = None if mine is not None else byte_view(tensor)  # the root receives nothing
        with _Agreement(self._link(ctx, root)) as link:
            msg = algorithms.broadcast(link, mine, root, into=into)
        if self.rank != root:
            place_block(tensor, msg, root, ctx, codec=self.codec, into=into)

    def gather_into(
        self, out: torch.Tensor | None, tensor: torch.Tensor, root: int, ctx: OpContext
    ) -> None:
        blocks = None if out is None else out.view(self.size, *tensor.shape)
        into = None if blocks is None else [byte_view(block) for block in blocks]
        with _Agreement(self._link(ctx, root)) as link:
            msgs = algorithms.gather(link, encode(tensor), root, into=into)
        if msgs is not None:
            assert blocks is not None and into is not None
            self._land_all(blocks, msgs, tensor, ctx, into)

    def gatherv_into(
        self, blocks: list[torch.Tensor] | None, tensor: torch.Tensor, root: int, ctx: OpContext
    ) -> None:
        """The root receives each peer's body straight into its block where the transport can:
        the gather offers every block before it waits for anyone (``algorithms.rooted._collect``),
        so all peers send at once and each body lands in its block whichever peer is waited
        for, instead of in a pool buffer copied afterwards (the base class's way: a 4-rank
        fan-in of 24 MB per rank cost a udp root twice the CPU)."""
        if blocks is None:
            super().gatherv_into(blocks, tensor, root, ctx)
            return
        into = [None if r == root else byte_view(b) for r, b in enumerate(blocks)]
        with _Agreement(self._link(ctx, root)) as link:
            msgs = algorithms.gather(link, encode(tensor), root, into=into)
        assert msgs is not None
        for src, msg in enumerate(msgs):
            if src != root:
                place_block(blocks[src], msg, src, ctx, codec=self.codec, into=into[src])
        copy_own_block(blocks[root], tensor)

    def allgather_into(self, out: torch.Tensor, tensor: torch.Tensor, ctx: OpContext) -> None:
        blocks = out.view(self.size, *tensor.shape)
        into = [byte_view(block) for block in blocks]
        msgs = algorithms.allgather(self._link(ctx), encode(tensor), into=into)
        self._land_all(blocks, msgs, tensor, ctx, into)

    def scatter_into(
        self, out: torch.Tensor, tensor: torch.Tensor | None, root: int, ctx: OpContext
    ) -> None:
        msgs = None
        if self.rank == root:
            assert tensor is not None
            msgs = [encode(block) for block in tensor.view(self.size, *out.shape)]
        into = byte_view(out)
        with _Agreement(self._link(ctx, root)) as link:
            msg = algorithms.scatter(link, msgs, root, into=into)
        if self.rank == root:
            assert tensor is not None
            out.copy_(tensor.view(self.size, *out.shape)[root])
        else:
            place_block(out, msg, root, ctx, codec=self.codec, into=into)

    def _land_all(
        self,
        blocks: torch.Tensor,
        msgs: list[Encoded],
        tensor: torch.Tensor,
        ctx: OpContext,
        into: list[memoryview | None],
    ) -> None:
        for src, msg in enumerate(msgs):
            if src != self.rank:
                place_block(blocks[src], msg, src, ctx, codec=self.codec, into=into[src])
            else:
                blocks[src].copy_(tensor)


class _CollectiveLink:
    """Binds the shared algorithms to one collective: its envelope, deadline and codec options."""

    send_copies = True  # ``_post`` owns the message when it returns (see ring_reduce)

    def __init__(self, backend: P2PBackend, ctx: OpContext, root: int) -> None:
        self._backend = backend
        self._ctx = ctx
        self.env = backend.envelope(ctx.name, ctx.seq, root)
        self.rank = backend.rank
        self.size = backend.size
        self.deadline = ctx.deadline
        self.codec = backend.codec

    def send(self, dst: int, msg: Encoded) -> None:
        self._backend._post(dst, COLLECTIVE_CHANNEL, self.env, msg, self.deadline)

    def send_each(self, posts: Sequence[tuple[int, Encoded]]) -> None:
        self._backend._post_each(posts, COLLECTIVE_CHANNEL, self.env, self.deadline)

    def recv(self, src: int, into: memoryview | None = None) -> Encoded:
        return self._receive(src, COLLECTIVE_CHANNEL, into)

    def has_message(self, src: int) -> bool:
        return self._backend._has_message(src, COLLECTIVE_CHANNEL)

    def offer(self, src: int, into: memoryview) -> Callable[[], None] | None:
        """See :func:`collectives.algorithms.link.sendrecv`."""
        return self._backend._offer(src, COLLECTIVE_CHANNEL, into)

    def decode_tensor(self, msg: Encoded, src: int) -> torch.Tensor:
        """A block received from ``src`` that must be a tensor, decoded with this rank's options."""
        return decode_tensor(msg, self.codec, self._ctx.name, src)

    # The agreement round (see the module docstring) on its own channel.
    def agree_send(self, dst: int, *, soon: bool = False) -> None:
        # ``soon``: the collective posts or takes right after, which sends the token (see
        # ``_post_soon``); a first data message to the same peer then shares its datagram.
        post = self._backend._post_soon if soon else self._backend._post
        post(dst, AGREEMENT_CHANNEL, self.env, TOKEN, self.deadline)

    def flush(self) -> None:
        self._backend._flush()

    def agree_recv(self, src: int) -> None:
        self._receive(src, AGREEMENT_CHANNEL, None)

    def _receive(self, src: int, channel: str, into: memoryview | None) -> Encoded:
        env, msg = self._backend._take(src, channel, self.deadline, into)
        self.env.expect(env, rank=self.rank, src=src)
        return msg


class _Agreement:
    """Dissemination exchange of a rooted collective's envelope, overlapped with its data.

    The rounds of :func:`collectives.algorithms.sync.dissemination`: after the last, every rank
    has (transitively) checked every other rank's envelope against its own.  Round 0 is posted
    on entry, before the collective moves data (held by the transport until the body's first
    post or take, or flushed on exit); the rest run on exit.  A failed body skips the rest (its
    error is the one that matters) but still sends round 0's token: a peer waiting for it then
    fails on its own terms, not by a timeout here.
    """

    def __init__(self, link: _CollectiveLink) -> None:
        self._link = link
        self._rounds = dissemination(link.rank, link.size)
        self._first: tuple[int, int] | None = None

    def __enter__(self) -> _CollectiveLink:
        self._first = next(self._rounds, None)
        if self._first is not None:
            self._link.agree_send(self._first[0], soon=True)
        return self._link

    def __exit__(self, exc_type: object, *rest: object) -> None:
        if self._first is None:
            return
        link = self._link
        if exc_type is not None:
            link.flush()
            return
        link.agree_recv(self._first[1])
        for dst, src in self._rounds:
            link.agree_send(dst)
            link.agree_recv(src)


def byte_view(tensor: torch.Tensor) -> memoryview | None:
    """A writable byte view of a contiguous CPU tensor's memory, or None where there is none
    (other devices, empty or conjugate/negative-bit views): the ``into`` of :meth:`_take`."""
    if (
        not tensor.is_cpu
        or not tensor.is_contiguous()
        or tensor.numel() == 0
        or tensor.is_conj()
        or tensor.is_neg()
    ):
        return None
    import torch

    return tensor.detach().reshape(-1).view(torch.uint8).numpy().data.cast("B")


def landing_size(header: Any) -> int | None:
    """The size of the buffer a message with this codec ``header`` (bytes, or a parsed
    :class:`Header`) may be received into (its one uncompressed tensor/array buffer), or None:
    it lands nowhere, or it is malformed (the decoder then reports it)."""
    if isinstance(header, Header):
        parsed = header  # checked by the receiver already: no second parse per message
    else:
        try:
            parsed = Header.parse(header)
        except CodecError:
            return None
    if parsed.kind is Kind.ARRAY and parsed.entries[0].codec == CODEC_NONE:
        return parsed.entries[0].wire_len  # an array message has exactly one entry
    return None


def lands_in(header: Any, nbytes: int) -> bool:
    """Whether a message with this codec ``header`` may be received into an ``nbytes`` buffer:
    one uncompressed tensor/array buffer of exactly that size (:func:`landing_size`)."""
    return landing_size(header) == nbytes


def decode_block(msg: Encoded, codec: CodecOptions, what: str) -> Any:
    """Decode a message that must be a tensor or array (:func:`~collectives.codec.decode_array`):
    anything else, a pickle above all, is refused with :class:`CodecError` before a byte of it
    is decoded; ``what`` names the op and the sender in the error."""
    header = msg.header if msg.checked is None else msg.checked  # parsed once, by the receiver
    try:
        return decode_array(header, msg.buffers, codec)
    except CodecError as err:
        raise CodecError(f"{what}: {err}") from None


def decode_tensor(msg: Encoded, codec: CodecOptions, op: str, src: int) -> torch.Tensor:
    """A block of ``op`` received from ``src`` that must be one tensor, decoded with ``codec``
    (:func:`decode_block`: anything but a tensor/array is refused before it is decoded); an
    array that is not a tensor is a :class:`CollectiveMismatchError` naming ``src``."""
    import torch

    value = decode_block(msg, codec, f"{op} from rank {src}")
    if not isinstance(value, torch.Tensor):
        raise CollectiveMismatchError(
            f"{op}: rank {src} sent a {type(value).__name__} where this rank expects a tensor",
            ranks=(src,),
        )
    return value


def received_block(
    msg: Encoded, out: torch.Tensor, src: int, ctx: OpContext, *, codec: CodecOptions
) -> torch.Tensor:
    """Decode a block received for ``out`` with ``codec`` (the backend's options), refusing a
    non-tensor message before decoding and one of another dtype or element count after."""
    value = decode_tensor(msg, codec, ctx.name, src)
    if value.dtype != out.dtype or value.numel() != out.numel():
        raise CollectiveMismatchError(
            f"{ctx.name}: rank {src} sent {value.dtype} {tuple(value.shape)} but this rank's "
            f"buffer is {out.dtype} {tuple(out.shape)}: the buffers of every rank taking part "
            "must match",
            ranks=(src,),
        )
    return value


def place_block(
    out: torch.Tensor,
    msg: Encoded,
    src: int,
    ctx: OpContext,
    *,
    codec: CodecOptions,
    into: memoryview | None = None,
) -> None:
    """Put a received block into ``out``; no copy when it was received straight into it.
    ``into``: the byte view of ``out`` the receive was offered (the transport then returns it as
    the message's only buffer when the payload landed there)."""
    key = landing_key(msg, into, codec)
    if known_fit(key, out):
        return
    got = received_block(msg, out, src, ctx, codec=codec)
    remember_fit(key, got)
    if got.data_ptr() != out.data_ptr() or got.device != out.device:
        out.copy_(got.view(out.shape))


__all__ = [
    "AGREEMENT_CHANNEL",
    "COLLECTIVE_CHANNEL",
    "NO_ROOT",
    "Envelope",
    "P2PBackend",
    "byte_view",
    "decode_block",
    "decode_tensor",
    "landing_size",
    "lands_in",
    "p2p_channel",
    "place_block",
    "received_block",
]
