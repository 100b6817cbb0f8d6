"""Collectives labelled with the node that issued them.

Every rank runs the same workflow, so the n-th collective of one rank must meet the n-th of every
other.  The communicator already refuses two different ops (a scatter meeting a gather); these
wrappers also catch the same op issued by two different nodes (two fan-outs run in a different
order on two ranks), which would otherwise silently swap data.  The label travels with the
payload and is checked by every rank that receives one; on a mismatch the communicator is aborted,
since the ranks no longer agree on what comes next.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from . import cluster
from .cluster import LEADER

if TYPE_CHECKING:
    from collectives import Communicator, Work

POLL_S = 0.05


def run(comm: Communicator, start: Callable[[], Work[Any]]) -> Any:
    """Run one collective, watching ComfyUI's interrupt flag while it waits.

    An interrupt on this rank aborts the collective here and, through the server integration,
    on every rank (their nodes fail with an error naming this rank).  A fatal failure (timeout,
    lost peer, mismatch) is reported to the integration, which re-forms the cluster.
    """
    from collectives import CollectivesError, CollectiveTimeoutError, InvalidArgumentError

    rt = cluster.runtime()
    bar = rt.progress_bar(1)
    try:
        work = start()
        while True:
            try:
                result = work.wait(timeout=POLL_S)
                if bar is not None:
                    bar.update_absolute(1)
                return result
            except CollectiveTimeoutError:
                if work.is_completed():
                    raise  # the collective's own deadline, not this poll
            if rt.interrupted():
                rt.abort(comm, f"interrupted on rank {comm.rank}")
                cluster.raise_interrupted()
    except CollectivesError as err:
        if not isinstance(err, InvalidArgumentError):
            rt.failed(comm, err)
        raise


def run_now(comm: Communicator, call: Callable[[], Any]) -> Any:
    """Run one blocking collective on the caller's thread, without :func:`run`'s hand-off to the
    communicator's worker thread and back: two thread wake-ups, each waiting for a core where
    ranks share a few (measured 2-7 ms per op with 4 ranks on 2 cores).

    It does not watch the interrupt flag while it waits, so it is only for a step that every rank
    has already reached (the root of a gather whose ranks all described their part): it waits for
    transfers, not for another rank's work.  An interrupt still aborts it through the
    integration, and is then raised as ComfyUI's own; other failures are reported as in
    :func:`run`.
    """
    from collectives import CollectivesError, InvalidArgumentError

    rt = cluster.runtime()
    try:
        result = call()
    except CollectivesError as err:
        if rt.interrupted():
            cluster.raise_interrupted()
        if not isinstance(err, InvalidArgumentError):
            rt.failed(comm, err)
        raise
    bar = rt.progress_bar(1)
    if bar is not None:
        bar.update_absolute(1)
    return result


class PeerNodeError(RuntimeError):
    """Another rank's part of this cluster node failed; ``rank`` says which."""

    def __init__(self, message: str, rank: int) -> None:
        super().__init__(message)
        self.rank = rank


def node_tag(node: str, unique_id: str | None = None) -> str:
    """The label of one node of the workflow: its class and, in ComfyUI, its id in the prompt."""
    return node if unique_id is None else f"{node}#{unique_id}"


def _check(comm: Communicator, tag: str, got: Any, src: int, op: str) -> Any:
    if not (isinstance(got, tuple | list) and len(got) == 2 and isinstance(got[0], str)):
        raise _mismatch(
            comm, f"{op} on rank {comm.rank}: rank {src} sent an unlabelled payload", src
        )
    if got[0] != tag:
        raise _mismatch(
            comm,
            f"{op} on rank {comm.rank}: this rank runs node {tag!r} but rank {src} ran {got[0]!r}; "
            "the ranks executed the workflow's cluster nodes in a different order (is the same "
            "workflow queued on every rank?)",
            src,
        )
    return got[1]


def _mismatch(comm: Communicator, message: str, src: int) -> Exception:
    from collectives import CollectiveMismatchError

    comm.abort(message)
    err = CollectiveMismatchError(message, ranks=(comm.rank, src))
    cluster.runtime().failed(comm, err)
    return err


def _issue(tag: str, start: Callable[[], Work[Any]]) -> Work[Any]:
    """``start()``; an object the codec refuses to send is reported naming the node."""
    from collectives import CodecError

    try:
        return start()
    except CodecError as err:
        err.add_note(f"(sent by node {tag})")
        raise


def in_background(comm: Communicator, work: Work[Any], tag: str) -> bool:
    """Leave ``work`` running if this rank's prompt allows it (its tail will wait for it)."""
    rt = cluster.runtime()
    pending = rt.background.get(comm)
    if pending is None:
        return False
    pending.append((work, tag))
    bar = rt.progress_bar(1)
    if bar is not None:
        bar.update_absolute(1)  # handed over; the tail reports failures
    return True


def settle(comm: Communicator) -> None:
    """Wait for the collectives this rank left running (see :func:`in_background`); the first
    failure is raised, naming the node that issued it."""
    pending = cluster.runtime().background.get(comm) or []
    while pending:
        work, tag = pending.pop(0)
        try:
            run(comm, lambda work=work: work)  # type: ignore[misc]
        except Exception as err:
            pending.clear()
            err.add_note(f"(left running in the background by node {tag})")
            raise


def broadcast(comm: Communicator, value: Any, tag: str, root: int = LEADER) -> Any:
    """``value`` of ``root`` on every rank (root's own object is returned, not a copy).

    The root needs nothing back, so inside a cluster prompt it does not wait for the transfer:
    its next nodes run while the data goes out (the next collective queues behind it).
    """
    if comm.rank == root and comm.size > 1:
        work = _issue(tag, lambda: comm.ibroadcast((tag, value), root))
        if in_background(comm, work, tag):
            return value
        return _check(comm, tag, run(comm, lambda: work), root, "broadcast")
    got = run(comm, lambda: comm.ibroadcast(None, root))
    return _check(comm, tag, got, root, "broadcast")


def scatter(comm: Communicator, items: Sequence[Any] | None, tag: str, root: int = LEADER) -> Any:
    """Rank i gets ``items[i]`` of ``root`` (which, as in :func:`broadcast`, does not wait)."""
    if comm.rank == root and items is not None and comm.size > 1:
        labelled = [(tag, item) for item in items]
        work = _issue(tag, lambda: comm.iscatter(labelled, root))
        if in_background(comm, work, tag):
            return items[root]
        return _check(comm, tag, run(comm, lambda: work), root, "scatter")
    got = run(comm, lambda: comm.iscatter(None, root))
    return _check(comm, tag, got, root, "scatter")


def start_gather(comm: Communicator, value: Any, tag: str, root: int = LEADER) -> Work[Any]:
    """Issue :func:`gather`'s op without waiting (for a rank that is not ``root``, which gets
    nothing back: ``run(comm, lambda: work)`` waits for it)."""
    return _issue(tag, lambda: comm.igather((tag, value), root))


def gather(comm: Communicator, value: Any, tag: str, root: int = LEADER) -> list[Any] | None:
    """Every rank's ``value`` in rank order on ``root``; None elsewhere."""
    got = run(comm, lambda: start_gather(comm, value, tag, root))
    if got is None:
        return None
    return [_check(comm, tag, item, src, "gather") for src, item in enumerate(got)]


def allgather(comm: Communicator, value: Any, tag: str) -> list[Any]:
    """Every rank's ``value`` in rank order, on every rank."""
    got = run(comm, lambda: _issue(tag, lambda: comm.iallgather((tag, value))))
    return [_check(comm, tag, item, src, "allgather") for src, item in enumerate(got)]
