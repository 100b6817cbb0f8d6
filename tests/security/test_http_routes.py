"""The routes the ranks' servers call on each other refuse what a stranger or a wrong rank sends.

Two layers: the checks themselves on the pack's objects (fast), then a real 2-rank ComfyUI
cluster with a cluster key, probed over HTTP as an attacker on the network would: without a
credential, with a forged, an expired and a replayed one, with malformed bodies, with a rejoin to
a world nobody forms, and with a follower's own rank as the sender of leader-only control.  After
all of it the state is unchanged and the next prompt runs.
"""

from __future__ import annotations

import dataclasses
import json
import socket
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from typing import Any

import pytest

from collectives.auth import AUTH_HEADER, ClusterKey, RequestSigner
from collectives.errors import ConfigurationError
from comfy_nodes.server.membership import Membership
from comfy_nodes.server.peers import PeerAuth, PeerClient
from comfy_nodes.server.routes import (
    MAX_BODY_BYTES,
    MAX_REASON_CHARS,
    Message,
    Refused,
    check_sender,
)
from comfy_nodes.server.settings import Settings
from tests.comfy_e2e.conftest import comfy_env, comfy_python  # noqa: F401  (fixtures)
from tests.comfy_nodes.helpers import local_settings

KEY = "test-cluster-key-" + "x" * 24
WRONG_KEY = "another-cluster-key-" + "y" * 24


def _settings(rank: int, size: int = 2, leader_url: str | None = None) -> Settings:
    return local_settings(rank, size, leader_url=leader_url, key=ClusterKey(KEY))


class _Recorded(Membership):
    """A membership that records the worlds it is told to join instead of joining them."""

    def __init__(self, settings: Settings, epoch: int) -> None:
        super().__init__(settings, "http://127.0.0.1:1")
        self.epoch, self.state = epoch, "ready"
        self.joined: list[int] = []

    def rejoin(self, epoch: int, reason: str = "") -> None:
        self.joined.append(epoch)
        self.epoch, self.state = epoch, "joining"

    def leader_epoch(self, timeout: float = 3.0) -> int | None:
        return 7  # what the leader would answer


# -- the checks, on the pack's objects -----------------------------------------------------------
def test_credentials_missing_wrong_expired_replayed() -> None:
    auth = PeerAuth(ClusterKey(KEY))
    body = b'{"rank": 1, "epoch": 0}'
    good = RequestSigner(ClusterKey(KEY)).sign("POST", "/cluster/failed", body)
    assert auth.refusal("POST", "/cluster/failed", body, good) is None
    assert auth.refusal("POST", "/cluster/failed", body, good) == (
        403,
        "replayed request credential",
    )
    assert auth.refusal("POST", "/cluster/failed", body, None)[0] == 401  # type: ignore[index]
    forged = RequestSigner(ClusterKey(WRONG_KEY)).sign("POST", "/cluster/failed", body)
    assert auth.refusal("POST", "/cluster/failed", body, forged)[0] == 403  # type: ignore[index]
    old = RequestSigner(ClusterKey(KEY)).sign("POST", "/cluster/failed", body, time.time() - 300)
    refused = auth.refusal("POST", "/cluster/failed", body, old)
    assert refused is not None and refused[0] == 403 and "expired" in refused[1]
    # Bound to path and body: the same credential for another route or body is refused.
    other = RequestSigner(ClusterKey(KEY)).sign("POST", "/cluster/failed", body)
    assert auth.refusal("POST", "/cluster/abort", body, other)[0] == 403  # type: ignore[index]
    assert auth.refusal("POST", "/cluster/failed", b"{}", other)[0] == 403  # type: ignore[index]


def test_without_a_key_unsigned_requests_are_accepted() -> None:
    assert PeerAuth(None).refusal("POST", "/cluster/failed", b"{}", None) is None
    assert PeerAuth(None).headers("POST", "/cluster/failed", b"{}") == {}


@pytest.mark.parametrize(
    "raw",
    [
        b"not json",
        b"\xff\xfe",
        b"[1, 2]",
        b'{"epoch": 1}',  # no sender
        b'{"rank": 0}',  # no epoch
        b'{"rank": 0, "epoch": 1e9}',
        b'{"rank": 0, "epoch": true}',
        b'{"rank": "0", "epoch": 1}',
        b'{"rank": -1, "epoch": 1}',
        b'{"rank": 0, "epoch": 1, "reason": 5}',
        b'{"rank": 0, "epoch": 99999999999}',
    ],
)
def test_malformed_bodies_are_400(raw: bytes) -> None:
    with pytest.raises(Refused) as err:
        Message.parse(raw, "/cluster/rejoin")
    assert err.value.status == 400 and "/cluster/rejoin" in str(err.value)


def test_who_may_send_what() -> None:
    leader, follower = _Recorded(_settings(0, 3), 3), _Recorded(_settings(2, 3), 3)
    msg = lambda rank: Message(rank=rank, epoch=3, reason="")  # noqa: E731
    check_sender("/cluster/rejoin", follower, msg(0))
    check_sender("/cluster/abort", follower, msg(0))
    check_sender("/cluster/failed", leader, msg(1))
    check_sender("/cluster/abort", leader, msg(2))
    refusals = [
        ("/cluster/rejoin", follower, msg(1), 403),  # another follower is not the leader
        ("/cluster/abort", follower, msg(1), 403),
        ("/cluster/failed", follower, msg(0), 409),  # a follower takes no failure reports
        ("/cluster/rejoin", leader, msg(1), 409),  # the leader announces worlds
        ("/cluster/abort", follower, msg(2), 400),  # itself
        ("/cluster/abort", follower, msg(3), 400),  # not a rank of this cluster
    ]
    for path, receiver, message, status in refusals:
        with pytest.raises(Refused) as err:
            check_sender(path, receiver, message)
        assert err.value.status == status, (path, message, str(err.value))


def test_a_rejoin_must_name_the_leaders_next_world() -> None:
    follower = _Recorded(_settings(1), 3)
    ok, why = follower.announced(10**9, "forged")
    assert not ok and "next world is 4" in why and follower.joined == [] and follower.epoch == 3
    assert follower.announced(3, "stale")[0] and follower.joined == []
    assert follower.announced(4, "the leader's next")[0] and follower.joined == [4]
    # Missed announcements (this rank was unreachable): believed when the leader confirms.
    assert follower.announced(7, "confirmed by the leader")[0] and follower.joined == [4, 7]


def test_senders_clip_a_reason_the_routes_would_refuse(monkeypatch: pytest.MonkeyPatch) -> None:
    import comfy_nodes.server.peers as peers

    sent: list[bytes] = []

    class _Response:
        def __enter__(self) -> _Response:
            return self

        def __exit__(self, *exc: object) -> None:
            pass

    def urlopen(req: urllib.request.Request, timeout: float) -> _Response:
        assert isinstance(req.data, bytes)
        sent.append(req.data)
        return _Response()

    monkeypatch.setattr(peers.urllib.request, "urlopen", urlopen)
    client = PeerClient(PeerAuth(ClusterKey(KEY)), rank=1)
    for reason in ("x" * (MAX_REASON_CHARS + 1000), "short"):
        client.post_async("http://leader", "/cluster/failed", {"epoch": 3, "reason": reason}).join(
            5
        )
    clipped, short = (Message.parse(raw, "/cluster/failed") for raw in sent)
    assert len(clipped.reason) == MAX_REASON_CHARS and clipped.reason.startswith("xxx")
    assert (short.rank, short.epoch, short.reason) == (1, 3, "short")


def test_a_key_is_needed_for_every_address_comfyui_listens_on() -> None:
    settings = _settings(1)
    settings.check_listen("0.0.0.0,::", {})  # with a key: anything
    keyless = dataclasses.replace(settings, key=None)
    keyless.check_listen("127.0.0.1,::1", {})
    keyless.check_listen(None, {})
    keyless.check_listen("0.0.0.0", {"COMFY_CLUSTER_INSECURE": "1"})
    for listen in ("0.0.0.0", "127.0.0.1,192.0.2.7", "::"):
        with pytest.raises(ConfigurationError, match="--listen"):
            keyless.check_listen(listen, {})


# -- a real cluster -------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def pair(
    comfy_env: Any,  # noqa: F811
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Any]:
    from tests.comfy_e2e.conftest import running_pair

    root = tmp_path_factory.mktemp("secure-pair")
    with running_pair(
        comfy_env, root, {"COMFY_CLUSTER_TIMEOUT": "30", "COMFY_CLUSTER_KEY": KEY}
    ) as comfy:
        yield comfy


def _request(
    url: str, path: str, body: bytes | None, header: str | None = None
) -> tuple[int, dict[str, Any]]:
    headers = {"Content-Type": "application/json"}
    if header is not None:
        headers[AUTH_HEADER] = header
    req = urllib.request.Request(
        url + path, data=body, headers=headers, method="GET" if body is None else "POST"
    )
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            return resp.status, json.load(resp)
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read() or b"{}")


def _sign(path: str, body: bytes, key: str = KEY, now: float | None = None) -> str:
    return RequestSigner(ClusterKey(key)).sign("GET" if not body else "POST", path, body, now)


def _status(url: str) -> dict[str, Any]:
    status, data = _request(url, "/cluster/status", None)
    assert status == 200
    return data


def _ready(url: str, timeout: float = 120) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = _status(url)
        if status["state"] == "ready":
            return status
        time.sleep(0.3)
    raise AssertionError(f"not ready: {_status(url)}")


@pytest.mark.comfy
def test_a_real_cluster_refuses_strangers_and_runs_the_next_prompt(pair: Any) -> None:
    from tests.comfy_e2e.comfy_client import ComfyClient

    leader_url, follower_url = pair.url(0), pair.url(1)
    before = _ready(leader_url)
    epoch = before["epoch"]
    assert (
        KEY not in json.dumps(before) and before["key_fingerprint"] == ClusterKey(KEY).fingerprint()
    )

    failed = json.dumps({"rank": 1, "epoch": epoch, "reason": "forged"}).encode()
    # Unsigned (the probe that used to re-form the world), forged, expired: refused.
    assert _request(leader_url, "/cluster/failed", failed)[0] == 401
    assert _request(leader_url, "/cluster/epoch", None)[0] == 401
    forged = _sign("/cluster/failed", failed, WRONG_KEY)
    assert _request(leader_url, "/cluster/failed", failed, forged)[0] == 403
    expired = _sign("/cluster/failed", failed, now=time.time() - 600)
    assert _request(leader_url, "/cluster/failed", failed, expired)[0] == 403
    # Replayed: a genuine request about a past world (harmless), sent twice.
    stale = json.dumps({"rank": 1, "epoch": epoch + 1000, "reason": "not this world"}).encode()
    header = _sign("/cluster/abort", stale)
    first = _request(leader_url, "/cluster/abort", stale, header)
    replay = _request(leader_url, "/cluster/abort", stale, header)
    assert first[0] == 200 and replay[0] == 403, (first, replay)
    assert "replayed" in replay[1]["error"], replay

    # Malformed bodies, properly signed: 400, never 500.
    for raw in (b"not json", b"[]", b'{"rank": 1, "epoch": 1e9}', b'{"epoch": 0}'):
        got = _request(leader_url, "/cluster/failed", raw, _sign("/cluster/failed", raw))
        assert got[0] == 400 and "error" in got[1], (raw, got)
    # A rejoin to a world nobody forms: refused, the follower is not stranded.
    rejoin = json.dumps({"rank": 0, "epoch": 10**9}).encode()
    got = _request(follower_url, "/cluster/rejoin", rejoin, _sign("/cluster/rejoin", rejoin))
    assert got[0] == 409, got
    # Leader-only control sent to a follower as if from a follower (its own rank): refused.
    abort = json.dumps({"rank": 1, "epoch": epoch, "reason": "forged"}).encode()
    got = _request(follower_url, "/cluster/abort", abort, _sign("/cluster/abort", abort))
    assert got[0] in (400, 403), got
    # The leader does not take rejoin at all.
    got = _request(leader_url, "/cluster/rejoin", rejoin, _sign("/cluster/rejoin", rejoin))
    assert got[0] == 409, got

    for url in (leader_url, follower_url):
        status = _status(url)
        assert (status["state"], status["epoch"]) == ("ready", epoch), status
    assert _request(leader_url, "/cluster/epoch", None, _sign("/cluster/epoch", b"")) == (
        200,
        {"epoch": epoch},
    )
    outputs = ComfyClient(leader_url, timeout=60).run(
        {"1": {"class_type": "ClusterInfo", "inputs": {}}}, timeout=120
    )
    assert "connected: 2/2" in outputs["1"]["text"][0]


def _raw_post(url: str, path: str, head: str, parts: list[bytes]) -> tuple[int, str]:
    """POST over a raw socket: ``head`` (headers, without the request line), then the body in
    ``parts``, each its own TCP segment, a pause apart; the status and body of the answer."""
    host, port = url.split("//", 1)[1].rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        request = f"POST {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n{head}\r\n"
        sock.sendall(request.encode())
        for part in parts:
            try:
                sock.sendall(part)
            except OSError:
                break  # refused before the rest was sent
            time.sleep(0.2)
        data = b""
        try:
            while chunk := sock.recv(65536):
                data += chunk
        except ConnectionResetError:
            pass  # the server closed the connection after answering
    head_part, _, answer = data.partition(b"\r\n\r\n")
    return int(head_part.split(b" ", 2)[1]), answer.decode("utf-8", "replace")


@pytest.mark.comfy
def test_a_body_split_over_segments_is_read_whole_and_a_long_chunked_one_refused(
    pair: Any,
) -> None:
    leader_url = pair.url(0)
    epoch = _ready(leader_url)["epoch"]
    # About a world that is not the leader's: harmless, but only accepted if read whole.
    body = json.dumps({"rank": 1, "epoch": epoch + 1000, "reason": "y" * 3000}).encode()
    head = (
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n"
        f"{AUTH_HEADER}: {_sign('/cluster/abort', body)}\r\n"
    )
    got = _raw_post(leader_url, "/cluster/abort", head, [body[:100], body[100:2000], body[2000:]])
    assert got[0] == 200, got
    # Chunked, no length: refused once past the cap (413), whatever the credential says.
    chunk = b"z" * (MAX_BODY_BYTES // 2)
    chunks = [b"%x\r\n%s\r\n" % (len(chunk), chunk) for _ in range(3)] + [b"0\r\n\r\n"]
    head = (
        "Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n"
        f"{AUTH_HEADER}: {_sign('/cluster/abort', b'x')}\r\n"
    )
    got = _raw_post(leader_url, "/cluster/abort", head, chunks)
    assert got[0] == 413, got
    assert _status(leader_url)["state"] == "ready" and _status(leader_url)["epoch"] == epoch
