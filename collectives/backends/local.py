"""In-process backend: N ranks as threads of one process (the test workhorse).

Ranks meet in a named *world*; each message is copied on send, so ranks never alias each other's
memory (the same contract as a real network).  Modelled on torch's threaded test process group.
"""

from __future__ import annotations

import threading
from collections import deque
from typing import TYPE_CHECKING

from collectives.backends.base import BackendConfig, register_backend
from collectives.backends.p2p import Envelope, P2PBackend
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
        self.boxes: list[dict[tuple[int, str], deque[tuple[Envelope, Encoded]]]] = [
            {} for _ in range(size)
        ]
        self.joined: set[int] = set()
        self.left: dict[int, str] = {}
        self.aborted: dict[int, str] = {}


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

    def __init__(self, world: _World, rank: int) -> None:
        super().__init__(rank, world.size)
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
            return cls(world, 0)
        return cls(_join(config.world, rank, size), rank)

    # -- transport -----------------------------------------------------------------------------
    def _post(self, dst: int, channel: str, env: Envelope, msg: Encoded, dl: Deadline) -> None:
        self._check_alive()
        copy = Encoded(header=bytes(msg.header), buffers=[_copy(b) for b in msg.buffers])
        world = self._world
        with world.lock:
            world.boxes[dst].setdefault((self.rank, channel), deque()).append((env, copy))
            world.arrived[dst].notify_all()

    def _take(self, src: int, channel: str, dl: Deadline) -> tuple[Envelope, Encoded]:
        world = self._world
        with world.lock:
            queue = world.boxes[self.rank].setdefault((src, channel), deque())
            while not queue:
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
            return queue.popleft()

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


def _copy(buf: memoryview) -> memoryview:
    out = alloc_buffer(buf.nbytes)
    out[:] = buf.cast("B") if buf.format != "B" or buf.ndim != 1 else buf
    return out


register_backend("local", LocalBackend)
