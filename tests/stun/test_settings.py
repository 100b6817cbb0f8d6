"""Settings from the environment: this project's names, the original server's names, errors
that name the variable; and the command line, run as a real process."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time

import httpx
import pytest

from collectives.errors import ConfigurationError
from stun.settings import Settings, parse_auth_keys

from .server_proc import ALPHA_KEY, REPO, free_port


def test_the_original_servers_variables_are_read() -> None:
    s = Settings.from_env(
        {
            "COMFY_CLUSTER_AUTH_KEYS": f"alpha:{ALPHA_KEY}, beta : beta-key-123",
            "STUN_SERVER_HOST": "0.0.0.0",
            "STUN_SERVER_PORT": "9000",
            "STUN_INSTANCE_TIMEOUT": "90",
            "STUN_CLEANUP_INTERVAL": "30",
            "COMFY_CLUSTER_STUN_LOG_LEVEL": "DEBUG",
        }
    )
    assert s.cluster_keys == {"alpha": ALPHA_KEY, "beta": "beta-key-123"}
    assert (s.host, s.port, s.ttl_s, s.cleanup_interval_s, s.log_level) == (
        "0.0.0.0",
        9000,
        90.0,
        30.0,
        "debug",
    )
    assert s.heartbeat_s == 30.0


def test_our_names_win_over_the_originals() -> None:
    s = Settings.from_env(
        {
            "COMFY_CLUSTER_AUTH_KEYS": f"alpha:{ALPHA_KEY}",
            "STUN_SERVER_PORT": "9000",
            "COMFY_CLUSTER_STUN_PORT": "9100",
            "COMFY_CLUSTER_STUN_UDP_PORT": "off",
            "COMFY_CLUSTER_STUN_OPEN_REGISTRATION": "1",
        }
    )
    assert (s.port, s.udp_port, s.open_registration) == (9100, None, True)
    assert Settings.from_env({"COMFY_CLUSTER_STUN_OPEN_REGISTRATION": "1"}).udp_port == 3478


@pytest.mark.parametrize(
    ("env", "names"),
    [
        ({"COMFY_CLUSTER_AUTH_KEYS": "alpha"}, "COMFY_CLUSTER_AUTH_KEYS"),
        ({"COMFY_CLUSTER_AUTH_KEYS": "alpha:short"}, "COMFY_CLUSTER_AUTH_KEYS"),
        ({"COMFY_CLUSTER_AUTH_KEYS": "bad id:0123456789"}, "COMFY_CLUSTER_AUTH_KEYS"),
        ({}, "COMFY_CLUSTER_STUN_OPEN_REGISTRATION"),
        (
            {"COMFY_CLUSTER_AUTH_KEYS": f"a:{ALPHA_KEY}", "STUN_SERVER_PORT": "x"},
            "STUN_SERVER_PORT",
        ),
        (
            {"COMFY_CLUSTER_AUTH_KEYS": f"a:{ALPHA_KEY}", "COMFY_CLUSTER_STUN_UDP_PORT": "99999"},
            "COMFY_CLUSTER_STUN_UDP_PORT",
        ),
        (
            {"COMFY_CLUSTER_AUTH_KEYS": f"a:{ALPHA_KEY}", "COMFY_CLUSTER_STUN_ADMIN_KEY": "short"},
            "COMFY_CLUSTER_STUN_ADMIN_KEY",
        ),
    ],
)
def test_bad_settings_name_the_variable(env: dict[str, str], names: str) -> None:
    with pytest.raises(ConfigurationError, match=names):
        Settings.from_env(env)


def test_parse_auth_keys_keeps_colons_in_keys() -> None:
    assert parse_auth_keys("a:k:with:colons,,b:other-key") == {
        "a": "k:with:colons",
        "b": "other-key",
    }


def test_python_m_stun_runs_with_the_originals_variables() -> None:
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("COMFY_", "STUN_"))}
    env.update(
        {
            "PYTHONPATH": str(REPO),
            "COMFY_CLUSTER_AUTH_KEYS": f"alpha:{ALPHA_KEY}",
            "STUN_SERVER_HOST": "127.0.0.1",
            "STUN_SERVER_PORT": str(port),
            "COMFY_CLUSTER_STUN_UDP_PORT": str(free_port(socket.SOCK_DGRAM)),
            "COMFY_CLUSTER_STUN_UDP_HOST": "127.0.0.1",
        }
    )
    proc = subprocess.Popen(
        [sys.executable, "-m", "stun"], cwd=REPO, env=env, stderr=subprocess.DEVNULL
    )
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                r = httpx.get(f"http://127.0.0.1:{port}/docs", timeout=1)
                break
            except httpx.HTTPError:
                assert time.monotonic() < deadline and proc.poll() is None
                time.sleep(0.05)
        assert r.status_code == 200 and "swagger" in r.text.lower()
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def test_a_bad_setting_exits_2_naming_it() -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("COMFY_", "STUN_"))}
    env["PYTHONPATH"] = str(REPO)
    done = subprocess.run(
        [sys.executable, "-m", "stun"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 2 and "COMFY_CLUSTER_AUTH_KEYS" in done.stderr


def test_the_udp_port_listens_where_http_was_told_unless_given_its_own() -> None:
    from stun.settings import Settings

    keys = {"COMFY_CLUSTER_AUTH_KEYS": "farm:0123456789abcdef"}
    assert Settings.from_env(keys).udp_host is None  # app.py binds it to settings.host
    told = Settings.from_env({**keys, "COMFY_CLUSTER_STUN_HOST": "127.0.0.5"})
    assert (told.udp_host or told.host) == "127.0.0.5"
