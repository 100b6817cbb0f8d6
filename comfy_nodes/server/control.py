"""Handing a cluster prompt from the leader to every follower, through the communicator.

The hand-over is two collectives that the leader runs as the first step of the prompt (the
ClusterSync head node) and each follower's control thread runs while its executor is idle:

1. the prompt, from the leader to every follower (any size: the communicator has no limit);
2. ``allgather`` of every rank's verdict (a follower's is ComfyUI's own validation of the prompt,
   restricted to what it will execute; the leader's is always "ok").  Every rank then applies
   the same rule to the same list: go only if every verdict is "ok".

Step 1 is a ``scatter`` of the same value to every rank rather than a ``broadcast``: the leader
sends to each follower directly, where a tree broadcast relays through followers, and each relay
waits for a follower process to be scheduled (the ranks often share a few CPU cores).  Step 2 is
one round where a gather of verdicts followed by the leader's decision would be two.

A follower queues the prompt only on "go", under the leader's prompt id, so a prompt is never
queued on some ranks only, and never twice.  Because these are collectives in the same sequence as
the prompt's own, every rank sees one order: [hand-over P1][P1's collectives][hand-over P2]...;
the control thread waits for P1 to finish on its rank before it joins the next hand-over.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from comfy_nodes.collective import PeerNodeError

if TYPE_CHECKING:
    from collectives import Communicator

LEADER = 0


@dataclass(frozen=True)
class Delivery:
    prompt_id: str
    prompt: dict[str, Any]
    tail_id: str
    extra: dict[str, Any]

    def message(self) -> dict[str, Any]:
        return {
            "kind": "prompt",
            "prompt_id": self.prompt_id,
            "prompt": self.prompt,
            "tail": self.tail_id,
            "extra": self.extra,
        }


@dataclass(frozen=True)
class Verdict:
    ok: bool
    error: str = ""
    node_errors: dict[str, Any] | None = None

    def message(self) -> dict[str, Any]:
        return {"ok": self.ok, "error": self.error, "node_errors": self.node_errors or {}}


def _to_every_rank(comm: Communicator, value: Any, *, timeout: float) -> None:
    comm.scatter([value] * comm.size, root=LEADER, timeout=timeout)


def from_leader(comm: Communicator, *, timeout: float) -> Any:
    """Follower side of a value the leader sends to every rank (hand-over step 1)."""
    return comm.scatter(None, root=LEADER, timeout=timeout)


def _refusals(verdicts: list[Any]) -> list[tuple[int, Any]]:
    """The ranks whose verdict is not "ok" (every rank computes this from the same list)."""
    return [(r, v) for r, v in enumerate(verdicts) if not (isinstance(v, dict) and v.get("ok"))]


def hand_over(comm: Communicator, delivery: Delivery, *, timeout: float) -> None:
    """Leader side: deliver the prompt; raise naming every follower that refused it."""
    _to_every_rank(comm, delivery.message(), timeout=timeout)
    refused = _refusals(comm.allgather(Verdict(True).message(), timeout=timeout))
    if refused:
        lines = [f"rank {rank}: {_describe(v)}" for rank, v in refused]
        raise PeerNodeError(
            "the prompt was refused by follower(s), so it runs nowhere: " + "; ".join(lines),
            refused[0][0],
        )


Validate = Callable[[Delivery], tuple[Verdict, Any]]
Enqueue = Callable[[Delivery, Any], None]


def take_over(
    comm: Communicator,
    validate: Validate,
    enqueue: Enqueue,
    *,
    idle_timeout: float,
    timeout: float,
) -> Delivery | None:
    """Follower side: wait for the next hand-over; queue the prompt if the leader says go.

    Returns the queued delivery, or None when the leader cancelled it.  ``idle_timeout`` bounds
    the wait for the next prompt (the cluster may sit idle for a long time).
    """
    msg = from_leader(comm, timeout=idle_timeout)
    delivery: Delivery | None = None
    try:
        delivery = Delivery(
            prompt_id=str(msg["prompt_id"]),
            prompt=dict(msg["prompt"]),
            tail_id=str(msg["tail"]),
            extra=dict(msg.get("extra") or {}),
        )
        verdict, ticket = validate(delivery)
    except Exception as err:  # a malformed message or a crash in validation: refuse, loudly
        verdict, ticket = Verdict(False, f"{type(err).__name__}: {err}"), None
    go = not _refusals(comm.allgather(verdict.message(), timeout=timeout))
    if go and verdict.ok and delivery is not None:
        enqueue(delivery, ticket)
        return delivery
    return None


def _describe(verdict: Any) -> str:
    if not isinstance(verdict, dict):
        return f"no verdict ({verdict!r})"
    text = str(verdict.get("error") or "refused")
    details = []
    for node_id, err in (verdict.get("node_errors") or {}).items():
        for e in err.get("errors", []) if isinstance(err, dict) else []:
            what = e.get("details") or e.get("message")
            details.append(f"node {node_id} ({err.get('class_type', '?')}): {what}")
    return text + (" — " + "; ".join(details) if details else "")
