"""The models this service answers for, and their loading state.

For now that is the one configured model, loaded in the background at
start-up so the HTTP server can answer /health (503) while it loads.
"""

from __future__ import annotations

import asyncio
import logging
import re
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from edgellm.config import EngineConfig
from edgellm.engine.chat import ChatTemplate
from edgellm.engine.model import Model
from edgellm.engine.runner import Runner
from edgellm.metrics import Metrics

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


class Loaded:
    """A model ready to serve: weights, the scheduler that runs it, and how to prompt it.

    Requests hold it while they use it (on the event loop or in a worker
    thread); the weights are freed only when nobody holds them.
    """

    def __init__(self, model_id: str, model: Model, runner: Runner, template: ChatTemplate | None) -> None:
        self.id = model_id
        self.model = model
        self.runner = runner
        self.template = template  # None for embedding models
        self._users = 0
        self._idle = threading.Condition()

    def acquire(self) -> None:
        with self._idle:
            self._users += 1

    def release(self) -> None:
        with self._idle:
            self._users -= 1
            if self._users == 0:
                self._idle.notify_all()

    @contextmanager
    def held(self) -> Iterator[Loaded]:
        self.acquire()
        try:
            yield self
        finally:
            self.release()

    def wait_idle(self, timeout: float) -> bool:
        with self._idle:
            return self._idle.wait_for(lambda: self._users == 0, timeout)


def model_id_for(path: Path) -> str:
    """A client-friendly id from a file name: no extension, no split-file suffix."""
    return re.sub(r"-\d{5}-of-\d{5}$", "", path.name.removesuffix(".gguf"))


class Pool:
    def __init__(self, path: str, model_id: str, engine: EngineConfig, chat_template: str = "",
                 metrics: Metrics | None = None) -> None:
        self.path = Path(path)
        self.id = model_id or model_id_for(self.path)
        self.created = int(self.path.stat().st_mtime)
        self._engine = engine
        self._chat_template = chat_template
        self._metrics = metrics or Metrics()
        self._loaded: Loaded | None = None
        self._error: str | None = None
        self._task: asyncio.Task | None = None
        self._closing = False

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
        log.info("model %s ready in %.1f s (context %d tokens, batch %d, %d parallel, %d threads, "
                 "flash attention %s)", self.id, time.monotonic() - started, runner.n_ctx, runner.n_batch,
                 runner.parallel, runner.n_threads, self._engine.flash_attn)

    def _load_blocking(self) -> Loaded:
        model = Model(self.path, n_gpu_layers=self._engine.n_gpu_layers)
        try:
            template = None if model.is_embedding else ChatTemplate.for_model(model, self._chat_template)
            runner = Runner(model, self._engine, model_id=self.id, metrics=self._metrics)
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
        if self._closing:
            raise NotReady("the server is shutting down", None)
        if self._loaded is None:
            if self._error:
                raise NotReady(f"model '{self.id}' failed to load: {self._error}", None)
            raise NotReady(f"model '{self.id}' is loading", 2)
        return self._loaded

    def interrupt(self) -> None:
        """Shutdown has begun: refuse new requests and end running ones now, so their
        clients get an answer instead of being cut off when the server's grace period ends."""
        self._closing = True
        if self._loaded is not None:
            self._loaded.runner.stop()

    async def close(self) -> None:
        """Refuse new requests, end the running ones, and free the model once nobody holds it."""
        self._closing = True
        if self._task is not None:
            await asyncio.gather(self._task, return_exceptions=True)
        if self._loaded is not None:
            loaded, self._loaded = self._loaded, None
            await asyncio.to_thread(loaded.runner.close)
            if await asyncio.to_thread(loaded.wait_idle, 10):
                loaded.model.close()
            else:  # a worker thread still tokenizes with it: leaking beats a use-after-free
                log.warning("model %s is still in use at shutdown; not freeing it", loaded.id)
