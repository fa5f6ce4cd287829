"""A circuit breaker: after `failures` consecutive failures the upstream is left alone for
`cooldown` seconds, then one probe decides whether it is back."""

from __future__ import annotations

import time


class Breaker:
    def __init__(self, failures: int, cooldown: float) -> None:
        self.threshold = max(1, failures)
        self.cooldown = cooldown
        self.failures = 0
        self.opened_at: float | None = None

    @property
    def state(self) -> str:
        if self.opened_at is None:
            return "closed"
        return "half-open" if time.monotonic() - self.opened_at >= self.cooldown else "open"

    def success(self) -> None:
        self.failures = 0
        self.opened_at = None

    def failure(self) -> None:
        self.failures += 1
        if self.failures >= self.threshold or self.opened_at is not None:
            self.opened_at = time.monotonic()  # (re)open: a failed probe waits a whole cooldown again
