"""This ComfyUI instance's place in the cluster: join in the background, re-form after failures.

A *world* is one communicator over every rank; worlds are numbered by epoch.  Epoch 0 forms at
start-up.  When a collective fails for good (a rank died, a timeout, an interrupt), the leader
announces epoch N+1 (a ``rejoin`` control message) and every rank joins world N+1; a rank that
restarts asks the leader for the current epoch first (``epoch``).  So a dead follower fails the
prompt it was part of, and once restarted it simply joins the next world.  Prompts wait (up to
the join timeout) for a world to be complete, and say which ranks are missing.

The rank's state and its moves are one table (comfy_nodes.server.states).  Every message between
ranks travels sealed over the control carrier (comfy_nodes.server.peers), independent of any
world, and names its sender; who may send what is one table in comfy_nodes.server.messages.

A world that is left is aborted at once (under the lock that leaves it, so no join can meet its
torch group still registered) and closed in the background, so a failed prompt's communicator
and its pending transfers are freed.  One join runs at a time in a process: from
``collectives.init`` until its world is installed or discarded.  A follower whose join fails
tells the leader, which then announces the next world.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from comfy_nodes import cluster
from comfy_nodes.server.carrier import Address, ControlUnreachableError
from comfy_nodes.server.peers import ControlRefusedError, Peers
from comfy_nodes.server.settings import Settings
from comfy_nodes.server.states import Event, State, next_state

if TYPE_CHECKING:
    from collectives import Communicator

log = logging.getLogger("comfy_cluster")


class ClusterNotReadyError(RuntimeError):
    """The cluster did not form within the join timeout; the message names the missing ranks."""


class Membership:
    def __init__(
        self,
        settings: Settings,
        my_url: str,
        peers: Peers | None = None,
        my_control: Address | None = None,
    ) -> None:
        """``peers``: this rank's control requests (install() passes the one its carrier
        serves); by default one knowing only the leader's endpoint from the settings, with no
        carrier.  ``my_control``: this rank's control endpoint, shared when a world forms."""
        self.settings = settings
        self.my_url = my_url
        self.my_control = my_control
        if peers is None:
            fingerprint = settings.key.fingerprint() if settings.key is not None else None
            book = {0: settings.leader_control} if settings.leader_control is not None else {}
            peers = Peers(settings.rank, book, fingerprint=fingerprint)
        self.peers = peers
        self.epoch = -1
        self.urls: dict[int, str] = {}
        self.state: str = State.IDLE
        self.last_error = ""
        self._comm: Communicator | None = None
        self._cond = threading.Condition()
        # One join at a time: held from collectives.init until that world is installed or
        # discarded, so a superseded join's torch group is gone before the next join looks.
        self._join_lock = threading.Lock()
        self._joining: Communicator | None = None  # the world being joined (allgather of urls)
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
                "control": {r: f"{h}:{p}" for r, (h, p) in self.peers.others().items()},
                # Public: lets an operator see that two ranks hold the same key, never the key.
                "key_fingerprint": self.peers.fingerprint,
            }

    def is_current(self, comm: Communicator) -> bool:
        """Whether ``comm`` is the communicator of the world this rank is in now."""
        with self._cond:
            return self._comm is comm

    def fail(
        self, reason: str, *, comm: Communicator | None = None, epoch: int | None = None
    ) -> None:
        """The current world is broken.  The leader starts the next one; a follower asks it to.

        ``comm``: the communicator the failure happened on.  A failure of an earlier world (a
        node of a failed prompt still finishing its collective on the old communicator) says
        nothing about the current one and is only logged.  ``epoch``: the world a peer's report
        is about (compared under the lock); a report for another world is ignored, and one for
        the world the leader is joining (a follower could not join it) starts the next world.
        """
        with self._cond:
            if comm is not None and comm is not self._comm:
                log.info("a failure of an earlier world, ignored: %s", reason)
                return
            if epoch is not None and epoch != self.epoch:
                log.info("a failure of world %d (this rank is at %d), ignored", epoch, self.epoch)
                return
            comm, current = self._comm, self.epoch
            if comm is None and self.state != State.READY:
                # Already re-forming; unless a follower reports that it could not join the world
                # the leader is joining: nobody else would end that one, so the leader does.
                if epoch is None or self.state != State.JOINING or not self.settings.is_leader:
                    return
            else:
                self._leave_world(reason)
                self._move(Event.FAIL)
                self.last_error = reason
        log.warning("cluster world %d failed: %s", current, reason)
        if comm is not None:
            _discard(comm)
        if self.settings.is_leader:
            self.rejoin(current + 1, reason)
        else:
            self.peers.send_async(0, "failed", {"epoch": current, "reason": reason})

    def abort_everywhere(
        self, reason: str, comm: Communicator | None = None, *, epoch: int | None = None
    ) -> None:
        """Abort this world on every rank: the leader tells each follower, a follower the leader.

        ``comm``: the communicator the request came from; if the cluster has formed a new world
        since (a node of the interrupted prompt still polling), only that old one is aborted.
        ``epoch``: the world a peer's abort is about; nothing happens unless it is this rank's
        current world (compared under the lock).
        """
        if comm is not None and not self.is_current(comm):
            comm.abort(reason)
            return
        s = self.settings
        with self._cond:
            if self.state != State.READY or (epoch is not None and epoch != self.epoch):
                return  # already failed and re-forming (the others know), or another world
            current = self.epoch
        body = {"epoch": current, "reason": reason}
        for rank in self.peers.others() if s.is_leader else [0]:
            self.peers.send_async(rank, "abort", body)
        self.fail(reason, epoch=current)

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
        """The leader's current epoch (one control request), or None if it does not say."""
        if self.settings.is_leader or self.peers.address(0) is None:
            return None
        try:
            epoch = self.peers.request(0, "epoch", {}, timeout).get("epoch")
        except (ControlUnreachableError, ControlRefusedError) as err:
            log.info("asking the leader for its epoch: %s", err)
            return None
        return epoch if type(epoch) is int else None

    def _move(self, event: Event) -> None:
        """Take ``event`` (caller holds ``_cond``): the state the transition table says."""
        self.state = next_state(self.state, event)

    def _leave_world(self, reason: str) -> Communicator | None:
        """Drop the current world and abort its communicator (caller holds ``_cond``); the
        communicator, for closing (:func:`_discard`).

        Aborted here, under the lock, so that its torch group is deregistered before anyone can
        start the next join.  The prompt running on it (if any) fails there; its failure must
        not be reported as one of the next world.  (A follower hears "abort this world" and
        "join the next" in either order, so both ``fail`` and ``rejoin`` leave through here.)
        """
        old, self._comm = self._comm, None
        rt = cluster.runtime()
        rt.set_comm(None)
        rt.current_prompt = None
        if old is not None:
            rt.forget(old)
            old.abort(reason)
        return old

    def rejoin(self, epoch: int, reason: str = "") -> None:
        """Leave the current world (if any) and join world ``epoch``."""
        with self._cond:
            if epoch <= self.epoch and self.state in (State.JOINING, State.READY):
                return  # that world (or a newer one) is forming already
            why = reason or f"moving to cluster epoch {epoch}"
            old = self._leave_world(why)
            if self._joining is not None:  # a join of an older world, past init: end it now
                self._joining.abort(f"superseded by cluster epoch {epoch}")
            # A join of an older world still in its rendezvous (waiting for a rank that may never
            # come) would hold the join lock until its timeout: make it give up now.
            superseded = self.epoch if self.state == State.JOINING else None
            self.epoch = epoch
            self._move(Event.JOIN)
        if superseded is not None:
            from collectives import cancel_init

            cancel_init(world_name(superseded))
        if old is not None:
            _discard(old)
        if self.settings.is_leader:
            for rank in self.peers.others():
                self.peers.send_async(rank, "rejoin", {"epoch": epoch, "reason": reason})
        threading.Thread(target=self._join, args=(epoch,), name="cluster-join", daemon=True).start()

    # -- joining ---------------------------------------------------------------------------------
    def _first_join(self) -> None:
        epoch = 0
        if not self.settings.is_leader and self.peers.address(0) is not None:
            # A restarted follower joins the world the others are in (or about to form).
            epoch = max(0, self._current_epoch(self.settings.join_timeout))
        self.rejoin(epoch)

    def _join(self, epoch: int) -> None:
        s = self.settings
        with self._join_lock:
            with self._cond:
                if self.epoch != epoch:
                    return  # superseded before it began: no world to form
            comm: Communicator | None = None
            try:
                comm = self._init_world(epoch)
                with self._cond:
                    if self.epoch != epoch:
                        raise _Superseded(f"cluster epoch {self.epoch} was announced")
                    self._joining = comm  # a newer announcement aborts it (rejoin)
                mine = [self.my_url, *(self.my_control or ("", 0))]
                shared = comm.allgather(mine, timeout=s.op_timeout)
            except Exception as err:  # joining failed (or was superseded): say why
                with self._cond:
                    self._joining = None
                error = f"joining world {epoch} failed: {type(err).__name__}: {err}"
                if comm is not None:
                    _abandon(comm, error)  # torch's group must not outlive this join
            else:
                error = ""
                with self._cond:
                    self._joining = None
                    installed = self.epoch == epoch  # else a newer world was announced meanwhile
                    if installed:
                        self._comm = comm
                        self._installed(shared)
                        self._move(Event.JOINED)
                        self.last_error = ""
                        cluster.runtime().set_comm(comm)
                        self._cond.notify_all()
                if not installed:
                    _abandon(comm, "superseded")
                    return
        if error or comm is None:
            self._join_failed(epoch, error)
            return
        log.info("cluster world %d ready: rank %d of %d (%s)", epoch, s.rank, s.size, comm.backend)
        for callback in self._on_ready:
            callback(comm, epoch)

    def _init_world(self, epoch: int) -> Communicator:
        """This rank's communicator of world ``epoch`` (waits for every rank to check in)."""
        import collectives
        from collectives.options import CommOptions

        s = self.settings
        comm = collectives.init(
            s.backend,
            rank=s.rank,
            size=s.size,
            world=world_name(epoch),
            # Rendezvous waits for late ranks as long as a follower may take to start.
            timeout=max(s.join_timeout, 3600.0),
        )
        # Never pickling: cluster.set_comm makes sure of it once the world is installed (the
        # allgather of URLs before that sends strings only).
        comm.options = CommOptions(timeout=s.op_timeout, codec=comm.options.codec)
        return comm

    def _join_failed(self, epoch: int, error: str) -> None:
        """Joining world ``epoch`` failed: the leader starts the next world, a follower tells the
        leader (which then does).  Nothing, if a newer world was announced meanwhile."""
        s = self.settings
        with self._cond:
            if self.epoch != epoch:
                return
            self._move(Event.JOIN_FAILED)
            self.last_error = error
            self._cond.notify_all()
        log.error("%s", error)
        if s.is_leader:
            time.sleep(1.0)
            self.rejoin(epoch + 1, error)
        else:
            self.peers.send_async(0, "failed", {"epoch": epoch, "reason": error})

    def _installed(self, shared: list[Any]) -> None:
        """What every rank shared when the world formed: its URL and control endpoint."""
        self.urls = {}
        for rank, item in enumerate(shared):
            url, host, port = item
            self.urls[rank] = str(url)
            if host and type(port) is int and 0 < port < 65536:
                self.peers.learn(rank, (str(host), port))

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
        missing = _missing_ranks(world_name(self.epoch))
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


def world_name(epoch: int) -> str:
    """The name of the cluster's world ``epoch`` (in every message envelope and store key)."""
    return f"comfy-cluster-e{epoch}"


def _missing_ranks(world: str) -> list[int]:
    try:
        from collectives.backends.torch_rendezvous import waiting_for
    except ImportError:
        return []
    return waiting_for(world)


class _Superseded(Exception):
    """A newer world was announced while this rank was joining."""


def _abandon(comm: Communicator, reason: str) -> None:
    """Abort ``comm`` now (its torch group is deregistered, its pending ops fail with
    ``reason``) and close it in the background."""
    comm.abort(reason)
    _discard(comm)


def _discard(comm: Communicator) -> None:
    """Close an aborted ``comm`` in the background, releasing its backend and whatever transfers
    were still queued on it."""

    def close() -> None:
        try:
            comm.close()
        except Exception as err:  # a broken world may fail to close cleanly; it is gone anyway
            log.debug("closing an old world: %s: %s", type(err).__name__, err)

    threading.Thread(target=close, name="cluster-close", daemon=True).start()
