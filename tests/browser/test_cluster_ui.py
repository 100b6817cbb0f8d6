"""The cluster's UI in a real browser, on a real 2-rank cluster: what a new user sees and does.

One cluster for the module (ComfyUI starts in ~15 s on two cores), one leader page for the tests
in order: the panel lists both ranks; a status push while the user types the weights keeps the
text and the focus; weights typed in the panel go with the next prompt; the "Queue Cluster"
button in the action bar runs a loaded cluster workflow and the leader saves the images;
"Interrupt all" stops a running prompt on both ranks and the next one runs; "Free memory"
reaches both ranks; the follower's control endpoint refuses forged, wrongly addressed and unknown
commands (sealed UDP datagrams, real sockets), and its HTTP server has no command route; a
killed follower turns "lost" within the heartbeat timeout with the error and its fix,
and turns back when restarted; a follower's own page names the leader.  Screenshots of each
state go to the artifacts folder (printed), and the panel's to docs/images/cluster-panel.png.
"""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from collectives.auth import ClusterKey
from comfy_nodes.server.carrier import ControlUnreachableError, UdpCarrier
from comfy_nodes.server.peers import ControlRefusedError, Peers
from comfy_nodes.server.seal import Seal
from comfyui_cluster.launchers.comfyui import ComfyCluster
from tests.comfy_e2e.comfy_client import ComfyClient
from tests.comfy_e2e.conftest import ComfyEnv, running_pair

pytestmark = [pytest.mark.browser, pytest.mark.comfy]

REPO = Path(__file__).resolve().parents[2]
BEAT_S, TIMEOUT_S = 0.5, 4.0
DOCS_SHOT = REPO / "docs" / "images" / "cluster-panel.png"
# The test knows the key (the launcher would otherwise invent one) to sign requests as a rank.
KEY = ClusterKey.generate()
SLEEP_NODES, SLEEP_S = 10, 1.0


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


def sleepy_workflow(sleep_nodes: int, seconds: float) -> dict[str, Any]:
    """Two images per rank through a chain of sleeps: ComfyUI checks its interrupt flag only
    between nodes, so one long sleep could not be interrupted; ``sleep_nodes`` short ones can."""
    wf = {
        "1": _node("IndexedImages", batch=4, size=8, dtype="float32"),
        # Weights of its own: the panel's "3,1" from an earlier test would starve rank 1.
        "2": _node("ClusterFanOutImage", image=["1", 0], weights="1,1"),
    }
    last = "2"
    for i in range(sleep_nodes):
        wf[str(10 + i)] = _node("SleepPerImage", images=[last, 0], seconds_per_image=seconds / 2)
        last = str(10 + i)
    wf["3"] = _node("ClusterFanInImages", images=[last, 0])
    wf["4"] = _node("SaveTensor", value=["3", 0], name="sleepy")
    return wf


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
        "COMFY_CLUSTER_KEY": KEY.text,
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
    # The panel fills in as reports arrive (the link turns "ok" once the backend's session is up,
    # the memory line with the first heartbeat): every field must get there within a few beats.
    follower = _card(leader, 1)
    deadline = time.monotonic() + 10 * BEAT_S + 5
    while True:
        text = leader.locator("[data-testid=cluster-panel]").inner_text()
        backend = follower.locator(".cluster-backend").inner_text()
        link = follower.locator(".cluster-link").inner_text()
        age = follower.locator(".cluster-heartbeat").inner_text()
        memory = follower.locator(".cluster-memory").inner_text()
        fresh = age.endswith("s ago") and float(age.split()[0]) < 3 * BEAT_S + 1
        if (link == "ok" and fresh and "free of" in memory) or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert "2 ranks" in text and "rank 0 (leader)" in text and "rank 1" in text, text
    assert backend.startswith("udp"), text
    assert link == "ok", text
    assert fresh, age
    assert "free of" in memory, text
    shot = _shoot(leader, artifacts, "1-panel-idle")
    DOCS_SHOT.parent.mkdir(parents=True, exist_ok=True)
    # A clip of the page, not the element's own screenshot: the panel re-renders on every report,
    # and an element replaced mid-screenshot fails it ("not attached to the DOM").
    # bounding_box() is None while the panel is replaced, so it is asked again for a moment.
    panel = leader.locator("[data-testid=cluster-panel]")
    box = panel.bounding_box()
    deadline = time.monotonic() + 5
    while box is None and time.monotonic() < deadline:
        time.sleep(0.1)
        box = panel.bounding_box()
    assert box is not None, "the panel is not rendered"
    leader.screenshot(path=str(DOCS_SHOT), clip=box)
    print(f"panel: {shot}, {DOCS_SHOT}")


_PUSH_STATUS = """async () => {
  const view = await (await fetch("/cluster/panel")).json();
  window.comfyAPI.api.api.dispatchEvent(new CustomEvent("cluster.status", { detail: view }));
}"""


def test_a_status_push_while_typing_keeps_the_weights_text_and_focus(
    leader: Any, pair: ComfyCluster
) -> None:
    """The panel redraws on every push (each heartbeat): the weights a user is typing stay."""
    weights = leader.locator("[data-testid=cluster-weights]")
    weights.click()
    weights.press_sequentially("2,")
    typed_in = weights.element_handle()
    leader.evaluate(_PUSH_STATUS)  # a redraw now, and the heartbeat's meanwhile
    time.sleep(3 * BEAT_S)
    assert leader.evaluate("el => el.isConnected && document.activeElement === el", typed_in), (
        "a redraw replaced the input the user was typing in"
    )
    weights.press_sequentially("5")
    weights.press("Enter")
    deadline = time.monotonic() + 10
    while _http(f"{pair.leader_url}/settings").get("Cluster.Weights") != "2,5":
        assert time.monotonic() < deadline, "the typed weights never reached the user's settings"
        time.sleep(0.1)


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


def _queue_loaded(page: Any, workflow: dict[str, Any]) -> str:
    """Load ``workflow`` into the leader's canvas, press Queue Cluster; the prompt's id."""
    page.evaluate(
        "wf => (window.app ?? window.comfyAPI.app.app).loadApiJson(wf, 'sleepy.json')", workflow
    )
    with page.expect_response(lambda r: r.url.endswith("/cluster/queue")) as answer:
        page.locator("button.cluster-queue-button").click()
    body = answer.value.json()
    assert answer.value.ok, body
    return str(body["prompt_id"])


def _entry(url: str, prompt_id: str, timeout: float) -> dict[str, Any]:
    """The prompt's /history entry on the rank at ``url`` once it ended (any way)."""
    client, deadline = ComfyClient(url), time.monotonic() + timeout
    while (entry := client.history(prompt_id)) is None:
        assert time.monotonic() < deadline, f"{prompt_id} not ended on {url} after {timeout:g} s"
        time.sleep(0.1)
    return entry


def _commands(pair: ComfyCluster, rank: int) -> dict[str, int]:
    """The controls ``rank`` says it has handled: its own report, from its own server."""
    view = _http(f"{pair.url(rank)}/cluster/panel")
    (row,) = [r for r in view["rows"] if r["rank"] == rank]
    return dict(row["commands"])


def _wait_world_after(pair: ComfyCluster, epoch: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while True:
        status = _http(f"{pair.leader_url}/cluster/status")
        if status["epoch"] > epoch and status["state"] == "ready":
            return
        assert time.monotonic() < deadline, f"no world after {epoch} in {timeout:g} s: {status}"
        time.sleep(0.2)


def test_interrupt_all_stops_a_running_prompt_on_every_rank_and_the_next_one_runs(
    leader: Any, pair: ComfyCluster, artifacts: Path
) -> None:
    for rank in (0, 1):
        _wait_state(leader, rank, ("idle",), timeout=60)
    epoch = _http(f"{pair.leader_url}/cluster/status")["epoch"]
    before = _commands(pair, 1)
    queued = time.monotonic()
    prompt_id = _queue_loaded(leader, sleepy_workflow(SLEEP_NODES, SLEEP_S))
    for rank in (1, 0):
        _wait_state(leader, rank, ("executing",), timeout=30)
    leader.wait_for_timeout(1500)  # both ranks well inside the chain of sleeps
    _shoot(leader, artifacts, "3-sleepy-prompt-running")
    clicked = time.monotonic()
    leader.locator("[data-testid=cluster-interrupt]").click()
    for rank in (0, 1):
        entry = _entry(pair.url(rank), prompt_id, timeout=SLEEP_NODES * SLEEP_S + 30)
        took, since_queued = time.monotonic() - clicked, time.monotonic() - queued
        status = entry["status"]
        # Interrupted, not failed: an abort of the world alone would end a follower with an
        # execution_error in its next collective; only the command sets its interrupt flag.
        kinds = [m[0] for m in status["messages"]]
        assert "execution_interrupted" in kinds and "execution_error" not in kinds, (rank, status)
        assert took < 2 * SLEEP_S + 2, f"rank {rank} ended {took:.1f} s after the click"
        # Even had every sleep started the moment it was queued, they would still be running.
        assert since_queued < SLEEP_NODES * SLEEP_S, (rank, since_queued)
    assert _commands(pair, 1)["interrupt"] == before["interrupt"] + 1
    _shoot(leader, artifacts, "4-interrupted")
    # The interrupt ended that world; the next prompt runs on the next one, on both ranks.
    _wait_world_after(pair, epoch, timeout=60)
    for rank in (0, 1):
        _wait_state(leader, rank, ("idle",), timeout=30)
    prompt_id = _queue_loaded(leader, sleepy_workflow(1, 0.0))
    for rank in (0, 1):
        status = _entry(pair.url(rank), prompt_id, timeout=60)["status"]
        assert status["status_str"] == "success", (rank, status)
    assert not leader.errors, leader.errors


def _pretending(rank: int, pair: ComfyCluster, key: ClusterKey = KEY) -> Peers:
    """A control endpoint that claims to be ``rank``, knowing both ranks' real endpoints."""

    def no_requests(envelope: Any, source: Any) -> dict[str, Any]:
        return {"ok": False, "error": "this test endpoint takes no requests"}

    carrier = UdpCarrier(
        rank, ("127.0.0.1", 0), Seal(key), no_requests, port_env="COMFY_CLUSTER_CONTROL_PORT"
    )
    control = _http(f"{pair.leader_url}/cluster/status")["control"]
    host, port = control["1"].rsplit(":", 1)
    peers = Peers(rank, {1: (host, int(port))}, carrier=carrier)
    leader = pair.leader_url.rsplit(":", 1)  # the leader's control port is its ComfyUI port
    peers.learn(0, (leader[0].split("//")[-1], int(leader[1])))
    return peers


def test_the_followers_control_takes_only_the_leaders_sealed_commands(
    pair: ComfyCluster,
) -> None:
    before = _commands(pair, 1)
    with pytest.raises(urllib.error.HTTPError) as err:  # no command route on HTTP
        _http(pair.url(1) + "/cluster/command", {"rank": 0, "epoch": 0, "action": "free"})
    assert err.value.code in (404, 405)
    stranger, as_leader, as_follower = (
        _pretending(0, pair, ClusterKey.generate()), _pretending(0, pair), _pretending(1, pair)
    )  # fmt: skip
    try:
        with pytest.raises(ControlUnreachableError, match="rank 1 at udp"):
            stranger.request(1, "command", {"epoch": 0, "action": "free"}, 1.0)
        with pytest.raises(ControlRefusedError, match="'action' must be one of"):
            as_leader.request(1, "command", {"epoch": 0, "action": "reboot"}, 5.0)
        with pytest.raises(ControlRefusedError, match="not another rank"):
            as_follower.request(1, "command", {"epoch": 0, "action": "free"}, 5.0)
        with pytest.raises(ControlRefusedError, match="does not take 'command'"):
            as_follower.request(0, "command", {"epoch": 0, "action": "interrupt"}, 5.0)
        assert _commands(pair, 1) == before, "a refused command must do nothing"
        reply = as_leader.request(1, "command", {"epoch": 0, "action": "free"}, 5.0)
        assert reply["ok"], reply
        assert _commands(pair, 1)["free"] == before["free"] + 1
    finally:
        for peers in (stranger, as_leader, as_follower):
            assert peers.carrier is not None
            peers.carrier.close()


def test_free_memory_reaches_every_rank(leader: Any, pair: ComfyCluster, artifacts: Path) -> None:
    before = {rank: _commands(pair, rank)["free"] for rank in (0, 1)}
    leader.locator("[data-testid=cluster-free]").click()
    leader.get_by_text("sent to rank(s) 1").first.wait_for(timeout=10_000)
    deadline = time.monotonic() + 5
    for rank in (0, 1):
        while _commands(pair, rank)["free"] != before[rank] + 1:
            assert time.monotonic() < deadline, f"rank {rank}: {_commands(pair, rank)}"
            time.sleep(0.1)
    # And the leader's panel shows it for both, from the follower's next heartbeat.
    for rank in (0, 1):
        cell = _card(leader, rank).locator(".cluster-commands")
        want = f"free {before[rank] + 1}"
        deadline = time.monotonic() + 6 * BEAT_S + 2
        while want not in cell.inner_text():
            assert time.monotonic() < deadline, f"rank {rank}'s card: {cell.inner_text()!r}"
            leader.wait_for_timeout(100)
    _shoot(leader, artifacts, "5-memory-freed")
    assert not leader.errors, leader.errors


def test_a_killed_follower_turns_lost_then_back(
    leader: Any, pair: ComfyCluster, artifacts: Path
) -> None:
    _wait_state(leader, 1, ("idle",), timeout=30)
    pair.kill_rank(1)
    unreachable = _wait_state(leader, 1, ("unreachable", "lost"), timeout=TIMEOUT_S)
    _shoot(leader, artifacts, "6-follower-unreachable")
    lost = unreachable + _wait_state(leader, 1, ("lost",), timeout=TIMEOUT_S + 2)
    # The leader notices within the timeout (plus one beat of its own clock and one of the push).
    assert lost <= TIMEOUT_S + 2 * BEAT_S + 1.5, lost
    card = _card(leader, 1)
    assert "no report from rank 1" in card.locator(".cluster-error").inner_text()
    assert "restart" in card.locator(".cluster-fix").inner_text()
    _shoot(leader, artifacts, "7-follower-lost")
    # A control now cannot reach rank 1: the user is told so, not "sent to rank(s) 1".
    leader.locator("[data-testid=cluster-free]").click()
    leader.get_by_text("not on every rank").first.wait_for(timeout=10_000)
    why = "rank 1: rank 1 at udp"  # the control endpoint that did not answer, named
    assert leader.get_by_text(why).count(), "the toast should say why rank 1 missed it"
    pair.restart_rank(1)
    pair.wait_ready(timeout=120)
    _wait_state(leader, 1, ("starting", "idle"), timeout=60)
    _wait_state(leader, 1, ("idle",), timeout=120)  # and in the leader's next world
    _wait_state(leader, 0, ("idle",), timeout=30)
    _shoot(leader, artifacts, "8-follower-back")


def test_a_followers_page_names_the_leader(
    browser: Any, pair: ComfyCluster, artifacts: Path
) -> None:
    page = _open(browser, pair.url(1))
    try:
        banner = page.locator("#cluster-follower-banner")
        banner.wait_for(state="visible", timeout=20_000)
        assert pair.leader_url in banner.inner_text()
        assert "rank 1 of 2" in banner.inner_text()
        _shoot(page, artifacts, "9-follower-banner")
        assert not page.errors, page.errors
    finally:
        page.close()
