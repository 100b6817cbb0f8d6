"""The object API of the mpi backend: encoded messages (codec header + buffers) over MPI.

Every object collective starts with the same MPI call, an ``Iallgather`` of one fixed-size
*envelope* per rank (:data:`ENV_SIZE` bytes: op name, collective sequence number, root, and the
codec header inline when it fits).  Because every object collective and the barrier begin with
that one call, mismatched calls (rank 0 in ``broadcast`` while rank 1 is in ``allgather``, or two
different roots) always match each other in MPI and every rank sees the difference: each raises
``CollectiveMismatchError`` naming the ranks, instead of MPI crossing the wires.

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

from collectives.backends.mpi_core import byte_view
from collectives.codec import Encoded, alloc_buffer, buffer_sizes
from collectives.errors import CollectiveMismatchError

if TYPE_CHECKING:
    from collectives.backends.base import OpContext
    from collectives.backends.mpi_core import Engine

ENV_SIZE = 512
_MAGIC = b"CCMP"
_VERSION = 1
_FLAG_INLINE = 1
# magic, version, flags, reserved, root, seq, header length, op name
_HEAD = struct.Struct("<4sBBhiQI32s")
INLINE_CAPACITY = ENV_SIZE - _HEAD.size
PAYLOAD_TAGS = 1 << 15  # collective payload tags are seq mod this (MPI guarantees >= 32767)


class Envelope(NamedTuple):
    op: str
    seq: int
    root: int
    header_len: int
    header: bytes | None  # inline header, or None when it follows as its own message

    def describe(self) -> str:
        where = f", root {self.root}" if self.root >= 0 else ""
        return f"{self.op} (collective #{self.seq}{where})"


def pack_envelope(op: str, seq: int, root: int, header: bytes | None) -> bytes:
    name = op.encode("utf-8")[:32]
    inline = header is not None and len(header) <= INLINE_CAPACITY
    hlen = 0 if header is None else len(header)
    head = _HEAD.pack(_MAGIC, _VERSION, _FLAG_INLINE if inline else 0, 0, root, seq, hlen, name)
    body = header if inline and header is not None else b""
    return head + body + bytes(ENV_SIZE - len(head) - len(body))


def parse_envelope(data: memoryview | bytes) -> Envelope | None:
    """The envelope in ``data``, or None if it is not one (another op's bytes)."""
    if len(data) < _HEAD.size:
        return None
    magic, version, flags, _, root, seq, hlen, name = _HEAD.unpack_from(data)
    if magic != _MAGIC or version != _VERSION:
        return None
    inline = bool(flags & _FLAG_INLINE)
    if inline and hlen > INLINE_CAPACITY:
        return None
    header = bytes(data[_HEAD.size : _HEAD.size + hlen]) if inline else None
    return Envelope(name.rstrip(b"\0").decode("utf-8", "replace"), seq, root, hlen, header)


def _mine(ctx: OpContext, root: int) -> Envelope:
    return Envelope(ctx.name.encode("utf-8")[:32].decode("utf-8", "ignore"), ctx.seq, root, 0, None)


def _mismatch(engine: Engine, ctx: OpContext, mine: Envelope, others: dict[int, str]) -> Exception:
    listed = "; ".join(f"rank {r} is in {what}" for r, what in sorted(others.items()))
    return CollectiveMismatchError(
        f"rank {engine.rank} is in {mine.describe()} but {listed}: every rank must call the same "
        "collectives, with the same root, in the same order",
        ranks=(engine.rank, *others),
    )


def exchange_envelopes(
    engine: Engine, ctx: OpContext, root: int, header: bytes | None
) -> list[Envelope]:
    """The first step of every object collective: allgather envelopes and check they agree."""
    mpi = engine.MPI
    mine = _mine(ctx, root)
    send = np.frombuffer(pack_envelope(ctx.name, ctx.seq, root, header), dtype=np.uint8)
    recv = np.zeros(engine.size * ENV_SIZE, dtype=np.uint8)
    req = engine.coll.Iallgather([send, mpi.BYTE], [recv, mpi.BYTE])
    engine.wait([req], ctx, keep=(send, recv))
    view = recv.data
    envs: list[Envelope] = []
    wrong: dict[int, str] = {}
    for r in range(engine.size):
        env = parse_envelope(view[r * ENV_SIZE : (r + 1) * ENV_SIZE])
        if env is None:
            wrong[r] = "a different kind of operation (its bytes are not an object-API envelope)"
            continue
        if (env.op, env.seq, env.root) != (mine.op, mine.seq, mine.root):
            wrong[r] = env.describe()
        envs.append(env)
    if wrong:
        engine.mark_broken(f"{ctx.name} #{ctx.seq}: mismatched collective calls")
        raise _mismatch(engine, ctx, mine, wrong)
    return envs


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


def _receive_messages(
    engine: Engine, ctx: OpContext, envs: dict[int, Envelope], extra: _Posts | None = None
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
            buf = alloc_buffer(env.header_len)
            headers[src] = buf
            posts.recv(comm, mpi, buf, src, tag)
    engine.wait(posts.reqs, ctx, sources=posts.sources, keep=posts.keep)
    posts = _Posts()
    out: dict[int, Encoded] = {}
    for src, header in headers.items():
        raw = bytes(header)
        bufs = _alloc(buffer_sizes(raw))
        for buf in bufs:
            posts.recv(comm, mpi, buf, src, tag)
        out[src] = Encoded(raw, bufs)
    if extra is not None:
        posts.reqs += extra.reqs
        posts.sources += extra.sources
        posts.keep += extra.keep
    engine.wait(posts.reqs, ctx, sources=posts.sources, keep=posts.keep)
    return out


# -- collectives -----------------------------------------------------------------------------------
def broadcast(engine: Engine, msg: Encoded | None, root: int, ctx: OpContext) -> Encoded:
    mpi = engine.MPI
    is_root = engine.rank == root
    header = msg.header if is_root and msg is not None else None
    envs = exchange_envelopes(engine, ctx, root, header)
    peers = [] if is_root else [root]
    if is_root:
        assert msg is not None
        if len(msg.header) > INLINE_CAPACITY:
            req = engine.coll.Ibcast([msg.header, mpi.BYTE], root)
            engine.wait([req], ctx, keep=msg.header)
        bufs = [byte_view(b) for b in msg.buffers]
    else:
        env = envs[root]
        if env.header is not None:
            raw = env.header
        else:
            hbuf = alloc_buffer(env.header_len)
            engine.wait([engine.coll.Ibcast([hbuf, mpi.BYTE], root)], ctx, peers, keep=hbuf)
            raw = bytes(hbuf)
        bufs = _alloc(buffer_sizes(raw))
    reqs = [engine.coll.Ibcast([b, mpi.BYTE], root) for b in bufs if b.nbytes]
    engine.wait(reqs, ctx, peers, keep=bufs)
    if is_root:
        assert msg is not None
        return msg
    return Encoded(raw, bufs)


def gather(engine: Engine, msg: Encoded, root: int, ctx: OpContext) -> list[Encoded] | None:
    envs = exchange_envelopes(engine, ctx, root, msg.header)
    if engine.rank != root:
        posts = _Posts()
        _send_message(posts, engine, msg, root, _payload_tag(ctx))
        engine.wait(posts.reqs, ctx, [root], keep=(msg, posts.keep))
        return None
    others = {r: env for r, env in enumerate(envs) if r != root}
    got = _receive_messages(engine, ctx, others)
    got[root] = msg
    return [got[r] for r in range(engine.size)]


def allgather(engine: Engine, msg: Encoded, ctx: OpContext) -> list[Encoded]:
    envs = exchange_envelopes(engine, ctx, -1, msg.header)
    tag = _payload_tag(ctx)
    sends = _Posts()
    # Each peer gets this rank's long header (if any) before its buffers, on one tag: MPI keeps
    # messages between two ranks on one tag in order, so receivers can size the buffers.
    peers = [r for r in range(engine.size) if r != engine.rank]
    for dst in peers:
        _send_message(sends, engine, msg, dst, tag)
    got = _receive_messages(engine, ctx, {r: envs[r] for r in peers}, sends)
    got[engine.rank] = msg
    return [got[r] for r in range(engine.size)]


def scatter(engine: Engine, msgs: list[Encoded] | None, root: int, ctx: OpContext) -> Encoded:
    mpi = engine.MPI
    exchange_envelopes(engine, ctx, root, None)
    tag = _payload_tag(ctx)
    mine = np.zeros(ENV_SIZE, dtype=np.uint8)
    if engine.rank == root:
        assert msgs is not None and len(msgs) == engine.size
        table = np.frombuffer(
            b"".join(pack_envelope(ctx.name, ctx.seq, root, m.header) for m in msgs),
            dtype=np.uint8,
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
    env = parse_envelope(mine.data)
    if env is None:
        raise _mismatch(engine, ctx, _mine(ctx, root), {root: "a different operation"})
    return _receive_messages(engine, ctx, {root: env})[root]


def barrier(engine: Engine, ctx: OpContext) -> None:
    exchange_envelopes(engine, ctx, -1, None)


# -- point to point --------------------------------------------------------------------------------
def send(engine: Engine, msg: Encoded, dst: int, tag: int, ctx: OpContext) -> None:
    mpi = engine.MPI
    data_tag = engine.next_message_tag()
    env = np.frombuffer(pack_envelope("send", data_tag, -1, msg.header), dtype=np.uint8)
    posts = _Posts()
    posts.add(engine.p2p.Isend([env, mpi.BYTE], dst, tag), dst, env)
    if len(msg.header) > INLINE_CAPACITY:
        posts.send(engine.data, mpi, msg.header, dst, data_tag)
    for buf in msg.buffers:
        posts.send(engine.data, mpi, buf, dst, data_tag)
    engine.wait(posts.reqs, ctx, [dst], keep=(msg, posts.keep), collective=False)


def recv(engine: Engine, src: int, tag: int, ctx: OpContext) -> Encoded:
    mpi = engine.MPI
    env_buf = np.zeros(ENV_SIZE, dtype=np.uint8)
    status = mpi.Status()
    req = engine.p2p.Irecv([env_buf, mpi.BYTE], src, tag)
    engine.wait([req], ctx, [src], statuses=[status], keep=env_buf, collective=False, cancel=True)
    env = parse_envelope(env_buf.data) if status.Get_count(mpi.BYTE) == ENV_SIZE else None
    if env is None or env.op != "send":
        raise CollectiveMismatchError(
            f"recv on rank {engine.rank}: rank {src} sent a {status.Get_count(mpi.BYTE)}-byte "
            f"message on tag {tag} that is not an object message (did it call send_buffer? "
            "pair send with recv and send_buffer with recv_into)",
            ranks=(engine.rank, src),
        )
    data_tag = env.seq
    posts = _Posts()
    if env.header is not None:
        header: bytes = env.header
    else:
        hbuf = alloc_buffer(env.header_len)
        posts.recv(engine.data, mpi, hbuf, src, data_tag)
        engine.wait(posts.reqs, ctx, [src], keep=hbuf, collective=False, cancel=True)
        header = bytes(hbuf)
        posts = _Posts()
    bufs = _alloc(buffer_sizes(header))
    for buf in bufs:
        posts.recv(engine.data, mpi, buf, src, data_tag)
    engine.wait(posts.reqs, ctx, [src], keep=bufs, collective=False, cancel=True)
    return Encoded(header, bufs)
