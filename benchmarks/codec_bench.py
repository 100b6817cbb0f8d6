"""Codec throughput: encode + decode GB/s for float32 tensors from 1 KiB to 128 MiB.

    python -m benchmarks.codec_bench [--compression] [--png] [--json out.json]

Paths: ``framed`` (encode/decode, header + buffers, what a scatter/gather transport does),
``packed`` (dumps/loads, one contiguous frame), ``pickle5`` (a nested dict holding the tensor,
through encode/decode), and on request ``zstd``/``lz4`` (packed, compressed) and ``png`` (an image
batch of the same byte size, packed, lossy).  Timings are the best of several repetitions.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

if __package__ in (None, ""):  # run as a script: make the project importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from collectives.codec import CodecOptions, decode, dumps, encode, loads

SIZES = [1 << 10, 16 << 10, 256 << 10, 4 << 20, 32 << 20, 128 << 20]


def _label(nbytes: int) -> str:
    for unit, shift in (("MiB", 20), ("KiB", 10)):
        if nbytes >= 1 << shift:
            return f"{nbytes >> shift} {unit}"
    return f"{nbytes} B"


def _best_seconds(step: Callable[[], object], min_time: float, max_reps: int) -> float:
    step()  # warm up (imports, allocator)
    best, spent, reps = float("inf"), 0.0, 0
    while reps < max_reps and (spent < min_time or reps < 3):
        start = time.perf_counter()
        step()
        took = time.perf_counter() - start
        best, spent, reps = min(best, took), spent + took, reps + 1
    return best


def _framed(obj: object, options: CodecOptions) -> Callable[[], object]:
    def step() -> object:
        enc = encode(obj, options)
        return decode(enc.header, enc.buffers, options)

    return step


def _packed(obj: object, options: CodecOptions) -> Callable[[], object]:
    return lambda: loads(dumps(obj, options), options)


def _image_batch(nbytes: int) -> torch.Tensor:
    side = max(1, int((nbytes // 4 // 3) ** 0.5))
    return torch.rand(1, side, side, 3)


def run(sizes: list[int], compression: bool, png: bool, min_time: float) -> list[dict[str, object]]:
    rows: list[dict[str, object]] = []
    plain = CodecOptions()
    for nbytes in sizes:
        tensor = torch.randn(nbytes // 4)
        nested = {"latent": {"samples": tensor}, "meta": {"seed": 1, "steps": [1, 2, 3]}}
        cases: dict[str, Callable[[], object]] = {
            "framed": _framed(tensor, plain),
            "packed": _packed(tensor, plain),
            "pickle5": _framed(nested, plain),
        }
        if compression:
            for codec in ("zstd", "lz4"):
                cases[codec] = _packed(tensor, CodecOptions(compression=codec))
        if png:
            images = _image_batch(nbytes)
            cases["png"] = _packed(images, CodecOptions(image_codec="png"))
        row: dict[str, object] = {"bytes": nbytes}
        max_reps = 200 if nbytes <= 1 << 20 else 10
        for name, step in cases.items():
            seconds = _best_seconds(step, min_time, max_reps)
            size = images.numel() * 4 if name == "png" else nbytes
            row[name] = {"seconds": seconds, "gb_per_s": size / seconds / 1e9}
        rows.append(row)
    return rows


def _print_table(rows: list[dict[str, object]]) -> None:
    names = [k for k in rows[0] if k != "bytes"]
    print(f"{'size':>9} " + " ".join(f"{n + ' GB/s':>13}" for n in names))
    for row in rows:
        cells = []
        for n in names:
            cell = row[n]
            assert isinstance(cell, dict)
            cells.append(f"{cell['gb_per_s']:>13.2f}")
        print(f"{_label(int(str(row['bytes']))):>9} " + " ".join(cells))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--max-size", type=int, default=128 << 20, help="largest size in bytes")
    parser.add_argument("--compression", action="store_true", help="also time zstd and lz4")
    parser.add_argument("--png", action="store_true", help="also time the lossy png codec")
    parser.add_argument("--min-time", type=float, default=0.2, help="seconds per measurement")
    parser.add_argument("--json", type=Path, help="write the results here as JSON")
    args = parser.parse_args(argv)
    sizes = [s for s in SIZES if s <= args.max_size]
    rows = run(sizes, args.compression, args.png, args.min_time)
    _print_table(rows)
    if args.json:
        meta = {"python": platform.python_version(), "torch": torch.__version__}
        args.json.write_text(json.dumps({"meta": meta, "results": rows}, indent=2))


if __name__ == "__main__":
    main()
