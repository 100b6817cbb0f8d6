"""A failed prompt releases its communicator and what it left running: memory stays flat."""

from __future__ import annotations

import gc
import threading
import tracemalloc

import torch

import collectives
from collectives import Communicator
from comfy_nodes import cluster
from comfy_nodes.server.membership import Membership

from .helpers import local_settings, run_node

MIB = 1 << 20


def _failing_prompt(i: int) -> None:
    """Both ranks start prompt ``i``; the leader's 1 MiB broadcast is left in flight, the
    follower's node fails before receiving it; each rank then does what a failed prompt does
    (the execution-error hook ends it, membership discards the world)."""
    errors: list[BaseException] = []

    def rank(r: int) -> None:
        comm = collectives.init("local", rank=r, size=2, world="failing-prompts", timeout=5.0)
        try:
            with cluster.comm_override(comm):
                run_node("ClusterSync", "start", f"p{i}")
                if r == 0:
                    run_node("ClusterBroadcastTensor", torch.ones(MIB // 4), unique_id="3")
                    assert len(cluster.runtime().background[comm]) == 1  # still in flight
                cluster.runtime().end_prompt()  # the error hook: the tail never runs
        except BaseException as err:
            errors.append(err)
        finally:
            comm.abort(f"prompt p{i} failed")
            comm.close()
            cluster.runtime().forget(comm)

    threads = [threading.Thread(target=rank, args=(r,)) for r in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert not errors, errors


def test_a_hundred_failed_prompts_leave_memory_flat() -> None:
    for i in range(5):  # warm up: imports, caches, the first world
        _failing_prompt(i)
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for i in range(100):
            _failing_prompt(i)
        gc.collect()
        growth = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert cluster.runtime().background == {} and cluster.runtime().current_prompt is None
    # Each failed prompt left 1 MiB in flight: kept, 100 would be 100 MiB.
    assert growth < 2 * MIB, f"{growth / MIB:.1f} MiB kept by 100 failed prompts"


def test_leaving_a_world_drops_its_transfers_and_closes_it() -> None:
    settings = local_settings()
    membership = Membership(settings, "http://127.0.0.1:1")
    comm: Communicator = collectives.init("local")
    membership._comm, membership.state, membership.epoch = comm, "ready", 1
    cluster.runtime().begin_prompt("p", comm)
    try:
        membership.fail("a peer was lost")
        assert comm not in cluster.runtime().background and cluster.runtime().current_prompt is None
        assert not membership.is_current(comm)
    finally:
        cluster.runtime().end_prompt(comm)
