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

from . import collective
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
        rt = self.runtime
        if mode != "start":
            comm = rt.peek()
            try:
                if comm is not None:
                    # The prompt is not over on this rank until what it sent has arrived.
                    collective.settle(comm)
            finally:
                rt.end_prompt()
            rt.prompt_ended(prompt_id)
            return (prompt_id,)
        # Leader: the hand-over.  A refusal cancels the prompt on every rank cleanly, so it is not
        # yet "running": no abort is needed if this raises.  Follower: raises for a stray prompt.
        # Neither (no server integration, in-process ranks): this rank's communicator.
        comm = rt.deliver(prompt_id, prompt) if prompt is not None else None
        if comm is None:
            comm = rt.admit(prompt_id) or rt.communicator(fresh=True)
        if comm.size > 1:
            rt.begin_prompt(prompt_id, comm)
        return (prompt_id,)
