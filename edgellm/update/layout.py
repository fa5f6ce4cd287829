"""Versions side by side under one root, and the links that say which one runs.

    ROOT/versions/X.Y.Z/   one venv per version; complete once its INSTALLED marker exists
    ROOT/current           -> versions/X.Y.Z: what the units run (ROOT/bin is current/bin)
    ROOT/trial             -> versions/OLD: only while a new version proves itself; where to go back
    ROOT/incoming/         root's verified copy of the bundle being installed
    ROOT/saved/            the state files as they were before the switch (the path back)
    ROOT/status.json       the last update's outcome, for /health, the console and the journal

Every link is replaced by renaming a new one over it, then the directory is fsynced: a power
cut leaves the old link or the new one, and `current` only ever names a complete version.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import shutil
from collections.abc import Iterator
from pathlib import Path

from edgellm.files import fsync_dir, write_atomic
from edgellm.update import UpdateError

INSTALLED = "edgellm-installed.json"  # written last into a version's directory: it is complete
VERSION_DIR_RE = re.compile(r"^\d+(\.\d+){0,2}$")


class Layout:
    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        self.versions = self.root / "versions"
        self.incoming = self.root / "incoming"
        self.saved = self.root / "saved"
        self.status_file = self.root / "status.json"

    def version_dir(self, version: str) -> Path:
        return self.versions / version

    def installed(self, version: str) -> bool:
        return (self.version_dir(version) / INSTALLED).is_file()

    def link(self, name: str) -> str | None:
        """The version `name` (current, trial) points to, or None when there is no such link."""
        try:
            target = os.readlink(self.root / name)
        except (FileNotFoundError, OSError):
            return None
        return Path(target).name

    def current(self) -> str | None:
        return self.link("current")

    def trial(self) -> str | None:
        return self.link("trial")

    def point(self, name: str, version: str) -> None:
        """Make ROOT/name point to versions/VERSION, atomically."""
        tmp = self.root / f".{name}.new"
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        os.symlink(f"versions/{version}", tmp)
        os.replace(tmp, self.root / name)
        fsync_dir(self.root)

    def drop(self, name: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.root / name)
        fsync_dir(self.root)

    def mark_installed(self, version: str, record: dict[str, object]) -> None:
        write_atomic(self.version_dir(version) / INSTALLED, json.dumps(record, indent=2) + "\n")

    def clean(self) -> list[str]:
        """Delete what a cut install left: incomplete versions no link names, the incoming copy,
        half-made links. Returns the versions deleted."""
        keep = {self.current(), self.trial()}
        removed = []
        for path in sorted(self.versions.iterdir()) if self.versions.is_dir() else []:
            if path.name not in keep and not (path / INSTALLED).is_file():
                shutil.rmtree(path, ignore_errors=True)
                removed.append(path.name)
        shutil.rmtree(self.incoming, ignore_errors=True)
        for name in (".current.new", ".trial.new", ".bin.new"):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.root / name)
        return removed

    def prune(self, keep: str | None) -> None:
        """Delete the installed versions other than the current one and `keep` (the one before)."""
        wanted = {self.current(), self.trial(), keep}
        for path in sorted(self.versions.iterdir()) if self.versions.is_dir() else []:
            if path.name not in wanted and VERSION_DIR_RE.fullmatch(path.name):
                shutil.rmtree(path, ignore_errors=True)

    def status(self) -> dict[str, object] | None:
        try:
            data = json.loads(self.status_file.read_text())
        except (OSError, ValueError):
            return None
        return data if isinstance(data, dict) else None

    def write_status(self, record: dict[str, object]) -> None:
        write_atomic(self.status_file, json.dumps(record, indent=2) + "\n")

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        """One update at a time (the CLI, the units)."""
        self.root.mkdir(parents=True, exist_ok=True)
        with open(self.root / ".lock", "a") as lock:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise UpdateError(f"{self.root}: another update is running") from None
            yield
