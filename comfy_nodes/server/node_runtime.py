"""The runtime the server integration installs for the nodes (comfy_nodes.cluster.Runtime).

It is the nodes' one seam to the server: their communicator is the current world's (waiting for
it to form), a prompt's head hands it over (leader) or admits it (follower), a collective's
progress fills ComfyUI's bar, an interrupt or a fatal failure goes to the membership, which
aborts or re-forms the world on every rank.  What needs ComfyUI comes in as callables, so that
this module imports none of it (comfy_nodes.server.integration does).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from comfy_nodes.cluster import Runtime

if TYPE_CHECKING:
    from collectives import Communicator
    from comfy_nodes.server.handoffs import Handoffs
    from comfy_nodes.server.membership import Membership


class ServerRuntime(Runtime):
    """A rank of a running cluster: the leader passes ``queue`` and ``deliver``, a follower
    ``handoffs``."""

    def __init__(
        self,
        membership: Membership,
        *,
        progress_bar: Callable[[int], Any] | None = None,
        interrupted: Callable[[], bool] | None = None,
        queue: Callable[[dict[str, Any]], str] | None = None,
        deliver: Callable[[str, dict[str, Any]], Communicator] | None = None,
        handoffs: Handoffs | None = None,
    ) -> None:
        super().__init__()
        self.membership = membership
        self._bar = progress_bar
        self._interrupted = interrupted
        self._queue = queue
        self._deliver = deliver
        self._handoffs = handoffs

    def _provide(self) -> Communicator:
        return self.membership.wait_ready()

    def queue_prompt(self, prompt: dict[str, Any], what: str) -> str:
        if self._queue is None:
            rank = self.membership.settings.rank
            raise RuntimeError(f"{what}: rank {rank} is a follower; only the leader queues")
        return self._queue(prompt)

    def deliver(self, prompt_id: str, prompt: dict[str, Any]) -> Communicator | None:
        return self._deliver(prompt_id, prompt) if self._deliver is not None else None

    def admit(self, prompt_id: str) -> Communicator | None:
        return self._handoffs.admit(prompt_id) if self._handoffs is not None else None

    def prompt_ended(self, prompt_id: str) -> None:
        if self._handoffs is not None:
            self._handoffs.finished(prompt_id)

    def progress_bar(self, total: int) -> Any | None:
        return self._bar(total) if self._bar is not None else None

    def interrupted(self) -> bool:
        return self._interrupted is not None and self._interrupted()

    def abort(self, comm: Communicator, reason: str) -> None:
        # If the cluster has formed a new world since, only this old one is aborted.
        self.membership.abort_everywhere(reason, comm)

    def failed(self, comm: Communicator, err: BaseException) -> None:
        # A late failure of an old world is not news: the membership compares communicators.
        self.membership.fail(f"{type(err).__name__}: {err}", comm=comm)
