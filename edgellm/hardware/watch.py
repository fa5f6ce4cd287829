"""Thermals while serving: temperatures and throttling into /metrics and /health, and with
[engine] throttle_threads, half the threads while the board throttles."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from pathlib import Path

from edgellm.hardware.probe import Thermal, thermal
from edgellm.metrics import Metrics

log = logging.getLogger("edgellm.hardware")

INTERVAL = 2.0  # seconds; a handful of small sysfs reads


class ThermalWatch:
    def __init__(self, root: Path, metrics: Metrics, *, on_threads: Callable[[int], None], threads: int,
                 throttle_threads: bool) -> None:
        """`on_threads(n)`: use n threads for decoding from now on (the pool's set_threads)."""
        self.root = root
        self.metrics = metrics
        self.on_threads = on_threads
        self.threads = threads
        self.throttle_threads = throttle_threads
        self.latest: Thermal = thermal(root)
        self._applied = threads
        self._record(self.latest)

    async def run(self) -> None:
        while True:
            await asyncio.sleep(INTERVAL)
            try:
                self._record(await asyncio.to_thread(thermal, self.root))
            except Exception:
                log.exception("reading the thermal state failed")

    def _record(self, now: Thermal) -> None:
        if now.throttled != self.latest.throttled:
            detail = ", ".join(now.flags) or (f"hottest zone {now.hottest:.0f} °C" if now.hottest is not None
                                              else "no temperature readable")
            log.warning("the board %s (%s)", "is throttling" if now.throttled else "stopped throttling", detail)
        self.latest = now
        for zone in now.zones:
            self.metrics.temperature.labels(zone.name).set(zone.celsius)
        self.metrics.throttled.set(1 if now.throttled else 0)
        wanted = max(1, self.threads // 2) if self.throttle_threads and now.throttled else self.threads
        if wanted != self._applied:
            log.info("using %d threads (was %d)", wanted, self._applied)
            self.on_threads(wanted)
            self._applied = wanted
        self.metrics.threads.set(self._applied)

    def health(self) -> dict:
        detail: dict = {"throttled": self.latest.throttled}
        if self.latest.hottest is not None:
            detail["temperature_celsius"] = self.latest.hottest
        if self.latest.flags:
            detail["throttle_flags"] = self.latest.flags
        return detail
