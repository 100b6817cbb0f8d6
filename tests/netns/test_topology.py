"""Each NAT kind of tests/netns/topology.py behaves as real NATs of that kind do, seen with real
sockets: the test process's own sockets made inside the namespaces, and the probe program
(punch_probe.py) run inside them as separate processes."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.netns.conftest import ALL_KINDS, TopologyFactory
from tests.netns.nsproc import NsProcess
from tests.netns.topology import (
    MAPPED_PORT_MIN,
    MAPPED_PORTS,
    NS_FAMILY,
    REPO_ROOT,
    SERVER_ALT_IP,
    SERVER_IP,
    Host,
    NatKind,
    Topology,
    list_namespaces,
    sweep_stale,
)

pytestmark = pytest.mark.netns

PROBE = str(Path(__file__).with_name("punch_probe.py"))
QUIET_S = 0.4  # how long "nothing arrives" is watched (a packet here arrives in well under 1 ms)
Addr = tuple[str, int]


def site_of(topo: Topology, kind: NatKind) -> int:
    """The site of `kind` in the all_kinds topology."""
    assert topo.sites[ALL_KINDS.index(kind)].nat is kind
    return ALL_KINDS.index(kind)


def recv(sock: socket.socket, timeout: float = 2.0) -> tuple[bytes, Addr] | None:
    sock.settimeout(timeout)
    try:
        data, src = sock.recvfrom(2048)
    except TimeoutError:
        return None
    return data, (src[0], src[1])


def bound(topo: Topology, where: Host | str, ip: str = "0.0.0.0", port: int = 0) -> socket.socket:
    sock = topo.socket(where)
    sock.bind((ip, port))
    return sock


def mapped(topo: Topology, host: Host, server: socket.socket) -> tuple[socket.socket, Addr]:
    """A fresh socket on `host`, and its reflexive address as `server` sees it."""
    sock = bound(topo, host)
    sock.sendto(b"hello", server.getsockname())
    got = recv(server)
    assert got is not None, f"{host.nat.value} host could not reach the server"
    return sock, got[1]


@pytest.fixture(scope="module")
def reflector(all_kinds: Topology) -> Iterator[NsProcess]:
    binds = [f"{SERVER_IP}:3478", f"{SERVER_IP}:3479", f"{SERVER_ALT_IP}:3478"]
    args = ["reflect", *(a for b in binds for a in ("--bind", b))]
    proc = all_kinds.spawn_python(all_kinds.server, PROBE, args)
    proc.wait_for_output("READY", timeout=15)
    all_kinds.wait_for_udp_bound(all_kinds.server, 3479)
    yield proc
    proc.stop()


def test_server_sees_each_hosts_reflexive_address(all_kinds: Topology, reflector: NsProcess):
    # One socket per host asks three server addresses (two ports, two IPs) what it looks like.
    servers = [f"{SERVER_IP}:3478", f"{SERVER_IP}:3479", f"{SERVER_ALT_IP}:3478"]
    args = ["ask", "--bind", "0.0.0.0:41000"] + [a for s in servers for a in ("--server", s)]
    asks = {h: all_kinds.spawn_python(h, PROBE, args) for h in all_kinds.hosts}
    for host, proc in asks.items():
        assert proc.wait(15) == 0, proc.tail()
        seen = [tuple(s) for s in json.loads(proc.stdout)["seen"]]
        assert all(s[0] == host.public_ip for s in seen), (host.nat, seen)
        ports = {s[1] for s in seen}
        if host.nat is NatKind.NONE:
            assert ports == {41000}  # no translation at all
        elif host.nat is NatKind.SYMMETRIC:
            assert len(ports) > 1, seen  # a new mapping per destination
        else:  # endpoint-independent mapping: one external port whatever the destination
            assert len(ports) == 1, seen
            assert MAPPED_PORT_MIN <= ports.pop() < MAPPED_PORT_MIN + MAPPED_PORTS


def test_full_cone_lets_anyone_reach_the_mapped_port(all_kinds: Topology):
    host = all_kinds.host(site_of(all_kinds, NatKind.FULL_CONE))
    server = bound(all_kinds, all_kinds.server, SERVER_IP)
    sock, ext = mapped(all_kinds, host, server)  # one packet out opens the mapping to everyone
    strangers = {
        "server, other address and port": bound(all_kinds, all_kinds.server, SERVER_ALT_IP),
        "public host": bound(all_kinds, all_kinds.host(site_of(all_kinds, NatKind.NONE))),
        "port-restricted host": bound(
            all_kinds, all_kinds.host(site_of(all_kinds, NatKind.PORT_RESTRICTED))
        ),
    }
    for who, stranger in strangers.items():
        stranger.sendto(who.encode(), ext)
        got = recv(sock)
        assert got is not None and got[0] == who.encode(), f"{who} could not reach {ext}"
        sock.sendto(b"reply", got[1])  # the answer leaves from the same mapped address
        answer = recv(stranger)
        assert answer == (b"reply", ext), (who, answer)


def test_port_restricted_answers_only_the_destination_it_sent_to(all_kinds: Topology):
    host = all_kinds.host(site_of(all_kinds, NatKind.PORT_RESTRICTED))
    server = bound(all_kinds, all_kinds.server, SERVER_IP)
    sock, ext = mapped(all_kinds, host, server)
    same_ip_other_port = bound(all_kinds, all_kinds.server, SERVER_IP)
    other_ip_same_port = bound(all_kinds, all_kinds.server, SERVER_ALT_IP, server.getsockname()[1])
    public = bound(all_kinds, all_kinds.host(site_of(all_kinds, NatKind.NONE)))
    for stranger in (same_ip_other_port, other_ip_same_port, public):
        stranger.sendto(b"unsolicited", ext)
    assert recv(sock, QUIET_S) is None  # all three filtered at the router
    server.sendto(b"answer", ext)
    assert recv(sock) == (b"answer", server.getsockname())
    # Once the host has sent to a destination, that one may answer on the same mapping.
    sock.sendto(b"now you", same_ip_other_port.getsockname())
    assert recv(same_ip_other_port) == (b"now you", ext)
    same_ip_other_port.sendto(b"ok", ext)
    assert recv(sock) == (b"ok", same_ip_other_port.getsockname())


def test_symmetric_maps_each_destination_to_its_own_port(all_kinds: Topology):
    host = all_kinds.host(site_of(all_kinds, NatKind.SYMMETRIC))
    server = bound(all_kinds, all_kinds.server, SERVER_IP)
    other = bound(all_kinds, all_kinds.server, SERVER_IP)
    sock, ext = mapped(all_kinds, host, server)
    sock.sendto(b"second destination", other.getsockname())
    got = recv(other)
    assert got is not None and got[1][0] == ext[0]
    assert got[1][1] != ext[1], "symmetric NAT reused the mapping for a new destination"
    # The address the server saw is useless to anyone else: the router filters per mapping.
    other.sendto(b"to the server's mapping", ext)
    assert recv(sock, QUIET_S) is None


def test_udp_blocked_reaches_only_the_server(all_kinds: Topology):
    host = all_kinds.host(site_of(all_kinds, NatKind.UDP_BLOCKED))
    public = all_kinds.host(site_of(all_kinds, NatKind.NONE))
    sock = bound(all_kinds, host)
    for ip in (SERVER_IP, SERVER_ALT_IP):
        server = bound(all_kinds, all_kinds.server, ip)
        sock.sendto(b"ping", server.getsockname())
        got = recv(server)
        assert got is not None and got[1][0] == host.public_ip
        server.sendto(b"pong", got[1])
        assert recv(sock) == (b"pong", server.getsockname())
    peer = bound(all_kinds, public)
    sock.sendto(b"direct", (public.ip, peer.getsockname()[1]))
    assert recv(peer, QUIET_S) is None, "UDP to a non-server address left a UDP-blocked site"
    # TCP to the server is allowed (a relay over TCP stays possible).
    listener = bound_tcp(all_kinds, SERVER_IP)
    all_kinds.wait_for_tcp(host, SERVER_IP, listener.getsockname()[1], timeout=5)


def bound_tcp(topo: Topology, ip: str) -> socket.socket:
    listener = topo.socket(topo.server, socket.SOCK_STREAM)
    listener.bind((ip, 0))
    listener.listen(8)
    return listener


def test_public_host_is_reachable_unsolicited(all_kinds: Topology):
    host = all_kinds.host(site_of(all_kinds, NatKind.NONE))
    sock = bound(all_kinds, host, host.ip, 41500)
    stranger = bound(all_kinds, all_kinds.server, SERVER_ALT_IP)
    stranger.sendto(b"hi", (host.ip, 41500))
    assert recv(sock) == (b"hi", stranger.getsockname())


@pytest.mark.parametrize("new_mapping", [True, False], ids=["rebind", "same-ports"])
@pytest.mark.parametrize("kind", [NatKind.PORT_RESTRICTED, NatKind.FULL_CONE], ids=str)
def test_flush_conntrack_drops_mappings(
    make_topology: TopologyFactory, kind: NatKind, new_mapping: bool
):
    topo = make_topology([kind])
    server = bound(topo, topo.server, SERVER_IP)
    sock, before = mapped(topo, topo.host(0), server)
    topo.flush_conntrack(0, new_mapping=new_mapping)
    server.sendto(b"to the old mapping", before)
    assert recv(sock, QUIET_S) is None, "the router kept the mapping through the flush"
    sock.sendto(b"again", server.getsockname())
    got = recv(server)
    assert got is not None and got[1][0] == before[0]
    if new_mapping:  # a rebinding: same socket, new external port
        assert got[1][1] != before[1]
    else:
        assert got[1] == before


@pytest.mark.parametrize("kind", [NatKind.NONE, NatKind.PORT_RESTRICTED])
def test_block_udp_cuts_one_path_only(all_kinds: Topology, kind: NatKind):
    site = site_of(all_kinds, kind)
    sock = bound(all_kinds, all_kinds.host(site))
    main, alt = (bound(all_kinds, all_kinds.server, ip) for ip in (SERVER_IP, SERVER_ALT_IP))
    all_kinds.block_udp(site, SERVER_ALT_IP)
    try:
        sock.sendto(b"a", alt.getsockname())
        sock.sendto(b"m", main.getsockname())
        assert recv(main) is not None
        assert recv(alt, QUIET_S) is None
    finally:
        all_kinds.unblock_udp(site, SERVER_ALT_IP)
    sock.sendto(b"a", alt.getsockname())
    assert recv(alt) is not None


PUNCH_CASES = [
    # (kinds of the two sites, whether a direct path opens)
    ((NatKind.PORT_RESTRICTED, NatKind.PORT_RESTRICTED), True),
    ((NatKind.SYMMETRIC, NatKind.SYMMETRIC), False),
    ((NatKind.SYMMETRIC, NatKind.FULL_CONE), True),  # via the peer-reflexive address
    ((NatKind.PORT_RESTRICTED, NatKind.SYMMETRIC), False),
    ((NatKind.UDP_BLOCKED, NatKind.NONE), False),
]


def punch_id(case: object) -> str | None:
    return "-".join(k.value for k in case) if isinstance(case, tuple) else None


@pytest.mark.parametrize(("kinds", "direct"), PUNCH_CASES, ids=punch_id)
def test_simultaneous_punching(
    make_topology: TopologyFactory, kinds: tuple[NatKind, NatKind], direct: bool
):
    topo = make_topology(list(kinds))
    reflector = topo.spawn_python(topo.server, PROBE, ["reflect", "--bind", f"{SERVER_IP}:3478"])
    reflector.wait_for_output("READY", timeout=15)
    common = ["punch", "--server", f"{SERVER_IP}:3478", "--group", "g", "--relay"]
    punchers = [
        topo.spawn_python(h, PROBE, [*common, "--name", f"p{i}", "--bind", "0.0.0.0:40000"])
        for i, h in enumerate(topo.hosts)
    ]
    results = []
    for proc in punchers:
        assert proc.wait(20) == 0, proc.tail()
        results.append(json.loads(proc.stdout))
    for host, result in zip(topo.hosts, results, strict=True):
        assert result["reflexive"][0] == host.public_ip
        assert result["relayed"], result  # the relay through the server works everywhere
    assert [r["heard"] is not None for r in results] == [direct, direct], results
    if direct and NatKind.SYMMETRIC not in kinds:
        # Each heard the other from the address the server had seen.
        assert [r["heard"] for r in results] == [r["peer"] for r in results]
    if direct and NatKind.SYMMETRIC in kinds:
        # The symmetric side answered from a new mapping: the cone side heard it at an address
        # the server never saw (peer-reflexive), and only answering there opened the path.
        sym = kinds.index(NatKind.SYMMETRIC)
        cone = 1 - sym
        assert results[cone]["heard"] != results[cone]["peer"], results
        assert results[cone]["heard"][0] == results[cone]["peer"][0]
        assert results[sym]["heard"] == results[sym]["peer"], results


def test_two_hosts_per_site_share_the_router(four_ranks_two_sites: Topology):
    topo = four_ranks_two_sites
    server = bound(topo, topo.server, SERVER_IP)
    seen = [mapped(topo, h, server)[1] for h in topo.hosts]
    assert [s[0] for s in seen] == [h.public_ip for h in topo.hosts]
    assert len(set(seen)) == 4, seen  # distinct mappings on the shared addresses
    # Hosts of one site talk directly on their LAN, without the NAT.
    a, b = topo.sites[0].hosts
    sock_b = bound(topo, b, b.ip, 42000)
    bound(topo, a).sendto(b"lan", (b.ip, 42000))
    got = recv(sock_b)
    assert got is not None and got[1][0] == a.ip


def test_teardown_and_sweep_leave_no_namespace(make_topology: TopologyFactory):
    # A run that dies without cleaning up (os._exit skips atexit) leaves namespaces behind...
    code = (
        "import os\nfrom tests.netns.topology import NatKind, nat_topology\n"
        "cm = nat_topology([NatKind.SYMMETRIC, NatKind.NONE])\ntopo = cm.__enter__()\n"
        "print(topo.prefix, flush=True)\nos._exit(0)\n"
    )
    child = subprocess.run(
        [sys.executable, "-c", code],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    prefix = child.stdout.strip()
    assert prefix.startswith(NS_FAMILY), child.stderr
    assert any(ns.startswith(prefix) for ns in list_namespaces())
    # ...which the next topology's sweep removes, while a live topology's namespaces stay.
    live = make_topology([NatKind.NONE])
    removed = sweep_stale()
    assert not any(ns.startswith(prefix) for ns in list_namespaces()), removed
    assert any(ns.startswith(live.prefix) for ns in list_namespaces())
    live.close()
    assert not any(ns.startswith(live.prefix) for ns in list_namespaces())


def test_spawned_programs_get_env_and_ports_are_awaited(all_kinds: Topology):
    # The way rank and server processes start in NAT tests: a module, env vars, port waits.
    web = all_kinds.spawn_python(
        all_kinds.server, "http.server", ["--bind", SERVER_IP, "18080"], name="http.server"
    )
    blocked = all_kinds.host(site_of(all_kinds, NatKind.UDP_BLOCKED))
    all_kinds.wait_for_tcp(blocked, SERVER_IP, 18080, timeout=15)
    fetch = "import urllib.request as u; print(u.urlopen('http://198.51.100.1:18080/').status)"
    assert all_kinds.run(blocked, [sys.executable, "-c", fetch], timeout=15).stdout == "200\n"
    web.wait_for_output(r"GET / HTTP", timeout=5, stream="stderr")  # its log, captured
    show_v = [sys.executable, "-c", "import os; print(os.environ['V'])"]
    echo = all_kinds.spawn(blocked, show_v, env={"V": "from-the-test"})
    assert echo.wait(15) == 0 and echo.stdout == "from-the-test\n"
    reflector = all_kinds.spawn_python(all_kinds.server, PROBE, ["reflect", "--bind", ":3600"])
    all_kinds.wait_for_udp_bound(all_kinds.server, 3600, timeout=15)
    reflector.stop()
    assert reflector.popen.returncode is not None
