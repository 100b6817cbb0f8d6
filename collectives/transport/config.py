"""Settings of one transport endpoint (see "Configuration" in docs/udp-transport.md)."""

from __future__ import annotations

from dataclasses import dataclass

from collectives.errors import ConfigurationError
from collectives.transport.header import HEADER_SIZE

# An AEAD tag plus one chunk header: the least a frame must hold besides data.
_MIN_FRAME = 256


@dataclass(frozen=True)
class TransportConfig:
    """Frozen settings; every endpoint of one world should use the same ones.

    ``max_datagram`` is the UDP payload per datagram (1200 fits every WAN/VPN path; the driver
    raises it on loopback).  ``frame_bytes`` is the plaintext sealed at once: the cipher and the
    Python work around it are paid per frame, not per datagram.  ``window_bytes`` is the receive
    memory per peer, granted to it as flow-control credit.  ``max_batch_bytes`` caps one GSO
    batch (the kernel refuses super-datagrams over 64 KiB).  ``hello_window`` is how far a HELLO's
    wall-clock timestamp may be from ours (replayed HELLOs older than that are refused).
    ``unreachable_grace`` is how long a peer an ICMP port unreachable was reported for has to
    answer a PING before it is declared lost (``Endpoint.unreachable``).
    """

    max_datagram: int = 1200
    frame_bytes: int = 64 * 1024
    window_bytes: int = 16 * 1024 * 1024
    max_meta: int = 16 * 1024
    peer_timeout: float = 30.0
    heartbeat_interval: float = 2.0
    initial_rtt: float = 0.1
    max_ack_delay: float = 0.005
    hello_interval: float = 0.25
    hello_window: float = 120.0
    max_batch_bytes: int = 65000
    unreachable_grace: float = 1.0
    insecure: bool = False

    def __post_init__(self) -> None:
        if not HEADER_SIZE + 64 <= self.max_datagram <= 65507:
            raise ConfigurationError(
                f"max_datagram={self.max_datagram} must be between {HEADER_SIZE + 64} and 65507"
            )
        if self.frame_bytes < _MIN_FRAME or self.frame_bytes > 1 << 30:
            raise ConfigurationError(f"frame_bytes={self.frame_bytes} must be 256 B .. 1 GiB")
        if (self.frame_bytes + HEADER_SIZE) // (self.max_datagram - HEADER_SIZE) > 65535:
            raise ConfigurationError("frame_bytes needs more than 65535 datagrams per frame")
        if self.window_bytes < 2 * self.frame_bytes:
            raise ConfigurationError(
                f"window_bytes={self.window_bytes} must hold two frames ({2 * self.frame_bytes})"
            )
        if not 0 <= self.max_meta <= min(65535, self.frame_bytes - _MIN_FRAME):
            raise ConfigurationError(f"max_meta={self.max_meta} must fit one frame and 65535 bytes")
        if self.max_batch_bytes < self.max_datagram:
            raise ConfigurationError("max_batch_bytes must hold at least one datagram")
        names = ("peer_timeout", "heartbeat_interval", "initial_rtt", "hello_interval")
        for name in (*names, "unreachable_grace"):
            if not getattr(self, name) > 0:
                raise ConfigurationError(f"{name} must be positive")
        if self.max_ack_delay < 0 or self.hello_window <= 0:
            raise ConfigurationError("max_ack_delay must be >= 0 and hello_window > 0")
