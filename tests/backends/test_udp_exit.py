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


CRASH_SCRIPT = textwrap.dedent(
    """
    import os, time
    import torch
    import collectives
    from collectives.errors import ConnectionLostError

    comm = collectives.init("udp", timeout=30)
    comm.barrier()
    if comm.rank == 1:
        os._exit(0)  # a crash: no CLOSE, no exit hook; the kernel closes the port
    time.sleep(0.5)  # rank 1 is gone by now
    start = time.monotonic()
    try:
        comm.send_buffer(torch.zeros(16), dst=1)
        comm.recv_into(torch.zeros(16), src=1, timeout=25)
    except ConnectionLostError as err:
        print(f"LOST-AFTER {time.monotonic() - start:.2f} {err}", flush=True)
    print("stats", comm.stats().get("unreachable_hints"), flush=True)
    comm.abort("peer gone")
    """
)


def test_a_crashed_peer_is_noticed_by_its_closed_port_within_seconds(tmp_path: Path) -> None:
    """ICMP port unreachable (IP_RECVERR) is a hint: the survivor PINGs the peer and declares it
    lost after ``unreachable_grace`` (1 s) without an answer, not after the 30 s peer timeout
    nor the 25 s op timeout."""
    script = tmp_path / "crash.py"
    script.write_text(CRASH_SCRIPT)
    done = subprocess.run(
        launch_command("udp", 2, [sys.executable, str(script)]),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    out = done.stdout + done.stderr
    lost = [line.partition("LOST-AFTER ")[2] for line in done.stdout.splitlines()]
    lost = [line for line in lost if line]
    assert lost, out[-3000:]
    seconds = float(lost[0].split()[0])
    assert seconds < 5.0, lost[0]
    assert "port is closed" in lost[0], lost[0]
