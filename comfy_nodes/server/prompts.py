"""Rewriting a cluster prompt so that every rank runs its collectives in the same order.

ComfyUI chooses its execution order from the set of nodes to run and a few UX heuristics; the
leader (which also runs SaveImage and friends) and the followers (which run only what the cluster
nodes need) would not agree on it for workflows with independent branches.  So the leader adds,
once, before the prompt is sent anywhere:

* a head node ``ClusterSync`` (mode "start"): the first thing every rank runs; it checks that all
  ranks are on the same prompt and that every follower accepted it;
* an ordering link ``cluster_after`` on every communicating node, to the previous one in one
  canonical topological order (ties broken by node id), so collectives can only run in that order;
* a tail node ``ClusterSync`` (mode "end"), an output node that depends on the last collective.
  Followers execute the prompt with the tail as their only target, which pulls in exactly the
  collective nodes and what they need; leader-only outputs are never run there.

The rewritten prompt is identical on every rank.
"""

from __future__ import annotations

import copy
import heapq
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

AFTER_INPUT = "cluster_after"
SYNC_CLASS = "ClusterSync"
HEAD_ID = "cluster_sync_start"
TAIL_ID = "cluster_sync_end"


@dataclass(frozen=True)
class ClusterPrompt:
    prompt: dict[str, Any]
    head_id: str
    tail_id: str
    collectives: tuple[str, ...]  # node ids in execution order


def _is_link(value: Any) -> bool:
    return (
        isinstance(value, list)
        and len(value) == 2
        and isinstance(value[0], str)
        and isinstance(value[1], int)
    )


def _node_key(node_id: str) -> tuple[Any, ...]:
    # Numeric-aware: "9" before "10", and "5:2" (expanded subgraph ids) after "5".
    return tuple((0, int(p), "") if p.isdigit() else (1, 0, p) for p in re.split(r"[:.]", node_id))


def cluster_node_ids(prompt: Mapping[str, Any], cluster_classes: Iterable[str]) -> list[str]:
    names = set(cluster_classes)
    return [nid for nid, node in prompt.items() if node.get("class_type") in names]


def is_cluster_prompt(prompt: Any, cluster_classes: Iterable[str]) -> bool:
    """A prompt that uses any node of this pack (and so must run on every rank)."""
    if not isinstance(prompt, dict):
        return False
    if HEAD_ID in prompt:
        return False  # already prepared (a prompt we distributed ourselves)
    return bool(cluster_node_ids(prompt, cluster_classes))


def topological_order(prompt: Mapping[str, Any]) -> list[str]:
    """Kahn's algorithm with a heap on node ids: one canonical order for a given prompt."""
    deps: dict[str, set[str]] = {nid: set() for nid in prompt}
    for nid, node in prompt.items():
        for value in node.get("inputs", {}).values():
            if _is_link(value) and value[0] in prompt:
                deps[nid].add(value[0])
    users: dict[str, list[str]] = {nid: [] for nid in prompt}
    for nid, parents in deps.items():
        for parent in parents:
            users[parent].append(nid)
    waiting = {nid: len(parents) for nid, parents in deps.items()}
    ready = [(_node_key(nid), nid) for nid, n in waiting.items() if n == 0]
    heapq.heapify(ready)
    order: list[str] = []
    while ready:
        _, nid = heapq.heappop(ready)
        order.append(nid)
        for user in users[nid]:
            waiting[user] -= 1
            if waiting[user] == 0:
                heapq.heappush(ready, (_node_key(user), user))
    if len(order) != len(prompt):
        stuck = sorted(set(prompt) - set(order), key=_node_key)
        raise ValueError(f"the prompt has a dependency cycle through nodes {stuck}")
    return order


def prepare(
    prompt: Mapping[str, Any], collective_classes: Iterable[str], prompt_id: str
) -> ClusterPrompt:
    """The rewritten prompt (a deep copy; ``prompt`` is not modified)."""
    classes = set(collective_classes)
    out: dict[str, Any] = copy.deepcopy(dict(prompt))
    for reserved in (HEAD_ID, TAIL_ID):
        if reserved in out:
            raise ValueError(f"node id {reserved!r} is reserved by ComfyUI Cluster")
    order = [nid for nid in topological_order(out) if out[nid].get("class_type") in classes]
    out[HEAD_ID] = {
        "class_type": SYNC_CLASS,
        "inputs": {"mode": "start", "prompt_id": prompt_id, "collectives": len(order)},
        "_meta": {"title": "Cluster sync (start)"},
    }
    previous = HEAD_ID
    for nid in order:
        out[nid].setdefault("inputs", {})[AFTER_INPUT] = [previous, 0]
        previous = nid
    out[TAIL_ID] = {
        "class_type": SYNC_CLASS,
        "inputs": {
            "mode": "end",
            "prompt_id": prompt_id,
            "collectives": len(order),
            AFTER_INPUT: [previous, 0],
        },
        "_meta": {"title": "Cluster sync (end)"},
    }
    return ClusterPrompt(out, HEAD_ID, TAIL_ID, tuple(order))


def strip(prompt: Mapping[str, Any]) -> dict[str, Any]:
    """Undo :func:`prepare`: the user's prompt (for re-queuing the current workflow)."""
    out = copy.deepcopy({k: v for k, v in prompt.items() if k not in (HEAD_ID, TAIL_ID)})
    for node in out.values():
        node.get("inputs", {}).pop(AFTER_INPUT, None)
    return out
