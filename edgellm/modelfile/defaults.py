"""The sampling settings a model recommends, checked before they can become request defaults.

A GGUF file may carry `general.sampling.*` keys and a bundle's manifest `defaults`; either
becomes the defaults of every request for that model. Each is checked here, by type and
range (limits.py), when the model is installed or described, so a bad value is refused at
import with its key named, never a failed request later (a top_k of 40.0 once reached
llama.cpp as a float, and every request for the model failed).
"""

from __future__ import annotations

from collections.abc import Mapping

from edgellm import limits

# GGUF's recommended sampling settings -> the request fields they are defaults for.
GGUF_KEYS = {
    "general.sampling.temp": "temperature",
    "general.sampling.top_k": "top_k",
    "general.sampling.top_p": "top_p",
    "general.sampling.min_p": "min_p",
    "general.sampling.penalty_repeat": "repeat_penalty",
    "general.sampling.penalty_last_n": "penalty_last_n",
}
FIELDS = frozenset(GGUF_KEYS.values())  # what a manifest's `defaults` may set


def from_gguf(metadata: Mapping[str, object]) -> dict[str, int | float]:
    """The defaults a GGUF header recommends; ValueError names the first bad key."""
    return {field: _checked(value, key, field) for key, field in GGUF_KEYS.items()
            if (value := metadata.get(key)) is not None}


def check(defaults: Mapping[str, object]) -> dict[str, int | float]:
    """Defaults given by request field (a manifest, the catalog); ValueError names the first bad one."""
    for name in defaults:
        if name not in FIELDS:
            raise ValueError(f"'{name}' is not a sampling default (known: {', '.join(sorted(FIELDS))})")
    return {name: _checked(value, f"'{name}'", name) for name, value in defaults.items()}


def _checked(value: object, key: str, field: str) -> int | float:
    problem = limits.SAMPLING[field].check(value)
    if problem:
        raise ValueError(f"{key} {problem}")
    assert isinstance(value, int | float)
    return value
