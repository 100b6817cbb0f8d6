"""Leader inputs are lazy: only the leader asks ComfyUI to evaluate what feeds them.

No other input is lazy.  Followers then run fewer nodes than the leader, which is safe because
the prompt rewrite chains every collective to the previous one (``cluster_after``, an ordinary
input): their order is the same on every rank whatever else a rank runs
(``tests/comfy_e2e/test_cluster_workflows.py`` runs it on real servers).
"""

from __future__ import annotations

from typing import Any

import pytest

from collectives import Communicator
from comfy_nodes import NODE_CLASS_MAPPINGS

from .helpers import images, spmd

FROM_LEADER = {
    "ClusterBroadcastTensor": "tensor",
    "ClusterListenTensorBroadcast": "tensor",
    "ClusterFanOutImage": "image",
    "ClusterFanOutLatent": "samples",
    "ClusterFanOutMask": "mask",
}


def _lazy_inputs(cls: Any) -> set[str]:
    spec = cls.INPUT_TYPES()
    return {
        name
        for section in ("required", "optional")
        for name, (_, *opts) in spec.get(section, {}).items()
        if opts and isinstance(opts[0], dict) and opts[0].get("lazy")
    }


def test_exactly_the_leader_inputs_are_lazy() -> None:
    for name, cls in NODE_CLASS_MAPPINGS.items():
        want = {FROM_LEADER[name]} if name in FROM_LEADER else set()
        assert _lazy_inputs(cls) == want, name
        assert set(getattr(cls, "LEADER_INPUTS", ())) == want, name
        # ComfyUI asks every node that has the hook: only these have it.
        assert hasattr(cls, "check_lazy_status") == bool(want), name


@pytest.mark.parametrize("node", sorted(FROM_LEADER))
def test_only_the_leader_asks_for_its_input(node: str) -> None:
    cls = NODE_CLASS_MAPPINGS[node]
    name = FROM_LEADER[node]

    def rank(comm: Communicator) -> tuple[list[str], list[str], list[str]]:
        obj = cls()
        unevaluated = obj.check_lazy_status(**{name: None, "cluster_after": None})
        evaluated = obj.check_lazy_status(**{name: images(2), "cluster_after": None})
        unconnected = obj.check_lazy_status(cluster_after=None)
        return unevaluated, evaluated, unconnected

    (lead, *follow) = spmd(3, rank)
    assert lead == ([name], [], [])
    assert follow == [([], [], [])] * 2
