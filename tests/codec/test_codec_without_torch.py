"""numpy-only users: the codec imports and works with torch unavailable."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import torch

from collectives.codec import dumps

ROOT = Path(__file__).resolve().parents[2]

SCRIPT = textwrap.dedent(
    """
    import sys, types
    sys.modules["torch"] = None  # any "import torch" now raises ImportError
    # Load only the codec package, not collectives/__init__ (other layers may need torch).
    package = types.ModuleType("collectives")
    package.__path__ = [sys.argv[1] + "/collectives"]
    sys.modules["collectives"] = package
    import numpy as np
    from collectives.codec import CodecOptions, dumps, loads
    from collectives.errors import CodecError

    obj = {"a": np.arange(5.0), "b": [b"x" * 2000, (1, None)], "s": "t"}
    for options in (CodecOptions(), CodecOptions(allow_pickle=True, compression="zstd")):
        back = loads(dumps(obj, options), options)
        assert np.array_equal(back["a"], obj["a"]) and back["b"] == obj["b"], back
    try:
        loads(sys.stdin.buffer.read())
    except CodecError as e:
        assert "torch is not installed" in str(e), e
    else:
        raise AssertionError("a torch tensor decoded without torch")
    print("ok")
    """
)


def test_codec_works_without_torch() -> None:
    frame = dumps(torch.ones(3))
    done = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(ROOT)],
        input=frame,
        capture_output=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr.decode()
    assert done.stdout.strip() == b"ok"
