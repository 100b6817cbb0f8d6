"""The checked-in protobuf code is what scripts/gen_proto.py makes from proto/ now."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
CHECKED_IN = ROOT / "collectives" / "transport" / "_pb"


def test_generated_code_is_fresh(tmp_path: Path) -> None:
    if importlib.util.find_spec("grpc_tools") is None:
        # A fail, not a skip: without the generator nobody checks the wire code is current.
        pytest.fail("grpcio-tools is not installed: pip install -e '.[dev]'", pytrace=False)
    spec = importlib.util.spec_from_file_location("gen_proto", ROOT / "scripts" / "gen_proto.py")
    assert spec is not None and spec.loader is not None
    gen = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gen)
    written = gen.generate(tmp_path)
    assert written
    for path in written:
        checked_in = CHECKED_IN / path.name
        assert checked_in.exists(), f"{checked_in} is missing: run scripts/gen_proto.py"
        assert checked_in.read_bytes() == path.read_bytes(), (
            f"{checked_in.name} is stale: run .venv/bin/python scripts/gen_proto.py"
        )
