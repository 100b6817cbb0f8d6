"""Encoded messages (header + buffers) over torch.distributed point-to-point sends.

gloo only moves tensors whose size the receiver already knows, and a receive smaller than what
arrives aborts the whole process ("Received data size doesn't match expected size").  So every
message starts with a fixed-size *envelope* (``ENVELOPE_BYTES`` uint8) that says which op it
belongs to and how long everything after it is::

    offset size field
    0      4    magic b"CCTD"
    4      1    version (1)
    5      1    length of the op name
    6      2    reserved, 0
    8      4    codec header length
    12     4    reserved, 0
    16     8    op sequence number
    24     32   op name (ASCII, zero padded)
    56     8    reserved, 0
    64     ...  the codec header, when it fits, then every buffer that still fits (in order)

The rest travels as separate sends on the same (peer, tag), in order: the header when it did not
fit, then each buffer not inlined (empty buffers are never sent).  gloo delivers one (peer, tag)
in order, and the receiver posts receives of exactly the announced sizes (into
:func:`~collectives.codec.alloc_buffer` memory, zero-copy for ``decode``).  Small objects
therefore cost one message; tensors travel as their own bytes.

A :class:`Link` binds this to one collective (one tag per op, from its sequence number) for
:mod:`collectives.algorithms` and :mod:`collectives.backends.torch_objects`.  A peer in another
collective sends an envelope naming its op, which raises :class:`CollectiveMismatchError` naming
both ranks instead of crossing wires.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import numpy as np

from collectives.backends.torch_engine import GRACE_S, P2PJob
from collectives.codec import (
    MAX_HEADER_BYTES,
    Encoded,
    alloc_buffer,
    buffer_sizes,
    header_length,
)
from collectives.errors import (
    CollectiveMismatchError,
    RemoteProtocolError,
)

if TYPE_CHECKING:
    import torch

    from collectives.backends.base import OpContext
    from collectives.backends.torch_engine import Engine
    from collectives.deadline import Deadline

ENVELOPE_BYTES = 1024
MAGIC = b"CCTD"
VERSION = 1
_PREFIX = struct.Struct("<4sBBHIIQ")
_OP_AT, _OP_FIELD = 24, 32
INLINE_AT = 64
INLINE_ROOM = ENVELOPE_BYTES - INLINE_AT


def _plan(header_len: int, sizes: Sequence[int]) -> tuple[bool, list[bool]]:
    """Whether the header and each buffer ride inside the envelope (both sides compute this)."""
    if header_len > INLINE_ROOM:
        return False, [n == 0 for n in sizes]
    room = INLINE_ROOM - header_len
    flags = []
    for n in sizes:
        inline = n <= room
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


def outgoing(msg: Encoded, op: str, seq: int) -> list[torch.Tensor]:
    """The tensors to send for ``msg``, envelope first, in order."""
    header = bytes(msg.header)
    views = [_bytes_of(b) for b in msg.buffers]
    header_inline, flags = _plan(len(header), [v.nbytes for v in views])
    env = np.zeros(ENVELOPE_BYTES, dtype=np.uint8)
    name = op.encode("ascii", "replace")[:_OP_FIELD]
    _PREFIX.pack_into(env.data, 0, MAGIC, VERSION, len(name), 0, len(header), 0, seq)
    env[_OP_AT : _OP_AT + len(name)] = np.frombuffer(name, dtype=np.uint8)
    parts: list[torch.Tensor] = [_u8(env)]
    pos = INLINE_AT
    if header_inline:
        env[pos : pos + len(header)] = np.frombuffer(header, dtype=np.uint8)
        pos += len(header)
    else:
        parts.append(_u8(np.frombuffer(bytearray(header), dtype=np.uint8)))
    for view, inline in zip(views, flags, strict=True):
        n = view.nbytes
        if n == 0:
            continue
        if inline:
            env[pos : pos + n] = np.frombuffer(view, dtype=np.uint8)
            pos += n
        else:
            parts.append(_sendable(view))
    return parts


class Incoming:
    """One message being received from ``src``; resumable after a timeout (see ``advance``)."""

    def __init__(
        self,
        engine: Engine,
        src: int,
        tag: int,
        ctx: OpContext,
        *,
        expect: tuple[str, int] | None,
        direct: torch.Tensor | None = None,
        linger_s: float = GRACE_S,
    ) -> None:
        self.engine = engine
        self.src = src
        self.tag = tag
        self.expect = expect
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
        self.buffers: list[memoryview] = []

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
        magic, version, name_len, _, header_len, _, seq = _PREFIX.unpack_from(env.data, 0)
        if magic != MAGIC or version != VERSION or name_len > _OP_FIELD:
            raise RemoteProtocolError(
                f"rank {self.engine.rank} received a malformed message envelope from rank "
                f"{self.src} (magic {bytes(magic)!r}, version {version})"
            )
        op = env[_OP_AT : _OP_AT + name_len].tobytes().decode("ascii", "replace")
        if self.expect is not None and (op, seq) != self.expect:
            want_op, want_seq = self.expect
            raise CollectiveMismatchError(
                f"rank {self.engine.rank} is in {want_op} (collective #{want_seq}) but rank "
                f"{self.src} sent for {op} (collective #{seq}): every rank must call the same "
                "collectives in the same order",
                ranks=(self.engine.rank, self.src),
            )
        if header_len > MAX_HEADER_BYTES:
            raise RemoteProtocolError(
                f"rank {self.src} announced a {header_len}-byte codec header (limit "
                f"{MAX_HEADER_BYTES})"
            )
        if header_len <= INLINE_ROOM:
            header = env[INLINE_AT : INLINE_AT + header_len].tobytes()
            header_length(header[:16])  # validates the prefix before trusting any size
            self.header = header
        return int(header_len)

    def _post_parts(self, ctx: OpContext) -> None:
        header = self.header
        assert header is not None
        sizes = buffer_sizes(header)
        header_inline, flags = _plan(len(header), sizes)
        pos = INLINE_AT + (len(header) if header_inline else 0)
        direct = self.direct
        use_direct = (
            direct is not None and len(sizes) == 1 and not flags[0] and sizes[0] == direct.numel()
        )
        for n, inline in zip(sizes, flags, strict=True):
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
            self._parts.append((self.engine.post_recv(target, self.src, self.tag, ctx), self.src))
        self._parts_job = self.engine.start(self._parts, ctx, extra_s=self._linger)

    def finish(self, ctx: OpContext) -> Encoded:
        assert self._parts_job is not None and self.header is not None
        self.engine.wait_job(self._parts_job, ctx)
        return Encoded(self.header, self.buffers)

    def abandon(self) -> None:
        """Keep whatever is still posted alive (gloo may write into it later)."""
        self.engine.bury(self._env, self._env_job, self._header_buf, self._header_job)
        self.engine.bury(self._parts, self._parts_job, self.buffers, self.direct)


class Link:
    """The :class:`collectives.algorithms.Link` of one collective, over point-to-point sends.

    ``send`` only posts (it never blocks, so rings and trees cannot deadlock); ``close`` waits
    for every posted send, and on failure keeps posted buffers alive for gloo.
    """

    def __init__(self, engine: Engine, ctx: OpContext, tag: int) -> None:
        self.engine = engine
        self.ctx = ctx
        self.rank = engine.rank
        self.size = engine.size
        self.deadline: Deadline = ctx.deadline
        self.tag = tag
        self._expect = (ctx.name, ctx.seq)
        self._sends: list[tuple[Any, int]] = []
        self._keep: list[object] = []
        self._incoming: list[Incoming] = []

    def send(self, dst: int, msg: Encoded) -> None:
        for part in outgoing(msg, self.ctx.name, self.ctx.seq):
            self._keep.append(part)
            self._sends.append((self.engine.post_send(part, dst, self.tag, self.ctx), dst))

    def recv(self, src: int) -> Encoded:
        return self.recv_many([src])[src]

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
                expect=self._expect,
                direct=direct.get(src) if direct is not None else None,
            )
            incoming.append(inc)
            self._incoming.append(inc)

        def silent() -> list[int]:
            return [i.src for i in incoming if not i.env_arrived()]

        for inc in incoming:
            inc.advance(self.ctx, silent=silent)
        out = {inc.src: inc.finish(self.ctx) for inc in incoming}
        self._incoming = [i for i in self._incoming if i not in incoming]
        return out

    def has_message(self, src: int) -> bool:
        return False  # gloo cannot probe; algorithms then name every pending rank on timeout

    def close(self) -> None:
        self.engine.wait_all(self._sends, self.ctx)
        self._sends.clear()
        self._keep.clear()

    def abandon(self) -> None:
        self.engine.bury(*self._sends, *self._keep)
        for inc in self._incoming:
            inc.abandon()


@contextmanager
def link(engine: Engine, ctx: OpContext, tag: int) -> Iterator[Link]:
    lk = Link(engine, ctx, tag)
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
    "link",
    "outgoing",
]
