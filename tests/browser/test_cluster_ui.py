"""The cluster's UI in a real browser, on a real 2-rank cluster: what a new user sees and does.

One cluster for the module (ComfyUI starts in ~15 s on two cores), one leader page for the tests
in order: the panel lists both ranks; weights typed in the panel go with the next prompt; the
"Queue Cluster" button in the action bar runs a loaded cluster workflow and the leader saves the
images; a killed follower turns "lost" within the heartbeat timeout with the error and its fix,
and turns back when restarted; a follower's own page names the leader.  Screenshots of each
state go to the artifacts folder (printed), and the panel's to docs/images/cluster-panel.png.
"""

from __future__ import annotations

import json
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from launchers.comfyui import ComfyCluster
from tests.comfy_e2e.conftest import ComfyEnv, running_pair

pytestmark = [pytest.mark.browser, pytest.mark.comfy]

REPO = Path(__file__).resolve().parents[2]
BEAT_S, TIMEOUT_S = 0.5, 4.0
DOCS_SHOT = REPO / "docs" / "images" / "cluster-panel.png"


def _node(class_type: str, **inputs: Any) -> dict[str, Any]:
    return {"class_type": class_type, "inputs": inputs}


def cluster_workflow(batch: int = 4) -> dict[str, Any]:
    """The tiny SD1.5 pipeline with its batch fanned out over the ranks (API format)."""
    return {
        "1": _node("UNETLoader", unet_name="tiny_sd15_unet.safetensors", weight_dtype="default"),
        "2": _node("ZeroConditioning", tokens=77, width=768),
        "3": _node("EmptyLatentImage", width=64, height=64, batch_size=batch),
        "10": _node("ClusterFanOutLatent", samples=["3", 0]),
        "4": _node("KSampler", model=["1", 0], seed=42, steps=2, cfg=2.0, sampler_name="euler",
                   scheduler="normal", positive=["2", 0], negative=["2", 0],
                   latent_image=["10", 0], denoise=1.0),
        "5": _node("VAELoader", vae_name="taesd"),
        "6": _node("VAEDecode", samples=["4", 0], vae=["5", 0]),
        "11": _node("ClusterFanInImages", images=["6", 0]),
        "7": _node("SaveImage", images=["11", 0], filename_prefix="browser_cluster"),
    }  # fmt: skip


def _http(url: str, body: Any = None) -> Any:
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=30) as resp:
        raw = resp.read()
    return json.loads(raw) if raw else None


def _new_user(url: str) -> None:
    # A first visit opens the template browser over the canvas; a user closes it once.
    _http(f"{url}/settings", {"Comfy.TutorialCompleted": True})


@pytest.fixture(scope="module")
def pair(comfy_env: ComfyEnv, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ComfyCluster]:
    root = tmp_path_factory.mktemp("browser-pair")
    env = {
        "COMFY_CLUSTER_HEARTBEAT_S": str(BEAT_S),
        "COMFY_CLUSTER_HEARTBEAT_TIMEOUT_S": str(TIMEOUT_S),
        "COMFY_CLUSTER_TIMEOUT": "30",
        "COMFY_CLUSTER_JOIN_TIMEOUT": "120",
    }
    with running_pair(comfy_env, root, env) as comfy:
        for url in comfy.urls:
            _new_user(url)
        yield comfy


def _open(browser: Any, url: str) -> Any:
    page = browser.new_page(viewport={"width": 1500, "height": 950})
    errors: list[str] = []
    page.on("pageerror", lambda err: errors.append(str(err)))
    page.errors = errors
    page.goto(url + "/")
    page.locator("button.cluster-queue-button").wait_for(state="visible", timeout=60_000)
    return page


@pytest.fixture(scope="module")
def leader(browser: Any, pair: ComfyCluster) -> Iterator[Any]:
    page = _open(browser, pair.leader_url)
    page.locator(".cluster-tab-button").click()
    page.locator("[data-testid=cluster-panel]").wait_for(timeout=20_000)
    yield page
    page.close()


def _card(page: Any, rank: int) -> Any:
    return page.locator(f".cluster-rank[data-rank='{rank}']")


def _wait_state(page: Any, rank: int, states: tuple[str, ...], timeout: float) -> float:
    """Seconds until rank's card shows one of ``states``."""
    t0 = time.monotonic()
    deadline = t0 + timeout
    while time.monotonic() < deadline:
        card = _card(page, rank)
        if card.count() and card.get_attribute("data-state") in states:
            return time.monotonic() - t0
        page.wait_for_timeout(100)
    shown = _card(page, rank).get_attribute("data-state") if _card(page, rank).count() else None
    raise AssertionError(f"rank {rank} not in {states} after {timeout:g} s (shows {shown})")


def _shoot(page: Any, artifacts: Path, name: str) -> Path:
    path = artifacts / f"{name}.png"
    page.screenshot(path=str(path))
    return path


def test_the_panel_lists_both_ranks_and_they_are_idle(leader: Any, artifacts: Path) -> None:
    for rank in (0, 1):
        _wait_state(leader, rank, ("idle",), timeout=30)
    text = leader.locator("[data-testid=cluster-panel]").inner_text()
    assert "2 ranks" in text and "rank 0 (leader)" in text and "rank 1" in text, text
    follower = _card(leader, 1)
    assert follower.locator(".cluster-backend").inner_text().startswith("udp"), text
    assert follower.locator(".cluster-link").inner_text() == "ok", text
    age = follower.locator(".cluster-heartbeat").inner_text()
    assert age.endswith("s ago") and float(age.split()[0]) < 3 * BEAT_S + 1, age
    assert "free of" in follower.locator(".cluster-memory").inner_text(), text
    shot = _shoot(leader, artifacts, "1-panel-idle")
    DOCS_SHOT.parent.mkdir(parents=True, exist_ok=True)
    leader.locator("[data-testid=cluster-panel]").screenshot(path=str(DOCS_SHOT))
    print(f"panel: {shot}, {DOCS_SHOT}")


def test_queue_cluster_runs_the_loaded_workflow_with_the_panels_weights(
    leader: Any, pair: ComfyCluster, artifacts: Path
) -> None:
    weights = leader.locator("[data-testid=cluster-weights]")
    weights.fill("3,1")
    weights.press("Enter")  # the input's change event stores the user setting
    deadline = time.monotonic() + 10
    while _http(f"{pair.leader_url}/settings").get("Cluster.Weights") != "3,1":
        assert time.monotonic() < deadline, "the weights never reached the user's settings"
        time.sleep(0.1)
    leader.evaluate(
        "wf => (window.app ?? window.comfyAPI.app.app).loadApiJson(wf, 'cluster.json')",
        cluster_workflow(),
    )
    button = leader.locator("button.cluster-queue-button")
    assert button.is_visible() and "Queue Cluster" in button.inner_text()
    button.click()
    history = _wait_history(pair.leader_url, timeout=180)
    (entry, *_) = history.values()
    assert entry["status"]["status_str"] == "success", entry["status"]
    # The weights went with the prompt (the leader's copy is the one every rank ran).
    assert entry["prompt"][2]["10"]["inputs"]["weights"] == "3,1"
    images = entry["outputs"]["7"]["images"]
    assert len(images) == 4, images
    output = pair.base_directory / "rank0" / "output"
    saved = sorted(p.name for p in output.glob("browser_cluster*.png"))
    assert len(saved) == 4, saved
    assert not list((pair.base_directory / "rank1" / "output").glob("*.png"))
    _shoot(leader, artifacts, "2-queued-and-done")
    assert not leader.errors, leader.errors


def _wait_history(url: str, timeout: float) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        history: dict[str, Any] = _http(f"{url}/history")
        if history and all(
            e.get("status", {}).get("completed") is not None for e in history.values()
        ):
            done = {k: v for k, v in history.items() if v["status"].get("status_str")}
            if done:
                return done
        time.sleep(0.3)
    raise AssertionError(f"no finished prompt on {url} after {timeout:g} s")


def test_a_killed_follower_turns_lost_then_back(
    leader: Any, pair: ComfyCluster, artifacts: Path
) -> None:
    _wait_state(leader, 1, ("idle",), timeout=30)
    pair.kill_rank(1)
    unreachable = _wait_state(leader, 1, ("unreachable", "lost"), timeout=TIMEOUT_S)
    _shoot(leader, artifacts, "3-follower-unreachable")
    lost = unreachable + _wait_state(leader, 1, ("lost",), timeout=TIMEOUT_S + 2)
    # The leader notices within the timeout (plus one beat of its own clock and one of the push).
    assert lost <= TIMEOUT_S + 2 * BEAT_S + 1.5, lost
    card = _card(leader, 1)
    assert "no report from rank 1" in card.locator(".cluster-error").inner_text()
    assert "restart" in card.locator(".cluster-fix").inner_text()
    _shoot(leader, artifacts, "4-follower-lost")
    pair.restart_rank(1)
    pair.wait_ready(timeout=120)
    _wait_state(leader, 1, ("starting", "idle"), timeout=60)
    _wait_state(leader, 1, ("idle",), timeout=120)  # and in the leader's next world
    _wait_state(leader, 0, ("idle",), timeout=30)
    _shoot(leader, artifacts, "5-follower-back")


def test_a_followers_page_names_the_leader(
    browser: Any, pair: ComfyCluster, artifacts: Path
) -> None:
    page = _open(browser, pair.url(1))
    try:
        banner = page.locator("#cluster-follower-banner")
        banner.wait_for(state="visible", timeout=20_000)
        assert pair.leader_url in banner.inner_text()
        assert "rank 1 of 2" in banner.inner_text()
        _shoot(page, artifacts, "6-follower-banner")
        assert not page.errors, page.errors
    finally:
        page.close()
