"""The cluster prompt rewrite: canonical order, ordering links, head/tail, and what ComfyUI sees."""

from __future__ import annotations

import pytest

from comfy_nodes.nodes import NODE_CLASS_MAPPINGS
from comfy_nodes.nodes_base import AFTER_INPUT, _ClusterNode
from comfy_nodes.server import prompts

COLLECTIVE = [
    n for n, c in NODE_CLASS_MAPPINGS.items() if issubclass(c, _ClusterNode) and n != "ClusterSync"
]

WORKFLOW_A = {
    "3": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 8}},
    "10": {"class_type": "ClusterFanOutLatent", "inputs": {"samples": ["3", 0]}},
    "4": {"class_type": "KSampler", "inputs": {"latent_image": ["10", 0], "seed": 42}},
    "6": {"class_type": "VAEDecode", "inputs": {"samples": ["4", 0]}},
    "11": {"class_type": "ClusterFanInImages", "inputs": {"images": ["6", 0]}},
    "7": {"class_type": "SaveImage", "inputs": {"images": ["11", 0]}},
    # an independent branch with its own collective: its order vs. the one above is arbitrary
    # for ComfyUI, so the rewrite must fix it
    "2": {"class_type": "EmptyImage", "inputs": {}},
    "9": {"class_type": "ClusterGatherImages", "inputs": {"images": ["2", 0]}},
    "8": {"class_type": "PreviewImage", "inputs": {"images": ["9", 0]}},
}


def test_detects_cluster_prompts() -> None:
    assert prompts.is_cluster_prompt(WORKFLOW_A, NODE_CLASS_MAPPINGS)
    plain = {k: v for k, v in WORKFLOW_A.items() if not v["class_type"].startswith("Cluster")}
    assert not prompts.is_cluster_prompt(plain, NODE_CLASS_MAPPINGS)
    assert not prompts.is_cluster_prompt(None, NODE_CLASS_MAPPINGS)


def test_topological_order_is_canonical() -> None:
    order = prompts.topological_order(WORKFLOW_A)
    assert order.index("3") < order.index("10") < order.index("4") < order.index("11")
    assert order == prompts.topological_order(dict(reversed(list(WORKFLOW_A.items()))))
    assert order[0] == "2"  # ties by numeric id, not insertion order or string order


def test_prepare_chains_collectives_and_adds_head_and_tail() -> None:
    cp = prompts.prepare(WORKFLOW_A, COLLECTIVE, "pid-1")
    assert cp.collectives == ("9", "10", "11")
    p = cp.prompt
    assert p["9"]["inputs"][AFTER_INPUT] == [prompts.HEAD_ID, 0]
    assert p["10"]["inputs"][AFTER_INPUT] == ["9", 0]
    assert p["11"]["inputs"][AFTER_INPUT] == ["10", 0]
    assert p[prompts.TAIL_ID]["inputs"][AFTER_INPUT] == ["11", 0]
    assert p[prompts.HEAD_ID]["inputs"]["prompt_id"] == "pid-1"
    assert AFTER_INPUT not in WORKFLOW_A["10"]["inputs"], "the caller's prompt is not modified"
    assert not prompts.is_cluster_prompt(p, NODE_CLASS_MAPPINGS), "prepared prompts are final"
    prompts.topological_order(p)  # still acyclic


def test_strip_undoes_prepare() -> None:
    cp = prompts.prepare(WORKFLOW_A, COLLECTIVE, "pid-1")
    assert prompts.strip(cp.prompt) == WORKFLOW_A


def test_cycles_and_reserved_ids_are_refused() -> None:
    cyclic = {
        "1": {"class_type": "A", "inputs": {"x": ["2", 0]}},
        "2": {"class_type": "B", "inputs": {"x": ["1", 0]}},
    }
    with pytest.raises(ValueError, match="cycle"):
        prompts.topological_order(cyclic)
    with pytest.raises(ValueError, match="reserved"):
        prompts.prepare({prompts.HEAD_ID: {"class_type": "X", "inputs": {}}}, COLLECTIVE, "p")


def test_every_collective_node_accepts_the_ordering_input() -> None:
    for name in COLLECTIVE:
        cls = NODE_CLASS_MAPPINGS[name]
        assert AFTER_INPUT in cls.INPUT_TYPES()["optional"], name
    info = NODE_CLASS_MAPPINGS["ClusterInfo"]()
    out = info.run(**{AFTER_INPUT: "anything"})  # ComfyUI passes the linked value: ignored
    assert out["result"][1:3] == (0, 1)
