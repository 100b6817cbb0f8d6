"""ClusterSync: the head and tail the cluster prompt rewrite adds (see server/prompts.py).

Not meant to be placed by hand.  The head runs first on every rank: the leader waits until every
follower has accepted the prompt (their validation errors surface here, naming the rank), then all
ranks check they are running the same prompt.  The tail is the output node followers execute, so
they run exactly the cluster nodes and what those need.
"""

from __future__ import annotations

from typing import Any

from . import cluster
from .collective import PeerNodeError
from .collective import run as run_collective
from .nodes_base import _ClusterNode


class ClusterSync(_ClusterNode):
    DESCRIPTION = "Internal: added to cluster prompts automatically; do not place it by hand."
    RETURN_TYPES = ("STRING",)
    RETURN_NAMES = ("prompt_id",)
    OUTPUT_NODE = True

    @classmethod
    def INPUT_TYPES(cls) -> dict[str, Any]:
        return {
            "required": {
                "mode": (["start", "end"],),
                "prompt_id": ("STRING", {"default": ""}),
                "collectives": ("INT", {"default": 0, "min": 0, "max": 2**31 - 1}),
            },
            "hidden": {"prompt": "PROMPT"},
        }

    def run(
        self,
        mode: str,
        prompt_id: str,
        collectives: int = 0,
        prompt: dict[str, Any] | None = None,
    ) -> tuple[str]:
        if mode != "start":
            cluster.end_prompt()
            return (prompt_id,)
        if cluster.deliver_hook is not None and prompt is not None:
            # Leader only (followers have no hook).  A refusal cancels the prompt on every rank
            # cleanly, so it is not yet "running": no abort is needed if this raises.
            cluster.deliver_hook(prompt_id, prompt)
        comm = cluster.get_comm(fresh=True)
        if comm.size == 1:
            return (prompt_id,)
        ids = run_collective(comm, lambda: comm.iallgather(prompt_id))
        strays = [rank for rank, other in enumerate(ids) if other != prompt_id]
        if strays:
            raise PeerNodeError(
                f"ClusterSync: rank(s) {strays} are running another prompt "
                f"({[ids[r] for r in strays]}) than rank {comm.rank} ({prompt_id}); "
                "the ranks' queues are out of step",
                strays[0],
            )
        cluster.begin_prompt(prompt_id, comm)
        return (prompt_id,)
