"""``comfycluster``: the cluster's helper commands (``python -m comfyui_cluster.launchers.tool``).

``comfycluster invite --server URL --cluster-id ID [--key K] [--expires 24h] [--world-size N]``
    prints one invite token (:mod:`launchers.invite`) for ``comfycluster-launch --join TOKEN``.
    The key comes from ``--key``, else ``COMFY_CLUSTER_KEY`` / ``COMFY_CLUSTER_KEY_FILE``; the
    server and cluster id may come from ``COMFY_CLUSTER_STUN_SERVER`` /
    ``COMFY_CLUSTER_CLUSTER_ID``.  The server must accept the key first, unless ``--offline``.
    The token contains the key: share it like a password.

``comfycluster doctor [--join TOKEN]``
    checks this machine's view of the cluster (:mod:`collectives.doctor`), from the invite's
    settings or from the environment, one line per check, and exits 0 when nothing is wrong.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Sequence
from typing import NoReturn

from collectives.auth import KEY_ENV, KEY_FILE_ENV, ClusterKey
from collectives.doctor import Check, report, run_checks
from collectives.errors import ConfigurationError, RendezvousError
from collectives.rendezvous.stun_client import (
    CA_FILE_ENV,
    CLUSTER_ID_ENV,
    SERVER_ENV,
    StunClient,
    server_url,
)

from .invite import Invite, InviteError, make_token, parse_duration
from .join import load_invite

PROG = "comfycluster"
USAGE_EXIT = 2
PROBLEM_EXIT = 1


class _UsageError(Exception):
    pass


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise _UsageError(message)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog=PROG, description="ComfyUI Cluster: invite machines, check the setup.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="{invite,doctor}")
    inv = sub.add_parser(
        "invite",
        help="print a token that lets another machine join (it contains the cluster key)",
        description="Print one invite token for `comfycluster-launch --join TOKEN`. The token "
        "contains the cluster key: anyone holding it can join until the key is rotated.",
    )
    inv.add_argument("--server", metavar="URL", help=f"the rendezvous server ({SERVER_ENV})")
    inv.add_argument("--cluster-id", metavar="ID", help=f"the cluster's id ({CLUSTER_ID_ENV})")
    inv.add_argument(
        "--key", metavar="K", help=f"the cluster key (default: {KEY_ENV} or {KEY_FILE_ENV})"
    )
    inv.add_argument(
        "--expires",
        default="24h",
        metavar="DURATION",
        help="how long the token is accepted, e.g. 30m, 24h, 7d (default: %(default)s)",
    )
    inv.add_argument(
        "--world-size", type=int, metavar="N", help="the ranks over all machines, if fixed"
    )
    inv.add_argument(
        "--offline", action="store_true", help="do not ask the server whether it accepts the key"
    )
    doc = sub.add_parser(
        "doctor",
        help="check the server, the key, this machine's UDP port, NAT, MTU, buffers and peers",
        description="Check this machine's view of the cluster; one line per check, exit 0 when "
        "no problem is found.",
    )
    doc.add_argument(
        "--join", metavar="TOKEN", help="check with an invite's settings (@FILE reads it)"
    )
    doc.add_argument(
        "--timeout",
        type=float,
        default=5.0,
        metavar="S",
        help="per request (default: %(default)s)",
    )
    return parser


def invite(ns: argparse.Namespace) -> int:
    env = os.environ
    raw_server = ns.server or env.get(SERVER_ENV, "")
    if not raw_server.strip():
        raise ConfigurationError(f"pass --server URL (or set {SERVER_ENV}): the rendezvous server")
    server = server_url(raw_server, env)
    cluster = (ns.cluster_id or env.get(CLUSTER_ID_ENV, "")).strip()
    if not cluster:
        raise ConfigurationError(f"pass --cluster-id ID (or set {CLUSTER_ID_ENV})")
    key = ClusterKey(ns.key) if ns.key else ClusterKey.from_env(env)
    if key is None:
        raise ConfigurationError(f"pass --key K, or set {KEY_ENV} or {KEY_FILE_ENV}")
    lifetime = parse_duration(ns.expires)
    expires = int(time.time() + lifetime)
    token = make_token(Invite(server, cluster, key.text, expires, ns.world_size))
    if not ns.offline:
        ca = env.get(CA_FILE_ENV, "").strip()
        client = StunClient(server, cluster, key, timeout=10.0, verify=ca or True, environ=env)
        try:
            members = client.members()
        finally:
            client.close()
        size = members.world_size
        if ns.world_size is not None and size is not None and size != ns.world_size:
            raise ConfigurationError(
                f"--world-size {ns.world_size} differs from cluster {cluster!r}'s world size "
                f"{size} on the server: drop --world-size or fix it"
            )
    print(token)
    print(
        f"{PROG}: invite to cluster {cluster!r} at {server}, valid until "
        f"{Invite(server, cluster, key.text, expires).expires_text()}. It contains the cluster "
        "key: share it like a password; to revoke it, rotate the key. On the joining machine: "
        "comfycluster-launch --join TOKEN --nproc N -- COMMAND",
        file=sys.stderr,
    )
    return 0


def doctor(ns: argparse.Namespace) -> int:
    env = dict(os.environ)
    checks: list[Check] = []
    if ns.join is not None:
        try:
            found = load_invite(ns.join)
        except InviteError as err:
            checks.append(Check("invite", False, "the token cannot be used", str(err)))
        else:
            env.pop(KEY_FILE_ENV, None)
            env.update(found.env())
            checks.append(
                Check(
                    "invite",
                    True,
                    f"cluster {found.cluster_id!r} at {found.server}, valid until "
                    f"{found.expires_text()}",
                )
            )
    checks += run_checks(env, timeout=ns.timeout)
    print(report(checks))
    return 0 if all(c.ok for c in checks) else PROBLEM_EXIT


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    try:
        ns = build_parser().parse_args(args)
        return invite(ns) if ns.command == "invite" else doctor(ns)
    except (_UsageError, ConfigurationError) as exc:
        print(f"{PROG}: error: {' '.join(str(exc).split())}", file=sys.stderr)
        return USAGE_EXIT
    except RendezvousError as exc:
        print(f"{PROG}: error: {' '.join(str(exc).split())}", file=sys.stderr)
        return PROBLEM_EXIT
    except SystemExit as exc:  # --help
        return exc.code if isinstance(exc.code, int) else 0


__all__ = ["PROG", "build_parser", "doctor", "invite", "main"]

if __name__ == "__main__":
    sys.exit(main())
