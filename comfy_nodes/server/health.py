"""The leader's view of every rank, from the reports (heartbeats) the ranks send it.

No ComfyUI, no clock, no thread: the caller passes ``now`` (``time.monotonic()``) to every call,
so tests drive time by hand.  A rank's state follows from two inputs only, in this one table:

    =========== ==========================================================================
    state       when
    =========== ==========================================================================
    starting    never heard from (yet), or the rank says it is joining a world
    idle        a report fresher than ``UNREACHABLE_BEATS`` beats; nothing queued or running
    executing   a fresh report; the rank runs a prompt (or has one queued)
    unreachable the last report is older than ``UNREACHABLE_BEATS`` beats (one or two missed)
    lost        no report for the heartbeat timeout (a rank never heard from: the timeout
                counted from when the leader started watching)
    =========== ==========================================================================

A rank that reports again after being unreachable or lost takes the state it reports: a
restarted follower turns back without anyone resetting anything.  A rank's *last error* is the
most recent of what the leader saw (silence) and what the rank itself reported (its membership's
last error), each with the fix an operator should try, from :data:`FIXES`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

STATES = ("starting", "idle", "executing", "unreachable", "lost")
REPORTED = ("starting", "idle", "executing")
"""What a rank may say about itself; the other states are the leader's conclusions."""

UNREACHABLE_BEATS = 2.5
"""Beats of silence before a rank is unreachable: one late beat is jitter, two are not."""

FIXES: tuple[tuple[str, str], ...] = (
    ("report from rank", "restart that rank's ComfyUI (or the launch); it rejoins on its own"),
    ("have not joined", "start the missing ComfyUI instances, or raise COMFY_CLUSTER_JOIN_TIMEOUT"),
    ("restarted", "none: the cluster re-forms with the restarted rank"),
    ("interrupted", "none: the next prompt runs on a new world"),
    ("timed out", "check the network between the ranks, or raise COMFY_CLUSTER_TIMEOUT"),
    ("Timeout", "check the network between the ranks, or raise COMFY_CLUSTER_TIMEOUT"),
    ("Authentication", "give every rank the same COMFY_CLUSTER_KEY"),
    ("credential", "give every rank the same COMFY_CLUSTER_KEY"),
    ("refused by follower", "install the same nodes and models on every rank"),
    ("lost", "restart the lost rank; the cluster re-forms when it is back"),
)
"""(text in the error, what to do): the first match wins, so specific texts come first."""

DEFAULT_FIX = "see this rank's log; the next prompt starts a new world"


def fix_for(error: str) -> str:
    """What an operator should try for ``error`` ("" for no error)."""
    if not error:
        return ""
    for needle, fix in FIXES:
        if needle in error:
            return fix
    return DEFAULT_FIX


def classify(age: float | None, watched: float, reported: str, beat: float, timeout: float) -> str:
    """The table above.  ``age``: seconds since the rank's last report (None: never);
    ``watched``: seconds the leader has been watching; ``reported``: the rank's own word."""
    silence = watched if age is None else age
    if silence >= timeout:
        return "lost"
    if age is None:
        return "starting"
    if age >= UNREACHABLE_BEATS * beat:
        return "unreachable"
    return reported if reported in REPORTED else "starting"


@dataclass(frozen=True)
class Transition:
    """A rank changed state (the panel shows lost and returning ranks as toasts)."""

    rank: int
    old: str
    new: str
    error: str = ""
    fix: str = ""

    def as_dict(self) -> dict[str, Any]:
        return {"rank": self.rank, "old": self.old, "new": self.new, "error": self.error,
                "fix": self.fix}  # fmt: skip


@dataclass
class _Rank:
    rank: int
    state: str = "starting"
    last_report: float | None = None
    report: dict[str, Any] = field(default_factory=dict)
    error: str = ""
    error_at: float | None = None
    reported_error: str = ""  # the rank's own last error, to notice when it changes
    boot: str = ""  # the reporting process's id: a new one means the rank was restarted


class Health:
    """Every rank's state as the leader sees it.  Not thread-safe: the caller holds a lock."""

    def __init__(self, size: int, beat: float, timeout: float, now: float) -> None:
        if timeout < 2 * beat:
            raise ValueError(f"heartbeat timeout {timeout:g} s must be at least 2 beats ({beat:g})")
        self.beat_s = beat
        self.timeout_s = timeout
        self.started = now
        self._ranks = [_Rank(r) for r in range(size)]

    def report(self, rank: int, report: dict[str, Any], now: float) -> list[Transition]:
        """Rank ``rank`` reported ``report`` (its heartbeat body).  Returns the transitions, and
        one with ``new == "restarted"`` first when the report comes from a new process."""
        r = self._ranks[rank]
        out: list[Transition] = []
        boot = str(report.get("boot", ""))
        if r.boot and boot and boot != r.boot:
            out.append(Transition(rank, r.state, "restarted", f"rank {rank} restarted"))
        r.boot = boot or r.boot
        r.last_report, r.report = now, dict(report)
        own = str(report.get("last_error") or "")
        if own and own != r.reported_error:
            r.error, r.error_at = own, now
        r.reported_error = own
        return out + self._update(r, now)

    def tick(self, now: float) -> list[Transition]:
        """Time passed: ranks gone silent become unreachable, then lost."""
        out: list[Transition] = []
        for r in self._ranks:
            out += self._update(r, now)
        return out

    def state(self, rank: int) -> str:
        return self._ranks[rank].state

    def reported(self, rank: int) -> dict[str, Any]:
        """The rank's last report (empty before its first)."""
        return dict(self._ranks[rank].report)

    def rows(self, now: float) -> list[dict[str, Any]]:
        """One JSON-ready row per rank, for the panel."""
        return [self._row(r, now) for r in self._ranks]

    def _update(self, r: _Rank, now: float) -> list[Transition]:
        age = None if r.last_report is None else now - r.last_report
        reported = str(r.report.get("activity", "starting"))
        new = classify(age, now - self.started, reported, self.beat_s, self.timeout_s)
        if new == r.state:
            return []
        old, r.state = r.state, new
        if new == "lost":
            silence = now - (r.last_report if r.last_report is not None else self.started)
            heard = (
                "no report from rank" if r.last_report is not None else "never a report from rank"
            )
            r.error = (
                f"{heard} {r.rank} for {silence:.1f} s (heartbeat timeout {self.timeout_s:g} s)"
            )
            r.error_at = now
        return [Transition(r.rank, old, new, r.error if new == "lost" else "", fix_for(r.error))]

    def _row(self, r: _Rank, now: float) -> dict[str, Any]:
        rep = r.report
        return {
            "rank": r.rank,
            "state": r.state,
            "heartbeat_age_s": None if r.last_report is None else round(now - r.last_report, 2),
            "url": rep.get("url"),
            "backend": rep.get("backend"),
            "path": rep.get("path"),
            "epoch": rep.get("epoch"),
            "membership": rep.get("membership"),
            "device": rep.get("device"),
            "mem_free": rep.get("mem_free"),
            "mem_total": rep.get("mem_total"),
            "queue": rep.get("queue"),
            "progress": rep.get("progress"),
            "rates": rep.get("rates"),
            "commands": rep.get("commands"),
            "error": r.error,
            "fix": fix_for(r.error),
            "error_age_s": None if r.error_at is None else round(now - r.error_at, 1),
        }
