"""Generate the protobuf code of the udp transport from proto/*.proto.

Run after editing a .proto file (the generated code is checked in, and
tests/transport/test_proto_fresh.py fails while it is stale)::

    .venv/bin/python scripts/gen_proto.py            # into collectives/transport/_pb/
    .venv/bin/python scripts/gen_proto.py --out DIR  # elsewhere (what the freshness test does)

Uses grpcio-tools' bundled protoc, so the output depends only on its pinned version.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROTO_DIR = ROOT / "proto"
DEFAULT_OUT = ROOT / "collectives" / "transport" / "_pb"
SOURCES = ("transport.proto",)


def generate(out: Path) -> list[Path]:
    """Write ``<name>_pb2.py`` and ``<name>_pb2.pyi`` for each source into ``out``."""
    from grpc_tools import protoc  # dev dependency only: the runtime needs just protobuf

    out.mkdir(parents=True, exist_ok=True)
    args = ["protoc", f"-I{PROTO_DIR}", f"--python_out={out}", f"--pyi_out={out}"]
    rc = protoc.main([*args, *(str(PROTO_DIR / name) for name in SOURCES)])
    if rc != 0:
        raise RuntimeError(f"protoc failed with exit status {rc}")
    written = []
    for name in SOURCES:
        stem = name.removesuffix(".proto")
        written += [out / f"{stem}_pb2.py", out / f"{stem}_pb2.pyi"]
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output folder")
    args = parser.parse_args(argv)
    for path in generate(args.out):
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
