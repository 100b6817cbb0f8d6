"""The prompt hand-over protocol on in-process ranks (the server glue is tested end to end)."""

from __future__ import annotations

from typing import Any

import pytest

from collectives import Communicator
from collectives.testing import run_local
from comfy_nodes.collective import PeerNodeError
from comfy_nodes.server.control import Delivery, Verdict, hand_over, take_over

PROMPT = {"1": {"class_type": "X", "inputs": {}}}


def _follower(comm: Communicator, refuse: bool) -> list[Any]:
    queued: list[Any] = []

    def validate(d: Delivery) -> tuple[Verdict, Any]:
        if refuse:
            errors = {
                "7": {
                    "class_type": "CheckpointLoaderSimple",
                    "errors": [{"message": "Value not in list", "details": "ckpt 'x'"}],
                }
            }
            return Verdict(False, "Prompt outputs failed validation", errors), None
        return Verdict(True), ["tail"]

    got = take_over(
        comm, validate, lambda d, t: queued.append((d.prompt_id, t)), idle_timeout=30, timeout=30
    )
    return [got is not None, queued]


@pytest.mark.parametrize("size", [2, 3, 4])
def test_every_follower_queues_the_leaders_prompt_once(size: int) -> None:
    def fn(comm: Communicator) -> Any:
        if comm.rank == 0:
            hand_over(comm, Delivery("p1", PROMPT, "tail", {}), timeout=30)
            return None
        return _follower(comm, refuse=False)

    results = run_local(size, fn)
    assert all(r == [True, [("p1", ["tail"])]] for r in results[1:])


def test_one_refusal_cancels_the_prompt_everywhere_and_names_the_rank() -> None:
    def fn(comm: Communicator) -> Any:
        if comm.rank == 0:
            with pytest.raises(PeerNodeError) as info:
                hand_over(comm, Delivery("p1", PROMPT, "tail", {}), timeout=30)
            assert info.value.rank == 2
            assert "rank 2" in str(info.value) and "ckpt 'x'" in str(info.value)
            return None
        return _follower(comm, refuse=comm.rank == 2)

    results = run_local(3, fn)
    assert results[1] == [False, []] and results[2] == [False, []]


def test_a_malformed_message_is_refused_not_crashed_on() -> None:
    def fn(comm: Communicator) -> Any:
        if comm.rank == 0:
            comm.scatter([{"kind": "prompt"}] * comm.size)  # no prompt id: a broken leader
            verdicts = comm.allgather({"ok": True})
            return verdicts[1]
        return _follower(comm, refuse=False)

    verdict = run_local(2, fn)[0]
    assert verdict["ok"] is False and "KeyError" in verdict["error"]
