"""In-process backend: N ranks as threads of one process (the test workhorse).

Ranks meet in a named *world*; each message is copied on send, so ranks never alias each other's
memory (the same contract as a real network).  Modelled on torch's threaded test process group.

A receive into a caller's buffer (``_take(..., into=)``) that is waiting when the message is
posted gets it in one copy, from the sender's buffer straight into the receiver's (the sender
claims the posted buffer under the world lock, copies outside it, then completes it); a message
that arrives first is copied into the mailbox and from there into the buffer when taken.
"""

from __future__ import annotations

import threading
from collections import deque
from typing import TYPE_CHECKING

from collectives.backends.base import BackendConfig, register_backend
from collectives.backends.envelope import Envelope
from collectives.backends.p2p import P2PBackend, landing_size
from collectives.codec import Encoded, alloc_buffer
from collectives.errors import (
    CommunicatorAbortedError,
    ConfigurationError,
    ConnectionLostError,
)

if TYPE_CHECKING:
    from collectives.deadline import Deadline


class _World:
    """Mailboxes of every rank of one in-process world, behind one lock."""

    def __init__(self, name: str, size: int) -> None:
        self.name = name
        self.size = size
        self.lock = threading.Lock()
        self.arrived = [threading.Condition(self.lock) for _ in range(size)]
        # (src, channel) -> queued (envelope, message, landing size: see ``_Queued``)
        self.boxes: list[dict[tuple[int, str], deque[_Queued]]] = [{} for _ in range(size)]
        # Receives waiting with a buffer of their own: (dst, src, channel) -> landing.
        self.landings: dict[tuple[int, int, str], _Landing] = {}
        self.joined: set[int] = set()
        self.left: dict[int, str] = {}
        self.aborted: dict[int, str] = {}


class _Landing:
    """A caller's buffer a waiting ``_take`` offers to the next message of its queue."""

    __slots__ = ("claimed", "into", "result")

    def __init__(self, into: memoryview) -> None:
        self.into = into
        self.claimed = False  # a sender is copying into it (outside the lock)
        self.result: tuple[Envelope, Encoded] | None = None


# A queued message, with the size of the buffer it may land in (:func:`landing_size` of its
# header, worked out once when it is posted; None: it never lands).
_Queued = tuple[Envelope, Encoded, int | None]

_WORLDS: dict[str, _World] = {}
_WORLDS_LOCK = threading.Lock()


def _join(name: str, rank: int, size: int) -> _World:
    with _WORLDS_LOCK:
        world = _WORLDS.get(name)
        if world is None or len(world.left) == world.size:
            world = _WORLDS[name] = _World(name, size)
        if world.size != size:
            raise ConfigurationError(
                f"local world {name!r} has size {world.size}, rank {rank} asked for {size}: "
                "every rank must pass the same size="
            )
        if rank in world.joined and rank not in world.left:
            raise ConfigurationError(
                f"rank {rank} already joined local world {name!r}: give each thread its own rank"
            )
        world.joined.add(rank)
        world.left.pop(rank, None)
        return world


class LocalBackend(P2PBackend):
    name = "local"

    def __init__(self, world: _World, rank: int, epoch: int = 0) -> None:
        super().__init__(rank, world.size, world=world.name, epoch=epoch)
        self._world = world

    @classmethod
    def create(cls, config: BackendConfig) -> LocalBackend:
        size = 1 if config.size is None else config.size
        rank = 0 if config.rank is None and size == 1 else config.rank
        if rank is None:
            raise ConfigurationError(
                f"backend 'local' with size={size} needs rank=: each thread passes its own rank"
            )
        if size < 1 or not 0 <= rank < size:
            raise ConfigurationError(f"rank={rank} is not in 0..{size - 1} (size={size})")
        if size == 1:
            # A world of one has nobody to meet: keep it private, so any number of independent
            # single-rank communicators (the default when no cluster is configured) can coexist.
            world = _World(config.world, 1)
            world.joined.add(0)
            return cls(world, 0, config.epoch)
        return cls(_join(config.world, rank, size), rank, config.epoch)

    # -- transport -----------------------------------------------------------------------------
    def _post(self, dst: int, channel: str, env: Envelope, msg: Encoded, dl: Deadline) -> None:
        self._check_alive()
        world = self._world
        key = (dst, self.rank, channel)
        lands = landing_size(msg.header) if len(msg.buffers) == 1 else None  # once, unlocked
        with world.lock:
            landing = world.landings.get(key)
            direct = (
                landing is not None
                and not world.boxes[dst].get((self.rank, channel))
                and _fits(msg, lands, landing.into)
            )
            if direct:
                assert landing is not None
                del world.landings[key]
                landing.claimed = True
        if direct:
            assert landing is not None
            _copy_into(landing.into, msg.buffers[0])
            with world.lock:
                landing.result = (env, Encoded(header=bytes(msg.header), buffers=[landing.into]))
                world.arrived[dst].notify_all()
            return
        copy = Encoded(header=bytes(msg.header), buffers=[_copy(b) for b in msg.buffers])
        with world.lock:
            world.boxes[dst].setdefault((self.rank, channel), deque()).append((env, copy, lands))
            world.arrived[dst].notify_all()

    def _take(
        self, src: int, channel: str, dl: Deadline, into: memoryview | None = None
    ) -> tuple[Envelope, Encoded]:
        world = self._world
        key = (self.rank, src, channel)
        with world.lock:
            queue = world.boxes[self.rank].setdefault((src, channel), deque())
            landing = None
            if into is not None and not queue:
                landing = world.landings[key] = _Landing(into)
            try:
                while True:
                    if landing is not None and landing.claimed:
                        # A sender is copying into the buffer: it completes it promptly, and
                        # its message was posted before anything queued meanwhile, so wait
                        # for it whatever the queue holds (and return it first).
                        if landing.result is not None:
                            return landing.result
                        world.arrived[self.rank].wait()
                        continue
                    if queue:
                        break
                    self._check_alive_locked()
                    if src in world.left:
                        raise ConnectionLostError(
                            f"{dl.op} on rank {self.rank}: rank {src} left the world "
                            f"({world.left[src]}) before sending",
                            ranks=(src,),
                        )
                    remaining = dl.remaining()
                    if remaining <= 0:
                        raise dl.error([src])
                    world.arrived[self.rank].wait(remaining)
            finally:
                if landing is not None and world.landings.get(key) is landing:
                    del world.landings[key]
            env, msg, lands = queue.popleft()
        if into is not None and _fits(msg, lands, into):
            _copy_into(into, msg.buffers[0])
            return env, Encoded(header=msg.header, buffers=[into])
        return env, msg

    def _has_message(self, src: int, channel: str) -> bool:
        with self._world.lock:
            return bool(self._world.boxes[self.rank].get((src, channel)))

    def _check_alive(self) -> None:
        with self._world.lock:
            self._check_alive_locked()

    def _check_alive_locked(self) -> None:
        reason = self._world.aborted.get(self.rank)
        if reason is not None:
            raise CommunicatorAbortedError(f"rank {self.rank} was aborted: {reason}")

    # -- lifetime ------------------------------------------------------------------------------
    def abort(self, reason: str) -> None:
        self._leave(reason, aborted=True)

    def close(self) -> None:
        self._leave("closed", aborted=False)

    def _leave(self, reason: str, *, aborted: bool) -> None:
        world = self._world
        with world.lock:
            if aborted:
                world.aborted.setdefault(self.rank, reason)
            world.left.setdefault(self.rank, reason)
            for cond in world.arrived:
                cond.notify_all()

    def peers(self) -> dict[int, str]:
        with self._world.lock:
            return {
                r: "lost" if r in self._world.left else "ok"
                for r in range(self.size)
                if r != self.rank
            }


def _fits(msg: Encoded, lands: int | None, into: memoryview) -> bool:
    """Whether ``msg``, whose header lands in ``lands`` bytes, may be copied into ``into``."""
    return lands == into.nbytes and len(msg.buffers) == 1 and msg.buffers[0].nbytes == lands


def _copy(buf: memoryview) -> memoryview:
    out = alloc_buffer(buf.nbytes)
    _copy_into(out, buf)
    return out


def _copy_into(out: memoryview, buf: memoryview) -> None:
    """Every payload byte the backend moves goes through here (once per hop)."""
    out[:] = buf.cast("B") if buf.format != "B" or buf.ndim != 1 else buf


register_backend("local", LocalBackend)
