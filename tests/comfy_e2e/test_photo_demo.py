"""Workflow (b) of the main job on a 2-rank cluster: a photograph's looks on one contact sheet.

The workflow comes from ``examples/photo_demo.py``, exactly as the demo queues it.  The sheet is
checked for its grid (size, black gutters), for eight looks that differ from each other and from
a blank image, and against the same work done by the leader alone.
"""

from __future__ import annotations

import io
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from comfyui_cluster.launchers.comfyui import ComfyCluster
from examples.photo_demo import (
    LOOKS,
    PADDING,
    SAVE_NODE,
    cell_box,
    sheet_size,
    stage_photo,
    workflow_b,
)
from tests.comfy_e2e.comfy_client import ComfyClient
from tests.comfy_e2e.conftest import ComfyEnv, running_pair, tail

pytestmark = pytest.mark.comfy


@dataclass(frozen=True)
class Pair:
    comfy: ComfyCluster
    leader: ComfyClient
    base: Path
    log: Path


@pytest.fixture(scope="module")
def pair(comfy_env: ComfyEnv, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pair]:
    root = tmp_path_factory.mktemp("photo")
    base = root / "base"
    stage_photo(base / "input")  # the ranks of one base directory share its input folder
    cluster_env = {"COMFY_CLUSTER_TIMEOUT": "60", "COMFY_CLUSTER_JOIN_TIMEOUT": "120"}
    with running_pair(comfy_env, root, cluster_env) as comfy:
        yield Pair(comfy, ComfyClient(comfy.leader_url, timeout=60), base, root / "cluster.log")


def _sheet(pair: Pair, prompt: dict[str, Any]) -> tuple[str, Path, np.ndarray]:
    prompt_id = pair.leader.queue_prompt(prompt)
    try:
        entry = pair.leader.wait(prompt_id, timeout=300)
    except Exception as exc:
        raise AssertionError(f"{exc}\n{tail(pair.log)}") from exc
    (ref,) = entry["outputs"][SAVE_NODE]["images"]
    path = pair.base / "rank0" / "output" / ref["subfolder"] / ref["filename"]
    pixels = np.asarray(Image.open(io.BytesIO(pair.leader.view(ref))).convert("RGB"))
    return prompt_id, path, pixels.astype(np.int16)


def test_contact_sheet_of_distinct_looks_equals_one_instance(pair: Pair) -> None:
    prompt_id, path, sheet = _sheet(pair, workflow_b(cluster=True))
    assert path.is_file(), path
    width, height = sheet_size()
    assert (sheet.shape[1], sheet.shape[0]) == (width, height)

    cells = [sheet[top:bottom, left:right] for left, top, right, bottom in map(cell_box, range(8))]
    assert len(cells) == len(LOOKS)
    # The gutters are ImageGrid's black padding: the cells sit where cell_box says.
    _, _, right, bottom = cell_box(0)
    assert not sheet[:, right : right + PADDING].any()
    assert not sheet[bottom : bottom + PADDING, :].any()
    for name, cell in zip(LOOKS, cells, strict=True):
        # Not blank: neither one flat colour nor nearly so.
        assert cell.std() > 20, (name, cell.std())
    for i in range(len(cells)):
        for j in range(i + 1, len(cells)):
            diff = np.abs(cells[i] - cells[j]).mean()
            assert diff > 5, (LOOKS[i], LOOKS[j], diff)

    # The follower took part (the leader's prompt ran in its queue, under the same id) and,
    # a leader-only output, saved nothing.
    follower = ComfyClient(pair.comfy.url(1), timeout=60)
    follower.wait(prompt_id, timeout=60)
    assert not list((pair.base / "rank1" / "output").rglob("*.png"))

    # The same nodes without fan-out/fan-in, all on the leader: the split changes nothing
    # (fan-out and fan-in are lossless; 1 allows a float rounding to flip an 8-bit value).
    _, _, alone = _sheet(pair, workflow_b(cluster=False))
    assert alone.shape == sheet.shape
    assert np.abs(alone - sheet).max() <= 1
