"""ClusterSync: the head and tail the cluster prompt rewrite adds (see server/prompts.py).

Not meant to be placed by hand.  The head runs first on every rank: the leader waits until every
follower has accepted the prompt (their validation errors surface here, naming the rank); a
follower checks, locally, that the leader handed it this very prompt, and binds the world it was
handed over on.  No collective is needed for that check: a follower only ever runs the prompts its
control thread queued, one at a time, in the leader's order (server/control.py), so a prompt id
that differs from the last one handed over can only be a stray prompt, which fails here alone
without touching the cluster.  The tail is the output node followers execute, so they run exactly
the cluster nodes and what those need; it also tells the control thread that this rank is done
with the prompt's collectives.
"""

from __future__ import annotations

from typing import Any

from . import cluster, collective
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
            comm = cluster.peek_comm()
            try:
                if comm is not None:
                    # The prompt is not over on this rank until what it sent has arrived.
                    collective.settle(comm)
            finally:
                cluster.end_prompt()
            if cluster.prompt_end_hook is not None:
                cluster.prompt_end_hook(prompt_id)
            return (prompt_id,)
        if cluster.deliver_hook is not None and prompt is not None:
            # Leader only.  A refusal cancels the prompt on every rank cleanly, so it is not yet
            # "running": no abort is needed if this raises.
            comm = cluster.deliver_hook(prompt_id, prompt)
        elif cluster.admit_hook is not None:
            comm = cluster.admit_hook(prompt_id)  # follower: raises for a stray prompt
        else:
            comm = cluster.get_comm(fresh=True)  # no server integration (in-process ranks)
        if comm.size > 1:
            cluster.begin_prompt(prompt_id, comm)
        return (prompt_id,)
