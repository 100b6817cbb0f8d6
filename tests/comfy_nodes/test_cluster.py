"""Where the nodes get their communicator from."""

from __future__ import annotations

import threading

import collectives
from comfy_nodes import cluster


def test_thread_override_wins_over_the_process_wide_comm() -> None:
    process = collectives.init("local", world="test-process-wide")
    mine = collectives.init("local", world="test-override")
    rt = cluster.Runtime()
    try:
        with cluster.installed(rt):
            rt.set_comm(process)
            assert cluster.runtime().communicator() is process
            with cluster.comm_override(mine):
                assert rt.communicator() is mine
                seen: list[object] = []
                other = threading.Thread(target=lambda: seen.append(rt.communicator()))
                other.start()
                other.join()
                assert seen == [process]  # an override is local to its thread
            assert rt.communicator() is process
    finally:
        process.close()
        mine.close()


def test_the_installed_runtime_is_what_the_nodes_receive() -> None:
    from comfy_nodes import NODE_CLASS_MAPPINGS

    class Mine(cluster.Runtime):
        pass

    rt = Mine()
    with cluster.installed(rt):
        node = NODE_CLASS_MAPPINGS["ClusterInfo"]()
        assert node.runtime is rt and cluster.runtime() is rt
    assert cluster.runtime() is not rt


def test_the_standalone_runtime_refuses_to_queue_naming_the_node() -> None:
    import pytest

    with pytest.raises(RuntimeError, match="ClusterExecuteWorkflow: queuing workflows needs"):
        cluster.Runtime().queue_prompt({}, "ClusterExecuteWorkflow")
