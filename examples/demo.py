"""A 4-rank job doing real work: fan a batch of images out, filter each slice, fan back in.

    mpiexec -n 4 python examples/demo.py --backend mpi
    comfycluster-launch --nproc 4 --backend gloo -- python examples/demo.py
    python examples/demo.py --backend local --local-ranks 4

Rank 0 makes the embedded default input (a seeded batch of 16 RGB 256x256 images), scatters
uneven slices, every rank blurs its slice, the leader gathers the result, checks it against a
single-process run and writes a PNG contact sheet.  Stage timings are printed by rank 0.
"""

from __future__ import annotations

import argparse
import itertools
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import collectives


def make_batch(n: int, size: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(1234)
    return torch.rand((n, size, size, 3), generator=g)


def blur(images: torch.Tensor, radius: int = 3) -> torch.Tensor:
    k = 2 * radius + 1
    weight = torch.full((3, 1, k, k), 1.0 / (k * k))
    x = images.permute(0, 3, 1, 2)
    y = F.conv2d(F.pad(x, (radius,) * 4, mode="reflect"), weight, groups=3)
    return y.permute(0, 2, 3, 1).contiguous()


def split(n: int, parts: int) -> list[slice]:
    base, extra = divmod(n, parts)
    bounds, start = [], 0
    for i in range(parts):
        stop = start + base + (1 if i < extra else 0)
        bounds.append(slice(start, stop))
        start = stop
    return bounds


def job(comm: collectives.Communicator, batch: int, size: int, out: Path) -> None:
    marks: list[tuple[str, float]] = [("start", time.perf_counter())]

    def mark(stage: str) -> None:
        marks.append((stage, time.perf_counter()))

    images = make_batch(batch, size) if comm.rank == 0 else None
    mark("make input")
    slices = [images[s] for s in split(batch, comm.size)] if images is not None else None
    mine = comm.scatter(slices, root=0)
    mark("fan-out (scatter)")
    result = blur(mine)
    mark(f"blur {mine.shape[0]} images")
    parts = comm.gather(result, root=0)
    mark("fan-in (gather)")
    mean = torch.tensor([float(result.sum()), float(result.numel())], dtype=torch.float64)
    comm.allreduce(mean, op="sum")
    mark("allreduce stats")
    if comm.rank == 0:
        assert parts is not None and images is not None
        combined = torch.cat(parts)
        reference = blur(images)
        assert torch.allclose(combined, reference, atol=1e-6), "cluster result differs"
        out.parent.mkdir(parents=True, exist_ok=True)
        _save_sheet(combined[:8], out)
        mark("verify + save")
        print(f"backend={comm.backend} ranks={comm.size} batch={batch}x{size}x{size}x3")
        for (_, t0), (stage, t1) in itertools.pairwise(marks):
            print(f"  {stage:<24} {1e3 * (t1 - t0):8.1f} ms")
        print(f"  total                    {1e3 * (marks[-1][1] - marks[0][1]):8.1f} ms")
        print(f"  mean pixel value {mean[0] / mean[1]:.6f}; matches the 1-process run")
        print(f"  contact sheet: {out.resolve()}")


def _save_sheet(images: torch.Tensor, path: Path) -> None:
    from PIL import Image

    row = torch.cat(list(images), dim=1)
    Image.fromarray((row.clamp(0, 1) * 255).round().to(torch.uint8).numpy()).save(path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", default=None)
    parser.add_argument("--local-ranks", type=int, default=4)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    if args.backend == "local":
        from collectives.testing import run_local

        out = args.out or Path("outputs/demo_local.png")
        run_local(args.local_ranks, lambda comm: job(comm, args.batch, args.size, out))
        return
    with collectives.init(args.backend, timeout=120) as comm:
        job(comm, args.batch, args.size, args.out or Path(f"outputs/demo_{comm.backend}.png"))


if __name__ == "__main__":
    main()
