"""How the torch backends join a world: env:// or tcp:// rendezvous, or the user's process group.

torch's own rendezvous waits inside C++ and, on failure, cannot say which rank is missing; its
``TCPStore`` also listens on every interface and serves anyone.  So the store is set up here
first, as our own :class:`~collectives.rendezvous.store.StoreServer`: every rank resolves
MASTER_ADDR (an unresolvable one fails at once, on every rank) and gets the cluster key
(:func:`collectives.auth.require_key`: loopback may run without one), rank 0 listens on exactly
MASTER_ADDR:MASTER_PORT, the others connect (in Python, against the deadline) until its
handshake accepts them, every rank checks in under its own key, and only when all ``size`` keys
exist is ``init_process_group`` called on the finished store.  A rendezvous that does not
complete in ``config.timeout`` therefore raises :class:`RendezvousTimeoutError` naming the ranks
that never arrived (or rank 0's address); a process without the key is refused with
:class:`AuthenticationError` and can neither read nor write anything.  gloo's own transport is
bound to this rank's interface towards MASTER_ADDR (``GLOO_SOCKET_IFNAME``), never the wildcard.

When torch.distributed is already initialised by the user, the backend builds a private group
over all ranks (``new_group``) so that its traffic never interleaves with the user's, and never
tears down the user's default group.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import socket
import struct
import threading
import time
import urllib.parse
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from datetime import timedelta
from typing import TYPE_CHECKING, Any

from collectives.auth import ClusterKey, require_key
from collectives.errors import (
    ConfigurationError,
    RendezvousClosedError,
    RendezvousConnectionError,
    RendezvousTimeoutError,
)
from collectives.rendezvous.env import read_rank_env
from collectives.rendezvous.store import Address, StoreClient, StoreServer, resolve

if TYPE_CHECKING:
    from torch.distributed import ProcessGroup

    from collectives.backends.base import BackendConfig

log = logging.getLogger(__name__)

LAUNCH_HINT = "or launch with comfycluster-launch"
GLOO_IFNAME_ENV = "GLOO_SOCKET_IFNAME"
_KEY_PREFIX = "collectives/checkin/"
_TORCH_KEY_PREFIX = "collectives/world/"
# One store server per (address, port) for the life of the process: rank 0 keeps serving
# MASTER_PORT across re-formed worlds (its old store may still be held by an aborted group), and
# every world gets its own key space.
_STORES: dict[tuple[str, int], StoreServer] = {}
# The world whose keys each of those servers holds (rank 0 joined it last): its keys are deleted
# when this process's rank 0 joins another world there.
_STORE_WORLDS: dict[tuple[str, int], str] = {}
_STORES_LOCK = threading.Lock()
_GLOO_ENV_LOCK = threading.Lock()
# The Python stores handed to torch.  torch keeps only their C++ half: once Python forgets one,
# torch's calls land on the C++ base ("Not implemented").  A group that was aborted may still
# call its store, so the wrappers are kept for the life of the process (one per world formed);
# their connections are closed when the world ends (TorchBackend.close), after which a call from
# such a group fails with a DistStoreError instead.
_TORCH_STORES: list[Any] = []
_PROGRESS_EVERY_S = 0.25

# Ranks that a rendezvous in progress in this process is still waiting for, by world name
# (BackendConfig.world), for status pages: see waiting_for().
_WAITING: dict[str, list[int]] = {}
_WAITING_LOCK = threading.Lock()


def waiting_for(world: str) -> list[int]:
    """The ranks a rendezvous of ``world`` running in this process still waits for.

    Empty when no such rendezvous is in progress (not started, finished or failed).  While a
    rank other than 0 cannot reach rank 0's store, that is ``[0]``.
    """
    with _WAITING_LOCK:
        return list(_WAITING.get(world, ()))


_CANCELLED: set[str] = set()


def cancel(world: str) -> None:
    """Make this process's rendezvous of ``world`` give up, whether it runs now or starts later.

    It ends within a fraction of a second with :class:`RendezvousClosedError` instead of waiting
    for ranks until its timeout: for a caller that has moved on to a newer world (the node pack
    re-forming after a failure), so that the old one does not hold the process up.
    """
    with _WAITING_LOCK:
        _CANCELLED.add(world)


def _check_cancelled(world: str, rank: int) -> None:
    with _WAITING_LOCK:
        if world not in _CANCELLED:
            return
        _CANCELLED.discard(world)
    raise RendezvousClosedError(f"rendezvous of world {world!r} on rank {rank} was cancelled")


def _set_waiting(world: str, ranks: list[int] | None) -> None:
    with _WAITING_LOCK:
        if ranks is None:
            _WAITING.pop(world, None)
        else:
            _WAITING[world] = list(ranks)


@dataclass
class Joined:
    pg: ProcessGroup
    rank: int
    size: int
    owns_default: bool  # we called init_process_group: close() destroys it
    own_group: bool  # we called new_group on the user's default group: close() destroys it
    hosts: dict[int, str] = field(default_factory=dict)
    local_rank: int = 0
    # This rank's connection to rank 0's store, which the group uses for as long as it lives:
    # close() closes it once the group is destroyed.  None without one (a world of one, a torch
    # init_method, the user's group).
    store: StoreClient | None = None


def join(
    config: BackendConfig, *, name: str, torch_backend: str, want_cuda: bool = False
) -> Joined:
    """Join (or build on) a torch.distributed world for backend ``name``."""
    import torch.distributed as dist

    environ: Mapping[str, str] = config.environ or os.environ
    rank, size, local_rank = _rank_and_size(config, environ)
    timeout = timedelta(seconds=max(config.timeout, 60.0))
    if dist.is_initialized():
        return _on_existing_group(
            name=name,
            torch_backend=torch_backend,
            rank=rank,
            size=size,
            local_rank=local_rank,
            timeout=timeout,
        )
    if size is None:
        raise ConfigurationError(
            f"backend {name!r}: WORLD_SIZE is not set: set it to the number of ranks, {LAUNCH_HINT}"
        )
    if rank is None:
        raise ConfigurationError(
            f"backend {name!r}: RANK is not set: set it to this process's 0-based rank, "
            f"{LAUNCH_HINT}"
        )
    if size < 1 or not 0 <= rank < size:
        raise ConfigurationError(f"backend {name!r}: rank {rank} is not in a world of size {size}")
    extra: dict[str, Any] = {}
    if want_cuda:
        extra["device_id"] = _own_gpu(name, local_rank)
    deadline = time.monotonic() + config.timeout
    method = config.init_method or "env://"
    scheme = urllib.parse.urlsplit(method).scheme
    if scheme not in ("env", "tcp"):
        if scheme == "":
            raise ConfigurationError(
                f"backend {name!r}: init_method={method!r} has no scheme: use env://, "
                "tcp://HOST:PORT or a torch init_method such as file:///path"
            )
        short = timedelta(seconds=config.timeout)
        _init(
            dist,
            name=name,
            torch_backend=torch_backend,
            timeout=short,
            rank=rank,
            size=size,
            extra=extra,
            init_method=method,
        )
        world = dist.group.WORLD
        assert world is not None
        return Joined(world, rank, size, True, False, {}, local_rank)
    gloo_ifname: str | None = None
    client: StoreClient | None = None
    if size == 1 and scheme == "env" and not environ.get("MASTER_ADDR"):
        from torch._C._distributed_c10d import HashStore

        store: Any = HashStore()  # a world of one needs no network
        hosts = {0: _my_host()}
    else:
        addr, port = _address(method, scheme, environ, name)
        what = "MASTER_ADDR" if scheme == "env" else f"the host of init_method={method!r}"
        address = resolve(addr, port, what)  # fails fast, on every rank alike
        family, sockaddr = address
        key = require_key(str(sockaddr[0]), f"the rendezvous store ({what}={addr})", environ)
        if uses_gloo(torch_backend):
            gloo_ifname = _gloo_interface(environ, family, sockaddr)
        _set_waiting(config.world, [0] if rank != 0 else [r for r in range(size) if r != 0])
        try:
            if rank == 0:
                _serve(addr, port, key, address, config.world)
            client = _connect(
                addr,
                port,
                key,
                address,
                rank=rank,
                deadline=deadline,
                timeout=config.timeout,
                world=config.world,
            )
            hosts = _check_in(
                client,
                rank=rank,
                size=size,
                deadline=deadline,
                timeout=config.timeout,
                addr=addr,
                port=port,
                world=config.world,
            )
        finally:
            _set_waiting(config.world, None)
        from collectives.rendezvous.torch_store import AuthenticatedStore

        # torch's own keys too are per world: a world re-formed in this process (a rank died and
        # came back) must not read the previous world's addresses.
        authenticated = AuthenticatedStore(client, timeout)
        _TORCH_STORES.append(authenticated)
        store = dist.PrefixStore(  # type: ignore[attr-defined]
            _torch_prefix(config.world), authenticated
        )
    try:
        with _gloo_env(gloo_ifname):
            _init(
                dist,
                name=name,
                torch_backend=torch_backend,
                timeout=timeout,
                rank=rank,
                size=size,
                extra=extra,
                store=store,
            )
    except BaseException:
        if client is not None:
            client.close()
        raise
    pg = dist.group.WORLD
    assert pg is not None
    return Joined(pg, rank, size, True, False, hosts, local_rank, client)


def uses_gloo(torch_backend: str) -> bool:
    """Whether a torch backend string (``gloo``, ``cpu:gloo,cuda:nccl``) has gloo in it."""
    return any(part.rpartition(":")[2].strip() == "gloo" for part in torch_backend.split(","))


def _world_key(world: str) -> str:
    # Quoted, so no world's keys are a prefix of another's ("a/" of "a/b/"): see _serve.
    return urllib.parse.quote(world, safe="")


def _checkin_prefix(world: str) -> str:
    return f"{_KEY_PREFIX}{_world_key(world)}/"


def _torch_prefix(world: str) -> str:
    return f"{_TORCH_KEY_PREFIX}{_world_key(world)}/"


def _serve(
    addr: str, port: int, key: ClusterKey | None, address: Address, world: str
) -> StoreServer:
    """Rank 0's store server on ``addr:port`` (started once per process), ready for ``world``.

    Rank 0 joins one world at a time: the previous world it joined on this server is over (its
    group destroyed or aborted), so that world's keys are deleted, and re-formed worlds do not
    fill the store.  A world joined again under the same name keeps its keys: its other ranks may
    be checking in already.
    """
    with _STORES_LOCK:
        server = _STORES.get((addr, port))
        if server is None:
            server = _STORES[(addr, port)] = StoreServer(addr, port, key, address=address)
        previous = _STORE_WORLDS.get((addr, port))
        if previous is not None and previous != world:
            server.delete_prefix(_checkin_prefix(previous))
            server.delete_prefix(_torch_prefix(previous))
        _STORE_WORLDS[(addr, port)] = world
        return server


def _own_gpu(name: str, local_rank: int) -> Any:
    """The CUDA device of this rank (``LOCAL_RANK``), made current; NCCL needs one per rank."""
    import torch

    count = torch.cuda.device_count()
    if not 0 <= local_rank < count:
        raise ConfigurationError(
            f"backend {name!r}: LOCAL_RANK={local_rank} names no GPU: this host sees {count} "
            f"CUDA device(s) (CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES')!r}); "
            "NCCL needs a GPU per rank: start at most that many ranks per host, or use "
            "backend 'gloo' (it moves CUDA tensors through host memory)"
        )
    torch.cuda.set_device(local_rank)
    return torch.device("cuda", local_rank)


def _rank_and_size(
    config: BackendConfig, environ: Mapping[str, str]
) -> tuple[int | None, int | None, int]:
    rank, size = config.rank, config.size
    env = read_rank_env(environ)
    if env is not None:
        rank = env.rank if rank is None else rank
        size = env.world_size if size is None else size
    if env is not None and env.rank == rank:
        local_rank = env.local_rank
    else:
        raw = environ.get("LOCAL_RANK", "").strip()
        local_rank = int(raw) if raw.isdigit() else (rank or 0)
    return rank, size, local_rank


def _on_existing_group(
    *,
    name: str,
    torch_backend: str,
    rank: int | None,
    size: int | None,
    local_rank: int,
    timeout: timedelta,
) -> Joined:
    import torch.distributed as dist

    drank, dsize = dist.get_rank(), dist.get_world_size()
    if (rank is not None and rank != drank) or (size is not None and size != dsize):
        raise ConfigurationError(
            f"backend {name!r}: torch.distributed is already initialised as rank {drank} of "
            f"{dsize}, but rank={rank} size={size} was asked for: leave rank/size unset (or "
            "RANK/WORLD_SIZE consistent) when building on an existing process group"
        )
    try:
        pg = dist.new_group(list(range(dsize)), timeout=timeout, backend=torch_backend)
    except (RuntimeError, ValueError) as err:
        raise RendezvousConnectionError(
            f"backend {name!r}: could not create a private {torch_backend} group on the existing "
            f"torch.distributed world ({err})"
        ) from err
    assert pg is not None
    return Joined(pg, drank, dsize, False, True, {}, local_rank)


def _address(method: str, scheme: str, environ: Mapping[str, str], name: str) -> tuple[str, int]:
    if scheme == "tcp":
        parts = urllib.parse.urlsplit(method)
        try:
            port = parts.port
        except ValueError:
            port = None
        if not parts.hostname or port is None:
            raise ConfigurationError(
                f"backend {name!r}: init_method={method!r} must look like tcp://HOST:PORT "
                "(rank 0's address and a free port)"
            )
        return parts.hostname, port
    addr = environ.get("MASTER_ADDR", "").strip()
    if not addr:
        raise ConfigurationError(
            f"MASTER_ADDR is not set: set it to rank 0's address, {LAUNCH_HINT} "
            f"(backend {name!r}, env:// rendezvous)"
        )
    raw = environ.get("MASTER_PORT", "").strip()
    if not raw:
        raise ConfigurationError(
            f"MASTER_PORT is not set: set it to a free TCP port on rank 0, {LAUNCH_HINT} "
            f"(backend {name!r}, env:// rendezvous)"
        )
    try:
        port = int(raw)
    except ValueError:
        port = -1
    if not 0 < port < 65536:
        raise ConfigurationError(f"MASTER_PORT={raw!r} is not a TCP port number (1..65535)")
    return addr, port


def _connect(
    addr: str,
    port: int,
    key: ClusterKey | None,
    address: Address,
    *,
    rank: int,
    deadline: float,
    timeout: float,
    world: str,
) -> StoreClient:
    """A connection to rank 0's store, retried until the deadline (rank 0 may start later) or
    until the rendezvous of ``world`` is cancelled (:func:`cancel`).

    A refused or unproven key (:class:`AuthenticationError`) is not retried: waiting cannot fix
    it.
    """
    pause = 0.02
    last: Exception | None = None
    while True:
        _check_cancelled(world, rank)
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            why = f" (last error: {last})" if last else ""
            raise RendezvousTimeoutError(
                f"rendezvous timed out after {timeout:g} s on rank {rank}: rank 0 never opened "
                f"MASTER_ADDR:MASTER_PORT={addr}:{port}{why}; is rank 0 running, and do all "
                "ranks use the same MASTER_ADDR/MASTER_PORT?"
            )
        try:
            return StoreClient(
                addr, port, key, connect_timeout_s=min(max(remaining, 0.1), 5.0), address=address
            )
        except RendezvousConnectionError as err:
            last = err
        time.sleep(min(pause, max(deadline - time.monotonic(), 0)))
        pause = min(pause * 2, 0.25)


def _gloo_interface(
    environ: Mapping[str, str], family: int, sockaddr: tuple[object, ...]
) -> str | None:
    """The interface gloo should listen on: the user's ``GLOO_SOCKET_IFNAME``, else the one this
    host routes MASTER_ADDR through (``lo`` for a loopback master).  None when it cannot be told
    (gloo then falls back to its default: the address the host name resolves to)."""
    chosen = environ.get(GLOO_IFNAME_ENV) or os.environ.get(GLOO_IFNAME_ENV)
    if chosen:
        return chosen
    try:
        with socket.socket(family, socket.SOCK_DGRAM) as probe:
            probe.connect(sockaddr)  # UDP: no packet is sent, the kernel just picks a route
            source = str(probe.getsockname()[0])
    except OSError as err:
        log.info("no route to MASTER_ADDR %s for gloo (%s); using gloo's default", sockaddr, err)
        return None
    name = _interface_of(source)
    if name is None:
        log.info("no interface holds %s; gloo uses its default address", source)
    return name


def _interface_of(address: str) -> str | None:
    """The name of the network interface that holds ``address`` (Linux), else None."""
    if ":" in address:
        try:
            with open("/proc/net/if_inet6", encoding="ascii") as f:
                rows = [line.split() for line in f]
        except OSError:
            return None
        packed = socket.inet_pton(socket.AF_INET6, address.split("%", maxsplit=1)[0]).hex()
        return next((row[5] for row in rows if len(row) >= 6 and row[0] == packed), None)
    siocgifaddr = 0x8915
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        for _, name in socket.if_nameindex():
            try:
                raw = fcntl.ioctl(
                    sock.fileno(), siocgifaddr, struct.pack("256s", name[:15].encode())
                )
            except OSError:
                continue  # an interface without an IPv4 address
            if socket.inet_ntoa(raw[20:24]) == address:
                return name
    return None


@contextlib.contextmanager
def _gloo_env(ifname: str | None) -> Iterator[None]:
    """``GLOO_SOCKET_IFNAME=ifname`` while gloo creates its device (torch reads it only then)."""
    if ifname is None:
        yield
        return
    with _GLOO_ENV_LOCK:
        before = os.environ.get(GLOO_IFNAME_ENV)
        os.environ[GLOO_IFNAME_ENV] = ifname
        try:
            yield
        finally:
            if before is None:
                os.environ.pop(GLOO_IFNAME_ENV, None)
            else:
                os.environ[GLOO_IFNAME_ENV] = before


def _my_host() -> str:
    try:
        return socket.gethostbyname(socket.gethostname())
    except OSError:
        return "127.0.0.1"


def _check_in(
    store: StoreClient,
    *,
    rank: int,
    size: int,
    deadline: float,
    timeout: float,
    addr: str,
    port: int,
    world: str,
) -> dict[int, str]:
    """Every rank announces itself; wait until all ``size`` have, naming any that never do.

    The store's server waits for the keys, in slices of ``_PROGRESS_EVERY_S``: after each slice
    that ends short of them, the ranks still missing are looked up for :func:`waiting_for`.
    """
    prefix = _checkin_prefix(world)
    keys = [f"{prefix}{r}" for r in range(size)]
    try:
        claims = store.add(f"{prefix}claims/{rank}", 1)
        if claims > 1:
            raise ConfigurationError(
                f"two processes claim rank {rank} at {addr}:{port}: give each one its own RANK"
            )
        store.set(keys[rank], _my_host().encode("utf-8"))
        missing = list(range(size))
        while True:
            _check_cancelled(world, rank)
            remaining = deadline - time.monotonic()
            try:
                store.wait(keys, max(min(_PROGRESS_EVERY_S, remaining), 0.0))
                break
            except RendezvousTimeoutError:
                pass
            # A rank that checked in stays checked in: only the missing ones are asked again,
            # but all of them at the deadline (or when none seemed missing: a key was deleted).
            past = time.monotonic() >= deadline
            asked = missing if missing and not past else range(size)
            missing = [r for r in asked if not store.check([keys[r]])]
            _set_waiting(world, missing)
            if past and missing:
                raise RendezvousTimeoutError(
                    f"rendezvous at {addr}:{port} timed out after {timeout:g} s on rank {rank}: "
                    f"rank(s) {', '.join(map(str, missing))} of {size} never arrived; start them "
                    "with the same MASTER_ADDR/MASTER_PORT/WORLD_SIZE, or raise the timeout "
                    "(COMFY_CLUSTER_TIMEOUT)"
                )
        hosts = {}
        for r in range(size):
            hosts[r] = store.get(keys[r]).decode("utf-8", "replace")
        return hosts
    except BaseException:
        store.close()
        raise


def _init(
    dist: Any,
    *,
    name: str,
    torch_backend: str,
    timeout: timedelta,
    rank: int,
    size: int,
    extra: dict[str, Any],
    **where: Any,
) -> None:
    try:
        dist.init_process_group(
            backend=torch_backend, rank=rank, world_size=size, timeout=timeout, **where, **extra
        )
    except RuntimeError as err:
        text = str(err).splitlines()[0] if str(err) else type(err).__name__
        if "timed out" in text.lower() or "timeout" in text.lower():
            raise RendezvousTimeoutError(
                f"backend {name!r}: torch.distributed rendezvous timed out on rank {rank}: {text}"
            ) from None
        raise RendezvousConnectionError(
            f"backend {name!r}: torch.distributed could not connect rank {rank}: {text}"
        ) from None


__all__ = ["Joined", "cancel", "join", "uses_gloo", "waiting_for"]
