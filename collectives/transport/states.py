"""The per-peer session state machine: every transition in one table (in the style of h11).

::

    client (lower rank)                      server (higher rank)
    IDLE --OPEN--> HELLO_SENT                IDLE --AWAIT--> WAITING
    HELLO_SENT --HELLO_ACK--> ESTABLISHED    WAITING --HELLO--> ESTABLISHED
                                             ESTABLISHED --HELLO--> ESTABLISHED (our answer was
                                                 lost, or a new HELLO before the client confirmed)
    any live state --CLOSE_LOCAL--> CLOSED
    any live state --PEER_GONE (timeout, CLOSE, ABORT)--> LOST

A (state, input) pair missing from the table is refused: :func:`next_state` raises for a local
input (a bug here) and the session drops a remote one (a datagram that makes no sense now).
"""

from __future__ import annotations

import enum

from collectives.errors import LocalProtocolError


class State(enum.Enum):
    IDLE = "idle"
    WAITING = "waiting for HELLO"
    HELLO_SENT = "HELLO sent"
    ESTABLISHED = "established"
    CLOSED = "closed"
    LOST = "lost"


class Input(enum.Enum):
    OPEN = "open"  # local: this side is the client
    AWAIT = "await"  # local: this side is the server
    HELLO = "HELLO"  # remote: an authentic, fresh HELLO
    HELLO_ACK = "HELLO_ACK"  # remote: an authentic HELLO_ACK answering our HELLO
    CLOSE_LOCAL = "close"  # local: close() or abort()
    PEER_GONE = "peer gone"  # remote or timer: CLOSE/ABORT received, or peer_timeout


_LIVE = (State.IDLE, State.WAITING, State.HELLO_SENT, State.ESTABLISHED)

TRANSITIONS: dict[tuple[State, Input], State] = {
    (State.IDLE, Input.OPEN): State.HELLO_SENT,
    (State.IDLE, Input.AWAIT): State.WAITING,
    (State.WAITING, Input.HELLO): State.ESTABLISHED,
    (State.ESTABLISHED, Input.HELLO): State.ESTABLISHED,
    (State.HELLO_SENT, Input.HELLO_ACK): State.ESTABLISHED,
    **{(state, Input.CLOSE_LOCAL): State.CLOSED for state in _LIVE},
    **{(state, Input.PEER_GONE): State.LOST for state in _LIVE},
}


def allowed(state: State, event: Input) -> bool:
    return (state, event) in TRANSITIONS


def next_state(state: State, event: Input) -> State:
    try:
        return TRANSITIONS[state, event]
    except KeyError:
        raise LocalProtocolError(
            f"session cannot take {event.value!r} when {state.value}"
        ) from None
