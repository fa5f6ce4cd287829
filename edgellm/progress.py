"""Progress bars for long copies and hashes on a terminal; silence when output is not one."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable

# What long copies and hashes report: (stage, file name, bytes done, bytes in all).
Progress = Callable[[str, str, int, int], None]


class Bar:
    """`bar(stage, name, done, total)` redraws one line on stderr, at most ten times a second."""

    def __init__(self) -> None:
        self.enabled = sys.stderr.isatty()
        self._last = 0.0
        self._started = time.monotonic()

    def __call__(self, stage: str, name: str, done: int, total: int) -> None:
        if not self.enabled:
            return
        now = time.monotonic()
        finished = done >= total
        if not finished and now - self._last < 0.1:
            return
        self._last = now
        share = done / total if total else 1.0
        filled = int(share * 30)
        rate = done / max(now - self._started, 1e-6) / 1e6
        line = f"\r{stage} {name[:40]:40} [{'#' * filled}{'.' * (30 - filled)}] {share:4.0%} {rate:6.1f} MB/s"
        print(line, end="\n" if finished else "", file=sys.stderr, flush=True)
