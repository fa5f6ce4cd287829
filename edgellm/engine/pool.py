"""The models this service answers for, and their loading state.

For now that is the one configured model, loaded in the background at
start-up so the HTTP server can answer /health (503) while it loads.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from dataclasses import dataclass
from pathlib import Path

from edgellm.config import EngineConfig
from edgellm.engine.chat import ChatTemplate
from edgellm.engine.model import Model
from edgellm.engine.runner import Runner

log = logging.getLogger("edgellm.engine")


class ModelNotFound(LookupError):
    def __init__(self, name: str, available: list[str]) -> None:
        super().__init__(f"model '{name}' does not exist here; available: {', '.join(available) or 'none'}")
        self.name = name


class NotReady(Exception):
    """The model is still loading, or failed to; retry_after is a hint in seconds."""

    def __init__(self, message: str, retry_after: int | None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


@dataclass
class Loaded:
    """A model ready to serve: weights, the scheduler that runs it, and how to prompt it."""

    id: str
    model: Model
    runner: Runner
    template: ChatTemplate | None  # None for embedding models


def model_id_for(path: Path) -> str:
    """A client-friendly id from a file name: no extension, no split-file suffix."""
    return re.sub(r"-\d{5}-of-\d{5}$", "", path.name.removesuffix(".gguf"))


class Pool:
    def __init__(self, path: str, model_id: str, engine: EngineConfig, chat_template: str = "") -> None:
        self.path = Path(path)
        self.id = model_id or model_id_for(self.path)
        self.created = int(self.path.stat().st_mtime)
        self._engine = engine
        self._chat_template = chat_template
        self._loaded: Loaded | None = None
        self._error: str | None = None
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        """Begin loading in a worker thread; the event loop stays free."""
        self._task = asyncio.create_task(self._load())

    async def _load(self) -> None:
        started = time.monotonic()
        try:
            self._loaded = await asyncio.to_thread(self._load_blocking)
        except Exception as e:
            self._error = str(e)
            log.error("model %s failed to load: %s", self.id, e)
            return
        runner = self._loaded.runner
        log.info("model %s ready in %.1f s (context %d tokens, batch %d, %d threads, flash attention %s)",
                 self.id, time.monotonic() - started, runner.n_ctx, runner.n_batch, runner.n_threads,
                 self._engine.flash_attn)

    def _load_blocking(self) -> Loaded:
        model = Model(self.path, n_gpu_layers=self._engine.n_gpu_layers)
        try:
            template = None if model.is_embedding else ChatTemplate.for_model(model, self._chat_template)
            runner = Runner(model, self._engine)
        except BaseException:
            model.close()
            raise
        return Loaded(self.id, model, runner, template)

    @property
    def ready(self) -> bool:
        return self._loaded is not None

    def ids(self) -> list[str]:
        return [self.id]

    def get(self, name: str | None) -> Loaded:
        """The loaded model for a request's `model` field (None means the default)."""
        if name is not None and name != self.id:
            raise ModelNotFound(name, self.ids())
        if self._loaded is None:
            if self._error:
                raise NotReady(f"model '{self.id}' failed to load: {self._error}", None)
            raise NotReady(f"model '{self.id}' is loading", 2)
        return self._loaded

    async def close(self) -> None:
        if self._task is not None:
            await asyncio.gather(self._task, return_exceptions=True)
        if self._loaded is not None:
            loaded, self._loaded = self._loaded, None
            await asyncio.to_thread(loaded.runner.close)
            loaded.model.close()
