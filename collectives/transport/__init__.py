"""The sans-IO core of the udp backend: no sockets, no clock, no threads.

See docs/udp-transport.md.  :class:`Endpoint` is the whole public surface; the modules below it
each do one thing (wire header, crypto, handshake, chunks, send and receive directions, loss
recovery, congestion control, pacing).
"""

from collectives.transport.config import TransportConfig
from collectives.transport.endpoint import COUNTERS, Endpoint
from collectives.transport.events import (
    Address,
    Event,
    MessageFramed,
    MessageReceived,
    MessageSent,
    PeerAddressChanged,
    PeerConnected,
    PeerLost,
)
from collectives.transport.outbound import Batch
from collectives.transport.receiving import Allocator

__all__ = [
    "COUNTERS",
    "Address",
    "Allocator",
    "Batch",
    "Endpoint",
    "Event",
    "MessageFramed",
    "MessageReceived",
    "MessageSent",
    "PeerAddressChanged",
    "PeerConnected",
    "PeerLost",
    "TransportConfig",
]
