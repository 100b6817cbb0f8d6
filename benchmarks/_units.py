"""Sizes and durations as people write them: ``1K``, ``16M``, ``532 µs``."""

from __future__ import annotations

import math

_UNITS = {"": 1, "B": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30}


def parse_size(text: str) -> int:
    """``"64K"`` -> 65536.  Suffixes are binary (K = KiB); ``KiB``/``KB`` spellings are accepted."""
    raw = text.strip().upper().removesuffix("IB").removesuffix("B")
    digits = raw.rstrip("KMG")
    unit = raw[len(digits) :]
    try:
        value = float(digits) * _UNITS[unit]
    except (ValueError, KeyError):
        raise ValueError(f"not a size: {text!r} (write e.g. 1K, 64K, 1M, 128M)") from None
    if value < 4 or value != int(value) or int(value) % 4:
        raise ValueError(f"size {text!r} must be a positive multiple of 4 bytes (float32 elements)")
    return int(value)


def parse_sizes(text: str) -> list[int]:
    return [parse_size(part) for part in text.split(",") if part.strip()]


def format_size(nbytes: int) -> str:
    """65536 -> ``"64K"``; the inverse of :func:`parse_size` for the sizes people pick."""
    for unit in ("G", "M", "K"):
        scale = _UNITS[unit]
        if nbytes >= scale and nbytes % scale == 0:
            return f"{nbytes // scale}{unit}"
    return f"{nbytes}B" if nbytes else "-"


def format_seconds(seconds: float) -> str:
    """Three significant digits with a unit fit for the value (``"532 µs"``, ``"6.61 ms"``)."""
    if not math.isfinite(seconds):
        return "-"
    for scale, unit in ((1.0, "s"), (1e-3, "ms"), (1e-6, "µs")):
        if seconds >= scale:
            return f"{_three_digits(seconds / scale)} {unit}"
    return f"{_three_digits(seconds / 1e-9)} ns"


def _three_digits(value: float) -> str:
    if value >= 100:
        return f"{value:.0f}"
    if value >= 10:
        return f"{value:.1f}"
    return f"{value:.2f}"
