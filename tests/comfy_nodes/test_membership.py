"""Membership: a failure or abort that comes from an earlier world must not end the current one;
a join that fails or is superseded leaves no communicator behind, and is never left unreported.

(Regressions: a node of an interrupted prompt, still finishing a collective on the old, aborted
communicator, reported that failure after the next world had formed and took it down too; a
join whose allgather failed kept its torch group registered, so the next join built on it.)
"""

from __future__ import annotations

import dataclasses
import threading
import time
from typing import Any

import pytest

import collectives
from collectives.errors import CommunicatorAbortedError
from comfy_nodes import cluster
from comfy_nodes.server.membership import Membership
from tests.comfy_nodes.helpers import local_settings


def _follower_in_a_world() -> tuple[Membership, collectives.Communicator]:
    membership = Membership(local_settings(), "http://127.0.0.1:1")
    current = collectives.init("local")
    membership._comm, membership.state, membership.epoch = current, "ready", 2
    return membership, current


def test_failure_of_an_earlier_world_is_ignored() -> None:
    membership, current = _follower_in_a_world()
    old = collectives.init("local")
    membership.fail("gather: the communicator was aborted", comm=old)
    assert membership.state == "ready" and membership.is_current(current)
    assert current.allgather(1) == [1]  # still usable
    membership.fail("allreduce timed out", comm=current)
    assert membership.state == "failed" and membership.last_error == "allreduce timed out"
    assert not membership.is_current(current)


def test_abort_from_an_earlier_world_aborts_only_that_one() -> None:
    membership, current = _follower_in_a_world()
    old = collectives.init("local")
    membership.abort_everywhere("interrupted on rank 1", old)
    assert membership.state == "ready" and current.allgather(2) == [2]
    try:
        old.allgather(3)
    except CommunicatorAbortedError as err:
        assert "interrupted on rank 1" in str(err)
    else:
        raise AssertionError("the old communicator was not aborted")
    membership.abort_everywhere("interrupted on rank 1", current)
    assert membership.state == "failed"


def test_moving_to_a_new_world_forgets_the_running_prompt() -> None:
    """A follower may hear "join the next world" before "abort this one"; the prompt still
    running on the old world must not then report its failure as one of the new world."""
    membership, current = _follower_in_a_world()
    membership._join = lambda epoch: None  # type: ignore[method-assign]  # no second rank here
    cluster.runtime().begin_prompt("p-old", current)
    try:
        membership.rejoin(3, "interrupted on rank 1")
        assert cluster.runtime().current_prompt is None
        assert membership.epoch == 3 and membership.state == "joining"
        # The new world forms; then the old prompt's node error arrives.  Reported with the
        # prompt's communicator (as the execution-error hook does), it aborts only that one.
        new = collectives.init("local")
        membership._comm, membership.state = new, "ready"
        assert cluster.runtime().peek() is current
        membership.abort_everywhere("rank 1 failed at node 4", cluster.runtime().peek())
        assert membership.state == "ready" and new.allgather(4) == [4]
    finally:
        cluster.runtime().end_prompt()


def test_leaving_a_world_aborts_it_before_fail_returns() -> None:
    membership, current = _follower_in_a_world()
    membership.fail("allreduce timed out", comm=current)
    with pytest.raises(CommunicatorAbortedError, match="allreduce timed out"):
        current.allgather(1)


def test_a_report_about_another_world_is_ignored_under_the_lock() -> None:
    membership, current = _follower_in_a_world()
    membership.fail("rank 0: old news", epoch=1)
    membership.abort_everywhere("aborted by rank 0", epoch=3)
    assert membership.state == "ready" and current.allgather(5) == [5]
    membership.fail("rank 0: this world", epoch=2)
    assert membership.state == "failed" and membership.last_error == "rank 0: this world"


class _Comm:
    """A communicator whose allgather fails (or answers), recording abort and close."""

    backend = "fake"

    def __init__(self, fails: bool = True) -> None:
        from collectives.options import CommOptions

        self.fails = fails
        self.options = CommOptions()
        self.aborted: str | None = None
        self.closed = threading.Event()

    def allgather(self, obj: Any, timeout: float | None = None) -> list[Any]:
        if self.fails:
            raise ConnectionError("rank 0 hung up")
        return [obj, obj]

    def abort(self, reason: str) -> None:
        self.aborted = reason

    def close(self) -> None:
        self.closed.set()


class _Posted(list[tuple[int, str, dict[str, Any]]]):
    """Stands in for the rank's Peers: records what it would send whom."""

    def send_async(self, rank: int, kind: str, body: dict[str, Any]) -> None:
        self.append((rank, kind, body))

    def others(self) -> dict[int, tuple[str, int]]:
        return {1: ("127.0.0.1", 3)}

    def learn(self, rank: int, address: tuple[str, int]) -> None:
        pass


def _joining(rank: int, init: Any) -> tuple[Membership, _Posted]:
    settings = local_settings(rank)
    if rank != 0:
        settings = dataclasses.replace(settings, leader_control=("127.0.0.1", 1))
    membership = Membership(settings, "http://127.0.0.1:2")
    posted = _Posted()
    membership.peers = posted  # type: ignore[assignment]
    membership._init_world = init  # type: ignore[method-assign]
    membership.epoch, membership.state = 4, "joining"
    return membership, posted


def test_a_failed_join_aborts_and_closes_its_comm_and_tells_the_leader() -> None:
    comm = _Comm()
    membership, posted = _joining(1, lambda epoch: comm)
    membership._join(4)
    assert comm.aborted is not None and "joining world 4 failed" in comm.aborted
    assert comm.closed.wait(5)
    assert membership.state == "failed" and "rank 0 hung up" in membership.last_error
    assert posted == [(0, "failed", {"epoch": 4, "reason": membership.last_error})]


def test_a_join_superseded_during_init_is_discarded_silently() -> None:
    comm = _Comm(fails=False)

    def init(epoch: int) -> _Comm:
        membership.epoch = 5  # the leader announced the next world meanwhile
        return comm

    membership, posted = _joining(1, init)
    membership._join(4)
    assert comm.aborted is not None and comm.closed.wait(5)
    assert membership.state == "joining" and membership._comm is None and posted == []


def test_the_leader_starts_the_next_world_when_a_follower_cannot_join() -> None:
    membership, posted = _joining(0, lambda epoch: _Comm())
    joined: list[int] = []
    membership._join = joined.append  # type: ignore[method-assign]
    membership.urls = {0: "http://127.0.0.1:2", 1: "http://127.0.0.1:3"}
    membership.fail("rank 1: joining world 3 failed", epoch=3)  # an older world: nothing
    assert membership.epoch == 4 and posted == []
    membership.fail("rank 1: joining world 4 failed", epoch=4)
    membership.fail("rank 1: joining world 4 failed", epoch=4)  # a second report: nothing more
    deadline = time.monotonic() + 5
    while not joined and time.monotonic() < deadline:
        time.sleep(0.01)
    assert membership.epoch == 5 and membership.state == "joining" and joined == [5]
    assert [(rank, kind, body["epoch"]) for rank, kind, body in posted] == [(1, "rejoin", 5)]


def test_joins_are_serialised_and_a_superseded_one_is_discarded_first() -> None:
    entered, release = threading.Event(), threading.Event()
    first, second = _Comm(fails=False), _Comm(fails=False)
    order: list[str] = []

    def init(epoch: int) -> _Comm:
        order.append(f"init {epoch}")
        if epoch == 4:
            entered.set()
            assert release.wait(5)
            return first
        assert first.aborted is not None, "the superseded world was not discarded first"
        return second

    membership, _ = _joining(1, init)
    old = threading.Thread(target=membership._join, args=(4,))
    old.start()
    assert entered.wait(5)
    membership.rejoin(5, "the next world")  # its join waits for the one still in init
    time.sleep(0.2)
    assert order == ["init 4"]
    release.set()
    old.join(5)
    deadline = time.monotonic() + 5
    while membership.state != "ready" and time.monotonic() < deadline:
        time.sleep(0.01)
    try:
        assert order == ["init 4", "init 5"] and membership.state == "ready"
        assert membership.epoch == 5 and membership._comm is second
    finally:
        cluster.runtime().set_comm(None)


def test_moving_on_cancels_the_rendezvous_of_the_world_still_joining(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A join of world 4 waiting in its rendezvous for a rank that never comes holds the join
    # lock until its timeout: rejoining world 5 must make it give up.
    cancelled: list[str] = []
    monkeypatch.setattr(collectives, "cancel_init", cancelled.append)
    membership, _ = _joining(1, lambda epoch: _Comm(fails=False))
    membership._join = lambda epoch: None  # type: ignore[method-assign]
    membership.rejoin(5, "the next world")
    assert cancelled == ["comfy-cluster-e4"]
    membership.state = "ready"
    membership.rejoin(6, "after a formed world")  # nothing is joining: nothing to cancel
    assert cancelled == ["comfy-cluster-e4"]
