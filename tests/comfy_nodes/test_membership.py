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
