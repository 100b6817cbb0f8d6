"""Hosts behind NATs on one machine: network namespaces, veths, nftables and conntrack.

`nat_topology([NatKind.PORT_RESTRICTED, NatKind.SYMMETRIC])` builds, inside namespaces it creates
(nothing touches the machine's own network):

    pub        198.51.100.1 and .2 on a bridge: the "internet" and the rendezvous/relay side
    site i     NAT kinds: router r<i> with WAN 198.51.100.(11+i) on the bridge, LAN 10.(81+i).0.0/24
               on a LAN bridge, hosts h<i>-<j> at 10.(81+i).0.(2+j) behind it
               NatKind.NONE: hosts h<i>-<j> directly on the public bridge at 198.51.100.(101+n)

Every router runs a stateful firewall (forward and input drop what conntrack has not seen go
out), as home and cloud routers do.  What differs per kind is the mapping and the filtering; see
docs/testing-nat.md.  Namespaces are named `cnat<pid>x<n>-...`: a topology never collides with
another run's, and `sweep_stale()` removes those whose process is gone.
"""

from __future__ import annotations

import atexit
import contextlib
import enum
import ipaddress
import itertools
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from tests.netns.nsproc import NsProcess, TopologyError, sh, signal_group, socket_in

SERVER_IP = "198.51.100.1"
SERVER_ALT_IP = "198.51.100.2"  # a second server address (a "different IP" for filtering checks)
PUBLIC_PREFIX = 24
NS_FAMILY = "cnat"  # every namespace this module makes starts with it
_NS_RE = re.compile(rf"^{NS_FAMILY}(\d+)x\d+-")
# A cone router maps UDP to external ports from MAPPED_PORT_MIN on (a hash of the internal
# endpoint picks one of MAPPED_PORTS).
MAPPED_PORT_MIN, MAPPED_PORTS = 20000, 16384
REPO_ROOT = Path(__file__).resolve().parents[2]


class NatKind(enum.Enum):
    FULL_CONE = "full-cone"  # endpoint-independent mapping and filtering
    PORT_RESTRICTED = "port-restricted"  # endpoint-independent mapping, addr+port filtering
    SYMMETRIC = "symmetric"  # a new external port per destination, addr+port filtering
    UDP_BLOCKED = "udp-blocked"  # UDP only to the server's addresses; TCP allowed
    NONE = "none"  # a public address on the bridge, no NAT, no firewall (a cloud VM)


@dataclass(frozen=True)
class Node:
    """Somewhere a program can run: a namespace and its main address."""

    ns: str
    ip: str


@dataclass(frozen=True)
class Host(Node):
    site: int
    index: int  # within the site
    nat: NatKind
    public_ip: str  # the router's WAN address (its own address for NatKind.NONE)


@dataclass(frozen=True)
class Site:
    index: int
    nat: NatKind
    router: Node | None  # None for NatKind.NONE
    hosts: tuple[Host, ...]

    @property
    def bridge_ports(self) -> tuple[str, ...]:
        """Its links' names on the public bridge (in the pub namespace)."""
        if self.router:
            return (f"s{self.index}r",)
        return tuple(f"s{self.index}h{h.index}" for h in self.hosts)


def netns_unavailable_reason() -> str | None:
    """Why namespaced NAT tests cannot run here, or None when they can."""
    if os.name != "posix" or os.geteuid() != 0:
        return "needs root (network namespaces, nftables): run the netns tests as root"
    for tool in ("ip", "nft", "conntrack", "ss"):
        if shutil.which(tool) is None:
            return f"needs `{tool}` on PATH (Debian: iproute2, nftables, conntrack)"
    probe = f"{NS_FAMILY}{os.getpid()}x0-probe"  # swept like the rest if left behind
    try:
        sh(["ip", "netns", "add", probe])
        try:
            sh(["ip", "netns", "exec", probe, "nft", "list", "ruleset"])
        finally:
            sh(["ip", "netns", "del", probe])
    except TopologyError as exc:
        return f"network namespaces or nftables do not work here: {exc}"
    return None


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def list_namespaces() -> list[str]:
    out = sh(["ip", "netns", "list"])
    return [line.split()[0] for line in out.splitlines() if line.strip()]


def sweep_stale() -> list[str]:
    """Delete this family's namespaces left by processes that are gone (a crash, a SIGKILL)."""
    removed = []
    for ns in list_namespaces():
        m = _NS_RE.match(ns)
        if m and not _pid_alive(int(m.group(1))):
            with contextlib.suppress(TopologyError):
                sh(["ip", "netns", "del", ns])
                removed.append(ns)
    return removed


_counter = itertools.count(1)
_live: set[Topology] = set()


@atexit.register
def _close_all_at_exit() -> None:
    for topo in list(_live):
        topo.close()


def ns_of(where: Node | str) -> str:
    return where.ns if isinstance(where, Node) else where


class Topology:
    """The namespaces of one test: `server`, `sites`, `hosts`, and ways to run things inside."""

    def __init__(self, prefix: str, udp_timeout_s: int | None) -> None:
        self.prefix = prefix
        self.server = Node(f"{prefix}pub", SERVER_IP)
        self.server_alt_ip = SERVER_ALT_IP
        self.sites: list[Site] = []
        self.udp_timeout_s = udp_timeout_s
        self._namespaces: list[str] = []
        self._procs: list[NsProcess | subprocess.Popen[str]] = []
        self._sockets: list[socket.socket] = []
        self._seeds: dict[int, int] = {}
        self._closed = False

    @property
    def hosts(self) -> list[Host]:
        return [h for site in self.sites for h in site.hosts]

    def host(self, site: int, index: int = 0) -> Host:
        return self.sites[site].hosts[index]

    # -- running things inside ---------------------------------------------------------------

    def popen(
        self,
        where: Node | str,
        argv: Sequence[str],
        env: Mapping[str, str] | None = None,
        **kwargs: object,
    ) -> subprocess.Popen[str]:
        """`ip netns exec NS argv...` (env: overrides on top of this process's environment),
        in its own process group; stopped at teardown if still running."""
        ns = ns_of(where)
        full_env = {**os.environ, **(env or {})}
        kwargs.setdefault("text", True)
        popen: subprocess.Popen[str] = subprocess.Popen(  # type: ignore[call-overload]
            ["ip", "netns", "exec", ns, *argv], env=full_env, start_new_session=True, **kwargs
        )
        self._procs.append(popen)
        return popen

    def spawn(
        self,
        where: Node | str,
        argv: Sequence[str],
        env: Mapping[str, str] | None = None,
        name: str | None = None,
        cwd: str | Path = REPO_ROOT,
    ) -> NsProcess:
        """A program in a namespace with its output captured (see NsProcess)."""
        popen = self.popen(
            where, argv, env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=str(cwd)
        )
        proc = NsProcess(popen, name or f"{ns_of(where)}:{argv[0]}")
        self._procs.append(proc)
        return proc

    def spawn_python(
        self,
        where: Node | str,
        module: str,
        args: Sequence[str] = (),
        env: Mapping[str, str] | None = None,
        name: str | None = None,
    ) -> NsProcess:
        """`python -m module args...` with this interpreter (the venv's), run from the repository
        root with it on PYTHONPATH, unbuffered; `module` may also be a path to a .py file."""
        target = [module] if module.endswith(".py") else ["-m", module]
        base = {"PYTHONPATH": str(REPO_ROOT), "PYTHONUNBUFFERED": "1"}
        return self.spawn(
            where,
            [sys.executable, *target, *args],
            env={**base, **(env or {})},
            name=name or f"{ns_of(where)}:{module}",
        )

    def run(
        self, where: Node | str, argv: Sequence[str], timeout: float = 30.0, check: bool = True
    ) -> subprocess.CompletedProcess[str]:
        ns = ns_of(where)
        done = subprocess.run(
            ["ip", "netns", "exec", ns, *argv],
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
        if check and done.returncode != 0:
            raise TopologyError(f"in {ns}: {' '.join(argv)} failed: {done.stderr.strip()}")
        return done

    def socket(self, where: Node | str, kind: int = socket.SOCK_DGRAM) -> socket.socket:
        """An IPv4 socket inside `where`, owned by this test process; closed at teardown."""
        sock = socket_in(ns_of(where), socket.AF_INET, kind)
        self._sockets.append(sock)
        return sock

    def wait_for_tcp(self, where: Node | str, ip: str, port: int, timeout: float = 15.0) -> None:
        """Until a TCP connect from `where` to ip:port succeeds (a server has come up)."""
        deadline = time.monotonic() + timeout
        last: OSError | None = None
        while time.monotonic() < deadline:
            probe = socket_in(ns_of(where), socket.AF_INET, socket.SOCK_STREAM)
            with contextlib.closing(probe):
                probe.settimeout(1.0)
                try:
                    probe.connect((ip, port))
                    return
                except OSError as exc:
                    last = exc
            time.sleep(0.05)
        raise TimeoutError(
            f"no TCP listener at {ip}:{port} seen from {ns_of(where)} in {timeout}s: {last}"
        )

    def wait_for_udp_bound(self, where: Node | str, port: int, timeout: float = 15.0) -> None:
        """Until some socket in `where` has bound UDP `port` (a UDP server has come up)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            out = self.run(where, ["ss", "-Hnul", f"sport = :{port}"], timeout=5.0).stdout
            if out.strip():
                return
            time.sleep(0.05)
        raise TimeoutError(f"nothing bound UDP port {port} in {ns_of(where)} within {timeout}s")

    # -- changing the network mid-test -------------------------------------------------------

    def flush_conntrack(self, site: int, new_mapping: bool = True) -> None:
        """Forget the site router's mappings, as a NAT that reboots or expires them does.  With
        `new_mapping` the router also maps each internal endpoint to a new external port from
        now on (a rebinding); without, the same ports come back on the next packet out."""
        router = self._router(site)
        if new_mapping and self.sites[site].nat is not NatKind.SYMMETRIC:
            self._seeds[site] += 1
            rules = f"flush chain ip nat snat_udp\n{self._snat_rule(site)}\n"
            if self.sites[site].nat is NatKind.FULL_CONE:
                rules += "flush map ip nat cone\n"
            sh(["ip", "netns", "exec", router.ns, "nft", "-f", "-"], stdin=rules)
        elif self.sites[site].nat is NatKind.FULL_CONE:
            sh(["ip", "netns", "exec", router.ns, "nft", "flush", "map", "ip", "nat", "cone"])
        self.run(router, ["conntrack", "-F"])

    def block_udp(self, site: int, peer_ip: str) -> None:
        """Drop UDP between site `site` and `peer_ip` (a public address), both ways, until
        unblock_udp: a path that breaks while the server stays reachable."""
        self._guard_set(site, "add", peer_ip)

    def unblock_udp(self, site: int, peer_ip: str) -> None:
        self._guard_set(site, "delete", peer_ip)

    def _guard_set(self, site: int, verb: str, peer_ip: str) -> None:
        element = ["element", "bridge", "guard", f"blocked{site}", "{", peer_ip, "}"]
        sh(["ip", "netns", "exec", self.server.ns, "nft", verb, *element])

    def _router(self, site: int) -> Node:
        router = self.sites[site].router
        if router is None:
            raise ValueError(f"site {site} is NatKind.NONE: it has no router")
        return router

    # -- building ----------------------------------------------------------------------------

    def _add_ns(self, name: str) -> str:
        ns = f"{self.prefix}{name}"
        sh(["ip", "netns", "add", ns])
        self._namespaces.append(ns)
        sh(["ip", "-n", ns, "link", "set", "lo", "up"])
        return ns

    def _veth(self, ns_a: str, if_a: str, ns_b: str, if_b: str) -> None:
        # Both ends are made directly inside their namespaces: no name in the machine's own
        # namespace, so concurrent topologies cannot clash on interface names.
        peer = ["peer", "name", if_b, "netns", ns_b]
        sh(["ip", "link", "add", if_a, "netns", ns_a, "type", "veth", *peer])

    def _bridge_port(self, ns: str, ifname: str, bridge: str) -> None:
        sh(["ip", "-n", ns, "link", "set", ifname, "master", bridge, "up"])

    def _up(self, ns: str, ifname: str, cidr: str | None = None) -> None:
        if cidr:
            sh(["ip", "-n", ns, "addr", "add", cidr, "dev", ifname])
        sh(["ip", "-n", ns, "link", "set", ifname, "up"])

    def build(self, kinds: Sequence[NatKind], hosts_per_site: Sequence[int]) -> None:
        pub = self._add_ns("pub")
        sh(["ip", "-n", pub, "link", "add", "br0", "type", "bridge"])
        self._up(pub, "br0", f"{SERVER_IP}/{PUBLIC_PREFIX}")
        sh(["ip", "-n", pub, "addr", "add", f"{SERVER_ALT_IP}/{PUBLIC_PREFIX}", "dev", "br0"])
        public_hosts = itertools.count(101)
        for i, (kind, count) in enumerate(zip(kinds, hosts_per_site, strict=True)):
            if kind is NatKind.NONE:
                hosts = []
                for j in range(count):
                    ip = f"198.51.100.{next(public_hosts)}"
                    ns = self._add_ns(f"h{i}-{j}")
                    self._veth(ns, "eth0", pub, f"s{i}h{j}")
                    self._bridge_port(pub, f"s{i}h{j}", "br0")
                    self._up(ns, "eth0", f"{ip}/{PUBLIC_PREFIX}")
                    hosts.append(Host(ns, ip, i, j, kind, ip))
                self.sites.append(Site(i, kind, None, tuple(hosts)))
                continue
            router = Node(self._add_ns(f"r{i}"), f"198.51.100.{11 + i}")
            self._veth(router.ns, "wan", pub, f"s{i}r")
            self._bridge_port(pub, f"s{i}r", "br0")
            self._up(router.ns, "wan", f"{router.ip}/{PUBLIC_PREFIX}")
            lan = ipaddress.ip_network(f"10.{81 + i}.0.0/24")
            sh(["ip", "-n", router.ns, "link", "add", "lan", "type", "bridge"])
            self._up(router.ns, "lan", f"{lan[1]}/24")
            hosts = []
            for j in range(count):
                ns = self._add_ns(f"h{i}-{j}")
                ip = str(lan[2 + j])
                self._veth(ns, "eth0", router.ns, f"l{j}")
                self._bridge_port(router.ns, f"l{j}", "lan")
                self._up(ns, "eth0", f"{ip}/24")
                sh(["ip", "-n", ns, "route", "add", "default", "via", str(lan[1])])
                hosts.append(Host(ns, ip, i, j, kind, router.ip))
            self.sites.append(Site(i, kind, router, tuple(hosts)))
            self._seeds[i] = 1
            self._router_rules(i)
        self._guard()

    def _snat_rule(self, site: int) -> str:
        # Endpoint-independent mapping: the external port is a hash of the internal address and
        # port, the same whatever the destination; a new seed gives every endpoint a new port.
        # The map turns the hash (a host-order integer) into a port (network order).
        ports = ", ".join(f"{i} : {MAPPED_PORT_MIN + i}" for i in range(MAPPED_PORTS))
        return (
            f"add rule ip nat snat_udp meta l4proto udp snat ip to {self._router(site).ip} : "
            f"jhash ip saddr . udp sport mod {MAPPED_PORTS} seed {self._seeds[site]:#x} "
            f"map {{ {ports} }}"
        )

    def _router_rules(self, site: int) -> None:
        kind = self.sites[site].nat
        router = self._router(site)
        sh(["ip", "netns", "exec", router.ns, "sysctl", "-qw", "net.ipv4.ip_forward=1"])
        udp_map = "masquerade fully-random" if kind is NatKind.SYMMETRIC else "jump snat_udp"
        outbound = ""
        if kind is NatKind.UDP_BLOCKED:
            outbound = (
                f'oifname "wan" meta l4proto udp ip daddr != {{ {SERVER_IP}, {SERVER_ALT_IP} }} '
                "drop"
            )
        cone_timeout = self.udp_timeout_s or 120
        cone = ""
        if kind is NatKind.FULL_CONE:
            # Endpoint-independent filtering: remember each mapping (external port -> internal
            # endpoint) as packets leave, and send anything arriving at that port inside.
            cone = f"""
  map cone {{ type inet_service : ipv4_addr . inet_service; flags dynamic, timeout;
             timeout {cone_timeout}s; }}
  chain cone_in {{ type nat hook prerouting priority dstnat;
    iifname "wan" udp dport @cone dnat ip to udp dport map @cone
  }}
  chain cone_learn {{ type filter hook postrouting priority srcnat + 10;
    oifname "wan" meta l4proto udp ct direction original ct status snat \
      update @cone {{ udp sport : ct original ip saddr . ct original proto-src }}
  }}"""
        rules = f"""
table ip nat {{
  chain snat_udp {{ }}
  chain post {{ type nat hook postrouting priority srcnat;
    oifname "wan" meta l4proto udp {udp_map}
    oifname "wan" masquerade
  }}{cone}
}}
table ip filter {{
  chain forward {{ type filter hook forward priority filter; policy drop;
    ct state established,related accept
    iifname != "wan" oifname != "wan" accept
    {outbound}
    iifname != "wan" oifname "wan" accept
    {'iifname "wan" ct status dnat accept' if kind is NatKind.FULL_CONE else ""}
  }}
  chain input {{ type filter hook input priority filter; policy drop;
    iifname != "wan" accept
    ct state established,related accept
  }}
}}
"""
        if kind is not NatKind.SYMMETRIC:
            rules += self._snat_rule(site) + "\n"
        sh(["ip", "netns", "exec", router.ns, "nft", "-f", "-"], stdin=rules)
        if self.udp_timeout_s is not None:
            for key in ("nf_conntrack_udp_timeout", "nf_conntrack_udp_timeout_stream"):
                setting = f"net.netfilter.{key}={self.udp_timeout_s}"
                sh(["ip", "netns", "exec", router.ns, "sysctl", "-qw", setting])

    def _guard(self) -> None:
        # The sets block_udp() fills, on the public bridge's ports: the "internet" drops the
        # packets, so neither end sees an error, just silence, as on a broken path.
        chains = {"prerouting": ("iifname", "daddr"), "postrouting": ("oifname", "saddr")}
        table = ["table bridge guard {"]
        table += [f"  set blocked{site.index} {{ type ipv4_addr; }}" for site in self.sites]
        for hook, (port_dir, addr_dir) in chains.items():
            table.append(f"  chain {hook} {{ type filter hook {hook} priority filter - 10;")
            for site in self.sites:
                ports = ", ".join(f'"{p}"' for p in site.bridge_ports)
                table.append(
                    f"    {port_dir} {{ {ports} }} meta l4proto udp "
                    f"ip {addr_dir} @blocked{site.index} drop"
                )
            table.append("  }")
        table.append("}")
        sh(["ip", "netns", "exec", self.server.ns, "nft", "-f", "-"], stdin="\n".join(table))

    # -- teardown ----------------------------------------------------------------------------

    def close(self) -> None:
        """Stop what runs inside, close sockets, delete every namespace; safe to call twice."""
        if self._closed:
            return
        self._closed = True
        _live.discard(self)
        for proc in reversed(self._procs):
            if isinstance(proc, NsProcess):
                proc.stop()
            elif proc.poll() is None:
                signal_group(proc, "KILL")
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(3.0)
        for sock in self._sockets:
            sock.close()
        for ns in reversed(self._namespaces):
            with contextlib.suppress(TopologyError):
                sh(["ip", "netns", "del", ns])


@contextlib.contextmanager
def nat_topology(
    kinds: Sequence[NatKind],
    hosts_per_site: int | Sequence[int] = 1,
    udp_timeout_s: int | None = None,
) -> Iterator[Topology]:
    """Build the namespaces for `kinds` (one site each), yield them, and always remove them.

    `hosts_per_site`: a count for every site, or one per site.  `udp_timeout_s`: the routers'
    conntrack UDP timeouts (how long an idle mapping lives; the kernel's default is 30 s
    unreplied, 120 s once replied)."""
    kinds = list(kinds)
    counts = [hosts_per_site] * len(kinds) if isinstance(hosts_per_site, int) else hosts_per_site
    if not 1 <= len(kinds) <= 16:
        raise ValueError(f"kinds: 1 to 16 sites, got {len(kinds)}")
    if len(counts) != len(kinds) or not all(1 <= c <= 50 for c in counts):
        raise ValueError(f"hosts_per_site: 1 to 50 for each of {len(kinds)} sites, got {counts}")
    sweep_stale()
    topo = Topology(f"{NS_FAMILY}{os.getpid()}x{next(_counter)}-", udp_timeout_s)
    _live.add(topo)
    try:
        topo.build(kinds, counts)
        yield topo
    finally:
        topo.close()
