"""What an :class:`~collectives.transport.Endpoint` reports to its driver (``next_event``)."""

from __future__ import annotations

from dataclasses import dataclass

Address = tuple[str, int]


@dataclass(frozen=True, slots=True)
class PeerConnected:
    """The handshake with ``peer`` finished: messages flow."""

    peer: int
    addr: Address


@dataclass(frozen=True, slots=True, eq=False)
class MessageReceived:
    """A whole message; ``body`` is the buffer the endpoint's ``allocate`` returned for it."""

    peer: int
    channel: int
    message_id: int
    meta: bytes
    body: memoryview


@dataclass(frozen=True, slots=True)
class MessageFramed:
    """Every byte of the message is sealed into frames (asked for per message, see
    ``Endpoint.send``): the sender's buffers are free already, since resends use the sealed
    frames; ``MessageSent`` still follows once everything is acknowledged."""

    peer: int
    message_id: int


@dataclass(frozen=True, slots=True)
class MessageSent:
    """Every byte of the message was acknowledged: the sender's buffers are free again."""

    peer: int
    message_id: int


@dataclass(frozen=True, slots=True)
class PeerAddressChanged:
    """An authenticated datagram of ``peer`` came from a new address (a NAT rebinding)."""

    peer: int
    old: Address | None
    new: Address


@dataclass(frozen=True, slots=True)
class PeerLost:
    """Nothing authenticated came for ``peer_timeout``, or the peer closed or aborted."""

    peer: int
    reason: str


Event = (
    PeerConnected | MessageReceived | MessageFramed | MessageSent | PeerAddressChanged | PeerLost
)
