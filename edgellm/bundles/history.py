"""The last imports and what became of them, for the console's Import page: USB sticks (the CLI,
run by the import units) and uploads alike. <state dir>/imports.json, newest first, written
atomically under the store's lock; a damaged file reads as no history (it is only a record)."""

from __future__ import annotations

import json
import time
from pathlib import Path

from edgellm.files import write_atomic

KEEP = 20  # imports remembered


def _path(state_dir: Path) -> Path:
    return state_dir / "imports.json"


def read(state_dir: Path) -> list[dict[str, object]]:
    try:
        entries = json.loads(_path(state_dir).read_text())
    except (OSError, ValueError):
        return []
    return [e for e in entries if isinstance(e, dict)] if isinstance(entries, list) else []


def record(state_dir: Path, source: str, outcome: str, models: list[dict[str, str]]) -> None:
    """Add one import: where it came from, "imported" or "refused: why", and its models' ids and statuses."""
    entry = {"time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "source": source, "outcome": outcome,
             "models": models}
    write_atomic(_path(state_dir), json.dumps([entry, *read(state_dir)][:KEEP], indent=2))
