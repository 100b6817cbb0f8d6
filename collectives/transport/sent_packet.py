"""What loss recovery keeps per transmitted datagram and what its ACK and timer steps return."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, NamedTuple

__all__ = ["AckResult", "SentPacket", "TimeoutResult"]


@dataclass(slots=True, eq=False)
class SentPacket:
    """One transmitted datagram, as recovery tracks it.

    ``data`` is the caller's handle for resending it; recovery never looks inside.  The
    ``delivered*``/``first_sent_at``/``app_limited`` fields are the delivery-rate state stamped at
    send time, ``seq`` and ``lost`` recovery's own bookkeeping.
    """

    number: int
    size: int
    sent_at: float = 0.0
    ack_eliciting: bool = True
    in_flight: bool = True
    retransmitted: bool = False
    delivered: int = 0
    delivered_at: float = 0.0
    first_sent_at: float = 0.0
    app_limited: bool = False
    data: Any = None  # Any, not object: see View in frames.py
    seq: int = field(default=-1, repr=False)
    lost: bool = field(default=False, repr=False)


class AckResult(NamedTuple):  # immutable and cheap to make (one per ACK or timer)
    acked: list[SentPacket]
    lost: list[SentPacket]
    rtt_sample: float | None


class TimeoutResult(NamedTuple):  # immutable and cheap to make (one per ACK or timer)
    lost: list[SentPacket]
    #: A probe timeout fired: send one or two ack-eliciting packets now, even past the window
    #: and the pacer (new data if any, else a resend of :meth:`Recovery.oldest_unacked`).
    probe: bool
