"""Same-host rings in the ``udp`` backend's IO driver (a mixin of ``udp_io.Engine``).

To a rank of this host that may read this process and be read by it (cross-memory attach, both
ways), every message that is not a far message (:mod:`~collectives.backends.udp_cma`) goes
through a shared-memory ring (:mod:`~collectives.backends.shm_ring`) instead of the socket:
the message header (channel, meta and body lengths), the meta and the body, back to back on the
ring's byte stream.  The socket still carries the handshake, heartbeats, far messages and their
answers, CLOSE and ABORT, so a peer's death, an abort and the deadlines work as before.

Order.  A ring is FIFO per peer, so per ``(peer, channel)`` too.  A far message still goes
through the socket, but its sender waits for the answer, which the receiver sends once the
message is in its queue: nothing posted later can pass it.  Rings are attached when the world
forms (:func:`attach_world`, after the cross-memory probe): every message of the probe's
collectives is taken within them, so nothing sent through the socket before the switch is
still on its way after it.  A turn reads the rings after the socket, so a message a peer wrote
before it closed is read before its CLOSE is acted on.

Waking.  A reader that waits polls its rings with the socket (a load per ring, no syscall).
Before it sleeps in ``select`` it raises its flag in every ring it reads; a writer that finds
the flag up after writing sends an empty datagram to the reader's socket (a *doorbell*: it
carries nothing, and the driver reads and drops every empty datagram, so one from anyone else
only wakes the reader for a look).  Writes that find the ring full stay queued, in order, and
are written by later turns; their writer raises the ring's ``WAITING`` flag, and the reader
rings it after it has made room.

Trust.  The ring's bytes are not sealed with the cluster key: they never leave the host's
memory, and only a process that may ptrace both ranks (the same user, or root) can map them,
which could read the ranks' keys out of their memory anyway.  What a peer writes is still
checked as a datagram's contents are: lengths are bounded before anything is allocated
(``max_meta``, the codec header's checks in ``_allocate``); a ring that breaks the format
loses its peer (:class:`~collectives.errors.ConnectionLostError` to whoever waits on it).
"""

from __future__ import annotations

import contextlib
import logging
import math
import struct
import threading
from collections import deque
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from collectives.backends import futex, shm_arena, shm_ring
from collectives.backends.envelope import SIZE as ENVELOPE_SIZE
from collectives.backends.shm_arena import Arena
from collectives.backends.shm_ring import ASLEEP, READ, WAITING, Ring, fence
from collectives.backends.udp_cma import is_far, parse_far
from collectives.backends.udp_inbox import checked_header
from collectives.codec import CodecOptions, Header
from collectives.errors import CollectivesError, InvalidArgumentError
from collectives.transport.events import MessageReceived
from collectives.transport.frames import FrameError

if TYPE_CHECKING:
    from collectives.backends.udp_pool import BufferPool
    from collectives.backends.udp_socket import Address, UdpSocket
    from collectives.transport.endpoint import Endpoint

log = logging.getLogger(__name__)

_HEAD = struct.Struct("<IIQ")  # channel, meta bytes, body bytes: what starts each message
FAR_HOLD_S = 0.005
"""How long the IO thread leaves a far message for its receive (see ``_hold_far``)."""
_EMPTY = memoryview(b"")


class _Out:
    """A message (or its rest) waiting for room in a peer's ring."""

    __slots__ = ("index", "mid", "offset", "parts")

    def __init__(self, mid: int, parts: list[memoryview], index: int, offset: int) -> None:
        self.mid, self.parts, self.index, self.offset = mid, parts, index, offset


class _In:
    """A ring this rank reads, and where its next message stands."""

    __slots__ = (
        "body",
        "channel",
        "head",
        "head_have",
        "held_since",
        "left",
        "meta",
        "meta_have",
        "ring",
    )

    def __init__(self, ring: Ring) -> None:
        self.ring = ring
        self.head = bytearray(_HEAD.size)
        self.head_have = 0
        self.meta: bytearray | None = None  # set once the head is complete
        self.meta_have = 0
        self.channel = 0
        self.body: memoryview | None = None  # set once the meta is complete (None: skipped)
        self.left = -1  # body bytes still to come (-1: not allocated yet)
        self.held_since: float | None = None  # see ShmLinks._hold_far


class ShmLinks:
    """The rings (see the module docstring); :meth:`_init_shm` sets them up, empty."""

    lock: threading.Lock
    cond: threading.Condition
    counters: dict[str, int]
    lost: dict[int, str]
    outstanding: dict[int, set[int]]
    unframed: dict[int, set[int]]
    sock: UdpSocket
    ep: Endpoint
    rank: int
    _allocate: Callable[[int, int, bytes, int], memoryview]
    _codec: Callable[[], CodecOptions]
    _pool: BufferPool
    _headers: dict[bytes, tuple[CodecOptions, Header]]
    landings: dict[tuple[int, int], Any]
    _offered: dict[tuple[int, int], Any]
    clock: Callable[[], float]
    _received: Callable[[MessageReceived], None]

    def _init_shm(self) -> None:
        self.shm_out: dict[int, Ring] = {}
        self._shm_in: dict[int, _In] = {}
        self._rings_in: tuple[Ring, ...] = ()  # the same rings, for the waits (no lock there)
        self._shm_pending: dict[int, deque[_Out]] = {}
        self.peer_addrs: dict[int, Address] = {}  # where each peer's socket is (doorbells)
        self._shm_mids = 0
        self._rung: dict[int, int] = {}  # peer -> its ring's read position when last rung
        self.arena: Arena | None = None  # the world's, when every rank is on this host
        self._io_draining = False  # the IO thread takes a turn (see _hold_far)
        self._held_until = math.inf  # when a held far message is read anyway
        for name in ("shm_sent", "shm_received", "doorbells"):
            self.counters[name] = 0

    def start_shm(
        self, outbound: dict[int, Ring], inbound: dict[int, Ring], arena: Arena | None = None
    ) -> None:
        """Write to the peers of ``outbound`` and read the peers of ``inbound`` through these
        rings from now on, and run small collectives through ``arena`` (see
        :func:`attach_world`)."""
        with self.lock:
            self.arena = arena
            self.shm_out.update(outbound)
            self._shm_in.update({peer: _In(ring) for peer, ring in inbound.items()})
            self._rings_in = tuple(state.ring for state in self._shm_in.values())

    @property
    def doorbells_expected(self) -> bool:
        """Whether an empty datagram is a doorbell here (this rank has rings); elsewhere it goes
        to the core, which counts it as malformed."""
        return bool(self.shm_out or self._rings_in)

    def shm_peers(self) -> list[int]:
        """The peers this rank writes to through a ring."""
        return sorted(self.shm_out)

    # -- writing ---------------------------------------------------------------------------------
    def _shm_send(
        self, peer: int, ring: Ring, channel: int, meta: bytes, body: Sequence[memoryview]
    ) -> int:
        """Write one message to ``peer``'s ring, or queue what does not fit (holding the lock);
        its id (negative: never the core's), in ``unframed`` and ``outstanding`` while queued."""
        limit = self.ep.config.max_meta
        if len(meta) > limit:
            raise InvalidArgumentError(f"meta of {len(meta)} bytes is over max_meta={limit}")
        self._shm_mids -= 1
        mid = self._shm_mids
        nbytes = sum(b.nbytes for b in body)
        parts = [memoryview(_HEAD.pack(channel, len(meta), nbytes)), memoryview(meta), *body]
        self.counters["shm_sent"] += 1
        pending = self._shm_pending.get(peer)
        out = _Out(mid, parts, 0, 0)
        if pending:  # behind what is queued already
            pending.append(out)
        elif self._write(ring, out):
            self._wrote(peer, ring)
            return mid
        else:
            self._shm_pending.setdefault(peer, deque()).append(out)
            self._wrote(peer, ring)
        self.outstanding[peer].add(mid)
        self.unframed[peer].add(mid)
        ring.slots[WAITING] = 1
        fence()  # the flag before the second look at the room: the reader checks the other way
        self._flush_ring(peer, ring)
        return mid

    @staticmethod
    def _write(ring: Ring, out: _Out) -> bool:
        """Write what fits of ``out``; whether all of it is in."""
        parts = out.parts
        while out.index < len(parts):
            part = parts[out.index]
            if out.offset < part.nbytes:
                out.offset += ring.write(part[out.offset :] if out.offset else part)
                if out.offset < part.nbytes:
                    return False
            out.index += 1
            out.offset = 0
        return True

    def _flush_ring(self, peer: int, ring: Ring) -> int:
        """Write what is queued for ``peer`` while it fits (holding the lock); how many
        messages went in."""
        pending = self._shm_pending.get(peer)
        done = 0
        while pending:
            out = pending[0]
            if not self._write(ring, out):
                break
            pending.popleft()
            self.outstanding[peer].discard(out.mid)
            self.unframed[peer].discard(out.mid)
            done += 1
        if done:
            self._wrote(peer, ring)
        if not pending:
            ring.slots[WAITING] = 0
        return done

    def _wrote(self, peer: int, ring: Ring) -> None:
        """Ring ``peer``'s doorbell if its reader sleeps (after a write), once: a reader that
        has not read since the last ring has that doorbell still to wake it, and reads what
        came since with it."""
        fence()  # the position before the look at the flags (see shm_ring.fence)
        slots = ring.slots
        if (slots[ASLEEP] or slots[ASLEEP + 1]) and self._rung.get(peer) != slots[READ]:
            self._rung[peer] = slots[READ]
            self._doorbell(peer)

    def _doorbell(self, peer: int) -> None:
        addr = self.peer_addrs.get(peer)
        if addr is None:
            return  # not connected yet: the peer is not waiting on a ring of ours either
        self.counters["doorbells"] += 1
        with contextlib.suppress(OSError):  # a full buffer: the reader has datagrams to read
            self.sock.sock.sendto(b"", addr)

    # -- reading ---------------------------------------------------------------------------------
    def _shm_turn(self) -> int:
        """Write what waited for room, read every ring (holding the lock); how many messages
        moved either way (the waiters on ``cond`` are told)."""
        moved = 0
        if self._shm_pending:
            for peer, pending in list(self._shm_pending.items()):
                if pending:
                    moved += self._flush_ring(peer, self.shm_out[peer])
                if peer in self.lost:
                    self._drop_pending(peer)
        self._held_until = math.inf
        for peer, state in list(self._shm_in.items()):
            if state.ring.readable() or state.meta is not None:  # new bytes, or a held message
                moved += self._drain(peer, state)
        if moved:
            self.cond.notify_all()
        return moved

    def shm_readable(self) -> bool:
        """Whether a ring has bytes to read (without the lock: a hint for the waits)."""
        return any(ring.readable() for ring in self._rings_in)

    def _drain(self, peer: int, state: _In) -> int:
        """Read ``peer``'s ring up to its last whole message (holding the lock); how many
        messages were handed over."""
        ring, got = state.ring, 0
        try:
            while True:
                if state.left < 0 and not self._read_meta(peer, state):
                    break
                if state.left:
                    if state.body is None:
                        state.left -= ring.skip(state.left)
                    else:
                        at = state.body.nbytes - state.left
                        state.left -= ring.read_into(state.body[at:])
                    if state.left:
                        break
                meta, body = state.meta, state.body
                assert meta is not None
                body = _EMPTY if body is None else body
                self._received(MessageReceived(peer, state.channel, 0, bytes(meta), body))
                state.head_have, state.meta, state.body, state.left = 0, None, None, -1
                got += 1
                self.counters["shm_received"] += 1
        except (FrameError, CollectivesError) as err:
            self._breach(peer, str(err))
            return got + 1  # the waiters must see the loss
        fence()  # our read position before the look at the writer's flag
        if ring.slots[WAITING]:
            self._doorbell(peer)
        return got

    def _read_meta(self, peer: int, state: _In) -> bool:
        """Read a message's head and meta and allocate its body; whether that is done."""
        ring = state.ring
        if state.meta is None:
            if state.head_have < _HEAD.size:
                view = memoryview(state.head)
                state.head_have += ring.read_into(view[state.head_have :])
                if state.head_have < _HEAD.size:
                    return False
            channel, meta_len, body_len = _HEAD.unpack(state.head)
            if meta_len > self.ep.config.max_meta:
                raise FrameError(f"a meta of {meta_len} bytes (max_meta is smaller)")
            state.channel, state.meta, state.meta_have = channel, bytearray(meta_len), 0
            state.left = -body_len - 1  # the body's length, kept until the meta is in
        meta = state.meta
        if state.meta_have < len(meta):
            state.meta_have += ring.read_into(memoryview(meta)[state.meta_have :])
            if state.meta_have < len(meta):
                return False
        body_len = -state.left - 1
        if self._hold_far(peer, state):
            return False
        # The driver's own checks, as for a message from the socket: the codec header against
        # this rank's options and the body's length before anything is allocated.
        dest = self._allocate(peer, state.channel, bytes(meta), body_len)
        state.body = dest if dest.nbytes == body_len else None  # far, or an answer: no body
        state.left = body_len
        return True

    def _hold_far(self, peer: int, state: _In) -> bool:
        """Whether the IO thread leaves a far message unread for now: nothing waits for it
        (no take's buffer, no offer) and reading it would take fresh memory (no free pool
        buffer of its size).  A receive that comes within :data:`FAR_HOLD_S` reads it straight
        into its own buffer; a fresh 128 MiB took ~0.3 s of page faults inside the copy with 4
        ranks on 2 cores, a fan-in's non-roots often post before the root offers its blocks,
        and the IO thread, rung at once, used to take the message first.  After the hold the
        IO thread reads it as before (a post never waits long for a rank that does not take:
        its answer comes at most this much later); a caller's turn never holds."""
        if not self._io_draining:
            state.held_since = None
            return False
        meta = state.meta
        assert meta is not None
        key = (peer, state.channel)
        if not is_far(bytes(meta)) or key in self.landings or key in self._offered:
            return False
        try:
            far = parse_far(bytes(meta), peer)
            header = bytes(far.meta[ENVELOPE_SIZE:])
            sizes = checked_header(self._headers, header, self._codec()).wire_sizes
        except CollectivesError:
            return False  # refused by _allocate, now
        if self._pool.has_free(sum(sizes)):
            return False
        now = self.clock()
        if state.held_since is None:
            state.held_since = now
        until = state.held_since + FAR_HOLD_S
        if now >= until:
            return False
        self._held_until = min(self._held_until, until)
        return True

    def _breach(self, peer: int, why: str) -> None:
        reason = f"broke the same-host ring's format: {why}"
        log.warning("udp rank %d: rank %d %s", self.rank, peer, reason)
        self.lost.setdefault(peer, reason)
        # Not read again; unmapped when the last reference goes (a wait may hold the tuple).
        self._shm_in.pop(peer, None)
        self._rings_in = tuple(state.ring for state in self._shm_in.values())

    def _drop_pending(self, peer: int) -> None:
        for out in self._shm_pending.pop(peer, ()):
            self.outstanding[peer].discard(out.mid)
            self.unframed[peer].discard(out.mid)

    # -- sleeping --------------------------------------------------------------------------------
    def _shm_sleep(self, slot: int) -> bool:
        """Raise sleeper ``slot``'s flag (0: the IO thread, 1: a waiting caller) in every ring
        this rank reads; whether one has bytes after all (then the caller must not sleep, and
        lowers the flags with :meth:`_shm_awake`)."""
        rings = self._rings_in
        if not rings:
            return False
        for ring in rings:
            ring.slots[ASLEEP + slot] = 1
        fence()  # the flags before the look at the positions (see shm_ring.fence)
        return any(ring.readable() for ring in rings)

    def _shm_awake(self, slot: int) -> None:
        for ring in self._rings_in:
            ring.slots[ASLEEP + slot] = 0

    def _close_shm(self) -> None:
        """Forget every ring (holding the lock): each is unmapped when the last reference goes
        (a thread still in a wait may hold one for a moment)."""
        self.shm_out.clear()
        self._shm_in.clear()
        self._rings_in = ()
        self._shm_pending.clear()


def attach_world(backend: Any, timeout: float, engine: Any) -> None:
    """Set up the rings of a world that just formed, after ``cma.probe_world``: every pair of
    ranks that may read each other gets one ring per direction.  Two small allgathers: each
    rank's ring descriptors, then which rings each rank mapped; a writer uses a ring only once
    its reader has it.  Every rank must call it, at the same point (see the module docstring
    for why the switch loses no order)."""
    import os

    import torch

    from collectives.backends.base import OpContext
    from collectives.deadline import Deadline

    rank, size = backend.rank, backend.size
    ctx = OpContext("shm rings", 0, Deadline.start(timeout, "shm rings", rank))
    sources: dict[int, int] = engine.cma_sources
    mutual = [p for p in sorted(sources) if p in engine.cma_readers] if shm_ring.available() else []
    made: dict[int, tuple[int, Ring]] = {}
    # Descriptors for each peer; on the diagonal of rank 0's row, the arena's (udp_arena),
    # made only when every other rank shares this host.
    mine = torch.full((size,), -1, dtype=torch.int64)
    inbound: dict[int, Ring] = {}
    arena_fd, area = -1, None
    try:
        for peer in mutual:
            with contextlib.suppress(OSError):
                made[peer] = shm_ring.create()
                mine[peer] = made[peer][0]
        arena_ok = futex.available()  # its waiters sleep on futexes
        if rank == 0 and len(mutual) == size - 1 and arena_ok:
            with contextlib.suppress(OSError):
                arena_fd, area = shm_arena.create(size)
                mine[0] = arena_fd
        every = torch.empty((size, size), dtype=torch.int64)
        backend.allgather_into(every, mine, ctx)
        for peer in mutual:
            with contextlib.suppress(OSError):
                inbound[peer] = shm_ring.attach(sources[peer], int(every[peer, rank]))
        if rank != 0 and 0 in mutual and int(every[0, 0]) >= 0 and arena_ok:
            with contextlib.suppress(OSError):
                area = shm_arena.attach(sources[0], int(every[0, 0]), size)
        # Off the diagonal: the rings this rank mapped; on it: the arena.
        have = torch.tensor(
            [p in inbound if p != rank else area is not None for p in range(size)],
            dtype=torch.uint8,
        )
        verdicts = torch.empty((size, size), dtype=torch.uint8)
        backend.allgather_into(verdicts, have, ctx)
    except BaseException:
        for ring in inbound.values():
            ring.close()
        for _, ring in made.values():
            ring.close()
        raise
    finally:
        for fd in [fd for fd, _ in made.values()] + ([arena_fd] if arena_fd >= 0 else []):
            os.close(fd)  # the peers mapped it (or never will): the mappings keep the memory
    outbound = {}
    for peer, (_, ring) in made.items():
        if verdicts[peer, rank]:
            outbound[peer] = ring
        else:
            ring.close()
    # The arena only where every rank has it and every pair has its rings: the same verdict
    # on every rank (they all see the same matrix).
    whole = area is not None and bool(verdicts.all())
    engine.start_shm(outbound, inbound, Arena(area, rank, size) if whole else None)


__all__ = ["ShmLinks", "attach_world"]
