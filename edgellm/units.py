"""Sizes, durations and times as operators, clients and bundles write them ('512MiB', '5m'). A leaf."""

from __future__ import annotations

import math
import re
from datetime import UTC, datetime

MiB = 1 << 20

_SIZE_UNITS = {"": 1, "b": 1, "k": 1000, "kb": 1000, "kib": 1 << 10, "m": 1000**2, "mb": 1000**2, "mib": 1 << 20,
               "g": 1000**3, "gb": 1000**3, "gib": 1 << 30, "t": 1000**4, "tb": 1000**4, "tib": 1 << 40}
_TIME_UNITS = {"": 1, "ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1, "m": 60, "h": 3600, "d": 86400}
# Seconds, or Go's durations as Ollama's clients write them ("5m", "1h30m", "500ms"; "d" besides).
_DURATION = re.compile(r"\s*(-?)((?:[0-9]+(?:\.[0-9]+)?\s*(?:ns|us|µs|ms|s|m|h|d)\s*)+|[0-9]+(?:\.[0-9]+)?)\s*")
_DURATION_PART = re.compile(r"([0-9]+(?:\.[0-9]+)?)\s*(ns|us|µs|ms|s|m|h|d)?")
MAX_SECONDS = 10 * 365 * 86400.0  # longer is "forever" in all but name, and keeps arithmetic finite


def parse_size(text: str) -> int:
    """'512MiB', '1.5GB', '1048576' -> bytes."""
    match = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([A-Za-z]*)\s*", text)
    if not match or match[2].lower() not in _SIZE_UNITS:
        raise ValueError(f"expected a size such as 512MiB or 2GB, got {text!r}")
    size = float(match[1]) * _SIZE_UNITS[match[2].lower()]
    if size > 1 << 60:  # more than any disk or RAM (and float('9' * 400) is inf)
        raise ValueError(f"{text!r} is larger than any size this could mean")
    return int(size)


def parse_duration(text: str | int | float) -> float | None:
    """Ollama's keep_alive: '5m', '1h30m', '500ms', or seconds; 0 is now; negative is forever (None)."""
    if isinstance(text, int) and not isinstance(text, bool):
        seconds = float(text) if abs(text) < 1 << 64 else math.inf if text > 0 else -math.inf  # 400 digits
    elif isinstance(text, float):
        seconds = text
    else:
        match = _DURATION.fullmatch(str(text))
        if not match:
            raise ValueError(f"expected a duration such as 30s, 5m or 1h30m (negative: forever), got {text!r}")
        seconds = sum(float(number) * _TIME_UNITS[unit] for number, unit in _DURATION_PART.findall(match[2]))
        seconds = -seconds if match[1] else seconds
    if seconds != seconds:  # NaN
        raise ValueError(f"expected a duration such as 30s, 5m or 1h (negative: forever), got {text!r}")
    return None if seconds < 0 or seconds > MAX_SECONDS else seconds


def timestamp(text: str) -> datetime:
    """An ISO 8601 time, a bundle's `created`, as a UTC datetime to compare (one without a zone is
    UTC); ValueError when it is not one."""
    value = datetime.fromisoformat(text)
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)
