"""``collectives.init()``: pick a backend, join the world, return a Communicator."""

from __future__ import annotations

import os
from collections.abc import Mapping

from collectives.backends.base import BackendConfig, get_backend_class
from collectives.codec import CodecOptions
from collectives.communicator import Communicator
from collectives.options import CommOptions
from collectives.rendezvous.env import detect_mpi_launcher, read_rank_env

BACKEND_ENV = "COMFY_CLUSTER_BACKEND"


def detect_backend(environ: Mapping[str, str] | None = None) -> str:
    """The backend a process should use when nobody said: mpi under mpirun, udp under a
    torchrun-style launcher (RANK/WORLD_SIZE with more than one rank: it needs no shared fabric,
    is encrypted, and crosses NATs and WAN links), else a 1-rank local world.  gloo and nccl stay
    one ``backend=`` / ``COMFY_CLUSTER_BACKEND`` away.
    """
    env = os.environ if environ is None else environ
    if detect_mpi_launcher(env):
        return "mpi"
    rank_env = read_rank_env(env)
    if rank_env is not None and rank_env.world_size > 1:
        return "udp"
    return "local"


def init(
    backend: str | None = None,
    *,
    rank: int | None = None,
    size: int | None = None,
    timeout: float | None = None,
    codec: CodecOptions | None = None,
    init_method: str | None = None,
    world: str = "default",
    epoch: int = 0,
    environ: Mapping[str, str] | None = None,
) -> Communicator:
    """Join a world and return this rank's :class:`Communicator`.

    The backend comes from ``backend=``, else ``COMFY_CLUSTER_BACKEND``, else detection
    (:func:`detect_backend`).  ``rank``/``size`` default to the launcher's environment
    (RANK/WORLD_SIZE, COMFY_CLUSTER_INSTANCE_INDEX/COUNT, Open MPI/MPICH/Slurm variables).
    ``timeout`` is the default for every op (else ``COMFY_CLUSTER_TIMEOUT``, else 600 s).
    ``world`` names the group and ``epoch`` its incarnation (count it up when a world of the same
    name re-forms): both travel in every message envelope, so a late message from an earlier
    world is refused instead of being taken for this one's.
    """
    env = dict(os.environ if environ is None else environ)
    name = backend or env.get(BACKEND_ENV) or detect_backend(env)
    options = CommOptions.from_env(env, timeout=timeout, codec=codec)
    cls = get_backend_class(name)
    if rank is None and size is None and name != "mpi":
        rank_env = read_rank_env(env)
        if rank_env is not None:
            rank, size = rank_env.rank, rank_env.world_size
    config = BackendConfig(
        rank=rank,
        size=size,
        init_method=init_method,
        world=world,
        epoch=epoch,
        timeout=options.timeout,
        environ=env,
    )
    return Communicator(cls.create(config), options)


def cancel_init(world: str) -> None:
    """Make an ``init(world=world)`` running in another thread of this process (or about to)
    give up its rendezvous now, with :class:`~collectives.errors.RendezvousClosedError`, instead
    of waiting for missing ranks until its timeout.

    For a caller that has moved on to a newer world.  Only the gloo/nccl rendezvous waits for
    ranks inside ``init``; on the other backends there is nothing to cancel.
    """
    from collectives.backends import torch_rendezvous

    torch_rendezvous.cancel(world)
