"""Built-in backends.  Importing this package registers them; engines (mpi4py, torch.distributed)
are imported lazily, only when a backend is created."""

from collectives.backends import local, mpi, torch_dist, torch_nccl, udp

__all__ = ["local", "mpi", "torch_dist", "torch_nccl", "udp"]
