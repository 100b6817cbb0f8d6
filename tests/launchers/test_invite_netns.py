"""The invite flow across NATs (tests/netns/topology.py): the real rendezvous server in the
public namespace, a home PC behind each NAT running ``comfycluster-launch --join TOKEN`` (ranks
assigned by the server) and ``comfycluster doctor --join TOKEN``.

Measured and printed: the time from starting ``--join`` to a formed communicator (the world
forms over the relay) and the time until the direct path is used.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Iterator

import pytest

from comfyui_cluster.launchers.invite import Invite, make_token
from tests.netns.topology import (
    REPO_ROOT,
    SERVER_IP,
    NatKind,
    Topology,
    nat_topology,
    netns_unavailable_reason,
)

pytestmark = [pytest.mark.netns, pytest.mark.udp]

KEY = "netns-invite-key-0123456789abcdef"
HTTP_PORT = 8089
UDP_PORT = 3478
SERVER = f"http://{SERVER_IP}:{HTTP_PORT}"
# A rank: form the world, note when (wall clock: one machine, one clock), give punching up to
# 3 s, report the paths.
RANK = """
import json, time
import collectives
comm = collectives.init(timeout=60)
formed = time.time()
first = {r: p["path"] for r, p in comm.stats()["paths"].items()}
end = time.monotonic() + 3.0
while time.monotonic() < end and any(
        p["path"] == "relayed" for p in comm.stats()["paths"].values()):
    time.sleep(0.02)
paths = {r: [p["path"], p["direct_after_s"]] for r, p in comm.stats()["paths"].items()}
ok = comm.allgather(comm.rank) == list(range(comm.size))
comm.barrier()
print("FORMED " + json.dumps({"rank": comm.rank, "at": formed, "first": first, "paths": paths,
                              "ok": ok}), flush=True)
comm.close()
"""


@pytest.fixture
def topo() -> Iterator[Topology]:
    if reason := netns_unavailable_reason():
        pytest.skip(reason)
    with nat_topology([NatKind.PORT_RESTRICTED, NatKind.PORT_RESTRICTED]) as t:
        env = {"COMFY_CLUSTER_AUTH_KEYS": f"home:{KEY}", "COMFY_CLUSTER_STUN_LOG_LEVEL": "warning",
               "COMFY_CLUSTER_STUN_UDP_PUBLIC_HOST": SERVER_IP}  # fmt: skip
        t.spawn_python(t.server, "stun", ["--host", SERVER_IP, "--port", str(HTTP_PORT),
                       "--udp-host", SERVER_IP, "--udp-port", str(UDP_PORT)], env=env,
                       name="stun-server")  # fmt: skip
        t.wait_for_tcp(t.server, SERVER_IP, HTTP_PORT)
        t.wait_for_udp_bound(t.server, UDP_PORT)
        yield t


def _token(world_size: int | None = 2) -> str:
    return make_token(Invite(SERVER, "home", KEY, int(time.time()) + 600, world_size))


# The namespaces are this test's own network: plain http to the server is fine there.
HOME_ENV = {"COMFY_CLUSTER_STUN_ALLOW_HTTP": "1", "PYTHONPATH": str(REPO_ROOT)}


def test_two_home_pcs_join_with_one_token(topo: Topology) -> None:
    token = _token()
    began = time.time()
    procs = [
        topo.spawn(
            host,
            [
                sys.executable,
                "-m",
                "comfyui_cluster.launchers",
                "--join",
                token,
                "--nproc",
                "1",
                "--",
                sys.executable,
                "-c",
                RANK,
            ],
            HOME_ENV,
            f"home{i}",
        )
        for i, host in enumerate(topo.hosts)
    ]
    results = []
    for proc in procs:
        assert proc.wait(120) == 0, proc.tail()
        line = [x for x in proc.stdout.splitlines() if "FORMED " in x]
        assert line, proc.tail()
        results.append(json.loads(line[-1].split("FORMED ", 1)[1]))
    assert sorted(r["rank"] for r in results) == [0, 1]
    formed = max(r["at"] for r in results) - began
    direct = [after for r in results for _, after in r["paths"].values()]
    print(f"\n--join -> formed (port-restricted x port-restricted): {formed:.2f} s; "
          f"first paths {[r['first'] for r in results]}; direct after {direct} s")  # fmt: skip
    for r in results:
        assert r["ok"]
        assert all(path == "punched" for path, _ in r["paths"].values()), r
    assert all(after is not None and after < 3.0 for after in direct), direct
    assert formed < 10.0  # the target is 2 s on an idle machine; CI shares two cores


def test_doctor_behind_a_nat_reports_the_public_address(topo: Topology) -> None:
    host = topo.host(0)
    proc = topo.spawn(host, [sys.executable, "-m", "comfyui_cluster.launchers.tool", "doctor",
                             "--join", _token()], HOME_ENV, "doctor")  # fmt: skip
    code = proc.wait(60)
    out = proc.stdout
    assert code == 0, proc.tail()
    (nat,) = [x for x in out.splitlines() if " nat:" in x]
    assert nat.startswith("ok ") and f"behind a NAT (public address {host.public_ip})" in nat
    assert "plain http" in next(x for x in out.splitlines() if " server:" in x)
