"""The routes the ranks' servers call on each other: authenticated, validated, from the right rank.

Three messages change a rank's state; who may send each to whom is this one table (anything not
in it is refused, h11 style):

    ==================== ====================== ======================
    route                the leader takes it    a follower takes it
                         from                   from
    ==================== ====================== ======================
    POST /cluster/rejoin (nobody: it sends it)  the leader
    POST /cluster/failed a follower             (nobody)
    POST /cluster/abort  a follower             the leader
    ==================== ====================== ======================

Two more carry the cluster panel's traffic (comfy_nodes.server.panel) and change no membership
state: ``POST /cluster/heartbeat`` (the leader takes it from a follower: its status report, under
``status``, any epoch) and ``POST /cluster/command`` (a follower takes it from the leader:
``action`` "interrupt" or "free").

and ``GET /cluster/epoch`` (a restarting follower asks the leader where the cluster is) changes
nothing.  Each request is checked in this order, and refused without any effect:

1. its credential (comfy_nodes.server.peers): 401 when missing, 403 when wrong, expired or
   replayed (only when a cluster key is set);
2. its body: a JSON object ``{"rank": int, "epoch": int, "reason": str}`` of at most 64 KiB,
   else 400 (the ``rank`` is the sender's, under the credential's MAC);
3. the table above: 409 when this rank does not take the message, 403 when the sender may not
   send it;
4. the epoch: a message about another world than this rank's is ignored (200; compared under
   the membership's lock), and a rejoin must name the leader's next world (409 otherwise; see
   ``Membership.announced``).  A follower's failure report about the world the leader is still
   joining (that follower could not join it) makes the leader announce the next world.

The routes meant for the browser (``/cluster/status``, ``/cluster/queue``) are not here: they
follow ComfyUI's own trust model, like its ``/prompt``.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from collectives.auth import AUTH_HEADER
from comfy_nodes.server.peers import MAX_REASON_CHARS, PeerAuth

if TYPE_CHECKING:
    from comfy_nodes.server.membership import Membership

MAX_BODY_BYTES = 64 * 1024
LEADER, FOLLOWER = "leader", "follower"

SENDERS: dict[str, dict[str, str]] = {
    "/cluster/rejoin": {FOLLOWER: LEADER},
    "/cluster/failed": {LEADER: FOLLOWER},
    "/cluster/abort": {LEADER: FOLLOWER, FOLLOWER: LEADER},
    "/cluster/heartbeat": {LEADER: FOLLOWER},
    "/cluster/command": {FOLLOWER: LEADER},
}
"""route -> the receiver's role -> the role its sender must have."""


class Refused(Exception):
    """A request refused with an HTTP status and a short reason."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class Message:
    """A control message's body: who sent it, about which world, why."""

    rank: int
    epoch: int
    reason: str
    extra: dict[str, Any] | None = None  # the body's other keys (a heartbeat's status)

    @classmethod
    def parse(cls, raw: bytes, path: str) -> Message:
        try:
            data = json.loads(raw)
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise Refused(400, f"{path}: the body is not JSON ({err})") from None
        if not isinstance(data, dict):
            raise Refused(400, f"{path}: the body must be a JSON object")
        rank, epoch = data.get("rank"), data.get("epoch")
        reason = data.get("reason", "")
        for name, value in (("rank", rank), ("epoch", epoch)):
            if type(value) is not int or not 0 <= value < 2**31:
                raise Refused(400, f"{path}: {name!r} must be an integer from 0 to 2**31-1")
        if not isinstance(reason, str) or len(reason) > MAX_REASON_CHARS:
            raise Refused(400, f"{path}: 'reason' must be a string of at most {MAX_REASON_CHARS}")
        assert isinstance(rank, int) and isinstance(epoch, int)
        extra = {k: v for k, v in data.items() if k not in ("rank", "epoch", "reason")}
        return cls(rank, epoch, reason, extra)


def _role(rank: int) -> str:
    return LEADER if rank == 0 else FOLLOWER


def check_sender(path: str, membership: Membership, msg: Message) -> None:
    """Raise :class:`Refused` unless the table lets ``msg.rank`` send ``path`` to this rank."""
    s = membership.settings
    mine = _role(s.rank)
    wanted = SENDERS[path].get(mine)
    if wanted is None:
        raise Refused(409, f"rank {s.rank} is the {mine}: it does not take {path}")
    if not 0 <= msg.rank < s.size or msg.rank == s.rank:
        raise Refused(400, f"{path}: rank {msg.rank} is not another rank of this cluster")
    if _role(msg.rank) != wanted:
        raise Refused(
            403, f"{path}: rank {s.rank} takes it from the {wanted} only, not rank {msg.rank}"
        )


# -- what each message does (called once it is authentic, well-formed and from the right rank) --
def _rejoin(membership: Membership, msg: Message) -> dict[str, Any]:
    ok, why = membership.announced(msg.epoch, msg.reason)
    if not ok:
        raise Refused(409, why)
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
    "/cluster/rejoin": _rejoin,
    "/cluster/failed": _failed,
    "/cluster/abort": _abort,
}


class PanelHooks(Protocol):
    """What the cluster panel does with its two messages (comfy_nodes.server.panel.Panel)."""

    def heartbeat(self, msg: Message) -> dict[str, Any]: ...

    def command(self, msg: Message) -> dict[str, Any]: ...


PANEL_ACTIONS: dict[str, Callable[[PanelHooks, Message], dict[str, Any]]] = {
    "/cluster/heartbeat": lambda panel, msg: panel.heartbeat(msg),
    "/cluster/command": lambda panel, msg: panel.command(msg),
}


Handler = Callable[[Any], Awaitable[Any]]


def control_routes(
    auth: PeerAuth,
    membership: Callable[[], Membership | None],
    panel: Callable[[], PanelHooks | None] = lambda: None,
) -> list[tuple[str, str, Handler]]:
    """(method, path, aiohttp handler) of every rank-to-rank route.

    ``membership``: this rank's, or None on a ComfyUI that is not part of a cluster (then the
    routes still check credentials and bodies, and change nothing).  ``panel``: this rank's
    cluster panel, or None (then its routes answer 409).
    """
    from aiohttp import web

    def refused(status: int, message: str) -> Any:
        return web.json_response({"error": message}, status=status)

    async def read_checked(request: Any) -> bytes:
        too_large = Refused(413, f"{request.path}: the body is larger than {MAX_BODY_BYTES} bytes")
        if (request.content_length or 0) > MAX_BODY_BYTES:
            raise too_large
        # The whole body, however it arrived (one read returns only what is buffered so far);
        # a body without a length (chunked) is refused as soon as it passes the cap.
        raw = bytearray()
        while chunk := await request.content.read(MAX_BODY_BYTES + 1 - len(raw)):
            raw += chunk
            if len(raw) > MAX_BODY_BYTES:
                raise too_large
        why = auth.refusal(
            request.method, request.path, bytes(raw), request.headers.get(AUTH_HEADER)
        )
        if why is not None:
            raise Refused(*why)
        return bytes(raw)

    async def epoch(request: Any) -> Any:
        try:
            await read_checked(request)
        except Refused as err:
            return refused(err.status, str(err))
        m = membership()
        return web.json_response({"epoch": max(m.epoch, 0) if m is not None else 0})

    def post(path: str) -> Handler:
        async def handler(request: Any) -> Any:
            try:
                msg = Message.parse(await read_checked(request), path)
                m = membership()
                if m is None:
                    raise Refused(409, "this ComfyUI is not part of a cluster")
                check_sender(path, m, msg)
                action = _bind(path, m)
                # The action may ask the leader a question (a rejoin): off the event loop.
                result = await asyncio.get_running_loop().run_in_executor(None, action, msg)
            except Refused as err:
                return refused(err.status, str(err))
            return web.json_response(result)

        return handler

    def _bind(path: str, m: Membership) -> Callable[[Message], dict[str, Any]]:
        if path in ACTIONS:
            return lambda msg: ACTIONS[path](m, msg)
        p = panel()
        if p is None:
            raise Refused(409, f"{path}: this rank runs no cluster panel")
        return lambda msg: PANEL_ACTIONS[path](p, msg)

    posts = [*ACTIONS, *PANEL_ACTIONS]
    return [("GET", "/cluster/epoch", epoch)] + [("POST", p, post(p)) for p in posts]
