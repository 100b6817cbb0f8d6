"""Where the nodes get their communicator from."""

from __future__ import annotations

import threading

import collectives
from comfy_nodes import cluster


def test_thread_override_wins_over_the_process_wide_comm() -> None:
    process = collectives.init("local", world="test-process-wide")
    mine = collectives.init("local", world="test-override")
    previous = cluster.peek_comm()
    try:
        cluster.set_comm(process)
        assert cluster.get_comm() is process
        with cluster.comm_override(mine):
            assert cluster.get_comm() is mine
            seen: list[object] = []
            other = threading.Thread(target=lambda: seen.append(cluster.get_comm()))
            other.start()
            other.join()
            assert seen == [process]  # an override is local to its thread
        assert cluster.get_comm() is process
    finally:
        cluster.set_comm(previous)
        process.close()
        mine.close()


def test_set_comm_thread_local() -> None:
    mine = collectives.init("local", world="test-thread-local")
    seen: list[object] = []

    def worker() -> None:
        cluster.set_comm(mine, thread_local=True)
        seen.append(cluster.get_comm())

    other = threading.Thread(target=worker)
    other.start()
    other.join()
    assert seen == [mine] and cluster.peek_comm() is not mine
    mine.close()
