"""This ComfyUI instance's place in the cluster: join in the background, re-form after failures.

A *world* is one communicator over every rank; worlds are numbered by epoch.  Epoch 0 forms at
start-up.  When a collective fails for good (a rank died, a timeout, an interrupt), the leader
announces epoch N+1 over HTTP (``/cluster/rejoin``) and every rank joins world N+1; a rank that
restarts asks the leader for the current epoch first (``/cluster/epoch``).  So a dead follower
fails the prompt it was part of, and once restarted it simply joins the next world.  Prompts
wait (up to the join timeout) for a world to be complete, and say which ranks are missing.

Every message between ranks is signed (comfy_nodes.server.peers) and names its sender; who may
send what is one table in comfy_nodes.server.routes.  A world that is left is aborted and closed,
so a failed prompt's communicator and its pending transfers are freed.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from comfy_nodes import cluster
from comfy_nodes.server.peers import PeerAuth, PeerClient
from comfy_nodes.server.settings import Settings

if TYPE_CHECKING:
    from collectives import Communicator

log = logging.getLogger("comfy_cluster")


class ClusterNotReadyError(RuntimeError):
    """The cluster did not form within the join timeout; the message names the missing ranks."""


class Membership:
    def __init__(self, settings: Settings, my_url: str, client: PeerClient | None = None) -> None:
        self.settings = settings
        self.my_url = my_url
        self.client = client or PeerClient(PeerAuth(settings.key), settings.rank)
        self.epoch = -1
        self.urls: dict[int, str] = {}
        self.state = "idle"
        self.last_error = ""
        self._comm: Communicator | None = None
        self._cond = threading.Condition()
        self._on_ready: list[Callable[[Communicator, int], None]] = []

    # -- public ----------------------------------------------------------------------------------
    def on_ready(self, callback: Callable[[Communicator, int], None]) -> None:
        """Called (in the joining thread) each time a world forms."""
        self._on_ready.append(callback)

    def start(self) -> None:
        threading.Thread(target=self._first_join, name="cluster-join", daemon=True).start()

    def wait_ready(self, timeout: float | None = None) -> Communicator:
        deadline = time.monotonic() + (self.settings.join_timeout if timeout is None else timeout)
        with self._cond:
            while self._comm is None:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise ClusterNotReadyError(self._not_ready_text())
                self._cond.wait(remaining)
            return self._comm

    def status(self) -> dict[str, Any]:
        with self._cond:
            comm = self._comm
            return {
                "rank": self.settings.rank,
                "size": self.settings.size,
                "epoch": self.epoch,
                "state": self.state,
                "backend": comm.backend if comm is not None else None,
                "peers": comm.peers() if comm is not None else {},
                "last_error": self.last_error,
                "urls": self.urls,
                # Public: lets an operator see that two ranks hold the same key, never the key.
                "key_fingerprint": self.client.auth.fingerprint,
            }

    def is_current(self, comm: Communicator) -> bool:
        """Whether ``comm`` is the communicator of the world this rank is in now."""
        with self._cond:
            return self._comm is comm

    def fail(self, reason: str, *, comm: Communicator | None = None) -> None:
        """The current world is broken.  The leader starts the next one; a follower asks it to.

        ``comm``: the communicator the failure happened on.  A failure of an earlier world (a
        node of a failed prompt still finishing its collective on the old communicator) says
        nothing about the current one and is only logged.
        """
        with self._cond:
            if comm is not None and comm is not self._comm:
                log.info("a failure of an earlier world, ignored: %s", reason)
                return
            comm, epoch = self._comm, self.epoch
            if comm is None and self.state != "ready":
                return  # already re-forming
            self._leave_world()
            self.state = "failed"
            self.last_error = reason
        log.warning("cluster world %d failed: %s", epoch, reason)
        if comm is not None:
            _discard(comm, reason)
        if self.settings.is_leader:
            self.rejoin(epoch + 1, reason)
        elif self.settings.leader_url:
            self.client.post_async(
                self.settings.leader_url, "/cluster/failed", {"epoch": epoch, "reason": reason}
            )

    def abort_everywhere(self, reason: str, comm: Communicator | None = None) -> None:
        """Abort this world on every rank: the leader tells each follower, a follower the leader.

        ``comm``: the communicator the request came from; if the cluster has formed a new world
        since (a node of the interrupted prompt still polling), only that old one is aborted.
        """
        if comm is not None and not self.is_current(comm):
            comm.abort(reason)
            return
        if self.state != "ready":
            return  # already failed and re-forming: the others know
        s = self.settings
        body = {"epoch": self.epoch, "reason": reason}
        if s.is_leader:
            for rank, url in sorted(self.urls.items()):
                if rank != s.rank:
                    self.client.post_async(url, "/cluster/abort", body)
        elif s.leader_url:
            self.client.post_async(s.leader_url, "/cluster/abort", body)
        self.fail(reason)

    def announced(self, epoch: int, reason: str) -> tuple[bool, str]:
        """A follower heard the leader announce world ``epoch``: join it if it is the leader's
        next world.  Returns (accepted or harmlessly stale, why).

        The next world is this rank's epoch + 1.  A larger number is believed only if the leader
        itself says it is its current epoch (this rank missed announcements while unreachable);
        anything else would strand this rank in a world nobody else joins.
        """
        with self._cond:
            current = self.epoch
        if epoch <= current:
            return True, f"rank {self.settings.rank} is at epoch {current} already"
        if epoch != current + 1 and self.leader_epoch() != epoch:
            return False, (
                f"rank {self.settings.rank} is at epoch {current}: the leader's next world is "
                f"{current + 1}, not {epoch}"
            )
        self.rejoin(epoch, reason)
        return True, f"joining world {epoch}"

    def leader_epoch(self, timeout: float = 3.0) -> int | None:
        """The leader's current epoch (one signed request), or None if it does not say."""
        url = self.settings.leader_url
        if url is None:
            return None
        try:
            epoch = self.client.get_json(url, "/cluster/epoch", timeout)["epoch"]
        except (OSError, ValueError, KeyError, TypeError):
            return None
        return epoch if type(epoch) is int else None

    def _leave_world(self) -> Communicator | None:
        """Drop the current world (caller holds ``_cond``); its communicator, for aborting.

        The prompt running on it (if any) fails there; its failure must not be reported as one
        of the next world.  (A follower hears "abort this world" and "join the next" in either
        order, so both ``fail`` and ``rejoin`` leave through here.)
        """
        old, self._comm = self._comm, None
        cluster.set_comm(None)
        cluster.current_prompt = None
        if old is not None:
            cluster.forget(old)
        return old

    def rejoin(self, epoch: int, reason: str = "") -> None:
        """Leave the current world (if any) and join world ``epoch``."""
        with self._cond:
            if epoch <= self.epoch and self.state in ("joining", "ready"):
                return  # that world (or a newer one) is forming already
            old = self._leave_world()
            self.epoch = epoch
            self.state = "joining"
        if old is not None:
            _discard(old, reason or f"moving to cluster epoch {epoch}")
        if self.settings.is_leader:
            for rank, url in sorted(self.urls.items()):
                if rank != self.settings.rank:
                    self.client.post_async(
                        url, "/cluster/rejoin", {"epoch": epoch, "reason": reason}
                    )
        threading.Thread(target=self._join, args=(epoch,), name="cluster-join", daemon=True).start()

    # -- joining ---------------------------------------------------------------------------------
    def _first_join(self) -> None:
        epoch = 0
        if not self.settings.is_leader and self.settings.leader_url:
            # A restarted follower joins the world the others are in (or about to form).
            epoch = max(0, self._current_epoch(self.settings.join_timeout))
        self.rejoin(epoch)

    def _join(self, epoch: int) -> None:
        import collectives
        from collectives.options import CommOptions

        s = self.settings
        try:
            comm = collectives.init(
                s.backend,
                rank=s.rank,
                size=s.size,
                world=f"comfy-cluster-e{epoch}",
                # Rendezvous waits for late ranks as long as a follower may take to start.
                timeout=max(s.join_timeout, 3600.0),
            )
            comm.options = CommOptions(timeout=s.op_timeout, codec=comm.options.codec)
            cluster.without_pickle(comm)
            urls = comm.allgather(self.my_url, timeout=s.op_timeout)
        except Exception as err:  # joining failed: say why, and keep trying on the leader
            with self._cond:
                if self.epoch != epoch:
                    return
                self.state = "failed"
                self.last_error = f"joining world {epoch} failed: {type(err).__name__}: {err}"
                self._cond.notify_all()
            log.error("%s", self.last_error)
            if s.is_leader:
                time.sleep(1.0)
                self.rejoin(epoch + 1, self.last_error)
            return
        with self._cond:
            if self.epoch != epoch:  # a newer world was announced while we were joining
                _discard(comm, "superseded")
                return
            self._comm = comm
            self.urls = dict(enumerate(urls))
            self.state = "ready"
            self.last_error = ""
            cluster.set_comm(comm)
            self._cond.notify_all()
        log.info("cluster world %d ready: rank %d of %d (%s)", epoch, s.rank, s.size, comm.backend)
        for callback in self._on_ready:
            callback(comm, epoch)

    def _current_epoch(self, timeout: float) -> int:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            epoch = self.leader_epoch(timeout=2.0)
            if epoch is not None:
                return epoch
            time.sleep(0.5)
        return 0

    def _not_ready_text(self) -> str:
        s = self.settings
        missing = _missing_ranks(f"comfy-cluster-e{self.epoch}")
        who = (
            f"rank(s) {', '.join(map(str, missing))} have not joined"
            if missing
            else "not every rank has joined"
        )
        extra = f" (last error: {self.last_error})" if self.last_error else ""
        return (
            f"the cluster (world {self.epoch}, {s.size} ranks) is not ready after "
            f"{s.join_timeout:g} s: {who}{extra}; start the missing ComfyUI instances, or raise "
            "COMFY_CLUSTER_JOIN_TIMEOUT"
        )


def _missing_ranks(world: str) -> list[int]:
    try:
        from collectives.backends.torch_rendezvous import waiting_for
    except ImportError:
        return []
    return waiting_for(world)


def _discard(comm: Communicator, reason: str) -> None:
    """Abort ``comm`` now (its pending ops fail with ``reason``) and close it in the background,
    releasing its backend and whatever transfers were still queued on it."""
    comm.abort(reason)

    def close() -> None:
        try:
            comm.close()
        except Exception as err:  # a broken world may fail to close cleanly; it is gone anyway
            log.debug("closing an old world: %s: %s", type(err).__name__, err)

    threading.Thread(target=close, name="cluster-close", daemon=True).start()
