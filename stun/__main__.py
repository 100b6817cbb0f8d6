"""``comfycluster-stun`` / ``python -m stun``: run the server under uvicorn.

Options override the environment (docs/rendezvous-server.md lists every variable).
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys

import uvicorn

from collectives.errors import ConfigurationError

from .app import create_app
from .settings import Settings


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="comfycluster-stun", description="ComfyUI Cluster rendezvous server"
    )
    p.add_argument("--host", help="HTTP bind address (COMFY_CLUSTER_STUN_HOST; 127.0.0.1)")
    p.add_argument("--port", type=int, help="HTTP port (COMFY_CLUSTER_STUN_PORT; 8089)")
    p.add_argument("--udp-host", help="UDP bind address (COMFY_CLUSTER_STUN_UDP_HOST; --host)")
    p.add_argument(
        "--udp-port", type=int, help="STUN/relay port, -1 for none (COMFY_CLUSTER_STUN_UDP_PORT)"
    )
    p.add_argument("--udp-mode", choices=("thread", "asyncio"), help="COMFY_CLUSTER_STUN_UDP_MODE")
    p.add_argument("--log-level", help="COMFY_CLUSTER_STUN_LOG_LEVEL (info)")
    p.add_argument("--db", help="SQLite file to persist membership in (COMFY_CLUSTER_STUN_DB)")
    p.add_argument(
        "--open-registration",
        action="store_true",
        default=None,
        help="let a first join create its cluster (COMFY_CLUSTER_STUN_OPEN_REGISTRATION=1)",
    )
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        settings = Settings.from_env().with_overrides(
            host=args.host,
            port=args.port,
            udp_host=args.udp_host,
            udp_mode=args.udp_mode,
            log_level=args.log_level.lower() if args.log_level else None,
            db_path=args.db,
            open_registration=args.open_registration,
        )
        if args.udp_port is not None:
            udp_port = args.udp_port if args.udp_port >= 0 else None
            settings = dataclasses.replace(settings, udp_port=udp_port)
    except ConfigurationError as exc:
        print(f"comfycluster-stun: {exc}", file=sys.stderr)
        return 2
    logging.basicConfig(
        level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    uvicorn.run(
        create_app(settings),
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level,
        proxy_headers=True,  # trusts X-Forwarded-For from 127.0.0.1 only (the Caddy in front)
        server_header=False,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
