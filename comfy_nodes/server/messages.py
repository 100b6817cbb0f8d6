"""The control messages the ranks send each other: who may send which, and what each does.

They travel over the control carrier (comfy_nodes.server.carrier), sealed with the cluster key;
the sender's rank is part of the sealed envelope.  Who may send what to whom is this one table
(anything not in it is refused, h11 style):

    =========== ====================== ====================== ================================
    kind        the leader takes it    a follower takes it    what it does
                from                   from
    =========== ====================== ====================== ================================
    epoch       a follower             (nobody)               answers the leader's epoch
    rejoin      (nobody: it sends it)  the leader             join the leader's next world
    failed      a follower             (nobody)               that world failed: form the next
    abort       a follower             the leader             abort that world everywhere
    heartbeat   a follower             (nobody)               the follower's panel report
    command     (nobody)               the leader             "interrupt" or "free" (the panel)
    =========== ====================== ====================== ================================

Each request is checked in this order and refused (``{"ok": false, "error": ...}``) without
any effect:

1. the seal (comfy_nodes.server.seal): a datagram that is forged, replayed, expired, oversized
   or malformed is dropped and counted, never answered;
2. the table above: the receiver must take the kind, and from the sender's role;
3. the body: ``epoch`` an integer from 0 to 2**31-1, ``reason`` a string of at most
   ``MAX_REASON_CHARS``;
4. the epoch: a message about another world than this rank's is ignored (compared under the
   membership's lock), and a rejoin must name the leader's next world (see
   ``Membership.announced``).  A follower's failure report about the world the leader is still
   joining (that follower could not join it) makes the leader announce the next world.

Every message from a follower also tells the leader where that follower's control endpoint is
(the datagram's source): a restarted follower is reachable for the next announcement.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from comfy_nodes.server.seal import MAX_REASON_CHARS

if TYPE_CHECKING:
    from comfy_nodes.server.membership import Membership

LEADER, FOLLOWER = "leader", "follower"

SENDERS: dict[str, dict[str, str]] = {
    "epoch": {LEADER: FOLLOWER},
    "rejoin": {FOLLOWER: LEADER},
    "failed": {LEADER: FOLLOWER},
    "abort": {LEADER: FOLLOWER, FOLLOWER: LEADER},
    "heartbeat": {LEADER: FOLLOWER},
    "command": {FOLLOWER: LEADER},
}
"""kind -> the receiver's role -> the role its sender must have."""


class Refused(Exception):
    """A control message refused; the reason goes back to its sender."""


@dataclass(frozen=True)
class Message:
    """A control message: who sent it (from the sealed envelope), about which world, why."""

    rank: int
    epoch: int
    reason: str
    extra: dict[str, Any] | None = None  # the body's other keys (a heartbeat's status)

    @classmethod
    def parse(cls, rank: int, kind: str, body: dict[str, Any]) -> Message:
        epoch, reason = body.get("epoch", 0), body.get("reason", "")
        if type(epoch) is not int or not 0 <= epoch < 2**31:
            raise Refused(f"{kind}: 'epoch' must be an integer from 0 to 2**31-1")
        if not isinstance(reason, str) or len(reason) > MAX_REASON_CHARS:
            raise Refused(f"{kind}: 'reason' must be a string of at most {MAX_REASON_CHARS}")
        extra = {k: v for k, v in body.items() if k not in ("epoch", "reason")}
        return cls(rank, epoch, reason, extra)


def role(rank: int) -> str:
    return LEADER if rank == 0 else FOLLOWER


def check_sender(kind: str, my_rank: int, size: int, sender: int) -> None:
    """Raise :class:`Refused` unless the table lets ``sender`` send ``kind`` to this rank."""
    mine = role(my_rank)
    wanted = SENDERS.get(kind, {}).get(mine)
    if wanted is None:
        raise Refused(f"rank {my_rank} is the {mine}: it does not take {kind!r}")
    if not 0 <= sender < size or sender == my_rank:
        raise Refused(f"{kind}: rank {sender} is not another rank of this cluster")
    if role(sender) != wanted:
        raise Refused(f"{kind}: rank {my_rank} takes it from the {wanted} only, not rank {sender}")


# -- what each message does (called once it is authentic, well-formed and from the right rank) --
def _epoch(membership: Membership, msg: Message) -> dict[str, Any]:
    return {"ok": True, "epoch": max(membership.epoch, 0)}


def _rejoin(membership: Membership, msg: Message) -> dict[str, Any]:
    ok, why = membership.announced(msg.epoch, msg.reason)
    if not ok:
        raise Refused(why)
    return {"ok": True, "detail": why}


def _failed(membership: Membership, msg: Message) -> dict[str, Any]:
    # The epoch is compared under the membership's lock: a report about another world (an
    # earlier one, or one that formed meanwhile) changes nothing.
    membership.fail(f"rank {msg.rank}: {msg.reason or 'failed'}", epoch=msg.epoch)
    return {"ok": True, "detail": f"failure of world {msg.epoch} noted"}


def _abort(membership: Membership, msg: Message) -> dict[str, Any]:
    reason = msg.reason or f"aborted by rank {msg.rank}"
    if membership.settings.is_leader:
        membership.abort_everywhere(reason, epoch=msg.epoch)
    else:
        membership.fail(reason, epoch=msg.epoch)
    return {"ok": True, "detail": f"abort of world {msg.epoch} noted"}


ACTIONS: dict[str, Callable[[Membership, Message], dict[str, Any]]] = {
    "epoch": _epoch,
    "rejoin": _rejoin,
    "failed": _failed,
    "abort": _abort,
}


class PanelHooks(Protocol):
    """What the cluster panel does with its two messages (comfy_nodes.server.panel.Panel)."""

    def heartbeat(self, msg: Message) -> dict[str, Any]: ...

    def command(self, msg: Message) -> dict[str, Any]: ...


PANEL_ACTIONS: dict[str, Callable[[PanelHooks, Message], dict[str, Any]]] = {
    "heartbeat": lambda panel, msg: panel.heartbeat(msg),
    "command": lambda panel, msg: panel.command(msg),
}


def dispatch(
    membership: Membership, panel: PanelHooks | None, sender: int, kind: str, body: dict[str, Any]
) -> dict[str, Any]:
    """The reply to one authentic control request (checked as the module's docstring says)."""
    s = membership.settings
    try:
        check_sender(kind, s.rank, s.size, sender)
        msg = Message.parse(sender, kind, body)
        if kind in ACTIONS:
            return ACTIONS[kind](membership, msg)
        if panel is None:
            raise Refused(f"{kind}: rank {s.rank} runs no cluster panel")
        return PANEL_ACTIONS[kind](panel, msg)
    except Refused as err:
        return {"ok": False, "error": str(err)}
