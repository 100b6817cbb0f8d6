"""Small collectives of a one-host ``udp`` world through its arena (a mixin of ``UdpBackend``).

When every rank of the world shares this host and every pair of them reads each other through
rings (``udp_shm.attach_world`` sets :attr:`ArenaCollectives._arena`), a collective whose
payload fits a slot (:data:`~collectives.backends.shm_arena.CAPACITY`) runs as one exchange
in the arena (:mod:`~collectives.backends.shm_arena`): each rank writes its envelope and its
part into its slot, waits until every rank has written the same op's slot, checks every
envelope (the agreement of a rooted collective comes with it), and copies out what it needs.

Which path an op takes is decided alike on every rank: by sizes every rank knows (a buffer
op's tensor, a reduction's), or, where only some ranks know them (a broadcast or gather of
Python objects), by the exchange itself: a payload that does not fit leaves a mark in its slot,
and then every rank, having seen the same marks, runs the message path's algorithm.

A reduction combines the ranks' tensors in the shape of the message path's algorithm
(recursive doubling for an allreduce, the binomial tree for a reduce) on every rank that
computes it, so an allreduce gives every rank the same bits, and the message path's.  Anything
the arena does not take (a scatter of objects, larger payloads) takes the message path, but a
large allreduce of a world of a few ranks, which goes up the tree and back down
(``arena_reduction.tree_allreduce``).

A rank waiting for the others' stores polls the arena briefly, then sleeps on the arena's world
word (a futex, ``shm_arena``), waking every few milliseconds to ask the IO engine whether a rank
it waits for was lost and to check the op's deadline; the IO thread serves the socket meanwhile.
"""

from __future__ import annotations

import functools
import os
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from collectives.algorithms.reduction import combined
from collectives.backends.arena_reduction import doubling, tree, tree_allreduce
from collectives.backends.base import land_gathered
from collectives.backends.envelope import NO_ROOT, Envelope
from collectives.backends.envelope import SIZE as ENVELOPE_SIZE
from collectives.backends.p2p import (
    P2PBackend,
    lands_in,
    received_block,
)
from collectives.backends.shm_arena import CAPACITY, COMPLETE, DRAINED, Arena
from collectives.backends.tensor_bytes import ByteViews
from collectives.backends.udp_inbox import checked_header, split_body
from collectives.codec import CodecOptions, Encoded, Header, encode
from collectives.errors import RemoteProtocolError
from collectives.reduce_op import ReduceOp, finish_, out_combiner

if TYPE_CHECKING:
    import torch

    from collectives.backends.base import OpContext
    from collectives.backends.udp_io import Engine

_HEADER_ALLOWANCE = 512  # a tensor's codec header is well under this
# How long a wait polls the arena (yielding the CPU between looks) before it sleeps on the
# world word, and how long each sleep lasts at most, between checks for a lost peer, an abort
# and the deadline.  A rank that polls sees the last store without the wakeup's latency, so
# where each rank has a CPU of its own it polls long, as MPI libraries do.  Where the ranks
# outnumber the CPUs a poll takes CPU turns from ranks with work, however often it yields, and
# a sleeper is placed afresh when woken (the benchmark's barrier leaves three of 4 ranks on one
# CPU): ComfyUI end to end, 4 ranks on 2 cores, efficiency 0.971 polling 50 us, 0.953-0.957
# polling 500 us.
_POLL_S = 500e-6
_SHARED_POLL_S = 50e-6
_SLICE_S = 0.005
_yield = getattr(os, "sched_yield", lambda: time.sleep(0))


class ArenaCollectives(P2PBackend):
    """The arena's collectives (see the module docstring), the message path's otherwise."""

    _engine: Engine | None
    _arena: Arena | None = None
    _arena_ops = 0  # arena ops so far: the same count on every rank
    _arena_headers: dict[bytes, tuple[CodecOptions, Header]] | None = None
    _tensor_headers: dict[tuple[torch.dtype, tuple[int, ...]], bytes] | None = None
    # Codec headers checked and found to be a raw buffer: header -> (dtype, numel, bytes),
    # under the codec options they were checked with (see _raw_body).
    _raw_headers: tuple[CodecOptions, dict[bytes, tuple[torch.dtype, int, int]]] | None = None
    # Tensors over the arena's slots, made once (see _view).
    _slot_views: dict[tuple[Any, ...], torch.Tensor] | None = None
    _scratch: dict[tuple[Any, ...], list[torch.Tensor]] | None = None  # see _reduce_scratch
    _poll_s: float | None = None  # see _arena_poll_s
    _byte_views: ByteViews | None = None  # see _bytes_of

    # -- the exchange --------------------------------------------------------------------------
    def _arena_for(self, nbytes: int | None) -> Arena | None:
        """The arena, when this op goes through it: ``nbytes`` (the payload's size where every
        rank knows it, None where some do not) fits.  Decided on sizes alone, so alike on
        every rank (a device tensor goes through host memory, as the message path's does)."""
        arena = self._arena
        if arena is None:
            return None
        if nbytes is not None and nbytes + ENVELOPE_SIZE + _HEADER_ALLOWANCE > CAPACITY:
            return None
        return arena

    def _exchange(self, arena: Arena, ctx: OpContext, root: int, msg: Encoded | None) -> int:
        """Write this rank's envelope and ``msg`` (if any) as the next arena op and wait for
        every rank's; check their envelopes.  The op's number: :meth:`Arena.finish` it once its
        slots are read (done here when this raises)."""
        k = self._arena_ops = self._arena_ops + 1
        env = self.envelope(ctx.name, ctx.seq, root)
        try:
            if not arena.free(k):  # every rank done with op k - 2, the last user of the slot
                self._arena_wait(ctx, DRAINED, functools.partial(arena.free, k), k - 2)
            mine = env.pack()
            meta = mine if msg is None else mine + bytes(msg.header)
            body = [] if msg is None else [_flat(b) for b in msg.buffers]
            arena.publish(k, meta, body)
            if not arena.all_ready(k):
                self._arena_wait(ctx, COMPLETE, functools.partial(arena.all_ready, k), k)
            for src in range(self.size):
                if src != self.rank:
                    meta_view, _ = arena.slot(src, k)
                    # Packed envelopes name no rank: equal bytes, the same op (the common case,
                    # without a parse); anything else is parsed for the error it makes.
                    if meta_view[:ENVELOPE_SIZE] != mine:
                        got = Envelope.unpack_from(meta_view, src=src)
                        env.expect(got, rank=self.rank, src=src)
        except BaseException:
            arena.finish(k)
            raise
        return k

    def _arena_wait(self, ctx: OpContext, word: int, ready: Callable[[], bool], k: int) -> None:
        """Wait until ``ready()``: every rank's slot of op ``k`` is written (``word`` is
        ``COMPLETE``), or every rank is done with op ``k`` (``DRAINED``).  Polls the arena for
        up to :meth:`_arena_poll_s`, then sleeps on the world word in slices of :data:`_SLICE_S`,
        between which the IO engine says whether a rank it waits for was lost, this rank
        aborted or closed, and the op's deadline is checked.  The IO thread serves the socket
        meanwhile."""
        arena, engine = self._arena, self._engine
        assert arena is not None and engine is not None
        clock = time.perf_counter
        until = clock() + self._arena_poll_s()
        while clock() < until:
            _yield()
            if ready():
                return
        dl = ctx.deadline
        while True:
            waited = arena.missing(k) if word == COMPLETE else arena.behind(k)
            with engine.lock:
                for src in waited:
                    engine.check_usable(src, dl.op)
            remaining = dl.remaining()
            if remaining <= 0:
                raise dl.error(waited, "it did not reach the collective")
            if arena.sleep(word, ready, min(remaining, _SLICE_S)):
                return

    def _arena_poll_s(self) -> float:
        """How long this rank's waits poll (see :data:`_POLL_S`): every rank of an arena world
        is on this host, so they outnumber its CPUs when the world does."""
        poll = self._poll_s
        if poll is None:
            shared = self.size > len(os.sched_getaffinity(0))
            poll = self._poll_s = _SHARED_POLL_S if shared else _POLL_S
        return poll

    def _message(self, arena: Arena, src: int, k: int, *, copy: bool = False) -> Encoded | None:
        """``src``'s payload of op ``k`` as a message whose buffers are views into the arena
        (``copy``: into memory of its own, for the caller to keep); None: it did not fit.  Its
        codec header is checked against this rank's options, as a received message's is, and
        the body split into the buffers it lists."""
        meta, body = arena.slot(src, k)
        if body is None:
            return None
        header = bytes(meta[ENVELOPE_SIZE:])
        checked = self._checked(header)
        sizes = checked.wire_sizes
        if sum(sizes) != body.nbytes:
            raise RemoteProtocolError(
                f"rank {src} wrote a {body.nbytes}-byte body but its codec header announces "
                f"{sum(sizes)} bytes"
            )
        if copy:
            body = memoryview(bytearray(body))
        return Encoded(header, split_body(body, sizes), checked)

    def _owned(self, arena: Arena, src: int, k: int) -> Encoded | None:
        return self._message(arena, src, k, copy=True)

    def _checked(self, header: bytes) -> Header:
        """``header`` checked against this rank's options, remembered (as a received
        message's is: ``udp_inbox.checked_header``)."""
        cache = self._arena_headers
        if cache is None:
            cache = self._arena_headers = {}
        return checked_header(cache, header, self.codec)

    # -- rootless ------------------------------------------------------------------------------
    def barrier(self, ctx: OpContext) -> None:
        arena = self._arena_for(0)
        if arena is None:
            super().barrier(ctx)
            return
        k = self._exchange(arena, ctx, NO_ROOT, None)
        arena.finish(k)

    def allgather(self, msg: Encoded, ctx: OpContext) -> list[Encoded]:
        arena = self._arena_for(None)
        if arena is None:
            return super().allgather(msg, ctx)
        k = self._exchange(arena, ctx, NO_ROOT, msg)
        try:
            # Every slot, this rank's too: the ranks decide alike only on the same marks.
            fits = all(arena.slot(r, k)[1] is not None for r in range(self.size))
            got = [msg if r == self.rank else self._owned(arena, r, k) for r in range(self.size)]
        finally:
            arena.finish(k)
        if not fits:
            return super().allgather(msg, ctx)  # a payload did not fit: every rank saw it
        return [m for m in got if m is not None]

    def allgather_into(self, out: torch.Tensor, tensor: torch.Tensor, ctx: OpContext) -> None:
        arena = self._arena_for(_nbytes(tensor))
        if arena is None:
            super().allgather_into(out, tensor, ctx)
            return
        k = self._exchange(arena, ctx, NO_ROOT, self._encoded(tensor))
        try:
            self._place_all(arena, out, tensor, k, ctx)
        finally:
            arena.finish(k)

    def allreduce(self, tensor: torch.Tensor, op: ReduceOp, ctx: OpContext) -> None:
        nbytes = _nbytes(tensor)
        arena = self._arena_for(nbytes)
        if arena is not None:
            self._reduce(arena, tensor, op, ctx, NO_ROOT)
        elif self._arena is not None and tree_allreduce(nbytes, self.size):
            # One host, a few ranks, a large tensor: up the tree to rank 0 and back down, as
            # two collectives of their own envelopes (see arena_reduction.tree_allreduce).
            super().reduce(tensor, 0, op, ctx._replace(name=f"{ctx.name}/up"))
            super().broadcast_into(tensor, 0, ctx._replace(name=f"{ctx.name}/down"))
        else:
            super().allreduce(tensor, op, ctx)

    # -- rooted --------------------------------------------------------------------------------
    def broadcast(self, msg: Encoded | None, root: int, ctx: OpContext) -> Encoded:
        arena = self._arena_for(None)
        if arena is None:
            return super().broadcast(msg, root, ctx)
        k = self._exchange(arena, ctx, root, msg if self.rank == root else None)
        try:
            got = msg if self.rank == root else self._owned(arena, root, k)
            fits = arena.slot(root, k)[1] is not None
        finally:
            arena.finish(k)
        if not fits:
            return super().broadcast(msg, root, ctx)  # every rank saw the root's mark
        assert got is not None
        return got

    def broadcast_into(self, tensor: torch.Tensor, root: int, ctx: OpContext) -> None:
        arena = self._arena_for(_nbytes(tensor))
        if arena is None:
            super().broadcast_into(tensor, root, ctx)
            return
        k = self._exchange(arena, ctx, root, self._encoded(tensor) if self.rank == root else None)
        try:
            if self.rank != root:
                self._place(arena, tensor, root, k, ctx)
        finally:
            arena.finish(k)

    def gather(self, msg: Encoded, root: int, ctx: OpContext) -> list[Encoded] | None:
        arena = self._arena_for(None)
        if arena is None:
            return super().gather(msg, root, ctx)
        k = self._exchange(arena, ctx, root, msg)
        try:
            fits = all(arena.slot(r, k)[1] is not None for r in range(self.size))
            got = None
            if fits and self.rank == root:
                got = [msg if r == root else self._owned(arena, r, k) for r in range(self.size)]
        finally:
            arena.finish(k)
        if not fits:
            return super().gather(msg, root, ctx)
        return None if got is None else [m for m in got if m is not None]

    def gather_into(
        self, out: torch.Tensor | None, tensor: torch.Tensor, root: int, ctx: OpContext
    ) -> None:
        arena = self._arena_for(_nbytes(tensor))
        if arena is None:
            super().gather_into(out, tensor, root, ctx)
            return
        k = self._exchange(arena, ctx, root, self._encoded(tensor))
        try:
            if out is not None:
                self._place_all(arena, out.view(self.size, *tensor.shape), tensor, k, ctx)
        finally:
            arena.finish(k)

    def gatherv_into(
        self, blocks: list[torch.Tensor] | None, tensor: torch.Tensor, root: int, ctx: OpContext
    ) -> None:
        # Blocks of any size: the object gather's exchange (which falls back alike on every
        # rank), then the root copies each into its block.  Not the message path's own
        # gatherv, whose non-roots would call the arena's gather while the root did not.
        if self._arena is None:
            super().gatherv_into(blocks, tensor, root, ctx)
            return
        msgs = self.gather(encode(tensor), root, ctx)
        if msgs is not None:
            assert blocks is not None
            received = {r: m for r, m in enumerate(msgs) if r != root}
            land_gathered(blocks, received, tensor, root, ctx, codec=self.codec)

    def scatter_into(
        self, out: torch.Tensor, tensor: torch.Tensor | None, root: int, ctx: OpContext
    ) -> None:
        # The root's slot holds every block: one codec header (the blocks are alike), then the
        # blocks back to back; rank r takes block r.
        nbytes = _nbytes(out) * self.size
        arena = self._arena_for(nbytes)
        if arena is None:
            super().scatter_into(out, tensor, root, ctx)
            return
        msg = None
        if self.rank == root:
            assert tensor is not None
            blocks = tensor.contiguous().view(self.size, *out.shape)
            whole = self._bytes_of(blocks)
            if whole is None or blocks.requires_grad:
                msg = Encoded(encode(blocks[0]).header, encode(blocks).buffers)
            else:  # a raw tensor's blocks: one block's header, every block's bytes as they are
                msg = Encoded(self._encoded(blocks[0]).header, [whole])
        k = self._exchange(arena, ctx, root, msg)
        try:
            if self.rank == root:
                assert tensor is not None
                out.copy_(tensor.view(self.size, *out.shape)[root])
            else:
                self._take_scattered(arena, out, root, k, ctx)
        finally:
            arena.finish(k)

    def _take_scattered(
        self, arena: Arena, out: torch.Tensor, root: int, k: int, ctx: OpContext
    ) -> None:
        """This rank's block of the root's scatter (op ``k``) into ``out``: its bytes copied
        straight in once the header is known to be a raw buffer of ``out``'s dtype and size
        (:meth:`_known_raw`), else decoded and checked."""
        meta, body = arena.slot(root, k)
        if body is None:  # never: every rank knew the size
            raise AssertionError("the arena's scatter did not fit")
        header = bytes(meta[ENVELOPE_SIZE:])
        size, rest = divmod(body.nbytes, self.size)
        into = self._bytes_of(out)
        if into is not None and not rest and self._known_raw(header, out, size):
            into[:] = body[self.rank * size : (self.rank + 1) * size]
            return
        checked = self._checked(header)
        size = sum(checked.wire_sizes)  # one block's
        if body.nbytes != size * self.size:
            raise RemoteProtocolError(
                f"rank {root} scattered {body.nbytes} bytes, not {self.size} blocks of {size}"
            )
        msg = Encoded(header, [body[self.rank * size : (self.rank + 1) * size]], checked)
        got = received_block(msg, out, root, ctx, codec=self.codec)
        self._learn_raw(msg, got)
        out.copy_(got.view(out.shape))

    def reduce(self, tensor: torch.Tensor, root: int, op: ReduceOp, ctx: OpContext) -> None:
        arena = self._arena_for(_nbytes(tensor))
        if arena is None:
            super().reduce(tensor, root, op, ctx)
            return
        self._reduce(arena, tensor, op, ctx, root)

    # -- helpers -------------------------------------------------------------------------------
    def _view(
        self, arena: Arena, like: torch.Tensor, src: int, k: int, ctx: OpContext
    ) -> torch.Tensor:
        """``src``'s tensor of op ``k`` as a view into the arena, shaped like ``like`` (valid
        until :meth:`Arena.finish`): decoded and checked the first time its header meets
        ``like``'s dtype and size, then taken as raw bytes through a view of the slot made once
        (the slot's memory stays where it is for the arena's life)."""
        import torch

        raw = self._raw_body(arena, src, k, like)
        if raw is not None:
            body, at = raw
            key = (src, k & 1, at, like.dtype, like.shape)
            views = self._slot_views
            if views is None:
                views = self._slot_views = {}
            view = views.get(key)
            if view is None:
                if len(views) >= 256:
                    views.clear()
                view = views[key] = torch.frombuffer(body, dtype=like.dtype).view(like.shape)
            return view
        msg = self._message(arena, src, k)
        assert msg is not None  # every rank knew the size
        got = received_block(msg, like, src, ctx, codec=self.codec)
        self._learn_raw(msg, got)
        return got.view(like.shape)

    def _raw_body(
        self, arena: Arena, src: int, k: int, like: torch.Tensor
    ) -> tuple[memoryview, int] | None:
        """``src``'s body of op ``k`` and its offset in the slot, when its codec header is one
        this rank has already checked and decoded to a raw buffer of ``like``'s dtype and
        element count (the body is then ``like``'s bytes as they are, with no decode); else
        None."""
        meta, body = arena.slot(src, k)
        if body is None:  # never: every rank knew the size
            raise AssertionError("an arena payload that every rank sized did not fit")
        if not self._known_raw(bytes(meta[ENVELOPE_SIZE:]), like, body.nbytes):
            return None
        return body, len(meta)

    def _known_raw(self, header: bytes, like: torch.Tensor, nbytes: int) -> bool:
        """Whether ``header`` was checked under this rank's codec options and decoded to a raw
        buffer of ``nbytes`` holding ``like``'s dtype and element count (:meth:`_learn_raw`)."""
        raws = self._raw_headers
        if raws is None or raws[0] is not self.codec:
            return False
        return raws[1].get(header) == (like.dtype, like.numel(), nbytes)

    def _learn_raw(self, msg: Encoded, got: torch.Tensor) -> None:
        """Remember that ``msg``'s header (checked, decoded to ``got``) is a raw buffer of
        ``got``'s dtype and size, when it is one (see :meth:`_known_raw`)."""
        nbytes = _nbytes(got)
        if msg.checked is None or not lands_in(msg.checked, nbytes):
            return
        raws = self._raw_headers
        if raws is None or raws[0] is not self.codec:
            raws = self._raw_headers = (self.codec, {})
        if len(raws[1]) >= 64:
            raws[1].clear()
        raws[1][bytes(msg.header)] = (got.dtype, got.numel(), nbytes)

    def _bytes_of(self, tensor: torch.Tensor) -> memoryview | None:
        """``byte_view(tensor)``, kept by address and length (``tensor_bytes``: in the first
        op after a barrier, byte_view's torch calls were most of a 1 KiB allgather's CPU)."""
        views = self._byte_views
        if views is None:
            views = self._byte_views = ByteViews()
        return views.of(tensor)

    def _encoded(self, tensor: torch.Tensor) -> Encoded:
        """``encode(tensor)``, its header remembered by dtype and shape for a plain CPU tensor
        (the header of a raw tensor depends on nothing else; an encode costs ~8 us)."""
        view = self._bytes_of(tensor)
        if view is None or tensor.requires_grad:
            return encode(tensor)
        cache = self._tensor_headers
        if cache is None:
            cache = self._tensor_headers = {}
        key = (tensor.dtype, tuple(tensor.shape))
        header = cache.get(key)
        if header is None:
            if len(cache) >= 64:
                cache.clear()
            header = cache[key] = bytes(encode(tensor).header)
        return Encoded(header, [view])

    def _place_all(
        self, arena: Arena, out: torch.Tensor, tensor: torch.Tensor, k: int, ctx: OpContext
    ) -> None:
        """Every rank's block of op ``k`` into ``out`` (``size`` blocks shaped like
        ``tensor``; this rank's from ``tensor``); one byte view of them all, sliced per block,
        and ``tensor`` stands for every block in the header checks (the blocks are alike: no
        block tensor is made on the fast path)."""
        whole = self._bytes_of(out)
        mine = None if whole is None else self._bytes_of(tensor)
        size = _nbytes(tensor)
        for src in range(self.size):
            into = None if whole is None else whole[src * size : (src + 1) * size]
            if src == self.rank:
                if into is not None and mine is not None:
                    into[:] = mine  # a memmove: ``tensor`` may be this very block
                else:
                    out.view(self.size, *tensor.shape)[src].copy_(tensor)
                continue
            raw = None if into is None else self._raw_body(arena, src, k, tensor)
            if raw is not None and into is not None:
                into[:] = raw[0]
            else:
                block = out.view(self.size, *tensor.shape)[src]
                self._place(arena, block, src, k, ctx, into=into)

    def _place(
        self,
        arena: Arena,
        out: torch.Tensor,
        src: int,
        k: int,
        ctx: OpContext,
        *,
        into: memoryview | None = None,
    ) -> None:
        """``src``'s block of op ``k`` into ``out`` (``into``: ``out``'s bytes, when the
        caller has them): its bytes copied straight in once its header is known to be a raw
        buffer of ``out``'s dtype and size (:meth:`_raw_body`), else decoded and checked."""
        if into is None:
            into = self._bytes_of(out)
        if into is not None:
            raw = self._raw_body(arena, src, k, out)
            if raw is not None:
                into[:] = raw[0]
                return
        msg = self._message(arena, src, k)
        assert msg is not None  # every rank knew the size
        got = received_block(msg, out, src, ctx, codec=self.codec)
        self._learn_raw(msg, got)
        out.copy_(got.view(out.shape))

    def _reduce(
        self, arena: Arena, tensor: torch.Tensor, op: ReduceOp, ctx: OpContext, root: int
    ) -> None:
        """Allreduce (``root`` is NO_ROOT) or reduce: every rank's tensor combined in the shape
        of the message path's algorithm, recursive doubling for an allreduce and the binomial
        tree for a reduce (the same bits as the message path's, and on every rank that computes
        it: in floating point the shape decides the rounding)."""
        import torch

        k = self._exchange(arena, ctx, root, self._encoded(tensor))
        try:
            if root not in (NO_ROOT, self.rank):
                return
            parts = []
            for src in range(self.size):
                if src == self.rank:
                    parts.append(tensor)
                elif tensor.is_cpu:  # combined straight out of the arena (before _finish)
                    parts.append(self._view(arena, tensor, src, k, ctx))
                else:
                    part = torch.empty_like(tensor, memory_format=torch.contiguous_format)
                    self._place(arena, part, src, k, ctx)
                    parts.append(part)
            combine = out_combiner(op, tensor)
            if combine is not None:  # each step written into scratch, the last into tensor
                free = iter(self._reduce_scratch(tensor))

                def step(lower: torch.Tensor, upper: torch.Tensor, last: bool) -> torch.Tensor:
                    dst = tensor if last else next(free)
                    combine(lower, upper, out=dst)
                    return dst
            else:

                def step(lower: torch.Tensor, upper: torch.Tensor, last: bool) -> torch.Tensor:
                    return combined(lower, upper, op)

            acc = doubling(parts, step) if root == NO_ROOT else tree(parts, root, step)
        finally:
            arena.finish(k)
        finish_(acc, op, self.size)
        if acc is not tensor:
            tensor.copy_(acc)

    def _reduce_scratch(self, like: torch.Tensor) -> list[torch.Tensor]:
        """``size - 2`` tensors like ``like`` (a reduction's steps but the last), kept."""
        import torch

        key = (like.dtype, like.shape, like.device)
        cache = self._scratch
        if cache is None:
            cache = self._scratch = {}
        got = cache.get(key)
        if got is None:
            if len(cache) >= 16:
                cache.clear()
            got = cache[key] = [
                torch.empty(like.shape, dtype=like.dtype, device=like.device)
                for _ in range(max(self.size - 2, 0))
            ]
        return got


def _nbytes(tensor: torch.Tensor) -> int:
    return int(tensor.numel()) * tensor.element_size()


def _flat(view: Any) -> memoryview:
    mv = view if isinstance(view, memoryview) else memoryview(view)
    return mv if mv.format == "B" and mv.ndim == 1 else mv.cast("B")


__all__ = ["ArenaCollectives"]
