"""Invite tokens: round trip, expiry, typos and tampering, and `comfycluster invite` against a
real rendezvous server."""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from comfyui_cluster.launchers.invite import (
    MAX_TOKEN_CHARS,
    Invite,
    InviteExpiredError,
    InviteMalformedError,
    InviteVersionError,
    make_token,
    parse_duration,
    parse_token,
)
from tests.stun.server_proc import ALPHA_KEY, StunProcess, free_port

REPO = Path(__file__).resolve().parents[2]
KEY = "k" * 24
NOW = 1_800_000_000.0


def _invite(**over: object) -> Invite:
    fields: dict[str, object] = {
        "server": "https://stun.example.org:8089",
        "cluster_id": "farm-1",
        "key": KEY,
        "expires": int(NOW) + 3600,
        "world_size": 4,
    }
    fields.update(over)
    return Invite(**fields)  # type: ignore[arg-type]


def test_round_trip_keeps_every_field() -> None:
    invite = _invite()
    token = make_token(invite)
    assert token.startswith("ccinv1.") and token.count(".") == 2
    assert parse_token(token, now=NOW) == invite
    assert parse_token(make_token(_invite(world_size=None)), now=NOW).world_size is None


def test_env_is_the_stun_discovery_of_the_invite() -> None:
    env = _invite().env()
    assert env == {
        "COMFY_CLUSTER_REGISTRATION_MODE": "stun",
        "COMFY_CLUSTER_STUN_SERVER": "https://stun.example.org:8089",
        "COMFY_CLUSTER_CLUSTER_ID": "farm-1",
        "COMFY_CLUSTER_KEY": KEY,
    }


def test_whitespace_from_a_wrapped_paste_is_ignored() -> None:
    token = make_token(_invite())
    wrapped = "  " + token[:40] + "\n" + token[40:90] + " \r\n\t" + token[90:] + "\n"
    assert parse_token(wrapped, now=NOW) == _invite()


def test_repr_never_shows_the_key() -> None:
    assert KEY not in repr(_invite())
    assert "fingerprint" in repr(_invite())


def test_expired_token_says_when_and_how_to_get_a_new_one() -> None:
    token = make_token(_invite(expires=int(NOW) - 7200))
    with pytest.raises(InviteExpiredError) as err:
        parse_token(token, now=NOW)
    text = str(err.value)
    assert "expired at 2027-01-15 06:00:00 UTC" in text  # NOW - 2 h
    assert "2.0 h ago" in text
    assert "comfycluster invite" in text and "--join" in text
    assert err.value.expired_at == NOW - 7200


def test_expiry_is_exact_to_the_second() -> None:
    token = make_token(_invite(expires=int(NOW) + 1))
    assert parse_token(token, now=NOW).expires == int(NOW) + 1
    with pytest.raises(InviteExpiredError):
        parse_token(token, now=NOW + 1)


@pytest.mark.parametrize("position", [10, 40, 80, -3])
def test_a_mistyped_character_fails_the_check(position: int) -> None:
    token = make_token(_invite())
    old = token[position]
    end = len(token) + position + 1 if position < 0 else position + 1
    typo = token[: end - 1] + ("A" if old != "A" else "B") + token[end:]
    with pytest.raises(InviteMalformedError, match="mistyped or cut short"):
        parse_token(typo, now=NOW)


def test_a_truncated_token_fails_clearly() -> None:
    token = make_token(_invite())
    with pytest.raises(InviteMalformedError, match="mistyped or cut short"):
        parse_token(token[:-2], now=NOW)
    with pytest.raises(InviteMalformedError, match="not an invite token"):
        parse_token(token.rsplit(".", 1)[0], now=NOW)


def test_another_version_is_named() -> None:
    token = make_token(_invite()).replace("ccinv1.", "ccinv2.", 1)
    with pytest.raises(InviteVersionError, match="version '2'"):
        parse_token(token, now=NOW)


@pytest.mark.parametrize("text", ["", "hello", "ccinv1", "ccinv1..", "https://x/y", "a.b.c"])
def test_garbage_is_not_a_token(text: str) -> None:
    with pytest.raises(InviteMalformedError):
        parse_token(text, now=NOW)


def test_oversized_input_is_refused_before_decoding() -> None:
    with pytest.raises(InviteMalformedError, match="characters long"):
        parse_token("ccinv1." + "A" * MAX_TOKEN_CHARS, now=NOW)


def _forge(body: object) -> str:
    """A token whose check is right (anyone can compute it) around a hostile payload."""
    import hashlib

    raw = json.dumps(body).encode()
    head = "ccinv1." + base64.urlsafe_b64encode(raw).decode().rstrip("=")
    check = base64.urlsafe_b64encode(hashlib.sha256(head.encode()).digest()[:6]).decode()
    return f"{head}.{check.rstrip('=')}"


GOOD = {"server": "https://s.example", "cluster_id": "c1", "key": KEY, "expires": int(NOW) + 60}


@pytest.mark.parametrize(
    ("body", "match"),
    [
        ([1, 2], "not a JSON object"),
        ({k: v for k, v in GOOD.items() if k != "key"}, "lacks 'key'"),
        ({**GOOD, "expires": "tomorrow"}, "expiry is not a number"),
        ({**GOOD, "expires": True}, "expiry is not a number"),
        ({**GOOD, "world_size": "4"}, "world size is not a number"),
        ({**GOOD, "world_size": 0}, "world size 0"),
        ({**GOOD, "key": "short"}, "too short"),
        ({**GOOD, "cluster_id": "a/b"}, "COMFY_CLUSTER_CLUSTER_ID"),
        ({**GOOD, "server": "file:///etc/passwd"}, "not an http"),
    ],
)
def test_a_well_checked_but_hostile_payload_is_refused(body: object, match: str) -> None:
    with pytest.raises(InviteMalformedError, match=match):
        parse_token(_forge(body), now=NOW)


def test_a_forged_payload_with_valid_fields_parses() -> None:
    # The check is not a signature: what protects the cluster is the key, not the token.
    assert parse_token(_forge(GOOD), now=NOW).cluster_id == "c1"


def test_make_token_refuses_what_parse_would_refuse() -> None:
    with pytest.raises(InviteMalformedError, match="too short"):
        make_token(_invite(key="short"))
    with pytest.raises(InviteMalformedError, match="world size"):
        make_token(_invite(world_size=0))


@pytest.mark.parametrize(
    ("text", "seconds"), [("90", 90), ("90s", 90), ("30m", 1800), ("24h", 86400), ("7d", 604800)]
)
def test_durations(text: str, seconds: float) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["0", "-1h", "1y", "400d", "soon", ""])
def test_bad_durations_name_the_option(text: str) -> None:
    with pytest.raises(ValueError, match="--expires"):
        parse_duration(text)


# -- comfycluster invite ----------------------------------------------------------------------
def _tool(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith("COMFY_")}
    base.update(env or {})
    return subprocess.run(
        [sys.executable, "-m", "comfyui_cluster.launchers.tool", *args],
        env=base,
        check=False,
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPO,
    )


@pytest.fixture(scope="module")
def server() -> object:
    proc = StunProcess().start()
    yield proc
    proc.stop()


def test_invite_prints_one_token_the_server_accepts(server: StunProcess) -> None:
    before = time.time()
    got = _tool(
        "invite", "--server", server.url, "--cluster-id", "alpha", "--expires", "2h",
        "--world-size", "3", env={"COMFY_CLUSTER_KEY": ALPHA_KEY},
    )  # fmt: skip
    assert got.returncode == 0, got.stderr
    lines = got.stdout.splitlines()
    assert len(lines) == 1
    invite = parse_token(lines[0])
    assert (invite.server, invite.cluster_id, invite.key, invite.world_size) == (
        server.url, "alpha", ALPHA_KEY, 3,
    )  # fmt: skip
    assert before + 7200 - 5 <= invite.expires <= time.time() + 7200
    assert "contains the cluster key" in got.stderr
    assert ALPHA_KEY not in got.stderr


def test_invite_reads_the_key_from_a_file(server: StunProcess, tmp_path: Path) -> None:
    path = tmp_path / "key"
    path.write_text(ALPHA_KEY + "\n")
    got = _tool(
        "invite", "--server", server.url, "--cluster-id", "alpha",
        env={"COMFY_CLUSTER_KEY_FILE": str(path)},
    )  # fmt: skip
    assert got.returncode == 0, got.stderr
    assert parse_token(got.stdout).key == ALPHA_KEY


def test_invite_refuses_a_key_the_server_does_not_accept(server: StunProcess) -> None:
    got = _tool(
        "invite", "--server", server.url, "--cluster-id", "alpha", "--key", "x" * 20,
    )  # fmt: skip
    assert got.returncode == 1
    assert got.stdout == ""  # no token for a key that cannot join
    assert "COMFY_CLUSTER_KEY" in got.stderr and "COMFY_CLUSTER_CLUSTER_ID" in got.stderr


def test_invite_names_the_missing_key_option() -> None:
    got = _tool("invite", "--server", "http://127.0.0.1:9", "--cluster-id", "alpha", "--offline")
    assert got.returncode == 2
    assert "--key" in got.stderr and "COMFY_CLUSTER_KEY" in got.stderr


def test_invite_offline_skips_the_server_and_a_down_server_is_an_error() -> None:
    down = f"http://127.0.0.1:{free_port()}"
    args = ("invite", "--server", down, "--cluster-id", "alpha", "--key", ALPHA_KEY)
    offline = _tool(*args, "--offline")
    assert offline.returncode == 0, offline.stderr
    assert parse_token(offline.stdout).server == down
    online = _tool(*args)
    assert online.returncode == 1 and online.stdout == ""
    assert "COMFY_CLUSTER_STUN_SERVER" in online.stderr


def test_invite_refuses_plain_http_to_another_host() -> None:
    got = _tool(
        "invite", "--server", "http://stun.example.org", "--cluster-id", "a", "--key", ALPHA_KEY,
        "--offline",
    )  # fmt: skip
    assert got.returncode == 2
    assert "COMFY_CLUSTER_STUN_ALLOW_HTTP" in got.stderr
