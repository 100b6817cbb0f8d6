"""The object API of the mpi backend: encoded messages (codec header + buffers) over MPI.

Every object collective starts with the same MPI call, an ``Iallgather`` of one fixed-size
*envelope* per rank (:data:`ENV_SIZE` bytes)::

    offset size field
    0      56   the message envelope (:mod:`collectives.backends.envelope`: op, seq, root,
                communicator id, epoch)
    56     4    codec header length
    60     4    payload tag (object send/recv: the message's tag on the data communicator)
    64     1    flags: 1 = the codec header is inline
    65     7    reserved, 0
    72     ...  the codec header, when it fits (:data:`INLINE_CAPACITY` bytes)
  Because every object collective and the barrier begin with
that one call, mismatched calls (rank 0 in ``broadcast`` while rank 1 is in ``allgather``, or two
different roots) always match each other in MPI and every rank sees the difference: each raises
``CollectiveMismatchError`` naming the ranks, instead of MPI crossing the wires.

Nothing a peer announces is allocated before it is checked: a codec header longer than the
receiver's codec limits allow (:func:`header_limit`) is a ``RemoteProtocolError``, and every
header passes :func:`~collectives.codec.message_sizes` (buffer count, total bytes, with the
communicator's :class:`~collectives.codec.CodecOptions`) before its buffers are allocated.

Payloads follow, received straight into :func:`~collectives.codec.alloc_buffer` memory:
broadcast uses ``Ibcast`` per buffer (every rank knows the sizes from root's header); gather,
scatter and allgather send each rank's header (when it did not fit inline) and buffers with
``Isend``/``Irecv`` on the collective communicator under a per-op tag, which handles ranks sending
different sizes, empty and many buffers.  ``send``/``recv`` put an envelope on the user's tag and
the payload on a separate communicator under a tag unique to the message.
"""

from __future__ import annotations

import struct
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np

from collectives.backends import envelope as ev
from collectives.backends.envelope import NO_ROOT, USER_OP, Envelope
from collectives.backends.mpi_core import byte_view
from collectives.codec import (
    CodecOptions,
    Encoded,
    alloc_buffer,
    check_header,
    check_header_length,
)
from collectives.errors import CollectiveMismatchError, RemoteProtocolError

if TYPE_CHECKING:
    from collectives.backends.base import OpContext
    from collectives.backends.mpi_core import Engine

ENV_SIZE = 512
_FLAG_INLINE = 1
_EXTRA = struct.Struct("<IIB7x")  # codec header length, payload tag, flags
INLINE_AT = ev.SIZE + _EXTRA.size
INLINE_CAPACITY = ENV_SIZE - INLINE_AT
PAYLOAD_TAGS = 1 << 15  # collective payload tags are seq mod this (MPI guarantees >= 32767)


class Wrapped(NamedTuple):
    """An envelope as received, with this transport's extras."""

    env: Envelope
    header_len: int
    payload_tag: int
    header: bytes | None  # inline header, or None when it follows as its own message


def pack_envelope(env: Envelope, header: bytes | None, payload_tag: int = 0) -> bytes:
    inline = header is not None and len(header) <= INLINE_CAPACITY
    hlen = 0 if header is None else len(header)
    out = bytearray(ENV_SIZE)
    env.pack_into(out)
    _EXTRA.pack_into(out, ev.SIZE, hlen, payload_tag, _FLAG_INLINE if inline else 0)
    if inline and header is not None:
        out[INLINE_AT : INLINE_AT + hlen] = header
    return bytes(out)


def parse_envelope(data: memoryview | bytes, src: int) -> Wrapped:
    """The envelope in ``data``; :class:`RemoteProtocolError` if it is not one (another op's
    bytes, or a forged one)."""
    env = Envelope.unpack_from(data, src=src)
    if len(data) < INLINE_AT:
        raise RemoteProtocolError(f"truncated message envelope from rank {src}")
    hlen, payload_tag, flags = _EXTRA.unpack_from(data, ev.SIZE)
    inline = bool(flags & _FLAG_INLINE)
    if inline and hlen > INLINE_CAPACITY:
        raise RemoteProtocolError(f"malformed message envelope from rank {src}")
    header = bytes(data[INLINE_AT : INLINE_AT + hlen]) if inline else None
    return Wrapped(env, hlen, payload_tag, header)


def _mismatch(engine: Engine, mine: Envelope, others: dict[int, str]) -> Exception:
    listed = "; ".join(f"rank {r} is in {what}" for r, what in sorted(others.items()))
    return CollectiveMismatchError(
        f"rank {engine.rank} is in {mine.describe()} but {listed}: every rank must call the same "
        "collectives, with the same root, in the same order",
        ranks=(engine.rank, *others),
    )


def exchange_envelopes(
    engine: Engine, ctx: OpContext, root: int, header: bytes | None
) -> tuple[Envelope, list[Wrapped]]:
    """The first step of every object collective: allgather envelopes and check they agree.

    Returns this rank's envelope and every rank's.  Each is held to this rank's: every rank that
    disagrees (another op, sequence number or root) is named in one
    :class:`CollectiveMismatchError`, and a message from another world or epoch is a
    :class:`RemoteProtocolError` (as :meth:`Envelope.expect` would raise); either way the engine
    is marked broken first.
    """
    mpi = engine.MPI
    mine = ev.op_envelope(ctx.name, ctx.seq, root, engine.comm, engine.epoch)
    send = np.frombuffer(pack_envelope(mine, header), dtype=np.uint8)
    recv = np.zeros(engine.size * ENV_SIZE, dtype=np.uint8)
    req = engine.coll.Iallgather([send, mpi.BYTE], [recv, mpi.BYTE])
    engine.wait([req], ctx, keep=(send, recv))
    view = recv.data
    envs: list[Wrapped] = []
    wrong: dict[int, str] = {}
    for r in range(engine.size):
        try:
            got = parse_envelope(view[r * ENV_SIZE : (r + 1) * ENV_SIZE], r)
        except RemoteProtocolError:
            wrong[r] = "a different kind of operation (its bytes are not an object envelope)"
            continue
        if (got.env.comm, got.env.epoch) != (mine.comm, mine.epoch):
            engine.mark_broken(f"{ctx.name} #{ctx.seq}: a message from another world")
            mine.expect(got.env, rank=engine.rank, src=r)  # raises RemoteProtocolError
        if got.env != mine:
            wrong[r] = got.env.describe()
        envs.append(got)
    if wrong:
        engine.mark_broken(f"{ctx.name} #{ctx.seq}: mismatched collective calls")
        raise _mismatch(engine, mine, wrong)
    return mine, envs


def _payload_tag(ctx: OpContext) -> int:
    return ctx.seq % PAYLOAD_TAGS


def _alloc(sizes: list[int]) -> list[memoryview]:
    return [alloc_buffer(n) for n in sizes]


class _Posts:
    """Requests of one phase, with the rank each waits for (to name it on timeout)."""

    def __init__(self) -> None:
        self.reqs: list[Any] = []
        self.sources: list[int] = []
        self.keep: list[object] = []

    def add(self, req: Any, peer: int, buf: object) -> None:
        self.reqs.append(req)
        self.sources.append(peer)
        self.keep.append(buf)

    def send(self, comm: Any, mpi: Any, buf: memoryview | bytes, dst: int, tag: int) -> None:
        if len(buf):
            view = byte_view(memoryview(buf))
            self.add(comm.Isend([view, mpi.BYTE], dst, tag), dst, view)

    def recv(self, comm: Any, mpi: Any, buf: memoryview, src: int, tag: int) -> None:
        if buf.nbytes:
            self.add(comm.Irecv([buf, mpi.BYTE], src, tag), src, buf)


def _send_message(posts: _Posts, engine: Engine, msg: Encoded, dst: int, tag: int) -> None:
    comm, mpi = engine.coll, engine.MPI
    if len(msg.header) > INLINE_CAPACITY:
        posts.send(comm, mpi, msg.header, dst, tag)
    for buf in msg.buffers:
        posts.send(comm, mpi, buf, dst, tag)


def _header_buffer(wrapped: Wrapped, src: int, codec: CodecOptions) -> memoryview:
    """Memory for a codec header that follows its envelope, once its length is checked."""
    return alloc_buffer(check_header_length(wrapped.header_len, codec, src))


def _allocated(raw: bytes, codec: CodecOptions) -> Encoded:
    """A message for ``raw``, its header checked (and kept: decoding does not parse it again)
    and its buffers allocated, ready to receive into."""
    checked = check_header(raw, codec)
    return Encoded(raw, _alloc(checked.wire_sizes), checked)


def _receive_messages(
    engine: Engine,
    ctx: OpContext,
    envs: dict[int, Wrapped],
    codec: CodecOptions,
    extra: _Posts | None = None,
) -> dict[int, Encoded]:
    """Receive one message from each rank in ``envs`` (and complete ``extra`` sends meanwhile)."""
    comm, mpi = engine.coll, engine.MPI
    tag = _payload_tag(ctx)
    headers: dict[int, bytes | memoryview] = {}
    posts = _Posts()
    for src, env in envs.items():
        if env.header is not None:
            headers[src] = env.header
        else:
            buf = _header_buffer(env, src, codec)
            headers[src] = buf
            posts.recv(comm, mpi, buf, src, tag)
    engine.wait(posts.reqs, ctx, sources=posts.sources, keep=posts.keep)
    posts = _Posts()
    out: dict[int, Encoded] = {}
    for src, header in headers.items():
        msg = out[src] = _allocated(bytes(header), codec)
        for buf in msg.buffers:
            posts.recv(comm, mpi, buf, src, tag)
    if extra is not None:
        posts.reqs += extra.reqs
        posts.sources += extra.sources
        posts.keep += extra.keep
    engine.wait(posts.reqs, ctx, sources=posts.sources, keep=posts.keep)
    return out


# -- collectives -----------------------------------------------------------------------------------
def broadcast(
    engine: Engine, msg: Encoded | None, root: int, ctx: OpContext, codec: CodecOptions
) -> Encoded:
    mpi = engine.MPI
    is_root = engine.rank == root
    header = msg.header if is_root and msg is not None else None
    _, envs = exchange_envelopes(engine, ctx, root, header)
    peers = [] if is_root else [root]
    if is_root:
        assert msg is not None
        if len(msg.header) > INLINE_CAPACITY:
            req = engine.coll.Ibcast([msg.header, mpi.BYTE], root)
            engine.wait([req], ctx, keep=msg.header)
        out = msg
        bufs = [byte_view(b) for b in msg.buffers]
    else:
        env = envs[root]
        if env.header is not None:
            raw = env.header
        else:
            hbuf = _header_buffer(env, root, codec)
            engine.wait([engine.coll.Ibcast([hbuf, mpi.BYTE], root)], ctx, peers, keep=hbuf)
            raw = bytes(hbuf)
        out = _allocated(raw, codec)
        bufs = out.buffers
    reqs = [engine.coll.Ibcast([b, mpi.BYTE], root) for b in bufs if b.nbytes]
    engine.wait(reqs, ctx, peers, keep=bufs)
    return out


def gather(
    engine: Engine, msg: Encoded, root: int, ctx: OpContext, codec: CodecOptions
) -> list[Encoded] | None:
    _, envs = exchange_envelopes(engine, ctx, root, msg.header)
    if engine.rank != root:
        posts = _Posts()
        _send_message(posts, engine, msg, root, _payload_tag(ctx))
        engine.wait(posts.reqs, ctx, [root], keep=(msg, posts.keep))
        return None
    others = {r: env for r, env in enumerate(envs) if r != root}
    got = _receive_messages(engine, ctx, others, codec)
    got[root] = msg
    return [got[r] for r in range(engine.size)]


def allgather(engine: Engine, msg: Encoded, ctx: OpContext, codec: CodecOptions) -> list[Encoded]:
    _, envs = exchange_envelopes(engine, ctx, NO_ROOT, msg.header)
    tag = _payload_tag(ctx)
    sends = _Posts()
    # Each peer gets this rank's long header (if any) before its buffers, on one tag: MPI keeps
    # messages between two ranks on one tag in order, so receivers can size the buffers.
    peers = [r for r in range(engine.size) if r != engine.rank]
    for dst in peers:
        _send_message(sends, engine, msg, dst, tag)
    got = _receive_messages(engine, ctx, {r: envs[r] for r in peers}, codec, sends)
    got[engine.rank] = msg
    return [got[r] for r in range(engine.size)]


def scatter(
    engine: Engine, msgs: list[Encoded] | None, root: int, ctx: OpContext, codec: CodecOptions
) -> Encoded:
    mpi = engine.MPI
    expected, _ = exchange_envelopes(engine, ctx, root, None)
    tag = _payload_tag(ctx)
    mine = np.zeros(ENV_SIZE, dtype=np.uint8)
    if engine.rank == root:
        assert msgs is not None and len(msgs) == engine.size
        table = np.frombuffer(
            b"".join(pack_envelope(expected, m.header) for m in msgs), dtype=np.uint8
        )
        req = engine.coll.Iscatter([table, mpi.BYTE], [mine, mpi.BYTE], root)
        engine.wait([req], ctx, keep=(table, mine))
        posts = _Posts()
        for dst, msg in enumerate(msgs):
            if dst != root:
                _send_message(posts, engine, msg, dst, tag)
        engine.wait(posts.reqs, ctx, keep=(msgs, posts.keep))
        return msgs[root]
    req = engine.coll.Iscatter(None, [mine, mpi.BYTE], root)
    engine.wait([req], ctx, [root], keep=mine)
    try:
        got = parse_envelope(mine.data, root)
    except RemoteProtocolError:
        raise _mismatch(engine, expected, {root: "a different operation"}) from None
    expected.expect(got.env, rank=engine.rank, src=root)
    return _receive_messages(engine, ctx, {root: got}, codec)[root]


def barrier(engine: Engine, ctx: OpContext) -> None:
    exchange_envelopes(engine, ctx, NO_ROOT, None)


# -- point to point --------------------------------------------------------------------------------
def send(engine: Engine, msg: Encoded, dst: int, tag: int, ctx: OpContext) -> None:
    mpi = engine.MPI
    data_tag = engine.next_message_tag()
    user = ev.user_envelope(engine.comm, engine.epoch)
    env = np.frombuffer(pack_envelope(user, msg.header, data_tag), np.uint8)
    posts = _Posts()
    posts.add(engine.p2p.Isend([env, mpi.BYTE], dst, tag), dst, env)
    if len(msg.header) > INLINE_CAPACITY:
        posts.send(engine.data, mpi, msg.header, dst, data_tag)
    for buf in msg.buffers:
        posts.send(engine.data, mpi, buf, dst, data_tag)
    engine.wait(posts.reqs, ctx, [dst], keep=(msg, posts.keep), collective=False)


def recv(engine: Engine, src: int, tag: int, ctx: OpContext, codec: CodecOptions) -> Encoded:
    mpi = engine.MPI
    env_buf = np.zeros(ENV_SIZE, dtype=np.uint8)
    status = mpi.Status()
    req = engine.p2p.Irecv([env_buf, mpi.BYTE], src, tag)
    engine.wait([req], ctx, [src], statuses=[status], keep=env_buf, collective=False, cancel=True)
    got = None
    if status.Get_count(mpi.BYTE) == ENV_SIZE:
        try:
            got = parse_envelope(env_buf.data, src)
        except RemoteProtocolError:
            got = None
    if got is None or got.env.op != USER_OP:
        raise CollectiveMismatchError(
            f"recv on rank {engine.rank}: rank {src} sent a {status.Get_count(mpi.BYTE)}-byte "
            f"message on tag {tag} that is not an object message (did it call send_buffer? "
            "pair send with recv and send_buffer with recv_into)",
            ranks=(engine.rank, src),
        )
    ev.user_envelope(engine.comm, engine.epoch).expect(got.env, rank=engine.rank, src=src)
    data_tag = got.payload_tag
    posts = _Posts()
    if got.header is not None:
        header: bytes = got.header
    else:
        hbuf = _header_buffer(got, src, codec)
        posts.recv(engine.data, mpi, hbuf, src, data_tag)
        engine.wait(posts.reqs, ctx, [src], keep=hbuf, collective=False, cancel=True)
        header = bytes(hbuf)
        posts = _Posts()
    msg = _allocated(header, codec)
    for buf in msg.buffers:
        posts.recv(engine.data, mpi, buf, src, data_tag)
    engine.wait(posts.reqs, ctx, [src], keep=msg.buffers, collective=False, cancel=True)
    return msg
