"""How fast a same-host peer copies out of this process's memory, by the kind of pages under it.

``python -m benchmarks.cma_pages [--reps 30] [--mib 4,16]`` starts a second process that holds a
buffer of each kind: a torch tensor on torch's default 4 KiB pages, a torch tensor allocated with
``THP_MEM_ALLOC_ENABLE=1`` (transparent huge pages; ``comfycluster-launch`` starts its ranks with
it), and a numpy array (numpy asks for huge pages from 4 MiB up).  This process copies out of
each with ``process_vm_readv``, as the udp and gloo backends' same-host path does, and prints
the median rate.  The copy pins every page it reads, so fewer, larger pages copy faster.  Needs
Linux and ptrace permission between the two processes (as the backends' path does).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

_HOLDER = """
import json, sys, numpy as np, torch
n = {nbytes}
kinds = {{"torch": torch.ones(n, dtype=torch.uint8), "numpy": np.ones(n, dtype=np.uint8)}}
addr = {{k: (v.data_ptr() if k == "torch" else v.ctypes.data) for k, v in kinds.items()}}
print(json.dumps(addr), flush=True)
sys.stdin.read()
"""


def _holders(nbytes: int, thp: str) -> tuple[subprocess.Popen[str], dict[str, int]]:
    env = dict(os.environ, THP_MEM_ALLOC_ENABLE=thp)
    proc = subprocess.Popen(
        [sys.executable, "-c", _HOLDER.format(nbytes=nbytes)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env=env,
    )
    assert proc.stdout is not None
    return proc, json.loads(proc.stdout.readline())


def rates(mib: list[int], reps: int) -> list[tuple[str, int, float]]:
    """``(kind, MiB, GB/s)``: the median rate of ``reps`` copies out of each kind of memory."""
    import numpy as np

    from collectives.backends import cma

    out = []
    for size in mib:
        nbytes = size << 20
        dst = np.ones(nbytes, dtype=np.uint8)
        for thp in ("0", "1"):
            proc, addr = _holders(nbytes, thp)
            try:
                kinds = {"torch, 4 KiB pages" if thp == "0" else "torch, huge pages": addr["torch"]}
                if thp == "0":
                    kinds["numpy"] = addr["numpy"]
                for kind, address in kinds.items():
                    times = []
                    for _ in range(reps):
                        start = time.perf_counter()
                        cma.read(proc.pid, address, int(dst.ctypes.data), nbytes)
                        times.append(time.perf_counter() - start)
                    out.append((kind, size, nbytes / statistics.median(times) / 1e9))
                    print(f"[{len(out)}] {kind} {size} MiB", file=sys.stderr, flush=True)
            finally:
                assert proc.stdin is not None
                proc.stdin.close()
                proc.wait(timeout=30)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=30)
    ap.add_argument("--mib", default="4,16", help="buffer sizes in MiB, comma separated")
    args = ap.parse_args(argv)
    from collectives.backends import cma

    if not cma.enabled():
        raise SystemExit("no process_vm_readv here (Linux only, COMFY_CLUSTER_CMA not 0)")
    print("| memory | MiB | GB/s |\n|---|---:|---:|")
    for kind, size, rate in rates([int(m) for m in args.mib.split(",")], args.reps):
        print(f"| {kind} | {size} | {rate:.1f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
