"""The catalog view: which models the service knows, and what each would take to load.

Every installed model (the store's catalog) and the --model file gets a Known
record: its entry, its GGUF headers and its memory estimate at the configured
context. refresh() takes in changes made by anyone (the CLI, the admin API, an
import) and says what came and went; names resolve to records here. A file that
cannot be described (a damaged blob, a header no estimate can read) is kept aside
with the reason, `unservable`: it is shown and named in errors, and nothing else
waits for it.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from dataclasses import dataclass

from edgellm.config import EngineConfig, ModelsConfig
from edgellm.engine.errors import ModelNotFound, NotReady
from edgellm.errors import EdgeError
from edgellm.modelfile import gguf, memory
from edgellm.modelfile.memory import Estimate
from edgellm.store.registry import Entry, Registry

log = logging.getLogger("edgellm.engine")


@dataclass(frozen=True)
class Known:
    """A model the service can serve: what it is, and what loading it will take."""

    entry: Entry
    headers: list[gguf.GGUFFile]
    estimate: Estimate
    pinned: bool  # never unloaded for being idle or to make room

    @property
    def id(self) -> str:
        return self.entry.id


def snapshot_key(entry: Entry) -> str:
    """What a model's prompt snapshots are kept under (prompt_cache.py): its SHA-256; for a file
    outside the store (not hashed: it may be large), its path, size and modification time."""
    if entry.sha256:
        return entry.sha256
    try:
        return "file:" + ";".join(f"{p.resolve()}:{p.stat().st_size}:{p.stat().st_mtime_ns}" for p in entry.paths)
    except OSError:
        return ""  # gone: no snapshots


class Catalog:
    def __init__(self, registry: Registry | None, extra: list[Entry], engine: EngineConfig,
                 settings: ModelsConfig) -> None:
        """`extra`: models served from where they are (the --model file), before the installed ones."""
        self._registry = registry
        self._extra = list(extra)
        self._engine = engine
        self._settings = settings
        self._known: dict[str, Known] = {}
        self._names: dict[str, Known] = {}
        self._installed: list[Entry] = []  # the store's, as last read
        self._stamp: int | None = None
        self.problem = ""  # why the store's catalog cannot be read, while it cannot
        self.unservable: dict[str, tuple[Entry, str]] = {}  # id -> the entry, and why it cannot be served

    async def refresh(self) -> tuple[list[Known], list[Known]]:
        """Read the store's catalog if it changed: the models that (re)appeared and those that went.
        A model whose files changed under the same id is both: gone, and new. Nothing changes
        here until the end, without an await between: a refresh cancelled halfway changes nothing."""
        stamp = self._registry.stamp() if self._registry else 0
        if stamp == self._stamp:
            return [], []
        installed, problem = self._installed, ""
        if self._registry is not None:
            try:
                installed = await asyncio.to_thread(self._registry.entries)
            except EdgeError as e:  # a damaged catalog: keep serving what is known, say why, try again
                problem = e.message
                if problem != self.problem:
                    log.error("%s", e)
        # An installed model wins a clash of ids with the --model file.
        current = {e.id: e for e in [*self._extra, *installed]}
        gone = [k for i, k in self._known.items() if i not in current or current[i].sha256 != k.entry.sha256]
        # Kept with the entry as it is now: its files are the same, its names may not be (an alias added).
        kept = {i: dataclasses.replace(k, entry=current[i], pinned=self._pinned(current[i]))
                for i, k in self._known.items() if k not in gone}
        came, unservable = [], {}
        for model_id, entry in current.items():
            if model_id not in kept:
                try:
                    came.append(await asyncio.to_thread(self._describe, entry))
                except (OSError, EdgeError) as e:  # a damaged blob: the others still serve
                    reason = e.message if isinstance(e, EdgeError) else f"{e.strerror or e}"
                    if self.unservable.get(model_id, (None, ""))[1] != reason:
                        log.error("model %s cannot be served: %s", model_id, reason)
                    unservable[model_id] = (entry, reason)
        self._known = {**kept, **{k.id: k for k in came}}
        self.unservable = unservable
        self._names = {name: k for k in self._known.values() for name in k.entry.names()}
        self._installed, self.problem = installed, problem
        if not problem:
            self._stamp = stamp
        return came, gone

    def _describe(self, entry: Entry) -> Known:
        headers = [gguf.read(p) for p in entry.paths]
        engine = self._engine
        estimate = memory.estimate(headers, n_ctx=engine.n_ctx, parallel=engine.parallel,
                                   n_ubatch=min(engine.n_ubatch, engine.n_batch), embedding=entry.embedding,
                                   type_k=engine.cache_type_k, type_v=engine.cache_type_v)
        return Known(entry, headers, estimate, self._pinned(entry))

    def _pinned(self, entry: Entry) -> bool:
        return not set(entry.names()).isdisjoint(self._settings.pinned)

    def all(self) -> list[Known]:
        return list(self._known.values())

    def has(self, name: str | None) -> bool:
        return name is not None and name in self._names

    def find(self, name: str | None) -> Known:
        """The model called `name` (an id or an alias); None names the only model there is."""
        if name is None and len(self._known) == 1:
            return next(iter(self._known.values()))
        known = self._names.get(name) if name is not None else None
        if known is None:
            for entry, reason in self.unservable.values():
                if name in entry.names():
                    raise NotReady(f"model '{entry.id}' cannot be served: {reason}", code="model_failed")
            raise ModelNotFound(name, sorted(self._known))
        return known
