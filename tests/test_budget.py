"""The memory budget's decisions, as pure functions of what is resident: no model is loaded here."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest

from edgellm.config import EngineConfig, ModelsConfig
from edgellm.engine.budget import Budget, Evict, Fits, Refuse, Wait
from edgellm.engine.catalog import Known
from edgellm.modelfile import gguf
from edgellm.modelfile.memory import Estimate
from edgellm.store.registry import Entry
from edgellm.units import MiB


def known(name: str, mib: int, *, pinned: bool = False, headers: list[gguf.GGUFFile] | None = None) -> Known:
    entry = Entry(id=name, aliases=[], files=[], size=0, sha256="", architecture="llama", quantization="F16",
                  parameters=0, context_length=0, has_chat_template=False, embedding=False, defaults={},
                  source="test", installed="2026-01-01T00:00:00Z")
    return Known(entry, headers or [], Estimate(weights=mib * MiB // 2, kv_cache=mib * MiB // 2, compute=0), pinned)


@dataclass
class Resident:
    known: Known
    phase: str = "loaded"
    last_used: float = 0.0
    users: int = 0
    waiters: int = 0

    @property
    def busy(self) -> bool:
        return bool(self.users or self.waiters)


def budget(mib: int | None = 1000, max_loaded: int = 3) -> Budget:
    settings = ModelsConfig(memory_budget=f"{mib}MiB" if mib else "", max_loaded=max_loaded)
    return Budget(settings, EngineConfig(), available=lambda: 1000 * MiB)


def test_a_model_that_fits_loads_now():
    assert budget().decide(known("a", 400), [Resident(known("b", 500))]) == Fits()


def test_the_least_recently_used_idle_model_makes_room():
    old, new = Resident(known("old", 400), last_used=1), Resident(known("new", 400), last_used=2)
    decision = budget().decide(known("c", 400), [new, old])
    assert decision == Evict(old)


def test_busy_pinned_and_loading_models_are_waited_for_not_evicted():
    busy = Resident(known("busy", 400), users=1)
    waited = Resident(known("waited", 300), waiters=1)  # a request waits for it: as good as busy
    pinned = Resident(known("pinned", 200, pinned=True))
    loading = Resident(known("loading", 100), phase="loading")
    decision = budget().decide(known("c", 500), [busy, waited, pinned, loading])
    assert isinstance(decision, Wait) and "busy, waited, pinned, loading" in decision.why


def test_a_model_that_is_unloading_is_waited_for_instead_of_evicting_another():
    going = Resident(known("going", 500), phase="unloading")
    idle = Resident(known("idle", 400))
    decision = budget().decide(known("c", 500), [going, idle])
    assert isinstance(decision, Wait) and "going to unload" in decision.why


def test_places_count_as_well_as_memory():
    idle = Resident(known("idle", 10))
    assert budget(max_loaded=1).decide(known("c", 10), [idle]) == Evict(idle)


def test_a_model_too_large_for_any_arrangement_is_refused_with_the_numbers(models):
    headers = [gguf.read(Path(models["scripted"]))]
    pinned = Resident(known("pinned", 600, pinned=True))
    decision = budget().decide(known("big", 500, headers=headers), [pinned])
    assert isinstance(decision, Refuse) and decision.error.code == "model_too_large"
    assert "needs about 500 MiB" in decision.error.message
    assert "at most 400 MiB can be made free" in decision.error.message


def test_pinned_models_that_take_every_place_refuse_the_load():
    pinned = [Resident(known(n, 10, pinned=True)) for n in ("a", "b")]
    decision = budget(max_loaded=2).decide(known("c", 10), pinned)
    assert isinstance(decision, Refuse) and "take all 2 places" in decision.error.message


@pytest.mark.parametrize("phase,counted", [("loaded", 250), ("loading", 500), ("unloading", 250)])
def test_without_a_fixed_budget_mapped_weights_count_and_loads_under_way_count_whole(phase, counted):
    """The kernel counts mapped weights as available; a load under way has allocated nothing yet."""
    b = budget(mib=None)
    assert b.free([Resident(known("m", 500), phase=phase)]) == 1000 * MiB - b.reserve - counted * MiB
