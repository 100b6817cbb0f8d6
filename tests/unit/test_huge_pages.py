"""Transparent huge pages under large buffers that a same-host peer copies out of.

``process_vm_readv`` pins every page it reads, so a peer copies 16 MiB out of huge pages 2-4x
faster than out of 4 KiB pages.  The scratch memory a reduce's partials are sent from is
mapped for them and advised for huge pages; the ranks' own tensors get them from torch's
allocator, which ``comfycluster-launch`` switches on (``THP_MEM_ALLOC_ENABLE=1``) unless told
otherwise.

Checked in ``/proc/self/smaps``: where the kernel gives huge pages only on request
(``madvise``, this machine's and the usual distributions' default) or always; skipped where it
never does (then there is nothing to ask for)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from collectives.algorithms.scratch import partial_buffer
from comfyui_cluster.launchers.config import LaunchConfig
from comfyui_cluster.launchers.launch import THP_ENV, child_env

_MODE = Path("/sys/kernel/mm/transparent_hugepage/enabled")


def _thp_mode() -> str | None:
    try:
        text = _MODE.read_text()
    except OSError:
        return None
    return text[text.index("[") + 1 : text.index("]")] if "[" in text else None


needs_thp = pytest.mark.skipif(
    _thp_mode() not in ("madvise", "always"), reason="this kernel gives no transparent huge pages"
)


def huge_kib(address: int, nbytes: int) -> int:
    """AnonHugePages (KiB) of this process's mappings that overlap ``nbytes`` at ``address``
    (a huge-page advice splits a mapping: its aligned middle becomes one of its own)."""
    inside, total = False, 0
    for line in Path("/proc/self/smaps").read_text().splitlines():
        head = line.split()[0]
        if "-" in head and ":" not in head:
            lo, hi = (int(x, 16) for x in head.split("-"))
            inside = lo < address + nbytes and address < hi
        elif inside and head == "AnonHugePages:":
            total += int(line.split()[1])
    return total


@needs_thp
def test_scratch_partials_sit_on_huge_pages() -> None:
    like = torch.zeros(1, dtype=torch.float32)
    buf = partial_buffer(1, (16 << 20) // 4, like)
    buf.fill_(1.0)  # first touch: the pages are faulted in now
    assert huge_kib(buf.data_ptr(), 16 << 20) >= 2048


_TORCH_PROBE = """
import torch, sys
sys.path.insert(0, {tests!r})
from unit.test_huge_pages import huge_kib
t = torch.ones((16 << 20) // 4)
print(huge_kib(t.data_ptr(), 16 << 20))
"""


def _torch_huge_kib(value: str) -> int:
    env = dict(os.environ, **{THP_ENV: value})
    code = _TORCH_PROBE.format(tests=str(Path(__file__).resolve().parents[1]))
    out = subprocess.run(
        [sys.executable, "-c", code],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert out.returncode == 0, out.stderr
    return int(out.stdout.split()[-1])


@needs_thp
def test_torch_allocates_large_tensors_on_huge_pages_when_switched_on() -> None:
    assert _torch_huge_kib("1") >= 2048
    if _thp_mode() == "madvise":  # without the switch torch does not ask for them
        assert _torch_huge_kib("0") == 0


def test_the_launcher_switches_them_on_unless_told_otherwise() -> None:
    config = LaunchConfig(command=["true"], nproc=1)
    slot = config.slots()[0]
    assert child_env(config, slot, 29500, base={})[THP_ENV] == "1"
    assert child_env(config, slot, 29500, base={THP_ENV: "0"})[THP_ENV] == "0"
