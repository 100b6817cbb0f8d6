"""What an :class:`~collectives.transport.Endpoint` reports to its driver (``next_event``)."""

from __future__ import annotations

from dataclasses import dataclass

Address = tuple[str, int]
View = memoryview  # (mypyc looks class-body annotations other than int/str/... up in the module)
_set = object.__setattr__  # (frozen dataclasses: see MessageReceived.__init__)


@dataclass(frozen=True, slots=True)
class PeerConnected:
    """The handshake with ``peer`` finished: messages flow."""

    peer: int
    addr: Address


@dataclass(frozen=True, slots=True, eq=False, init=False)
class MessageReceived:
    """A whole message; ``body`` is the buffer the endpoint's ``allocate`` returned for it."""

    peer: int
    channel: int
    message_id: int
    meta: bytes
    body: View

    # The __init__ dataclass writes, with object.__setattr__ looked up once (a frozen class's
    # own is a lookup per field): one of these is made per message.
    def __init__(
        self, peer: int, channel: int, message_id: int, meta: bytes, body: memoryview
    ) -> None:
        _set(self, "peer", peer)
        _set(self, "channel", channel)
        _set(self, "message_id", message_id)
        _set(self, "meta", meta)
        _set(self, "body", body)


@dataclass(frozen=True, slots=True)
class MessageFramed:
    """Every byte of the message is sealed into frames (asked for per message, see
    ``Endpoint.send``): the sender's buffers are free already, since resends use the sealed
    frames; ``MessageSent`` still follows once everything is acknowledged."""

    peer: int
    message_id: int


@dataclass(frozen=True, slots=True, init=False)
class MessageSent:
    """Every byte of the message was acknowledged: the sender's buffers are free again."""

    peer: int
    message_id: int

    def __init__(self, peer: int, message_id: int) -> None:  # as MessageReceived's
        _set(self, "peer", peer)
        _set(self, "message_id", message_id)


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
