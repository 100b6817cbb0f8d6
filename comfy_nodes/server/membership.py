"""This ComfyUI instance's place in the cluster: join in the background, re-form after failures.

A *world* is one communicator over every rank; worlds are numbered by epoch.  Epoch 0 forms at
start-up.  When a collective fails for good (a rank died, a timeout, an interrupt), the leader
announces epoch N+1 over HTTP (``/cluster/rejoin``) and every rank joins world N+1; a rank that
restarts asks the leader for the current epoch first (``/cluster/epoch``).  So a dead follower
fails the prompt it was part of, and once restarted it simply joins the next world.  Prompts
wait (up to the join timeout) for a world to be complete, and say which ranks are missing.
"""

from __future__ import annotations

import json
import logging
import threading
import time
import urllib.request
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from comfy_nodes import cluster
from comfy_nodes.server.settings import Settings

if TYPE_CHECKING:
    from collectives import Communicator

log = logging.getLogger("comfy_cluster")


class ClusterNotReadyError(RuntimeError):
    """The cluster did not form within the join timeout; the message names the missing ranks."""


class Membership:
    def __init__(self, settings: Settings, my_url: str) -> None:
        self.settings = settings
        self.my_url = my_url
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
            comm.abort(reason)
        if self.settings.is_leader:
            self.rejoin(epoch + 1, reason)
        elif self.settings.leader_url:
            _post_async(
                f"{self.settings.leader_url}/cluster/failed", {"epoch": epoch, "reason": reason}
            )

    def _leave_world(self) -> Communicator | None:
        """Drop the current world (caller holds ``_cond``); its communicator, for aborting.

        The prompt running on it (if any) fails there; its failure must not be reported as one
        of the next world.  (A follower hears "abort this world" and "join the next" in either
        order, so both ``fail`` and ``rejoin`` leave through here.)
        """
        old, self._comm = self._comm, None
        cluster.set_comm(None)
        cluster.current_prompt = None
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
            old.abort(reason or f"moving to cluster epoch {epoch}")
        if self.settings.is_leader:
            for rank, url in sorted(self.urls.items()):
                if rank != 0:
                    _post_async(f"{url}/cluster/rejoin", {"epoch": epoch, "reason": reason})
        threading.Thread(target=self._join, args=(epoch,), name="cluster-join", daemon=True).start()

    # -- joining ---------------------------------------------------------------------------------
    def _first_join(self) -> None:
        epoch = 0
        if not self.settings.is_leader and self.settings.leader_url:
            # A restarted follower joins the world the others are in (or about to form).
            epoch = max(0, _current_epoch(self.settings.leader_url, self.settings.join_timeout))
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
                comm.abort("superseded")
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


def _current_epoch(leader_url: str, timeout: float) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"{leader_url}/cluster/epoch", timeout=2) as resp:
                return int(json.load(resp)["epoch"])
        except (OSError, ValueError, KeyError):
            time.sleep(0.5)
    return 0


def _post_async(url: str, body: dict[str, Any]) -> None:
    def send() -> None:
        data = json.dumps(body).encode()
        req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
        for _ in range(20):
            try:
                with urllib.request.urlopen(req, timeout=5):
                    return
            except OSError:
                time.sleep(0.5)
        log.warning("could not reach %s", url)

    threading.Thread(target=send, name="cluster-notify", daemon=True).start()
