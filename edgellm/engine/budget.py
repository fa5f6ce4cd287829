"""The memory budget and the eviction policy: may a model load now, and if not, what then.

Pure decisions over the models resident now (loading, loaded or unloading), made
on the event loop with no await between deciding and acting, so two loads never
count the same free memory: a load that fits is resident (as loading) at once.
The pool acts on the decisions; this module never touches a model.

Before a load, the memory it will take is estimated from the GGUF header
(modelfile/memory.py). If it does not fit, the least recently used idle model is
unloaded; busy models are waited for; a model that could never fit is refused
with the numbers instead of the box getting an out-of-memory kill.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

import psutil

from edgellm.config import EngineConfig, ModelsConfig
from edgellm.engine.catalog import Known
from edgellm.engine.errors import ModelTooLarge, NoRoom
from edgellm.errors import EdgeError
from edgellm.modelfile import memory
from edgellm.units import MiB, parse_size


class Resident(Protocol):
    """What the budget needs to know of a model that holds memory."""

    known: Known
    phase: str  # "loading", "loaded" or "unloading"
    last_used: float

    @property
    def busy(self) -> bool: ...  # requests hold it or wait for it


@dataclass(frozen=True)
class Fits:
    """Load now."""


@dataclass(frozen=True)
class Evict:
    """Unload this idle model first, then decide again."""

    victim: Resident


@dataclass(frozen=True)
class Wait:
    """Wait for busy models to finish (or for loads and unloads under way), then decide again."""

    why: str


@dataclass(frozen=True)
class Refuse:
    """It cannot load as configured, however long it waits."""

    error: EdgeError


Decision = Fits | Evict | Wait | Refuse


def _available() -> int:
    return psutil.virtual_memory().available


class Budget:
    def __init__(self, settings: ModelsConfig, engine: EngineConfig, available: Callable[[], int] = _available
                 ) -> None:
        """`available`: bytes of RAM free for use now (psutil's), when no fixed budget is set."""
        self.limit = parse_size(settings.memory_budget) if settings.memory_budget else None
        self.reserve = parse_size(settings.memory_reserve) if settings.memory_reserve else 0
        self.max_loaded = settings.max_loaded
        self._engine = engine
        self._available = available

    def free(self, resident: Sequence[Resident]) -> int:
        """Bytes a new model may use now, with what is resident staying resident."""
        if self.limit is not None:
            return self.limit - sum(r.known.estimate.total for r in resident)
        # Loaded weights are memory-mapped file pages, which the kernel reports as available
        # (reclaimable); counting them as free would let two models thrash each other. A load
        # under way has not allocated yet: all of its estimate is spoken for.
        taken = sum(r.known.estimate.weights if r.phase != "loading" else r.known.estimate.total for r in resident)
        return self._available() - self.reserve - taken

    def decide(self, want: Known, resident: Sequence[Resident]) -> Decision:
        need = want.estimate.total
        free = self.free(resident)
        if len(resident) < self.max_loaded and need <= free:
            return Fits()
        best = free + sum(r.known.estimate.total for r in resident if not r.known.pinned)
        if need > best:
            return Refuse(ModelTooLarge(self._too_large(want, best)))
        unloading = [r for r in resident if r.phase == "unloading"]
        if unloading and len(resident) - len(unloading) < self.max_loaded and \
                need <= free + sum(r.known.estimate.total for r in unloading):
            return Wait(f"waits for model(s) {', '.join(r.known.id for r in unloading)} to unload")
        idle = [r for r in resident if r.phase == "loaded" and not r.busy and not r.known.pinned]
        if idle:
            return Evict(min(idle, key=lambda r: r.last_used))
        if len(resident) >= self.max_loaded and all(r.known.pinned for r in resident):
            return Refuse(NoRoom(f"model '{want.id}' cannot load: pinned models "
                                   f"({', '.join(r.known.id for r in resident)}) take all {self.max_loaded} "
                                   "places ([models] max_loaded)"))
        busy = ", ".join(r.known.id for r in resident if r.busy or r.phase != "loaded" or r.known.pinned)
        return Wait(f"waits for requests on busy model(s) {busy} to finish before it can load")

    def _too_large(self, want: Known, available: int) -> str:
        engine = self._engine
        n_ubatch = min(engine.n_ubatch, engine.n_batch)
        fits = memory.largest_context(want.headers, available, parallel=engine.parallel, n_ubatch=n_ubatch,
                                      type_k=engine.cache_type_k, type_v=engine.cache_type_v)
        where = (f"a {self.limit / MiB:.0f} MiB budget" if self.limit is not None
                 else f"the available RAM minus a {self.reserve / MiB:.0f} MiB reserve")
        hint = (f"it would fit with [engine] n_ctx = {fits}" if fits
                else "even the smallest context would not fit")
        return (f"model '{want.id}' needs about {want.estimate.describe()} with n_ctx {engine.n_ctx} and "
                f"{engine.parallel} parallel sequences, but at most {max(available, 0) / MiB:.0f} MiB can be "
                f"made free ({where}); {hint}")
