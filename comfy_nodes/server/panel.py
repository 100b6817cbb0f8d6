"""The cluster panel's server side: rank reports, the leader's live view, and cluster-wide controls.

Every rank runs one *panel thread* (started with ComfyUI's server):

* a follower sends the leader its report every ``COMFY_CLUSTER_HEARTBEAT_S`` (a ``heartbeat``
  control message, sealed like every message between ranks: comfy_nodes.server.messages);
* the leader files its own report and the followers' in a :class:`~.health.Health` table, which
  turns silent followers unreachable and then lost (``COMFY_CLUSTER_HEARTBEAT_TIMEOUT_S``);
* each rank pushes its view to its own browsers over ComfyUI's websocket
  (``PromptServer.send_sync``): ``cluster.status`` (the whole snapshot, every beat) and
  ``cluster.transition`` (a rank changed state: the browser shows a toast).  Browsers poll nothing.

A follower the leader finds lost (or restarted: a report from a new process) also ends the
leader's current world: that world cannot run another prompt, and a restarted follower can only
join the next one.  Controls (browser routes on the leader): interrupt every rank, free memory on
every rank; the leader forwards them to each follower as a ``command`` control message.
"""

from __future__ import annotations

import logging
import os
import threading
import time
import uuid
from typing import TYPE_CHECKING, Any

from comfy_nodes import cluster
from comfy_nodes.cluster_info import path_text, peer_paths
from comfy_nodes.partition import WEIGHTS_ENV
from comfy_nodes.server.carrier import ControlUnreachableError
from comfy_nodes.server.health import Health, Transition
from comfy_nodes.server.messages import Message, Refused
from comfy_nodes.server.peers import ControlRefusedError

if TYPE_CHECKING:
    from comfy_nodes.server.membership import Membership

log = logging.getLogger("comfy_cluster")

STATUS_EVENT = "cluster.status"
TRANSITION_EVENT = "cluster.transition"
COMMANDS = ("interrupt", "free")
COMMAND_TIMEOUT_S = 5.0
"""How long the leader waits for a follower to take a control (it acts at once: a late answer
means a rank in trouble, which the user should hear about)."""
_PROGRESS_ENDS = ("execution_success", "execution_error", "execution_interrupted")


class Progress:
    """The prompt this rank runs and its latest progress, seen on ComfyUI's own events."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.current: dict[str, Any] | None = None

    def observe(self, event: str, data: Any) -> None:
        if not isinstance(data, dict):
            return
        with self._lock:
            if event == "execution_start":
                self.current = {"prompt_id": data.get("prompt_id"), "node": None, "value": 0,
                                "max": 0}  # fmt: skip
            elif (event == "executing" and data.get("node") is None) or event in _PROGRESS_ENDS:
                self.current = None
            elif event == "executing" and self.current is not None:
                self.current.update(node=data.get("node"), value=0, max=0)
            elif event == "progress":
                self.current = {"prompt_id": data.get("prompt_id"), "node": data.get("node"),
                                "value": data.get("value"), "max": data.get("max")}  # fmt: skip

    def snapshot(self) -> dict[str, Any] | None:
        with self._lock:
            return dict(self.current) if self.current is not None else None


class Rates:
    """Bytes per second in and out, from the backend's counters between two reports."""

    def __init__(self) -> None:
        self._last: tuple[float, int, int] | None = None

    def sample(self, stats: dict[str, Any], now: float) -> dict[str, float] | None:
        b_in, b_out = stats.get("bytes_in"), stats.get("bytes_out")
        if not isinstance(b_in, int) or not isinstance(b_out, int):
            self._last = None
            return None  # a backend without counters (local, mpi): no rate to show
        last, self._last = self._last, (now, b_in, b_out)
        if last is None or now <= last[0] or b_in < last[1] or b_out < last[2]:
            return {"in": 0.0, "out": 0.0}  # the first sample, or a new world's fresh counters
        dt = now - last[0]
        return {"in": (b_in - last[1]) / dt, "out": (b_out - last[2]) / dt}


def _path(backend: str | None, mode: Any, peer: dict[str, Any] | None = None) -> str | None:
    """How data travels to one peer, as far as the backend says: ``udp punched
    203.0.113.7:51820 (stun)``, ``udp relayed via 198.51.100.1:3478 (stun)``, ``udp direct
    10.0.0.2:40000 (static)``; ``udp (<mode>)`` without a peer's path (this rank's own row)."""
    if backend is None:
        return None
    if backend != "udp":
        return backend
    route = path_text(peer)
    text = f"udp {route}" if route else "udp"
    return f"{text} ({mode})" if isinstance(mode, str) else text


def _device_memory() -> tuple[str | None, int | None, int | None]:
    try:
        import comfy.model_management as mm  # type: ignore[import-not-found,unused-ignore]

        dev = mm.get_torch_device()
        return str(dev), int(mm.get_free_memory(dev)), int(mm.get_total_memory(dev))
    except Exception as err:  # no ComfyUI (tests), or a device that cannot say
        log.debug("device memory: %s: %s", type(err).__name__, err)
        return None, None, None


def first_beat_s(rank: int, size: int, period_s: float) -> float:
    """When rank ``rank`` beats first: ``rank/size`` into the period (the leader after a whole
    one), so that ranks started together keep beating apart."""
    return period_s * rank / size if 0 < rank < size else period_s


class Panel:
    """One rank's panel: its reports, and on the leader the whole cluster's health."""

    def __init__(self, server: Any, membership: Membership, clock: Any = time.monotonic) -> None:
        self.server = server
        self.membership = membership
        self.settings = s = membership.settings
        self.clock = clock
        self.boot = uuid.uuid4().hex  # tells the leader this process from a restarted one
        self.progress = Progress()
        self._rates = Rates()
        self._lock = threading.Lock()
        self.health = Health(s.size, s.heartbeat_s, s.heartbeat_timeout_s, clock())
        self.leader_error = ""  # a follower: why its last report did not reach the leader
        # Controls handled on this rank, in its report: the free-memory flags are consumed by
        # ComfyUI's prompt worker within a moment, so without these nobody (the leader's panel,
        # an operator, a test) could tell that a follower ever received a command.
        self.commands = dict.fromkeys(COMMANDS, 0)
        # This rank's path to each peer, from its last report: the leader's rows show its own
        # view of each follower's path, which a follower's report cannot give.
        self._paths: dict[int, dict[str, Any]] = {}
        self._mode: Any = None  # the backend's mode (udp: its discovery), from the last report
        self._stop = threading.Event()

    # -- this rank's report ----------------------------------------------------------------------
    def report(self) -> dict[str, Any]:
        m, now = self.membership, self.clock()
        status = m.status()
        comm = cluster.runtime().peek()
        stats: dict[str, Any] = {}
        paths: dict[int, dict[str, Any]] = {}
        if comm is not None:
            try:
                stats = comm.stats()
            except Exception as err:  # a world being torn down may refuse; the report goes on
                log.debug("comm.stats(): %s: %s", type(err).__name__, err)
            paths = peer_paths(comm)
        with self._lock:
            self._paths, self._mode = paths, stats.get("mode")
        # A follower's own row: its path to the leader (the leader's row: its backend's mode).
        towards = None if self.settings.is_leader else paths.get(0)
        device, free, total = _device_memory()
        queue = self._queue_length()
        if status["state"] != "ready":
            activity = "starting"
        elif queue or cluster.runtime().current_prompt is not None:
            activity = "executing"
        else:
            activity = "idle"
        return {
            "rank": self.settings.rank,
            "boot": self.boot,
            "url": m.my_url,
            "epoch": status["epoch"],
            "membership": status["state"],
            "activity": activity,
            "backend": status["backend"],
            "path": _path(status["backend"], stats.get("mode"), towards),
            "peers": {str(k): v for k, v in status["peers"].items()},
            "device": device,
            "mem_free": free,
            "mem_total": total,
            "queue": queue,
            # A follower's executor reports no prompt end (it has no client): idle means done.
            "progress": self.progress.snapshot() if activity == "executing" else None,
            "rates": self._rates.sample(stats, now),
            "commands": self._commands(),
            "last_error": status["last_error"],
        }

    def _commands(self) -> dict[str, int]:
        with self._lock:
            return dict(self.commands)

    def _queue_length(self) -> int:
        queue = getattr(self.server, "prompt_queue", None)
        try:
            return int(queue.get_tasks_remaining()) if queue is not None else 0
        except Exception:  # ComfyUI's queue changed shape: show nothing rather than break
            return 0

    # -- the view a browser gets -----------------------------------------------------------------
    def snapshot(self) -> dict[str, Any]:
        s, now = self.settings, self.clock()
        mine = self.report()
        with self._lock:
            self.health.report(s.rank, mine, now)
            rows = self.health.rows(now)
            paths, mode = self._paths, self._mode
        links: dict[str, str] = mine["peers"]
        for row in rows:
            row["link"] = "self" if row["rank"] == s.rank else links.get(str(row["rank"]))
            if s.is_leader and row["rank"] in paths:  # the leader's view of the path to it
                row["path"] = _path(mine["backend"], mode, paths[row["rank"]])
        if not s.is_leader:
            rows = [row for row in rows if row["rank"] == s.rank]
        return {
            "rank": s.rank,
            "size": s.size,
            "is_leader": s.is_leader,
            "leader_url": s.leader_url,
            "epoch": mine["epoch"],
            "state": mine["membership"],
            "heartbeat_s": s.heartbeat_s,
            "heartbeat_timeout_s": s.heartbeat_timeout_s,
            "weights_env": os.environ.get(WEIGHTS_ENV, ""),
            "leader_error": self.leader_error,
            "rows": rows,
        }

    # -- the routes ------------------------------------------------------------------------------
    def heartbeat(self, msg: Message) -> dict[str, Any]:
        """Leader: a follower's report arrived (authentic, from a follower: routes checked)."""
        status = (msg.extra or {}).get("status")
        if not isinstance(status, dict):
            raise Refused("heartbeat: 'status' must be a JSON object")
        with self._lock:
            changes = self.health.report(msg.rank, status, self.clock())
        self._after(changes)
        return {"ok": True, "epoch": self.membership.epoch}

    def command(self, msg: Message) -> dict[str, Any]:
        """Follower: the leader asks for a cluster-wide action on this rank."""
        action = (msg.extra or {}).get("action")
        if action not in COMMANDS:
            raise Refused(f"command: 'action' must be one of {list(COMMANDS)}")
        return {"ok": True, "done": self.run_locally(str(action))}

    def run_locally(self, action: str) -> str:
        done = self._run_locally(action)
        with self._lock:
            self.commands[action] += 1
        return done

    def _run_locally(self, action: str) -> str:
        if action == "interrupt":
            # ComfyUI's own interrupt: it is wrapped (integration) to abort a running cluster
            # prompt on every rank, so one rank's cluster-wide interrupt reaches the others too.
            import nodes as comfy_nodes_module  # type: ignore[import-not-found,unused-ignore]

            comfy_nodes_module.interrupt_processing(True)
            return "interrupted"
        # As ComfyUI's POST /free: the prompt worker unloads and frees between prompts.
        self.server.prompt_queue.set_flag("unload_models", True)
        self.server.prompt_queue.set_flag("free_memory", True)
        return "models unloaded and memory freed when idle"

    def everywhere(self, action: str) -> dict[str, Any]:
        """Leader: ``action`` on this rank now and on every follower; which followers took it.

        The followers are asked in parallel and their answers awaited (``COMMAND_TIMEOUT_S`` at
        most): sent in the background, a follower that refused (another key) or was down would
        still be reported to the user as done.  ``failed``: rank -> why, for the toast."""
        done = self.run_locally(action)
        body = {"epoch": max(self.membership.epoch, 0), "action": action}
        peers = self.membership.peers
        followers = sorted(peers.others())
        failed: dict[str, str] = {}

        def ask(rank: int) -> None:
            try:
                peers.request(rank, "command", body, COMMAND_TIMEOUT_S)
            except (ControlUnreachableError, ControlRefusedError) as err:
                failed[str(rank)] = str(err)

        threads = [threading.Thread(target=ask, args=(r,), daemon=True) for r in followers]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        sent = [rank for rank in followers if str(rank) not in failed]
        return {"ok": not failed, "done": done, "sent_to": sent, "failed": failed}

    # -- the thread ------------------------------------------------------------------------------
    def start(self) -> None:
        threading.Thread(target=self._run, name="cluster-panel", daemon=True).start()

    def stop(self) -> None:
        self._stop.set()

    def _run(self) -> None:
        # The ranks start together, so their beats would fall together too: all at once into
        # whatever transfer is running then.  Each rank keeps its own phase (rank/size of the
        # period, its first beat early rather than late), so at most one beats at a time.
        s = self.settings
        if self._stop.wait(first_beat_s(s.rank, s.size, s.heartbeat_s)):
            return
        while True:
            try:
                self.beat()
            except Exception as err:  # the panel must never take the server down
                log.warning("cluster panel: %s: %s", type(err).__name__, err)
            if self._stop.wait(s.heartbeat_s):
                return

    def beat(self) -> None:
        """One beat: a follower reports to the leader; every rank updates its browsers."""
        if self.settings.is_leader:
            mine = self.report()  # first: the leader's own row is never the one gone silent
            with self._lock:
                self.health.report(self.settings.rank, mine, self.clock())
                changes = self.health.tick(self.clock())
            self._after(changes)
        else:
            self._report_to_leader()
        self.server.send_sync(STATUS_EVENT, self.snapshot())

    def _report_to_leader(self) -> None:
        peers = self.membership.peers
        if peers.address(0) is None:
            return
        body = {"epoch": max(self.membership.epoch, 0), "status": self.report()}
        try:
            peers.request(0, "heartbeat", body, self.settings.heartbeat_s)
        except (ControlUnreachableError, ControlRefusedError) as err:
            self.leader_error = f"cannot report to the leader: {err}"
        else:
            self.leader_error = ""

    def _after(self, changes: list[Transition]) -> None:
        for change in changes:
            self.server.send_sync(TRANSITION_EVENT, change.as_dict())
            if change.rank == self.settings.rank:
                continue
            # Only the current world: a rank lost while the cluster is re-forming is waited for
            # by that join (with its own timeout and message).
            if self.membership.state == "ready" and (
                change.new == "lost" or (change.new == "restarted" and not self._in_world(change))
            ):
                why = change.error or f"rank {change.rank} {change.new}"
                self.membership.fail(why, epoch=self.membership.epoch)

    def _in_world(self, change: Transition) -> bool:
        """Whether a restarted rank already joined the leader's current world (then that world
        is whole: it formed after the restart)."""
        with self._lock:
            report = self.health.reported(change.rank)
        return report.get("epoch") == self.membership.epoch and report.get("membership") == "ready"
