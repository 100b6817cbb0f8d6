"""Encoded messages (header + buffers) over torch.distributed point-to-point sends.

gloo only moves tensors whose size the receiver already knows, and a receive smaller than what
arrives aborts the whole process ("Received data size doesn't match expected size").  So every
message starts with a fixed-size *envelope* (``ENVELOPE_BYTES`` uint8) that says which op it
belongs to and how long everything after it is::

    offset size field
    0      56   the message envelope (:mod:`collectives.backends.envelope`: op, seq, root,
                communicator id, epoch)
    56     4    codec header length
    60     4    k: buffers the receiver reads from the sender's memory (0: none)
    64     8    sender's pid (when k > 0)
    72     ...  the codec header, when it fits, then every buffer that still fits (in order)
    -8k    8k   the address of each of those k buffers in the sender (when k > 0)

The rest travels as separate sends on the same (peer, tag), in order: the header when it did not
fit, then each buffer not inlined (empty buffers are never sent).  gloo delivers one (peer, tag)
in order, and the receiver posts receives of exactly the announced sizes (into
:func:`~collectives.codec.alloc_buffer` memory, zero-copy for ``decode``).  Small objects
therefore cost one message; tensors travel as their own bytes.

The receiver trusts none of it before checking: the envelope must be the one it expects
(:meth:`Envelope.expect`), the announced header length must be within what the receiver's codec
limits allow (:func:`header_limit`), and the header must pass
:func:`~collectives.codec.message_sizes` (buffer count, total bytes) before any buffer is
allocated.  A forged or foreign message is a :class:`~collectives.errors.RemoteProtocolError`,
:class:`~collectives.errors.CodecError` or :class:`CollectiveMismatchError`, never an allocation.

Between processes of one host that can read each other (:mod:`collectives.backends.cma`, probed
when the world forms), a collective's buffers of ``cma.MIN_BYTES`` or more do not travel at all:
the envelope gives their addresses, the receiver copies them straight out of the sender's memory
and acknowledges (8 bytes, 0 or an errno, on the op's acknowledgement tag); the sender keeps the
buffers alive until then.

A :class:`Link` binds this to one collective (one tag per op, from its sequence number) for
:mod:`collectives.algorithms` and :mod:`collectives.backends.torch_objects`.  A peer in another
collective (or with another root) sends an envelope naming its op, which raises
:class:`CollectiveMismatchError` naming both ranks instead of crossing wires.
"""

from __future__ import annotations

import errno
import os
import struct
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np

from collectives.backends import cma
from collectives.backends import envelope as ev
from collectives.backends.envelope import NO_ROOT, Envelope
from collectives.backends.p2p import decode_tensor
from collectives.backends.torch_engine import ACK_SPACE, GRACE_S, P2PJob
from collectives.codec import (
    CodecOptions,
    Encoded,
    Header,
    alloc_buffer,
    check_header,
    check_header_length,
    header_length,
)
from collectives.errors import (
    ConnectionLostError,
    RemoteProtocolError,
    TransportError,
)

if TYPE_CHECKING:
    import torch

    from collectives.backends.base import OpContext
    from collectives.backends.torch_engine import Engine
    from collectives.deadline import Deadline

ENVELOPE_BYTES = 1024
_EXTRA = struct.Struct("<IIQ")  # codec header length, k, sender's pid
_EXTRA_AT = ev.SIZE
INLINE_AT = _EXTRA_AT + _EXTRA.size
INLINE_ROOM = ENVELOPE_BYTES - INLINE_AT
MAX_REMOTE = 32  # buffers read from the sender per message; more: all travel through the engine
_ADDRESS = struct.Struct("<Q")


def _remote(sizes: Sequence[int], allowed: bool) -> list[bool]:
    """Which buffers the receiver reads from the sender's memory (both sides compute this)."""
    if not allowed:
        return [False] * len(sizes)
    flags = [n >= cma.MIN_BYTES for n in sizes]
    return flags if 0 < sum(flags) <= MAX_REMOTE else [False] * len(sizes)


def _plan(header_len: int, sizes: Sequence[int], remote: Sequence[bool]) -> tuple[bool, list[bool]]:
    """Whether the header and each buffer ride inside the envelope (both sides compute this)."""
    room = INLINE_ROOM - _ADDRESS.size * sum(remote)
    if header_len > room:
        return False, [n == 0 for n in sizes]
    room -= header_len
    flags = []
    for n, far in zip(sizes, remote, strict=True):
        inline = not far and n <= room
        if inline:
            room -= n
        flags.append(inline)
    return True, flags


def _bytes_of(buf: Any) -> memoryview:
    view = memoryview(buf)
    if view.ndim != 1 or view.format != "B":
        view = view.cast("B")
    return view


def _u8(array: np.ndarray[Any, np.dtype[np.uint8]]) -> torch.Tensor:
    import torch

    return torch.from_numpy(array)


def _sendable(buf: memoryview) -> torch.Tensor:
    """A uint8 tensor over ``buf`` (zero-copy unless the memory is read-only)."""
    array = np.frombuffer(buf, dtype=np.uint8)
    if not array.flags.writeable:  # torch refuses read-only memory; copy once
        array = array.copy()
    return _u8(array)


class Outgoing(NamedTuple):
    parts: list[torch.Tensor]  # to send, envelope first, in order
    remote: list[memoryview]  # read by the receiver from this process: alive until it says so


def outgoing(msg: Encoded, envelope: Envelope, *, readable: bool = False) -> Outgoing:
    """What to send for ``msg``; with ``readable`` (the receiver can read this process), large
    buffers are left for the receiver to copy out of this process's memory."""
    header = bytes(msg.header)
    views = [_bytes_of(b) for b in msg.buffers]
    sizes = [v.nbytes for v in views]
    remote = _remote(sizes, readable)
    header_inline, flags = _plan(len(header), sizes, remote)
    env = np.zeros(ENVELOPE_BYTES, dtype=np.uint8)
    k = sum(remote)
    envelope.pack_into(env.data)
    _EXTRA.pack_into(env.data, _EXTRA_AT, len(header), k, os.getpid() if k else 0)
    parts: list[torch.Tensor] = [_u8(env)]
    far: list[memoryview] = []
    pos = INLINE_AT
    if header_inline:
        env[pos : pos + len(header)] = np.frombuffer(header, dtype=np.uint8)
        pos += len(header)
    else:
        parts.append(_u8(np.frombuffer(bytearray(header), dtype=np.uint8)))
    for view, inline, is_far in zip(views, flags, remote, strict=True):
        n = view.nbytes
        if is_far:
            at = ENVELOPE_BYTES - _ADDRESS.size * (k - len(far))
            _ADDRESS.pack_into(env.data, at, cma.address_of(view))
            far.append(view)
        elif n == 0:
            continue
        elif inline:
            env[pos : pos + n] = np.frombuffer(view, dtype=np.uint8)
            pos += n
        else:
            parts.append(_sendable(view))
    return Outgoing(parts, far)


def ack_tag(tag: int) -> int:
    """The tag on which receivers acknowledge buffers they read from a message sent on ``tag``."""
    return (tag & ~3) | ACK_SPACE


class Incoming:
    """One message being received from ``src``; resumable after a timeout (see ``advance``)."""

    def __init__(
        self,
        engine: Engine,
        src: int,
        tag: int,
        ctx: OpContext,
        *,
        expect: Envelope,
        codec: CodecOptions,
        direct: torch.Tensor | None = None,
        linger_s: float = GRACE_S,
    ) -> None:
        self.engine = engine
        self.src = src
        self.tag = tag
        self.expect = expect
        self.codec = codec
        self.direct = direct  # a uint8 tensor to receive a single-buffer message into, if it fits
        self.used_direct = False
        self._linger = linger_s  # how long posted receives stay waited for past the deadline
        self._env = np.empty(ENVELOPE_BYTES, dtype=np.uint8)
        work = engine.post_recv(_u8(self._env), src, tag, ctx)
        self._env_job = engine.start([(work, src)], ctx, extra_s=linger_s)
        self._opened = False
        self._header_job: P2PJob | None = None
        self._header_buf: np.ndarray[Any, np.dtype[np.uint8]] | None = None
        self._parts: list[tuple[Any, int]] = []
        self._parts_job: P2PJob | None = None
        self.header: bytes | None = None
        self.checked: Header | None = None  # the header, checked against the codec's limits
        self.buffers: list[memoryview] = []
        self._far = 0  # buffers to read from the sender's memory (envelope field k)
        self._pid = 0

    def env_arrived(self) -> bool:
        return self._env_job.done.is_set() and self._env_job.error is None

    def expired(self) -> bool:
        jobs = (self._env_job, self._header_job, self._parts_job)
        return any(job is not None and job.expired for job in jobs)

    def advance(self, ctx: OpContext, *, silent: Callable[[], Iterable[int]] | None = None) -> None:
        """Wait for the envelope (and a separate header), then post every part's receive."""
        engine = self.engine
        if self._parts_job is not None:
            return
        if not self._opened:
            engine.wait_job(self._env_job, ctx, silent=silent)
            header_len = self._open_envelope()
            self._opened = True
            if self.header is None:
                self._header_buf = np.empty(header_len, dtype=np.uint8)
                work = engine.post_recv(_u8(self._header_buf), self.src, self.tag, ctx)
                self._header_job = engine.start([(work, self.src)], ctx, extra_s=self._linger)
        if self.header is None:
            assert self._header_job is not None and self._header_buf is not None
            engine.wait_job(self._header_job, ctx)
            self.header = self._header_buf.tobytes()
        self._post_parts(ctx)

    def _open_envelope(self) -> int:
        env = self._env
        rank, src = self.engine.rank, self.src
        self.expect.expect(Envelope.unpack_from(env.data, src=src), rank=rank, src=src)
        header_len, far, pid = _EXTRA.unpack_from(env.data, _EXTRA_AT)
        if far > MAX_REMOTE:
            raise RemoteProtocolError(
                f"rank {rank} received a malformed message envelope from rank {src} ({far} "
                f"buffers to read from its memory, at most {MAX_REMOTE})"
            )
        check_header_length(header_len, self.codec, src)
        self._far = int(far)
        self._pid = int(pid) if far else 0
        if far and self.engine.cma_sources.get(self.src) != self._pid:
            raise RemoteProtocolError(
                f"rank {self.src} asked rank {self.engine.rank} to read {far} buffers from pid "
                f"{self._pid}, which is not the process it showed when the world formed"
            )
        if header_len <= INLINE_ROOM - _ADDRESS.size * self._far:
            header = env[INLINE_AT : INLINE_AT + header_len].tobytes()
            header_length(header[:16])  # validates the prefix before trusting any size
            self.header = header
        return int(header_len)

    def _post_parts(self, ctx: OpContext) -> None:
        header = self.header
        assert header is not None
        self.checked = check_header(header, self.codec)  # before anything is allocated
        sizes = self.checked.wire_sizes
        remote = _remote(sizes, self._far > 0)
        if sum(remote) != self._far:
            raise RemoteProtocolError(
                f"rank {self.src} announced {self._far} buffers to read from its memory, but its "
                f"header describes {sum(remote)}"
            )
        header_inline, flags = _plan(len(header), sizes, remote)
        pos = INLINE_AT + (len(header) if header_inline else 0)
        far_at = ENVELOPE_BYTES - _ADDRESS.size * self._far
        direct = self.direct
        use_direct = (
            direct is not None and len(sizes) == 1 and not flags[0] and sizes[0] == direct.numel()
        )
        for n, inline, is_far in zip(sizes, flags, remote, strict=True):
            if inline:
                buf = alloc_buffer(n)
                if n:
                    np.frombuffer(buf, dtype=np.uint8)[:] = self._env[pos : pos + n]
                    pos += n
                self.buffers.append(buf)
                continue
            if use_direct:
                assert direct is not None
                target = direct
                self.buffers.append(direct.numpy().data)
                self.used_direct = True
            else:
                buf = alloc_buffer(n)
                target = _u8(np.frombuffer(buf, dtype=np.uint8))
                self.buffers.append(buf)
            if is_far:
                address = _ADDRESS.unpack_from(self._env.data, far_at)[0]
                far_at += _ADDRESS.size
                self._read_far(address, target, n, ctx)
                continue
            self._parts.append((self.engine.post_recv(target, self.src, self.tag, ctx), self.src))
        if self._far:
            self._acknowledge(0, ctx)
        self._parts_job = self.engine.start(self._parts, ctx, extra_s=self._linger)

    def _read_far(self, address: int, target: torch.Tensor, n: int, ctx: OpContext) -> None:
        try:
            cma.read(self._pid, address, target.data_ptr(), n)
        except OSError as err:
            self._acknowledge(err.errno or errno.EIO, ctx)  # so the sender fails too, not waits
            if err.errno == errno.ESRCH:
                raise ConnectionLostError(
                    f"rank {self.engine.rank}: rank {self.src} (pid {self._pid}) exited before "
                    f"its message could be read",
                    ranks=(self.src,),
                ) from None
            raise TransportError(
                f"rank {self.engine.rank} could not read rank {self.src}'s message from its "
                f"memory: {err}"
            ) from None

    def _acknowledge(self, code: int, ctx: OpContext) -> None:
        """Tell the sender its buffers were read (0) or not (an errno): it may reuse them.

        Not waited for here: this rank has its data, and the sender's own op ends with the
        acknowledgement; a helper thread waits for the send and keeps the 8 bytes alive.
        """
        ack = np.array([code], dtype=np.int64)
        work = self.engine.post_send(_u8(ack.view(np.uint8)), self.src, ack_tag(self.tag), ctx)
        self.engine.start([(work, self.src)], ctx, extra_s=self._linger).keep = ack

    def finish(self, ctx: OpContext) -> Encoded:
        assert self._parts_job is not None and self.header is not None
        self.engine.wait_job(self._parts_job, ctx)
        return Encoded(self.header, self.buffers, self.checked)

    def abandon(self) -> None:
        """Keep whatever is still posted alive (gloo may write into it later)."""
        self.engine.bury(self._env, self._env_job, self._header_buf, self._header_job)
        self.engine.bury(self._parts, self._parts_job, self.buffers, self.direct)


class Link:
    """The :class:`collectives.algorithms.Link` of one collective, over point-to-point sends.

    ``send`` only posts (it never blocks, so rings and trees cannot deadlock); ``close`` waits
    for every posted send, and on failure keeps posted buffers alive for gloo.
    """

    def __init__(
        self,
        engine: Engine,
        ctx: OpContext,
        tag: int,
        *,
        root: int,
        codec: CodecOptions,
        agree: bool = False,
    ) -> None:
        self.engine = engine
        self.ctx = ctx
        self.rank = engine.rank
        self.size = engine.size
        self.deadline: Deadline = ctx.deadline
        self.tag = tag
        self.codec = codec  # how messages received on this link are decoded
        self._envelope = ev.op_envelope(ctx.name, ctx.seq, root, engine.comm, engine.epoch)
        self._sends: list[tuple[Any, int]] = []
        self._keep: list[object] = []
        self._incoming: list[Incoming] = []
        self._acks: list[tuple[np.ndarray[Any, np.dtype[np.int64]], int]] = []
        self._votes: dict[int, np.ndarray[Any, np.dtype[np.uint8]]] = {}
        self._vote_works: list[tuple[Any, int]] = []
        if agree and self.size > 2:
            self._start_agreement()

    def _start_agreement(self) -> None:
        """Every rank sends its envelope to every other, before any message of the op.

        A rooted op's messages follow a tree of the root each rank believes in, so a rank can
        agree with its parent and finish while another rank named another root; only a word
        from every rank tells them all.  With two ranks no vote is needed: a disagreement
        leaves both sending (or both receiving), and both time out.  The vote is one envelope
        per peer, on the op's own tag ahead of everything else (gloo keeps a (peer, tag) in
        order), so it runs alongside the op's data: no extra round trip.  Each rank checks the
        votes before it waits for any data (:meth:`_check_votes`).
        """
        mine = np.zeros(ENVELOPE_BYTES, dtype=np.uint8)
        self._envelope.pack_into(mine.data)
        self._keep.append(mine)
        for k in range(1, self.size):
            src = (self.rank - k) % self.size
            vote = self._votes[src] = np.empty(ENVELOPE_BYTES, dtype=np.uint8)
            work = self.engine.post_recv(_u8(vote), src, self.tag, self.ctx)
            self._vote_works.append((work, src))
        for k in range(1, self.size):
            dst = (self.rank + k) % self.size
            self._sends.append((self.engine.post_send(_u8(mine), dst, self.tag, self.ctx), dst))

    def send(self, dst: int, msg: Encoded) -> None:
        out = outgoing(msg, self._envelope, readable=dst in self.engine.cma_readers)
        for part in out.parts:
            self._keep.append(part)
            self._sends.append((self.engine.post_send(part, dst, self.tag, self.ctx), dst))
        if out.remote:
            # dst reads these from this process: they must outlive its acknowledgement.
            ack = np.full(1, -1, dtype=np.int64)
            self._keep.append(out.remote)
            self._acks.append((ack, dst))
            work = self.engine.post_recv(_u8(ack.view(np.uint8)), dst, ack_tag(self.tag), self.ctx)
            self._sends.append((work, dst))

    def recv(self, src: int, into: memoryview | None = None) -> Encoded:
        """The next message from ``src`` (``into`` is a hint this transport does not use)."""
        return self.recv_many([src])[src]

    def decode_tensor(self, msg: Encoded, src: int) -> torch.Tensor:
        """A block from ``src`` that must be one tensor, decoded with this rank's options; any
        other kind of message is refused before it is decoded."""
        return decode_tensor(msg, self.codec, self.ctx.name, src)

    def recv_many(
        self, srcs: Sequence[int], direct: Mapping[int, torch.Tensor] | None = None
    ) -> dict[int, Encoded]:
        """One message from each of ``srcs``; all envelopes are posted at once.

        ``direct[src]`` (a uint8 tensor) receives a single-buffer message of exactly its size
        in place of fresh memory (see :class:`Incoming`).
        """
        incoming = []
        for src in srcs:
            inc = Incoming(
                self.engine,
                src,
                self.tag,
                self.ctx,
                expect=self._envelope,
                codec=self.codec,
                direct=direct.get(src) if direct is not None else None,
            )
            incoming.append(inc)
            self._incoming.append(inc)

        def silent() -> list[int]:
            return [i.src for i in incoming if not i.env_arrived()]

        self._check_votes()
        for inc in incoming:
            inc.advance(self.ctx, silent=silent)
        out = {inc.src: inc.finish(self.ctx) for inc in incoming}
        self._incoming = [i for i in self._incoming if i not in incoming]
        return out

    def has_message(self, src: int) -> bool:
        return False  # gloo cannot probe; algorithms then name every pending rank on timeout

    def _check_votes(self) -> None:
        if not self._vote_works:
            return
        self.engine.wait_all(self._vote_works, self.ctx)
        self._vote_works = []
        for src, vote in self._votes.items():
            got = Envelope.unpack_from(vote.data, src=src)
            self._envelope.expect(got, rank=self.rank, src=src)

    def close(self) -> None:
        self._check_votes()
        self.engine.wait_all(self._sends, self.ctx)
        failed = [(dst, int(ack[0])) for ack, dst in self._acks if ack[0] != 0]
        self._sends.clear()
        self._keep.clear()
        self._acks.clear()
        if failed:
            dst, code = failed[0]
            raise TransportError(
                f"{self.ctx.name} on rank {self.rank}: rank {dst} could not read this rank's "
                f"message from its memory ({os.strerror(code) if code > 0 else code}); set "
                f"{cma.ENV}=0 if that keeps happening"
            )

    def abandon(self) -> None:
        self.engine.bury(*self._sends, *self._keep, *self._acks, self._votes, self._vote_works)
        for inc in self._incoming:
            inc.abandon()


@contextmanager
def link(
    engine: Engine,
    ctx: OpContext,
    tag: int,
    *,
    root: int = NO_ROOT,
    codec: CodecOptions,
    agree: bool = False,
) -> Iterator[Link]:
    lk = Link(engine, ctx, tag, root=root, codec=codec, agree=agree)
    try:
        yield lk
        lk.close()
    except BaseException:
        lk.abandon()
        raise


__all__ = [
    "ENVELOPE_BYTES",
    "Incoming",
    "Link",
    "Outgoing",
    "ack_tag",
    "link",
    "outgoing",
]
