"""What congestion control gets from loss recovery and what it must offer it.

:class:`RateSample` is what :mod:`.recovery` computes per ACK; :class:`Congestion` is the
controller's side of the contract (:class:`~.congestion.Bbr` implements it).  Both are also
exported by :mod:`.congestion`.
"""

from __future__ import annotations

from typing import NamedTuple, Protocol

__all__ = ["Congestion", "RateSample"]


# A NamedTuple rather than a frozen dataclass: one is made per ACK, and a frozen dataclass sets
# each field through object.__setattr__ (several times the cost).
class RateSample(NamedTuple):
    """What one ACK taught the sender (delivery-rate estimation, BBR style).

    ``delivery_rate`` is bytes delivered over the interval that the newest acknowledged packet
    spans (the longer of its send and its ACK interval, so neither a send burst nor an ACK
    compression inflates it); None when no valid interval exists.
    """

    delivery_rate: float | None
    is_app_limited: bool
    #: Total bytes delivered when the newest acknowledged packet was sent (round counting).
    prior_delivered: int
    #: Total bytes delivered so far, this ACK included.
    delivered_total: int
    newly_acked: int
    newly_lost: int
    prior_in_flight: int
    bytes_in_flight: int
    #: The RTT sample of this ACK with the peer's ACK delay removed; None when it gave none.
    rtt: float | None


class Congestion(Protocol):
    """What :class:`~collectives.transport.recovery.Recovery` needs from a controller."""

    @property
    def cwnd(self) -> int:
        """Bytes that may be in flight."""
        ...

    @property
    def pacing_rate(self) -> float:
        """Bytes per second; ``inf`` for no pacing."""
        ...

    def on_sent(self, size: int, bytes_in_flight: int, now: float) -> None:
        """A packet of ``size`` went out; ``bytes_in_flight`` includes it."""
        ...

    def on_ack(self, sample: RateSample, now: float) -> None:
        """An ACK acknowledged or declared lost at least one packet."""
        ...

    def on_loss(self, lost_bytes: int, bytes_in_flight: int, now: float) -> None:
        """Packets were declared lost outside an ACK (by the loss timer)."""
        ...

    def on_timeout(self, pto_count: int, now: float) -> None:
        """A probe timeout fired (``pto_count`` consecutive ones so far)."""
        ...
