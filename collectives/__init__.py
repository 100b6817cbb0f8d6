"""collectives: MPI-style collective communication for Python and torch.

    import collectives
    with collectives.init() as comm:          # backend, rank and size from the environment
        x = comm.broadcast(obj, root=0)
        comm.allreduce(tensor, op="sum")

Backends: ``local`` (threads in one process), ``mpi`` (mpi4py), ``gloo``/``nccl``
(torch.distributed).  See the README for the full API and the environment variables.
"""

# First: decides whether the transport runs compiled or from source (see _compiled).
from collectives import _compiled  # noqa: F401
from collectives import backends as _backends  # noqa: F401  (registers the built-in backends)
from collectives.backends.base import Backend, BackendConfig, OpContext, register_backend
from collectives.backends.base import registered_backends as available_backends
from collectives.codec import CodecOptions, Encoded, decode, dumps, encode, loads
from collectives.communicator import Communicator
from collectives.errors import (
    AuthenticationError,
    BackendUnavailableError,
    CodecError,
    CollectiveMismatchError,
    CollectivesError,
    CollectiveTimeoutError,
    CommunicatorAbortedError,
    ConfigurationError,
    ConnectionLostError,
    InvalidArgumentError,
    LocalProtocolError,
    PeerUnreachableError,
    ProtocolError,
    RemoteProtocolError,
    RendezvousError,
    RendezvousTimeoutError,
    TransportError,
)
from collectives.options import CommOptions
from collectives.reduce_op import ReduceOp
from collectives.work import Work
from collectives.world import cancel_init, detect_backend, init

__version__ = "0.1.0"

__all__ = [
    "AuthenticationError",
    "Backend",
    "BackendConfig",
    "BackendUnavailableError",
    "CodecError",
    "CodecOptions",
    "CollectiveMismatchError",
    "CollectiveTimeoutError",
    "CollectivesError",
    "CommOptions",
    "Communicator",
    "CommunicatorAbortedError",
    "ConfigurationError",
    "ConnectionLostError",
    "Encoded",
    "InvalidArgumentError",
    "LocalProtocolError",
    "OpContext",
    "PeerUnreachableError",
    "ProtocolError",
    "ReduceOp",
    "RemoteProtocolError",
    "RendezvousError",
    "RendezvousTimeoutError",
    "TransportError",
    "Work",
    "available_backends",
    "cancel_init",
    "decode",
    "detect_backend",
    "dumps",
    "encode",
    "init",
    "loads",
    "register_backend",
]
