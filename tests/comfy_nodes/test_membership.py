"""Membership: a failure or abort that comes from an earlier world must not end the current one.

(Regression: a node of an interrupted prompt, still finishing a collective on the old, aborted
communicator, reported that failure after the next world had formed and took it down too.)
"""

from __future__ import annotations

import collectives
from collectives.errors import CommunicatorAbortedError
from comfy_nodes.server.integration import abort_everywhere
from comfy_nodes.server.membership import Membership
from comfy_nodes.server.settings import Settings


def _follower_in_a_world() -> tuple[Membership, collectives.Communicator]:
    settings = Settings(
        rank=1,
        size=2,
        backend="local",
        op_timeout=5.0,
        join_timeout=5.0,
        idle_timeout=5.0,
        leader_url=None,  # no HTTP: the messages to the leader are not under test here
        advertise_host="127.0.0.1",
    )
    membership = Membership(settings, "http://127.0.0.1:1")
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
    abort_everywhere(membership, "interrupted on rank 1", old)
    assert membership.state == "ready" and current.allgather(2) == [2]
    try:
        old.allgather(3)
    except CommunicatorAbortedError as err:
        assert "interrupted on rank 1" in str(err)
    else:
        raise AssertionError("the old communicator was not aborted")
    abort_everywhere(membership, "interrupted on rank 1", current)
    assert membership.state == "failed"


def test_moving_to_a_new_world_forgets_the_running_prompt() -> None:
    """A follower may hear "join the next world" before "abort this one"; the prompt still
    running on the old world must not then report its failure as one of the new world."""
    from comfy_nodes import cluster

    membership, current = _follower_in_a_world()
    membership._join = lambda epoch: None  # type: ignore[method-assign]  # no second rank here
    cluster.begin_prompt("p-old", current)
    try:
        membership.rejoin(3, "interrupted on rank 1")
        assert cluster.current_prompt is None
        assert membership.epoch == 3 and membership.state == "joining"
        # The new world forms; then the old prompt's node error arrives.  Reported with the
        # prompt's communicator (as the execution-error hook does), it aborts only that one.
        new = collectives.init("local")
        membership._comm, membership.state = new, "ready"
        assert cluster.peek_comm() is current
        abort_everywhere(membership, "rank 1 failed at node 4", cluster.peek_comm())
        assert membership.state == "ready" and new.allgather(4) == [4]
    finally:
        cluster.end_prompt()
