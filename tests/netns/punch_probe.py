"""A tiny UDP program for the NAT topologies, run inside a namespace (`ip netns exec NS python
tests/netns/punch_probe.py MODE ...`).  Standard library only.

    reflect --bind IP:PORT [--bind ...]   answer every datagram with the address it came from
                                          (as STUN does), pair up punch registrations and relay
                                          between the members of a pair
    ask --server IP:PORT [--server ...] --bind IP:PORT
                                          print {"seen": [[ip, port], ...]}: this socket's address
                                          as each server saw it (one socket for all servers)
    punch --server IP:PORT --name N --group G --bind IP:PORT
                                          register, learn the other member's reflexive address,
                                          punch at it, answer punches where they came from, print
                                          {"reflexive", "peer", "heard", "relayed"}; with
                                          --relay also exchange messages through the server

Every wait is bounded; the process exits on its own.
"""

from __future__ import annotations

import argparse
import json
import select
import socket
import sys
import time
from typing import Any

Addr = tuple[str, int]


def parse_addr(text: str) -> Addr:
    host, _, port = text.rpartition(":")
    return host, int(port)


def reflect(binds: list[Addr], lifetime: float) -> int:
    socks = []
    for addr in binds:
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.bind(addr)
        socks.append(sock)
    groups: dict[str, dict[str, Addr]] = {}
    print("READY", json.dumps([s.getsockname() for s in socks]), flush=True)
    deadline = time.monotonic() + lifetime
    while time.monotonic() < deadline:
        ready, _, _ = select.select(socks, [], [], 0.5)
        for sock in ready:
            data, src = sock.recvfrom(2048)
            try:
                msg = json.loads(data)
            except ValueError:
                msg = {}
            if not isinstance(msg, dict) or not ("register" in msg or "relay" in msg):
                sock.sendto(json.dumps({"seen": list(src)}).encode(), src)
                continue
            if "relay" in msg:  # pass it to the group's other members: the fallback path
                for name, member in groups.get(str(msg["relay"]), {}).items():
                    if name != msg.get("from"):
                        sock.sendto(f"relayed:{msg.get('from')}".encode(), member)
                continue
            members = groups.setdefault(str(msg["group"]), {})
            members[str(msg["register"])] = src
            print("REGISTER", msg["group"], msg["register"], list(src), flush=True)
            if len(members) >= 2:
                # Everyone learns everyone's reflexive address; members re-register until
                # they hear this, so a lost answer is simply sent again.
                reply = json.dumps({"peers": {k: list(v) for k, v in members.items()}})
                for member in members.values():
                    sock.sendto(reply.encode(), member)
    return 0


def ask(servers: list[Addr], bind: Addr, timeout: float) -> int:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(bind)
    sock.settimeout(0.2)
    seen: list[list[Any] | None] = []
    for server in servers:
        found = None
        deadline = time.monotonic() + timeout
        while found is None and time.monotonic() < deadline:
            sock.sendto(b"?", server)
            try:
                data, src = sock.recvfrom(2048)
            except TimeoutError:
                continue
            if src == server:
                found = json.loads(data)["seen"]
        seen.append(found)
    print(json.dumps({"local": list(sock.getsockname()), "seen": seen}), flush=True)
    return 0


def punch(args: argparse.Namespace) -> int:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(parse_addr(args.bind))
    sock.settimeout(0.2)
    server = parse_addr(args.server)
    register = json.dumps({"register": args.name, "group": args.group}).encode()
    peers: dict[str, list[Any]] | None = None
    deadline = time.monotonic() + args.timeout
    while peers is None:
        if time.monotonic() > deadline:
            print(json.dumps({"error": "no rendezvous answer"}), flush=True)
            return 2
        sock.sendto(register, server)
        try:
            data, src = sock.recvfrom(2048)
        except TimeoutError:
            continue
        if src == server:
            peers = json.loads(data)["peers"]
    reflexive = peers.pop(args.name)
    peer_name, peer = next(iter(peers.items()))
    target = (str(peer[0]), int(peer[1]))
    heard: list[Any] | None = None
    relayed = False
    relay = json.dumps({"relay": args.group, "from": args.name}).encode()
    extra_rounds = 5  # once done, keep going a little so that the peer hears us too
    for _ in range(args.tries):
        sock.sendto(f"punch:{args.name}".encode(), target)
        if args.relay:
            sock.sendto(relay, server)
        end = time.monotonic() + args.interval
        while (left := end - time.monotonic()) > 0:
            sock.settimeout(left)
            try:
                data, src = sock.recvfrom(2048)
            except TimeoutError:
                break
            kind, _, name = data.decode(errors="replace").partition(":")
            if name != peer_name:
                continue
            if kind in ("punch", "ack"):
                heard = list(src)
                if kind == "punch":  # answer where it came from: the peer-reflexive address
                    sock.sendto(f"ack:{args.name}".encode(), src)
            elif kind == "relayed" and src == server:
                relayed = True
        if heard is not None and (relayed or not args.relay):
            extra_rounds -= 1
            if extra_rounds == 0:
                break
    result = {"reflexive": reflexive, "peer": peer, "heard": heard, "relayed": relayed}
    print(json.dumps(result), flush=True)
    return 0


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    sub = parser.add_subparsers(dest="mode", required=True)
    p_reflect = sub.add_parser("reflect")
    p_reflect.add_argument("--bind", action="append", required=True)
    p_reflect.add_argument("--lifetime", type=float, default=120.0)
    p_ask = sub.add_parser("ask")
    p_ask.add_argument("--server", action="append", required=True)
    p_ask.add_argument("--bind", default="0.0.0.0:0")
    p_ask.add_argument("--timeout", type=float, default=5.0)
    p_punch = sub.add_parser("punch")
    p_punch.add_argument("--server", required=True)
    p_punch.add_argument("--name", required=True)
    p_punch.add_argument("--group", required=True)
    p_punch.add_argument("--bind", default="0.0.0.0:0")
    p_punch.add_argument("--tries", type=int, default=25)
    p_punch.add_argument("--interval", type=float, default=0.08)
    p_punch.add_argument("--timeout", type=float, default=10.0)
    p_punch.add_argument("--relay", action="store_true", help="also talk through the server")
    args = parser.parse_args(argv)
    if args.mode == "reflect":
        return reflect([parse_addr(b) for b in args.bind], args.lifetime)
    if args.mode == "ask":
        return ask([parse_addr(s) for s in args.server], parse_addr(args.bind), args.timeout)
    return punch(args)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
