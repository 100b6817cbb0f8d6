"""A udp rank that posts and then exits without close() still delivers what it posted.

The udp backend delivers eager posts from the process itself (they sit in the transport until
acknowledged), so an exit right after a send would lose the message, where a TCP engine's
kernel would still send it.  The backend closes (with a bounded linger) at interpreter exit.
Rank 1 posts 100 messages of 200 KB (each copied and returned at once: far more than the window
lets out) and leaves; rank 0 asks for them late.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

from collectives.testing.spmd import launch_command

SCRIPT = textwrap.dedent(
    """
    import sys, time
    import torch
    import collectives

    comm = collectives.init("udp", timeout=30)
    if comm.rank == 1:
        for i in range(100):
            comm.send_buffer(torch.full((25_000,), i, dtype=torch.int64), dst=0)
        sys.exit(0)  # no close(): the backend's exit hook must deliver the messages
    time.sleep(1.0)  # rank 1 is gone (or going) by now
    got = torch.empty(25_000, dtype=torch.int64)
    for i in range(100):
        comm.recv_into(got, src=1)
        assert torch.equal(got, torch.full((25_000,), i, dtype=torch.int64)), i
    print("RECEIVED-INTACT", flush=True)
    comm.close()
    """
)


def test_a_rank_that_exits_without_close_still_delivers(tmp_path: Path) -> None:
    script = tmp_path / "exit_after_send.py"
    script.write_text(SCRIPT)
    done = subprocess.run(
        launch_command("udp", 2, [sys.executable, str(script)]),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "RECEIVED-INTACT" in done.stdout
