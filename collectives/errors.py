"""One typed error tree for the whole library.

Every error a caller can see derives from :class:`CollectivesError`.  Messages name the rank, the
operation and, where a setting is at fault, the environment variable or option to fix, so that a
log line alone is enough to act on.
"""

from __future__ import annotations

from collections.abc import Iterable


class CollectivesError(Exception):
    """Base class of every error raised by :mod:`collectives`."""


class ConfigurationError(CollectivesError, ValueError):
    """A setting, argument or environment variable is missing or wrong (a local, caller error)."""


class BackendUnavailableError(ConfigurationError):
    """The requested backend cannot run here (its engine is not installed or not initialised)."""


class RendezvousError(CollectivesError):
    """Ranks could not find each other."""


class RendezvousTimeoutError(RendezvousError, TimeoutError):
    """Rendezvous did not complete within its timeout."""


class RendezvousClosedError(RendezvousError):
    """The rendezvous was closed before this rank joined."""


class RendezvousConnectionError(RendezvousError, ConnectionError):
    """The rendezvous endpoint (master address, server) could not be reached."""


class TransportError(CollectivesError):
    """Moving bytes between ranks failed."""


class PeerUnreachableError(TransportError):
    """A peer never answered (it could not be reached at all)."""


class ConnectionLostError(TransportError):
    """A peer that was reachable went away (exited, crashed, closed its end)."""

    def __init__(self, message: str, ranks: Iterable[int] = ()) -> None:
        super().__init__(message)
        self.ranks: tuple[int, ...] = tuple(sorted(set(ranks)))


class ProtocolError(CollectivesError):
    """A rule of the wire protocol or of the API was broken."""


class LocalProtocolError(ProtocolError):
    """This rank broke a rule (wrong argument, op on a closed or aborted communicator)."""


class InvalidArgumentError(LocalProtocolError, ValueError):
    """An argument is wrong for this op (wrong length, root out of range, buffer shape)."""


class RemoteProtocolError(ProtocolError):
    """A peer sent something that breaks the protocol."""


class CodecError(RemoteProtocolError, ValueError):
    """Bytes could not be decoded or encoded (malformed, truncated, unknown dtype, over a limit, or
    refused by the codec options: a pickle without ``allow_pickle``)."""


class CollectiveMismatchError(ProtocolError):
    """Ranks called different collectives (or the same one with incompatible arguments)."""

    def __init__(self, message: str, ranks: Iterable[int] = ()) -> None:
        super().__init__(message)
        self.ranks: tuple[int, ...] = tuple(sorted(set(ranks)))


class CollectiveTimeoutError(CollectivesError, TimeoutError):
    """An operation did not complete in time; ``ranks`` are the peers that did not answer."""

    def __init__(self, message: str, ranks: Iterable[int] = (), op: str = "") -> None:
        super().__init__(message)
        self.ranks: tuple[int, ...] = tuple(sorted(set(ranks)))
        self.op = op


class CommunicatorAbortedError(LocalProtocolError):
    """The communicator was aborted (``abort()`` or an earlier fatal error); no op can run."""


class AuthenticationError(CollectivesError):
    """A key was wrong or a message failed authentication."""


__all__ = [
    "AuthenticationError",
    "BackendUnavailableError",
    "CodecError",
    "CollectiveMismatchError",
    "CollectiveTimeoutError",
    "CollectivesError",
    "CommunicatorAbortedError",
    "ConfigurationError",
    "ConnectionLostError",
    "InvalidArgumentError",
    "LocalProtocolError",
    "PeerUnreachableError",
    "ProtocolError",
    "RemoteProtocolError",
    "RendezvousClosedError",
    "RendezvousConnectionError",
    "RendezvousError",
    "RendezvousTimeoutError",
    "TransportError",
]
