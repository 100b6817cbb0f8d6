"""A follower's record of the prompts the leader handed it: what its ClusterSync head may run, and
when the control thread may join the next hand-over.

The control thread (server/integration.py) records each prompt it queues; the executor's
ClusterSync head admits only the prompt handed over last, bound to the world it was handed over
on; the tail reports the prompt finished with its collectives.  The control thread waits for that
report before joining the next hand-over (a collective, so it must not interleave with the
prompt's own), woken at once instead of polling ComfyUI's history.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from collectives import Communicator


class StrayPromptError(RuntimeError):
    """A cluster prompt reached this follower's executor without the leader handing it over."""


class Handoffs:
    def __init__(self, rank: int) -> None:
        self.rank = rank
        self._cond = threading.Condition()
        self._last: tuple[str, Communicator] | None = None
        self._finished: str | None = None

    def handed(self, prompt_id: str, comm: Communicator) -> None:
        """The control thread queued ``prompt_id``, handed over on ``comm``."""
        with self._cond:
            self._last = (prompt_id, comm)
            self._finished = None

    def admit(self, prompt_id: str) -> Communicator:
        """The world ``prompt_id`` runs on; raises if it is not the prompt handed over last."""
        with self._cond:
            last = self._last
        if last is None or last[0] != prompt_id:
            handed = f"prompt {last[0]}" if last is not None else "no prompt yet"
            raise StrayPromptError(
                f"ClusterSync: rank {self.rank} runs cluster prompt {prompt_id}, but the leader "
                f"handed it {handed}; cluster prompts must be queued on the leader (rank 0)"
            )
        return last[1]

    def finished(self, prompt_id: str) -> None:
        """The ClusterSync tail of ``prompt_id`` ran: its collectives are over on this rank."""
        with self._cond:
            self._finished = prompt_id
            self._cond.notify_all()

    def wait_finished(
        self, prompt_id: str, ended: Callable[[], bool], *, poll_s: float = 0.05
    ) -> None:
        """Until the tail of ``prompt_id`` ran or ``ended()`` (its history is written: it failed
        before its tail, or the world is gone; checked every ``poll_s``)."""
        with self._cond:
            while self._finished != prompt_id:
                if ended():
                    return
                self._cond.wait(poll_s)
