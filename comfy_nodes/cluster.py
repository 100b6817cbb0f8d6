"""The nodes' runtime: where their communicator comes from and what surrounds their collectives.

Importing this module does nothing: no thread, no socket, no environment read.  Every node asks
its :class:`Runtime` (``self.runtime`` on a node, :func:`runtime` elsewhere) for what it needs
from the process it runs in.  There is one runtime per process:

* until something installs another, the standalone :class:`Runtime`: its communicator is created
  on first use by ``collectives.init()`` (with no cluster variables, a one-rank ``local`` world,
  so every cluster node is an identity and existing workflows run unchanged), nothing queues
  workflows, nothing is reported;
* the ComfyUI server integration installs its own (comfy_nodes.server.node_runtime), which waits
  for the cluster's current world, hands prompts over to the followers, reports failures and
  aborts to the membership, and fills ComfyUI's progress bars.

:func:`comm_override` binds a communicator to the current thread/context only, on top of any
runtime.  Tests use it to run several ranks as threads of one process (``run_local``).
"""

from __future__ import annotations

import contextlib
import contextvars
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from collectives import Communicator, Work

LEADER = 0
"""The rank that owns user inputs and outputs (the ComfyUI instance the user talks to)."""


class ClusterInterrupted(Exception):
    """The user interrupted a collective (raised when ComfyUI's own exception is unavailable)."""


def raise_interrupted() -> None:
    """Raise ComfyUI's own interrupt exception, so the UI shows "interrupted", not an error."""
    try:
        import comfy.model_management as mm  # type: ignore[import-not-found,unused-ignore]
    except ImportError:
        raise ClusterInterrupted("interrupted") from None
    raise mm.InterruptProcessingException()


_override: contextvars.ContextVar[Communicator | None] = contextvars.ContextVar(
    "comfy_cluster_comm", default=None
)


def without_pickle(comm: Communicator) -> Communicator:
    """``comm``, set never to pickle or unpickle, whatever ``COMFY_CLUSTER_ALLOW_PICKLE`` says.

    What the nodes send is tensors, dicts, lists, numbers and strings; unpickling what a peer
    sends would let anyone who reaches a rank run code on it.
    """
    import dataclasses

    options = comm.options
    if options.codec.allow_pickle:
        codec = dataclasses.replace(options.codec, allow_pickle=False)
        comm.options = dataclasses.replace(options, codec=codec)
    return comm


class Runtime:
    """One process's cluster runtime; this base class is the standalone one (no server).

    The integration's subclass overrides :meth:`_provide` and the hooks at the end; the prompt
    bookkeeping (which world a running prompt uses, what it left running) is shared.
    """

    def __init__(self) -> None:
        self._lock = threading.RLock()
        self._process_comm: Communicator | None = None
        self._prompt_comm: Communicator | None = None
        self.current_prompt: str | None = None
        """The cluster prompt this rank is running (set by ClusterSync's head, cleared by its
        tail or by the execution-error hook)."""
        self.background: dict[Communicator, list[tuple[Work[Any], str]]] = {}
        """Collectives a rank left running for each communicator that allows it (its result was
        local: the root of a scatter or broadcast), with the node that issued each; the
        ClusterSync tail waits for them (:func:`comfy_nodes.collective.settle`).  Keyed by
        communicator, so that in-process ranks (threads) keep theirs apart."""

    # -- communicators ---------------------------------------------------------------------------
    def communicator(self, *, fresh: bool = False) -> Communicator:
        """This thread's override, else the running cluster prompt's communicator, else the
        process-wide one (:meth:`_provide`).

        A prompt keeps the world it started on: if that world fails mid-prompt, its remaining
        cluster nodes fail with the original reason instead of meeting a newer world's ranks.
        ``fresh`` skips that (the ClusterSync head starting a new prompt).
        """
        comm = _override.get()
        if comm is not None:
            return comm
        if not fresh and self._prompt_comm is not None:
            return self._prompt_comm
        return self._provide()

    def _provide(self) -> Communicator:
        """The process-wide communicator, created on first use."""
        with self._lock:
            if self._process_comm is None:
                import collectives

                self.set_comm(collectives.init())
            comm = self._process_comm
            assert comm is not None
            return comm

    def peek(self) -> Communicator | None:
        """The communicator :meth:`communicator` would return, without creating or waiting."""
        return _override.get() or self._prompt_comm or self._process_comm

    def set_comm(self, comm: Communicator | None) -> None:
        """Install ``comm`` for the whole process, set never to pickle (:func:`without_pickle`).

        ``None`` removes it.  The previous communicator is not closed: whoever created it owns
        it.
        """
        if comm is not None:
            without_pickle(comm)
        with self._lock:
            self._process_comm = comm

    def is_leader(self) -> bool:
        return self.communicator().rank == LEADER

    def status(self, comm: Communicator | None = None) -> ClusterStatus:
        comm = self.communicator() if comm is None else comm
        return ClusterStatus(comm.rank, comm.size, comm.backend, dict(comm.peers()))

    # -- prompts ---------------------------------------------------------------------------------
    def begin_prompt(self, prompt_id: str, comm: Communicator) -> None:
        """The ClusterSync head: every cluster node of ``prompt_id`` uses ``comm``, and may leave
        collectives running in the background until the tail."""
        self._prompt_comm, self.current_prompt = comm, prompt_id
        self.background[comm] = []  # what an earlier, failed prompt left is its own business

    def end_prompt(self, comm: Communicator | None = None) -> None:
        """The prompt running on ``comm`` (default: this rank's) is over, finished or failed:
        forget it, and drop what it left running (a failed prompt's transfers fail with its
        world)."""
        comm = comm if comm is not None else self.peek()
        if comm is not None:
            self.background.pop(comm, None)
        if comm is None or comm is self._prompt_comm:
            self._prompt_comm, self.current_prompt = None, None

    def forget(self, comm: Communicator) -> None:
        """``comm``'s world is over: drop the transfers its prompt left running (they fail with
        it), so that its buffers are freed once it is closed.

        The prompt's own reference stays until :meth:`end_prompt`: a node of that prompt still
        running must fail on the old world, not meet the next one.
        """
        self.background.pop(comm, None)

    # -- hooks: what the server integration does (here: nothing, or a clear refusal) -------------
    def queue_prompt(self, prompt: dict[str, Any], what: str) -> str:
        """Queue an API-format prompt on the cluster (leader only); returns its prompt id."""
        raise RuntimeError(
            f"{what}: queuing workflows needs the ComfyUI Cluster server integration, which is "
            "not active in this process (no server runtime is installed)"
        )

    def deliver(self, prompt_id: str, prompt: dict[str, Any]) -> Communicator | None:
        """Leader: hand prompt ``prompt_id`` to every follower (raises naming the followers that
        refused it); the world it was handed over on.  None: no hand-over here."""
        return None

    def admit(self, prompt_id: str) -> Communicator | None:
        """Follower: the world the leader handed prompt ``prompt_id`` over on; raises if this rank
        was not handed that prompt.  None: no hand-over here."""
        return None

    def prompt_ended(self, prompt_id: str) -> None:
        """Follower: ``prompt_id`` is past its last collective here (the ClusterSync tail ran),
        so the next hand-over may start."""

    def progress_bar(self, total: int) -> Any | None:
        """A progress bar of ``total`` steps for the running node (``update_absolute``), or
        None."""
        return None

    def interrupted(self) -> bool:
        """Whether the user's interrupt was pressed on this rank."""
        return False

    def abort(self, comm: Communicator, reason: str) -> None:
        """Abort the world of ``comm`` (on every rank, where the integration can say so)."""
        comm.abort(reason)

    def failed(self, comm: Communicator, err: BaseException) -> None:
        """A collective on ``comm`` failed fatally (the integration re-forms the cluster)."""


_runtime_lock = threading.Lock()
_runtime: Runtime | None = None


def runtime() -> Runtime:
    """This process's runtime (the standalone one until :func:`install` replaces it)."""
    global _runtime
    with _runtime_lock:
        if _runtime is None:
            _runtime = Runtime()
        return _runtime


def install(rt: Runtime | None) -> Runtime | None:
    """Make ``rt`` this process's runtime (None: back to a fresh standalone one on next use);
    the previous one is returned (not closed: whoever created its communicator owns it)."""
    global _runtime
    with _runtime_lock:
        previous, _runtime = _runtime, rt
    return previous


@contextlib.contextmanager
def installed(rt: Runtime) -> Iterator[Runtime]:
    """Use ``rt`` as the process's runtime for the duration of the block (tests)."""
    previous = install(rt)
    try:
        yield rt
    finally:
        install(previous)


@contextlib.contextmanager
def comm_override(comm: Communicator) -> Iterator[Communicator]:
    """Use ``comm`` in the current thread/context for the duration of the block."""
    token = _override.set(without_pickle(comm))
    try:
        yield comm
    finally:
        _override.reset(token)


@dataclass(frozen=True)
class ClusterStatus:
    """What ClusterInfo shows: this rank, the world, and each peer's health."""

    rank: int
    size: int
    backend: str
    peers: dict[int, str] = field(default_factory=dict)

    @property
    def connected(self) -> int:
        """Ranks known to be reachable, this one included."""
        return 1 + sum(1 for health in self.peers.values() if health == "ok")

    def text(self) -> str:
        role = "leader" if self.rank == LEADER else "follower"
        lines = [
            f"rank {self.rank} of {self.size} ({role}), backend {self.backend}",
            f"connected: {self.connected}/{self.size}",
        ]
        lines += [f"  rank {peer}: {health}" for peer, health in sorted(self.peers.items())]
        return "\n".join(lines)
