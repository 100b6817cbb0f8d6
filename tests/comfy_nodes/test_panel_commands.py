"""POST /cluster/command (the leader asks a follower to interrupt or free memory) through the real
route handler of comfy_nodes.server.routes, credential checks included.

The dev venv has no aiohttp (ComfyUI's environment has it), so ``aiohttp.web`` is a stand-in with
the two things the handlers use: ``json_response`` and a request with ``method``, ``path``,
``headers``, ``content_length`` and ``content.read``.  Everything between the request and the
panel (PeerAuth, Message.parse, check_sender, Panel.command) is the pack's own code; the same
route is exercised over real HTTP on a running pair in tests/browser/test_cluster_ui.py.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import io
import json
import sys
import types
import urllib.error
from email.message import Message
from typing import Any

import pytest

from collectives.auth import AUTH_HEADER, ClusterKey
from comfy_nodes.server import panel as panel_module
from comfy_nodes.server.membership import Membership
from comfy_nodes.server.panel import Panel
from comfy_nodes.server.peers import PeerAuth, PeerClient
from comfy_nodes.server.routes import control_routes
from tests.comfy_nodes.helpers import local_settings

KEY = ClusterKey("k" * 40)
PATH = "/cluster/command"


class _Response:
    def __init__(self, body: Any, status: int = 200) -> None:
        self.body, self.status = body, status


class _Content:
    def __init__(self, raw: bytes) -> None:
        self._raw = raw

    async def read(self, n: int) -> bytes:
        chunk, self._raw = self._raw[:n], self._raw[n:]
        return chunk


class _Request:
    def __init__(self, path: str, raw: bytes, headers: dict[str, str]) -> None:
        self.method, self.path, self.headers = "POST", path, headers
        self.content_length = len(raw)
        self.content = _Content(raw)


class _Queue:
    def __init__(self) -> None:
        self.flags: dict[str, Any] = {}

    def set_flag(self, name: str, value: Any) -> None:
        self.flags[name] = value

    def get_tasks_remaining(self) -> int:
        return 0


class _Server:
    def __init__(self) -> None:
        self.prompt_queue = _Queue()

    def send_sync(self, event: str, data: Any, sid: Any = None) -> None:
        pass


@pytest.fixture
def interrupts(monkeypatch: pytest.MonkeyPatch) -> list[bool]:
    """ComfyUI's ``nodes.interrupt_processing`` and ``aiohttp.web``, as stand-ins."""
    pressed: list[bool] = []
    nodes = types.ModuleType("nodes")
    nodes.interrupt_processing = pressed.append  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "nodes", nodes)
    web = types.SimpleNamespace(json_response=_Response)
    aiohttp = types.ModuleType("aiohttp")
    aiohttp.web = web  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "aiohttp", aiohttp)
    return pressed


class _Rank:
    """One rank's routes and panel (no world formed: the command route needs none)."""

    def __init__(self, rank: int, size: int = 2) -> None:
        settings = local_settings(rank, size, key=KEY)
        self.auth = PeerAuth(KEY)
        self.membership = Membership(settings, f"http://r{rank}", PeerClient(self.auth, rank))
        self.server = _Server()
        self.panel = Panel(self.server, self.membership)
        routes = control_routes(self.auth, lambda: self.membership, lambda: self.panel)
        self.handler = next(h for m, p, h in routes if (m, p) == ("POST", PATH))

    def post(self, raw: bytes, header: str | None, path: str = PATH) -> _Response:
        headers = {AUTH_HEADER: header} if header is not None else {}
        # On a thread of its own, so the test does not depend on whether this thread already
        # runs an event loop (a browser test's Playwright does, while its module runs).
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            future = pool.submit(asyncio.run, self.handler(_Request(path, raw, headers)))
            response: _Response = future.result(timeout=30)
        return response


def _signed(sender: int, body: dict[str, Any], key: ClusterKey = KEY) -> tuple[bytes, str]:
    raw = json.dumps({"epoch": 0, **body, "rank": sender}).encode()
    return raw, PeerAuth(key).headers("POST", PATH, raw)[AUTH_HEADER]


def test_the_leaders_signed_command_runs_on_the_follower(interrupts: list[bool]) -> None:
    follower = _Rank(1)
    response = follower.post(*_signed(0, {"action": "interrupt"}))
    assert (response.status, response.body["done"]) == (200, "interrupted")
    assert interrupts == [True]
    response = follower.post(*_signed(0, {"action": "free"}))
    assert response.status == 200, response.body
    assert follower.server.prompt_queue.flags == {"unload_models": True, "free_memory": True}
    # What the follower's next heartbeat tells the leader's panel.
    assert follower.panel.report()["commands"] == {"interrupt": 1, "free": 1}


def test_a_command_without_a_credential_is_refused_401(interrupts: list[bool]) -> None:
    follower = _Rank(1)
    raw, _ = _signed(0, {"action": "interrupt"})
    response = follower.post(raw, None)
    assert response.status == 401 and AUTH_HEADER in response.body["error"]
    assert interrupts == [] and follower.panel.commands == {"interrupt": 0, "free": 0}


@pytest.mark.parametrize(
    "forge",
    [
        "wrong key",
        "body changed after signing",
        "signed for another route",
        "replayed",
        "garbage",
    ],
)
def test_a_forged_command_is_refused_403(interrupts: list[bool], forge: str) -> None:
    follower = _Rank(1)
    raw, header = _signed(0, {"action": "interrupt"})
    if forge == "wrong key":
        raw, header = _signed(0, {"action": "interrupt"}, ClusterKey("x" * 40))
    elif forge == "body changed after signing":
        raw = raw.replace(b"interrupt", b"free")
    elif forge == "signed for another route":
        header = PeerAuth(KEY).headers("POST", "/cluster/heartbeat", raw)[AUTH_HEADER]
    elif forge == "replayed":
        assert follower.post(raw, header).status == 200
        interrupts.clear()
    elif forge == "garbage":
        header = "v1:0:0:00"
    response = follower.post(raw, header)
    assert response.status == 403, response.body
    assert interrupts == []


def test_a_follower_cannot_command_another_follower(interrupts: list[bool]) -> None:
    follower = _Rank(1, size=3)
    response = follower.post(*_signed(2, {"action": "interrupt"}))
    assert response.status == 403 and "from the leader only" in response.body["error"]
    # Nor can a rank claim to be the one it sends to.
    response = follower.post(*_signed(1, {"action": "interrupt"}))
    assert response.status == 400
    assert interrupts == []


def test_the_leader_takes_no_command(interrupts: list[bool]) -> None:
    leader = _Rank(0)
    response = leader.post(*_signed(1, {"action": "interrupt"}))
    assert response.status == 409 and "does not take" in response.body["error"]
    assert interrupts == []


@pytest.mark.parametrize("body", [{"action": "reboot"}, {}, {"action": ["interrupt"]}])
def test_an_unknown_action_is_refused_400(interrupts: list[bool], body: dict[str, Any]) -> None:
    follower = _Rank(1)
    response = follower.post(*_signed(0, body))
    assert response.status == 400 and "'action' must be one of" in response.body["error"]
    assert interrupts == [] and follower.panel.commands == {"interrupt": 0, "free": 0}


def test_the_leader_runs_a_control_here_and_reports_which_followers_took_it(
    interrupts: list[bool], monkeypatch: pytest.MonkeyPatch
) -> None:
    asked: list[tuple[str, str, dict[str, Any]]] = []

    def post_once(m: Membership, url: str, path: str, body: dict[str, Any], t: float) -> Any:
        asked.append((url, path, body))
        if url == "http://r2":  # a follower with another key
            error = io.BytesIO(json.dumps({"error": "bad credential"}).encode())
            raise urllib.error.HTTPError(url + path, 403, "Forbidden", Message(), error)
        if url == "http://r3":
            raise ConnectionRefusedError(111, "Connection refused")
        return {"ok": True}

    monkeypatch.setattr(panel_module, "post_once", post_once)
    membership = Membership(local_settings(0, 4), "http://r0")
    membership.urls = {r: f"http://r{r}" for r in range(4)}
    panel = Panel(_Server(), membership)
    result = panel.everywhere("free")
    assert sorted((url, path, body["action"]) for url, path, body in asked) == [
        (f"http://r{r}", PATH, "free") for r in (1, 2, 3)
    ]
    assert result["sent_to"] == [1] and not result["ok"]
    assert result["failed"]["2"] == "refused (HTTP 403): bad credential"
    assert "Connection refused" in result["failed"]["3"]
    assert panel.commands == {"interrupt": 0, "free": 1}  # done here all the same
