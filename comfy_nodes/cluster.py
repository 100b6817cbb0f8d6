"""The process-wide Communicator the nodes use, created lazily on first use.

Importing this module does nothing: no thread, no socket, no environment read.  The first node
that needs the cluster calls :func:`get_comm`, which runs ``collectives.init()``: with no cluster
variables in the environment that is a one-rank ``local`` world, so every cluster node is an
identity and existing workflows run unchanged.

Two ways to supply a communicator instead:

* :func:`set_comm` installs one for the whole process (the ComfyUI server integration does this
  once it has joined the cluster);
* :func:`comm_override` binds one to the current thread/context only, on top of the process-wide
  one.  Tests use it to run several ranks as threads of one process (``run_local``), each thread
  with its own communicator.

``queue_prompt_hook`` is the seam for the server integration: the nodes that queue workflows
(ClusterExecuteWorkflow, ClusterExecuteCurrentWorkflow, ClusterUseSubgraph) call it with an API
format prompt.  Until the integration sets it, those nodes raise a clear error.
"""

from __future__ import annotations

import contextlib
import contextvars
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from collectives import Communicator, Work

LEADER = 0
"""The rank that owns user inputs and outputs (the ComfyUI instance the user talks to)."""

QueuePromptHook = Callable[[dict[str, Any]], str]
"""Queue an API-format prompt on the cluster; returns the prompt id."""

queue_prompt_hook: QueuePromptHook | None = None
"""Set by the server integration; called on the leader only (it distributes to every rank)."""

deliver_hook: Callable[[str, dict[str, Any]], Communicator] | None = None
"""Set by the server integration on the leader: hand prompt ``id`` to every follower (raises
naming the followers that refused it) and return the world it was handed over on.  Called by the
ClusterSync head node."""

admit_hook: Callable[[str], Communicator] | None = None
"""Set by the server integration on followers: the world the leader handed prompt ``id`` over on;
raises if this rank was not handed that prompt (one queued here directly, or left over from an
earlier world).  Called by the ClusterSync head node."""

prompt_end_hook: Callable[[str], None] | None = None
"""Set by the server integration on followers: prompt ``id`` is past its last collective here
(the ClusterSync tail ran), so the next hand-over may start."""

progress_bar: Callable[[int], Any] | None = None
"""Set by the server integration to ComfyUI's ``comfy.utils.ProgressBar``: a collective node's
bar fills as its transfer completes (one step per collective)."""

current_prompt: str | None = None
"""The cluster prompt this rank is running (set by ClusterSync's head, cleared by its tail)."""

interrupt_check: Callable[[], bool] | None = None
"""Set by the server integration: whether ComfyUI's interrupt was pressed on this rank."""

abort_hook: Callable[[Communicator, str], None] | None = None
"""Set by the server integration: abort the world of this communicator on every rank, with this
reason (nothing, if the cluster has moved on to another world since)."""

failure_hook: Callable[[Communicator, BaseException], None] | None = None
"""Set by the server integration: a collective on this communicator failed fatally; re-form the
cluster if it is still the current world (a late failure of an old world is not news)."""


class ClusterInterrupted(Exception):
    """The user interrupted a collective (raised when ComfyUI's own exception is unavailable)."""


def raise_interrupted() -> None:
    """Raise ComfyUI's own interrupt exception, so the UI shows "interrupted", not an error."""
    try:
        import comfy.model_management as mm  # type: ignore[import-not-found,unused-ignore]
    except ImportError:
        raise ClusterInterrupted("interrupted") from None
    raise mm.InterruptProcessingException()


_lock = threading.RLock()
_process_comm: Communicator | None = None
_override: contextvars.ContextVar[Communicator | None] = contextvars.ContextVar(
    "comfy_cluster_comm", default=None
)


comm_provider: Callable[[], Communicator] | None = None
"""Set by the server integration: the current world's communicator, waiting for it to form
(instead of creating a one-rank world when none is installed yet)."""

_prompt_comm: Communicator | None = None


def get_comm(*, fresh: bool = False) -> Communicator:
    """This thread's override, else the running cluster prompt's communicator, else the
    process-wide one (created on first use).

    A prompt keeps the world it started on: if that world fails mid-prompt, its remaining cluster
    nodes fail with the original reason instead of meeting a newer world's ranks.  ``fresh``
    skips that (the ClusterSync head starting a new prompt).
    """
    comm = _override.get()
    if comm is not None:
        return comm
    if not fresh and _prompt_comm is not None:
        return _prompt_comm
    if comm_provider is not None:
        return comm_provider()
    with _lock:  # re-entrant: set_comm takes it too
        if _process_comm is None:
            import collectives

            set_comm(collectives.init())
        comm = _process_comm
        assert comm is not None
        return comm


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


background: dict[Communicator, list[tuple[Work[Any], str]]] = {}
"""Collectives a rank left running for each communicator that allows it (its result was local:
the root of a scatter or broadcast), with the node that issued each; the ClusterSync tail waits
for them (:func:`comfy_nodes.collective.settle`).  Keyed by communicator, not per process, so
that in-process ranks (threads) keep theirs apart."""


def begin_prompt(prompt_id: str, comm: Communicator) -> None:
    """The ClusterSync head: every cluster node of ``prompt_id`` uses ``comm``, and may leave
    collectives running in the background until the tail."""
    global _prompt_comm, current_prompt
    _prompt_comm, current_prompt = comm, prompt_id
    background[comm] = []  # what an earlier, failed prompt left is its own business


def end_prompt(comm: Communicator | None = None) -> None:
    """The prompt running on ``comm`` (default: this rank's) is over, finished or failed: forget
    it, and drop what it left running (a failed prompt's transfers fail with its world)."""
    global _prompt_comm, current_prompt
    comm = comm if comm is not None else peek_comm()
    if comm is not None:
        background.pop(comm, None)
    if comm is None or comm is _prompt_comm:
        _prompt_comm, current_prompt = None, None


def forget(comm: Communicator) -> None:
    """``comm``'s world is over: drop the transfers its prompt left running (they fail with it),
    so that its buffers are freed once it is closed.

    The prompt's own reference stays until :func:`end_prompt`: a node of that prompt still
    running must fail on the old world, not meet the next one.
    """
    background.pop(comm, None)


def peek_comm() -> Communicator | None:
    """The communicator :func:`get_comm` would return, without creating or waiting for one."""
    return _override.get() or _prompt_comm or _process_comm


def set_comm(
    comm: Communicator | None, *, thread_local: bool = False
) -> contextvars.Token[Communicator | None] | None:
    """Install ``comm`` for the whole process (or, with ``thread_local``, this context only: the
    token that undoes it is returned).  Every communicator the nodes use is installed here, set
    never to pickle (:func:`without_pickle`).

    ``None`` removes it; the process-wide one is then created again on next use.  The previous
    process-wide communicator is not closed: whoever created it owns it.
    """
    global _process_comm
    if comm is not None:
        without_pickle(comm)
    if thread_local:
        return _override.set(comm)
    with _lock:
        _process_comm = comm
    return None


@contextlib.contextmanager
def comm_override(comm: Communicator) -> Iterator[Communicator]:
    """Use ``comm`` in the current thread/context for the duration of the block."""
    token = set_comm(comm, thread_local=True)
    assert token is not None
    try:
        yield comm
    finally:
        _override.reset(token)


def is_leader() -> bool:
    return get_comm().rank == LEADER


def call_queue_prompt_hook(prompt: dict[str, Any], what: str) -> str:
    """Queue ``prompt`` through the server integration, or explain why that is impossible."""
    hook = queue_prompt_hook
    if hook is None:
        raise RuntimeError(
            f"{what}: queuing workflows needs the ComfyUI Cluster server integration, which is "
            "not active in this process (comfy_nodes.cluster.queue_prompt_hook is unset)"
        )
    return hook(prompt)


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


def cluster_status(comm: Communicator | None = None) -> ClusterStatus:
    comm = get_comm() if comm is None else comm
    return ClusterStatus(comm.rank, comm.size, comm.backend, dict(comm.peers()))
