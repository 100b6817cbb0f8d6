"""The small interface every backend implements, and the registry that names them.

A backend moves *encoded* messages (:class:`collectives.codec.Encoded`: a header plus zero-copy
buffers) for the object API, and raw tensors for the in-place buffer API.  The communicator does
all encoding, argument checking and bookkeeping; a backend only moves bytes and maps its engine's
failures onto the typed errors.  Backends without a native collective inherit one built from
point-to-point messages (:class:`collectives.backends.p2p.P2PBackend`).
"""

from __future__ import annotations

import abc
import atexit
import threading
import weakref
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, NamedTuple

from collectives.codec.options import CodecOptions
from collectives.deadline import Deadline
from collectives.errors import BackendUnavailableError, ConfigurationError
from collectives.reduce_op import ReduceOp

if TYPE_CHECKING:
    import torch

    from collectives.codec import Encoded


class OpContext(NamedTuple):
    """Identity and deadline of one operation, passed down to the engine.

    ``seq`` counts the collectives a communicator has issued; ranks that call the same sequence
    of collectives agree on it, which is how mismatched calls are told apart from late ones.
    (A NamedTuple, not a dataclass: it is built on every op, and its cost shows at 1 MiB.)
    """

    name: str
    seq: int
    deadline: Deadline


class FastLane:
    """The communicator state a backend's fast path reads and updates, in one small object.

    A backend may run its hottest in-place ops in a single closure each (:meth:`Backend.fast_path`)
    because every Python frame and attribute read before the engine call costs several µs right
    after a large op (the caches hold its data, not our code): with two ranks per core, the
    general path's layers cost ~4 % of a 1 MiB allreduce (docs/backend-mpi.md).  The closure may
    run an op only while ``open`` is true (the communicator is usable and has no async op
    queued), and only while holding ``lock``; ``timeout`` is the default.

    Sequence numbers: every collective, on the general path and on a fast path alike, takes its
    number from :meth:`take` while holding ``lock``, and only **after every check of its
    arguments has passed** (timeout, root, buffers, reduce op): a call refused with an argument
    error must not consume a number, or this rank's next collective would carry a number its
    peers do not, and fail with :class:`~collectives.errors.CollectiveMismatchError`.  Once
    taken, the number belongs to an op that reaches the engine.
    """

    __slots__ = ("lock", "open", "rank", "seq", "timeout")

    def __init__(self, rank: int, timeout: float) -> None:
        self.lock = threading.Lock()
        self.open = True
        self.rank = rank
        self.seq = 0
        self.timeout = timeout

    def take(self) -> int:
        """The next sequence number (hold ``lock``; call after every argument check)."""
        seq = self.seq
        self.seq = seq + 1
        return seq


# A fast path: ``run(tensor, arg, timeout)`` (``arg``: the reduce op of ``allreduce``, the root of
# ``broadcast_into``) is True when it ran the op, False when the caller must take the general path
# (anything unusual: the general path checks it and raises the right error).
FastOp = Callable[[object, object, "float | None"], bool]


@dataclass(frozen=True)
class BackendConfig:
    """What ``collectives.init`` hands a backend.  Unset fields come from the environment."""

    rank: int | None = None
    size: int | None = None
    init_method: str | None = None
    world: str = "default"
    epoch: int = 0  # incarnation of ``world``: a re-formed world counts up (see envelope)
    timeout: float = 600.0
    environ: Mapping[str, str] = field(default_factory=dict)


class Backend(abc.ABC):
    """One engine that moves data between ``size`` ranks."""

    name: ClassVar[str] = ""

    def __init__(self, rank: int, size: int) -> None:
        if size < 1 or not 0 <= rank < size:
            raise ConfigurationError(f"rank {rank} is not in a world of size {size}")
        self.rank = rank
        self.size = size
        # How this rank decodes what peers send: the communicator sets its options here, and
        # every decode a backend does (object API, buffer receives, fallback reductions) must
        # use them.  The default never unpickles.
        self.codec: CodecOptions = CodecOptions()

    @classmethod
    def is_available(cls) -> bool:
        """Whether the engine can run here (its library imports)."""
        return True

    @classmethod
    def unavailable_reason(cls) -> str:
        """Why ``is_available()`` is false, with the install command that fixes it."""
        return "unknown"

    @classmethod
    @abc.abstractmethod
    def create(cls, config: BackendConfig) -> Backend:
        """Join the world described by ``config`` (rendezvous happens here)."""

    # -- point to point ------------------------------------------------------------------------
    @abc.abstractmethod
    def send(self, msg: Encoded, dst: int, tag: int, ctx: OpContext) -> None: ...

    @abc.abstractmethod
    def recv(self, src: int, tag: int, ctx: OpContext) -> Encoded: ...

    @abc.abstractmethod
    def send_buffer(self, tensor: torch.Tensor, dst: int, tag: int, ctx: OpContext) -> None: ...

    @abc.abstractmethod
    def recv_into(self, tensor: torch.Tensor, src: int, tag: int, ctx: OpContext) -> None: ...

    # -- object collectives on encoded messages --------------------------------------------------
    @abc.abstractmethod
    def broadcast(self, msg: Encoded | None, root: int, ctx: OpContext) -> Encoded: ...

    @abc.abstractmethod
    def gather(self, msg: Encoded, root: int, ctx: OpContext) -> list[Encoded] | None: ...

    @abc.abstractmethod
    def scatter(self, msgs: list[Encoded] | None, root: int, ctx: OpContext) -> Encoded: ...

    @abc.abstractmethod
    def allgather(self, msg: Encoded, ctx: OpContext) -> list[Encoded]: ...

    @abc.abstractmethod
    def barrier(self, ctx: OpContext) -> None: ...

    # -- in-place tensor collectives -----------------------------------------------------------
    @abc.abstractmethod
    def allreduce(self, tensor: torch.Tensor, op: ReduceOp, ctx: OpContext) -> None: ...

    @abc.abstractmethod
    def reduce(self, tensor: torch.Tensor, root: int, op: ReduceOp, ctx: OpContext) -> None: ...

    @abc.abstractmethod
    def broadcast_into(self, tensor: torch.Tensor, root: int, ctx: OpContext) -> None: ...

    @abc.abstractmethod
    def gather_into(
        self, out: torch.Tensor | None, tensor: torch.Tensor, root: int, ctx: OpContext
    ) -> None:
        """``out`` (root only) is ``size`` blocks shaped like ``tensor``, in rank order."""

    def gatherv_into(
        self, blocks: list[torch.Tensor] | None, tensor: torch.Tensor, root: int, ctx: OpContext
    ) -> None:
        """Root's ``blocks[r]`` (contiguous, of any size) receives rank ``r``'s ``tensor``.

        Each block must have the dtype and element count of the tensor its rank sends; a block
        that does not raises :class:`~collectives.errors.CollectiveMismatchError` on the root.
        This default moves each tensor through :meth:`gather` and copies it into its block;
        engines that can receive straight into the blocks override it.
        """
        from collectives.codec import encode

        msgs = self.gather(encode(tensor), root, ctx)
        if msgs is None:
            return
        assert blocks is not None
        received = {r: m for r, m in enumerate(msgs) if r != root}
        land_gathered(blocks, received, tensor, root, ctx, codec=self.codec)

    @abc.abstractmethod
    def allgather_into(self, out: torch.Tensor, tensor: torch.Tensor, ctx: OpContext) -> None: ...

    @abc.abstractmethod
    def scatter_into(
        self, out: torch.Tensor, tensor: torch.Tensor | None, root: int, ctx: OpContext
    ) -> None:
        """``tensor`` (root only) is ``size`` blocks shaped like ``out``, in rank order."""

    def fast_path(self, op: str, lane: FastLane) -> FastOp | None:
        """A one-frame version of in-place ``op`` ("allreduce", "broadcast_into") for the common
        case (see :class:`FastLane`), or None.

        Engines whose op costs little next to a few Python frames offer one; the default is
        None: every call takes the general path.
        """
        return None

    # -- lifetime ------------------------------------------------------------------------------
    @abc.abstractmethod
    def abort(self, reason: str) -> None:
        """Fail every pending and future op of this rank promptly."""

    @abc.abstractmethod
    def close(self) -> None:
        """Release the engine's resources; idempotent."""

    def peers(self) -> dict[int, str]:
        """Health of each peer as the engine sees it ("ok", "lost", "unknown")."""
        return {r: "ok" for r in range(self.size) if r != self.rank}

    def stats(self) -> dict[str, Any]:
        """Counters of the engine (datagrams, drops, socket buffers...); empty where it has none."""
        return {}

    def paths(self) -> dict[int, dict[str, Any]]:
        """Each peer's network path where the engine chooses one: ``{rank: {"path": ...,
        "address": ...}}`` (the udp backend: ``direct``, ``punched`` or ``relayed``); empty for
        engines that do not (their fabric or library routes)."""
        return {}


def close_at_exit(backend: Backend) -> Callable[[], None]:
    """Have ``backend.close()`` run at interpreter exit (held weakly: a collected backend is
    skipped) and return the hook, which ``close()`` passes to ``atexit.unregister``.

    Backends whose engine must shut down before the interpreter finalises (gloo's worker
    threads) or that deliver their last messages from the process itself (udp) use it.
    """
    ref = weakref.ref(backend)

    def hook() -> None:
        alive = ref()
        if alive is not None:
            alive.close()

    atexit.register(hook)
    return hook


_REGISTRY: dict[str, type[Backend]] = {}


def register_backend(name: str, cls: type[Backend]) -> None:
    """Make ``collectives.init(backend=name)`` use ``cls``.  Third parties may add their own."""
    _REGISTRY[name] = cls


def get_backend_class(name: str) -> type[Backend]:
    try:
        cls = _REGISTRY[name]
    except KeyError:
        known = ", ".join(sorted(_REGISTRY))
        raise ConfigurationError(
            f"unknown backend {name!r}: use one of {known} (argument backend= or "
            "COMFY_CLUSTER_BACKEND)"
        ) from None
    if not cls.is_available():
        raise BackendUnavailableError(
            f"backend {name!r} is not available here: {cls.unavailable_reason()}"
        )
    return cls


def registered_backends() -> dict[str, bool]:
    """Every registered backend name and whether it can run here."""
    return {name: cls.is_available() for name, cls in sorted(_REGISTRY.items())}


def land_gathered(
    blocks: list[torch.Tensor],
    received: Mapping[int, Encoded],
    tensor: torch.Tensor,
    root: int,
    ctx: OpContext,
    *,
    codec: CodecOptions,
) -> None:
    """The root's end of ``gatherv_into``: each received message into its rank's block (checked,
    decoded with ``codec``, the backend's options; no copy when it arrived there already), then
    the root's own ``tensor`` into its block."""
    from collectives.backends.p2p import place_block

    for src, msg in received.items():
        place_block(blocks[src], msg, src, ctx, codec=codec)
    copy_own_block(blocks[root], tensor)


def copy_own_block(out: torch.Tensor, tensor: torch.Tensor) -> None:
    """The root's own part of a gather: skipped when the caller passed the same memory."""
    if out.data_ptr() != tensor.data_ptr() or out.device != tensor.device:
        out.view(-1).copy_(tensor.reshape(-1))
