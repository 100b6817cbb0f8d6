"""The membership's states and every transition between them, in one table (h11 style).

A rank is in one state at a time (:class:`State`); an event (:class:`Event`) moves it to the
state :data:`TRANSITIONS` names, and an event the table does not list for the current state is
a bug (:class:`MembershipStateError`), never a silent change.  The guards (which epoch a message
is about, whether a failure concerns the current world) stay in comfy_nodes.server.membership;
only the moves are here.

    ========= ============ ============ =============== ==========
    state     join         joined       join_failed     fail
    ========= ============ ============ =============== ==========
    idle      joining
    joining   joining      ready        failed
    ready     joining                                   failed
    failed    joining
    ========= ============ ============ =============== ==========

``join``: a world is announced (the leader starts one, a follower hears it) — a newer one
supersedes a join in progress; ``joined``: the world formed and is installed; ``join_failed``:
forming it failed; ``fail``: the world this rank is in broke (a collective failed for good, an
abort, a lost follower).
"""

from __future__ import annotations

from enum import StrEnum


class State(StrEnum):
    IDLE = "idle"
    JOINING = "joining"
    READY = "ready"
    FAILED = "failed"


class Event(StrEnum):
    JOIN = "join"
    JOINED = "joined"
    JOIN_FAILED = "join_failed"
    FAIL = "fail"


TRANSITIONS: dict[State, dict[Event, State]] = {
    State.IDLE: {Event.JOIN: State.JOINING},
    State.JOINING: {
        Event.JOIN: State.JOINING,
        Event.JOINED: State.READY,
        Event.JOIN_FAILED: State.FAILED,
    },
    State.READY: {Event.JOIN: State.JOINING, Event.FAIL: State.FAILED},
    State.FAILED: {Event.JOIN: State.JOINING},
}


class MembershipStateError(RuntimeError):
    """An event the transition table does not allow in the current state."""


def next_state(state: str, event: Event) -> State:
    """The state ``event`` moves ``state`` to; :class:`MembershipStateError` if none."""
    current = State(state)
    moved = TRANSITIONS[current].get(event)
    if moved is None:
        allowed = ", ".join(TRANSITIONS[current]) or "none"
        raise MembershipStateError(
            f"membership event {event.value!r} in state {current.value!r} (allowed: {allowed})"
        )
    return moved
