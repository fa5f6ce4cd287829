"""Which models are loaded: on demand, within a memory budget, unloaded when idle.

Every model the service knows (the installed ones, and a file given with
--model) has a record here. A request leases a model: the first lease loads
it, concurrent first leases share that one load, and a lease is held until
the response ends, so a model with requests in flight is never unloaded.

Before a load, the memory it will take is estimated from the GGUF header
(memory.py). If it does not fit, the least recently used idle models are
unloaded; if it could never fit, the request gets a clear refusal with the
numbers instead of the box getting an out-of-memory kill. Loads run one at a
time, so two of them never count the same free memory.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import psutil

from edgellm.config import EngineConfig, ModelsConfig, parse_duration, parse_size
from edgellm.engine import gguf, memory
from edgellm.engine.chat import ChatTemplate
from edgellm.engine.memory import MiB, Estimate
from edgellm.engine.model import Model, ModelLoadError
from edgellm.engine.runner import Runner
from edgellm.engine.stream import EngineError
from edgellm.hardware.plan import Plan
from edgellm.metrics import Metrics
from edgellm.store.registry import Entry, Registry

log = logging.getLogger("edgellm.engine")


class ModelNotFound(LookupError):
    def __init__(self, name: str | None, available: list[str]) -> None:
        if not available:
            message = "no models are installed here: add one with `edgellm models add PATH`"
        elif name is None:
            message = f"'model' is required: this server has several ({', '.join(available)})"
        else:
            message = f"model '{name}' does not exist here; available: {', '.join(available) or 'none'}"
        super().__init__(message)
        self.name = name
        self.available = available


class NotReady(Exception):
    """The model is loading, failed to load, or the server is stopping; retry_after is a hint in seconds."""

    def __init__(self, message: str, retry_after: int | None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class ModelTooLarge(Exception):
    """The model cannot fit in memory here even with every other model unloaded."""


class Loaded:
    """A model ready to serve: weights, the scheduler that runs it, and how to prompt it.

    Requests hold it while they use it (on the event loop or in a worker
    thread); the weights are freed only when nobody holds them.
    """

    def __init__(self, model_id: str, model: Model, runner: Runner, template: ChatTemplate | None,
                 defaults: dict[str, float]) -> None:
        self.id = model_id
        self.model = model
        self.runner = runner
        self.template = template  # None for embedding models
        self.defaults = defaults  # sampling defaults the model file recommends
        self._users = 0
        self._idle = threading.Condition()

    @property
    def users(self) -> int:
        return self._users

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


class Managed:
    """One model the service knows about, loaded or not."""

    def __init__(self, entry: Entry, headers: list[gguf.GGUFFile], estimate: Estimate) -> None:
        self.entry = entry
        self.headers = headers
        self.estimate = estimate
        self.loaded: Loaded | None = None
        self.loading: asyncio.Task | None = None
        self.last_used = 0.0  # wall-clock seconds
        self.keep_alive: float | None = 0.0  # seconds idle before unloading; None: until evicted
        self.rss_delta: int | None = None  # measured when it loaded
        self.removed = False  # gone from the catalog: unload once idle, do not load again
        self.unload_requested = False  # by the admin API while requests were in flight
        self.waiters = 0  # requests waiting for it to load: it is as good as busy
        self.template_override = ""  # [model] chat_template, for the --model file
        self.pinned = False  # never unloaded for being idle or to make room
        self.waiting = ""  # why its load cannot start yet, while it waits for room
        self.backend = ""  # where it runs once loaded: cuda, vulkan or cpu
        self.gpu_layers = 0

    @property
    def state(self) -> str:
        return "loaded" if self.loaded else "loading" if self.loading else "unloaded"

    @property
    def expires_at(self) -> float | None:
        if self.loaded is None or self.keep_alive is None or self.loaded.users:
            return None
        return self.last_used + self.keep_alive


class Lease:
    """A request's hold on a loaded model; release() exactly once, when the response has ended."""

    def __init__(self, pool: Pool, managed: Managed, keep_alive: float | None) -> None:
        self.pool = pool
        self.managed = managed
        self.loaded: Loaded = managed.loaded
        self.keep_alive = keep_alive
        self._released = False
        self.loaded.acquire()

    def release(self) -> None:
        if not self._released:
            self._released = True
            self.loaded.release()
            self.pool._after_release(self.managed, self.keep_alive)


class Pool:
    def __init__(self, engine: EngineConfig, settings: ModelsConfig, *, plan: Plan, registry: Registry | None = None,
                 extra: list[tuple[Entry, str]] = (), metrics: Metrics | None = None) -> None:
        """`plan`: the backends to load on, in order of preference (hardware/plan.py).
        `extra`: models served from where they are (a --model file), with a chat template override each."""
        self._engine = engine
        self._plan = plan
        self._settings = settings
        self._registry = registry
        self._extra = list(extra)
        self._metrics = metrics or Metrics()
        self._models: dict[str, Managed] = {}
        self._stamp = -1
        self._load_lock = asyncio.Lock()
        self._released = asyncio.Event()  # set whenever a lease ends: a model may have become evictable
        self._startup: list[asyncio.Task] = []
        self._housekeeping: asyncio.Task | None = None
        self._closing = False
        self._threads = engine.n_threads
        self.default_keep_alive = parse_duration(settings.keep_alive)
        self.load_timeout = parse_duration(settings.load_timeout)  # None: wait as long as it takes
        self.budget = parse_size(settings.memory_budget) if settings.memory_budget else None
        self.reserve = parse_size(settings.memory_reserve) if settings.memory_reserve else 0

    # --- the catalog --------------------------------------------------------------------------

    async def start(self) -> None:
        """Read the catalog, start loading the preload list and the --model file, keep house."""
        if self._registry is not None:
            await asyncio.to_thread(self._registry.open, wait=False)
        await self.refresh()
        for name in [*(e.id for e, _ in self._extra), *self._settings.preload]:
            if name not in self._names():
                log.error("cannot preload %r: no such model", name)
                continue
            self._startup.append(asyncio.create_task(self._preload(name)))
        self._housekeeping = asyncio.create_task(self._keep_house())
        if not self._models:
            log.warning("no models yet: install one with `edgellm models add PATH` (it is picked up at once)")

    async def started(self) -> None:
        """Wait for the start-up loads to end, loaded or failed (health() says which)."""
        await asyncio.gather(*self._startup, return_exceptions=True)

    def dead(self) -> list[str]:
        """Loaded models whose runner thread died."""
        return [m.entry.id for m in self._models.values() if m.loaded and not m.loaded.runner.alive]

    def summary(self) -> str:
        """One line for `systemctl status`: models, loaded ones, requests in flight."""
        loaded = [m.loaded for m in self._models.values() if m.loaded]
        running = sum(lo.runner.in_flight for lo in loaded)
        return (f"{len(self._models)} models, {len(loaded)} loaded, "
                f"{running} request{'' if running == 1 else 's'} in flight")

    async def _preload(self, name: str) -> None:
        managed = self.find(name)
        try:
            await self._loaded(managed, timeout=None)
        except Exception as e:
            log.error("model %s failed to load: %s", name, e)
            raise
        managed.last_used = time.time()

    async def refresh(self) -> None:
        """Take in catalog changes made by anyone (the CLI, the admin API, an import)."""
        stamp = self._registry.stamp() if self._registry else 0
        if stamp == self._stamp:
            return
        self._stamp = stamp
        entries = [(e, e.template) for e in await asyncio.to_thread(self._registry.entries)] if self._registry else []
        current = {e.id: (e, template) for e, template in [*self._extra, *entries]}
        for model_id, managed in list(self._models.items()):
            entry = current.get(model_id, (None, ""))[0]
            if entry is None or entry.sha256 != managed.entry.sha256:
                managed.removed = True  # unloads once idle; a replacement gets a new record
                del self._models[model_id]
                await self._retire(managed)
        for model_id, (entry, template) in current.items():
            if model_id not in self._models:
                try:
                    self._models[model_id] = await asyncio.to_thread(self._describe, entry, template)
                except (OSError, gguf.GGUFError) as e:  # a damaged blob: the others still serve
                    log.error("model %s cannot be served: %s", model_id, e)

    def _describe(self, entry: Entry, template: str) -> Managed:
        headers = [gguf.read(p) for p in entry.paths]
        estimate = memory.estimate(headers, n_ctx=self._engine.n_ctx, parallel=self._engine.parallel,
                                   n_ubatch=min(self._engine.n_ubatch, self._engine.n_batch),
                                   embedding=entry.embedding)
        managed = Managed(entry, headers, estimate)
        managed.template_override = template
        managed.keep_alive = self.default_keep_alive
        managed.pinned = not set(entry.names()).isdisjoint(self._settings.pinned)
        return managed

    def _names(self) -> dict[str, Managed]:
        return {name: m for m in self._models.values() for name in m.entry.names()}

    def entries(self) -> list[Entry]:
        return [m.entry for m in self._models.values()]

    def models(self) -> list[Managed]:
        return list(self._models.values())

    def has(self, name: str | None) -> bool:
        return name is not None and name in self._names()

    def estimated_wait(self, name: str) -> float:
        """Seconds a request for this model would wait for a place (0 when it is not loaded)."""
        managed = self._names().get(name)
        return managed.loaded.runner.estimated_wait() if managed and managed.loaded else 0.0

    def find(self, name: str | None) -> Managed:
        names = self._names()
        if name is None and len(self._models) == 1:
            return next(iter(self._models.values()))
        if name not in names:
            raise ModelNotFound(name, sorted(self._models))
        return names[name]

    # --- leases ---------------------------------------------------------------------------------

    async def acquire(self, name: str | None, *, keep_alive: float | None | bool = False) -> Lease:
        """Lease the model called `name` (id or alias; None when only one exists), loading it if
        need be. keep_alive: seconds to stay loaded once idle, None for until evicted, False for
        the configured default."""
        if self._closing:
            raise NotReady("the server is shutting down", None)
        if name is not None and name not in self._names():
            await self.refresh()  # installed a moment ago by another process?
        managed = self.find(name)
        keep = self.default_keep_alive if keep_alive is False else keep_alive
        managed.waiters += 1  # from now until the lease: another load must not evict it
        try:
            await self._loaded(managed, timeout=self.load_timeout)
            if self._closing:
                raise NotReady("the server is shutting down", None)
            managed.last_used = time.time()
            return Lease(self, managed, keep)
        finally:
            managed.waiters -= 1

    async def _loaded(self, managed: Managed, *, timeout: float | None) -> None:
        """Return once `managed` is loaded: joining a load under way or starting one."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while managed.loaded is None:
            if managed.removed:
                raise ModelNotFound(managed.entry.id, sorted(self._models))
            task = managed.loading or self._start_load(managed)
            remaining = None if deadline is None else max(deadline - time.monotonic(), 0.001)
            try:
                await asyncio.wait_for(asyncio.shield(task), remaining)
            except TimeoutError:
                raise NotReady(f"model '{managed.entry.id}' {managed.waiting or 'is still loading'}", 5) from None
            except (ModelLoadError, EngineError) as e:
                raise NotReady(f"model '{managed.entry.id}' failed to load: {e}", None) from None

    def _after_release(self, managed: Managed, keep_alive: float | None) -> None:
        managed.last_used = time.time()
        managed.keep_alive = keep_alive
        self._released.set()
        if managed.loaded and managed.loaded.users == 0 and (
                managed.unload_requested or managed.removed
                or (keep_alive == 0 and not managed.pinned)):
            asyncio.get_running_loop().create_task(self._unload_if_idle(managed))

    # --- loading and unloading ------------------------------------------------------------------

    def _start_load(self, managed: Managed) -> asyncio.Task:
        managed.loading = asyncio.get_running_loop().create_task(self._load(managed))
        managed.loading.add_done_callback(lambda task: self._load_done(managed, task))
        return managed.loading

    @staticmethod
    def _load_done(managed: Managed, task: asyncio.Task) -> None:
        managed.loading = None
        managed.waiting = ""
        if not task.cancelled() and task.exception() is not None:
            # Every waiting request has been told; this is for a load nobody waits for any more.
            log.info("loading model %s did not complete: %s", managed.entry.id, task.exception())

    async def _load(self, managed: Managed) -> None:
        async with self._load_lock:
            if managed.loaded is not None or managed.removed:
                return
            await self._make_room(managed)
            process = psutil.Process()
            before = process.memory_info().rss
            started = time.monotonic()
            loaded = await asyncio.to_thread(self._load_blocking, managed)
            managed.rss_delta = process.memory_info().rss - before
            managed.loaded = loaded
            managed.last_used = time.time()
            managed.unload_requested = False
            if managed.removed:  # uninstalled while it loaded
                await self._unload(managed, reason="removed")
                return
            runner = loaded.runner
            log.info("model %s ready in %.1f s on %s (%d GPU layers; context %d tokens, batch %d, %d parallel, "
                     "%d threads, flash attention %s; memory +%.0f MiB, estimated %.0f MiB)", managed.entry.id,
                     time.monotonic() - started, managed.backend, managed.gpu_layers, runner.n_ctx, runner.n_batch,
                     runner.parallel, self._threads, self._engine.flash_attn, managed.rss_delta / MiB,
                     managed.estimate.total / MiB)

    def _load_blocking(self, managed: Managed) -> Loaded:
        """Load on the plan's first backend; when that fails (a broken driver, too little GPU
        memory), on the next, the CPU last, saying why."""
        n_layer = int(managed.headers[0].arch("block_count", 0) or 0)
        steps = self._plan.steps
        for i, step in enumerate(steps):
            layers = self._plan.gpu_layers(step, managed.estimate, n_layer, self._engine.n_gpu_layers)
            try:
                loaded = self._load_on(managed, step.device if layers else "", layers)
            except (ModelLoadError, EngineError) as e:
                if i == len(steps) - 1:
                    raise
                log.warning("loading model %s on %s failed (%s); trying %s instead", managed.entry.id,
                            step.device or step.backend, e, steps[i + 1].device or steps[i + 1].backend)
                continue
            managed.backend = step.backend if layers else "cpu"
            managed.gpu_layers = min(layers, n_layer + 1)
            return loaded
        raise AssertionError("the plan always ends with the CPU")

    def _load_on(self, managed: Managed, device: str, gpu_layers: int) -> Loaded:
        entry = managed.entry
        model = Model(entry.paths, n_gpu_layers=gpu_layers, device=device)
        try:
            template = None if model.is_embedding else ChatTemplate.for_model(model, managed.template_override)
            runner = Runner(model, dataclasses.replace(self._engine, n_threads=self._threads), model_id=entry.id,
                            metrics=self._metrics)
        except BaseException:
            model.close()
            raise
        return Loaded(entry.id, model, runner, template, entry.defaults)

    def set_threads(self, n: int) -> None:
        """Threads for every loaded model's decode steps from now on, and for later loads."""
        self._threads = n
        for managed in self._models.values():
            if managed.loaded is not None:
                managed.loaded.runner.set_threads(n)

    def free_memory(self) -> int:
        """Bytes a new model may use now, with what is loaded staying loaded."""
        if self.budget is not None:
            return self.budget - sum(m.estimate.total for m in self._models.values() if m.loaded)
        # The loaded models' weights are memory-mapped file pages, which the kernel reports as
        # available (reclaimable); counting them as free would let two models thrash each other.
        mapped = sum(m.estimate.weights for m in self._models.values() if m.loaded)
        return psutil.virtual_memory().available - self.reserve - mapped

    def _reclaimable(self, exclude: Managed) -> int:
        """Bytes that unloading every model that may be unloaded would give back."""
        return sum(m.estimate.total for m in self._models.values()
                   if m.loaded and m is not exclude and not m.pinned)

    async def _make_room(self, managed: Managed) -> None:
        """Unload idle models, least recently used first, until `managed` fits; wait (bounded)
        for busy ones; refuse with the numbers when it can never fit."""
        need = managed.estimate.total
        deadline = time.monotonic() + (self.load_timeout if self.load_timeout is not None else float("inf"))
        while True:
            loaded = [m for m in self._models.values() if m.loaded]
            if len(loaded) < self._settings.max_loaded and need <= self.free_memory():
                return
            best = self.free_memory() + self._reclaimable(managed)
            if need > best:
                raise ModelTooLarge(self._too_large(managed, best))
            idle = [m for m in loaded if not m.loaded.users and not m.waiters and not m.pinned]
            if idle:
                await self._unload(min(idle, key=lambda m: m.last_used), reason="to make room")
                continue
            if all(m.pinned for m in loaded) and len(loaded) >= self._settings.max_loaded:
                raise NotReady(f"model '{managed.entry.id}' cannot load: pinned models "
                               f"({', '.join(m.entry.id for m in loaded)}) take all {self._settings.max_loaded} "
                               "places ([models] max_loaded)", None)
            busy = ", ".join(m.entry.id for m in loaded if m.loaded.users or m.waiters or m.pinned)
            managed.waiting = f"waits for requests on busy model(s) {busy} to finish before it can load"
            if time.monotonic() > deadline:
                raise NotReady(f"model '{managed.entry.id}' {managed.waiting}", 5)
            self._released.clear()
            try:
                await asyncio.wait_for(self._released.wait(), min(deadline - time.monotonic(), 3600))
            except TimeoutError:
                pass

    def _too_large(self, managed: Managed, available: int) -> str:
        fits = memory.largest_context(managed.headers, available, parallel=self._engine.parallel,
                                      n_ubatch=min(self._engine.n_ubatch, self._engine.n_batch))
        where = (f"a {self.budget / MiB:.0f} MiB budget" if self.budget is not None
                 else f"the available RAM minus a {self.reserve / MiB:.0f} MiB reserve")
        hint = (f"it would fit with [engine] n_ctx = {fits}" if fits
                else "even the smallest context would not fit")
        return (f"model '{managed.entry.id}' needs about {managed.estimate.describe()} with n_ctx "
                f"{self._engine.n_ctx} and {self._engine.parallel} parallel sequences, but at most "
                f"{max(available, 0) / MiB:.0f} MiB can be made free ({where}); {hint}")

    async def _unload(self, managed: Managed, *, reason: str) -> None:
        loaded, managed.loaded = managed.loaded, None
        if loaded is None:
            return
        log.info("unloading model %s (%s)", managed.entry.id, reason)
        await asyncio.to_thread(loaded.runner.close)
        if await asyncio.to_thread(loaded.wait_idle, 10):
            loaded.model.close()
        else:  # a worker thread still tokenizes with it: leaking beats a use-after-free
            log.warning("model %s is still in use; not freeing its weights", managed.entry.id)

    async def _unload_if_idle(self, managed: Managed, reason: str = "keep_alive elapsed") -> bool:
        async with self._load_lock:
            if managed.loaded is None or managed.loaded.users:
                return False
            await self._unload(managed, reason="removed" if managed.removed else reason)
            return True

    async def _retire(self, managed: Managed) -> None:
        if managed.loaded is not None and not managed.loaded.users:
            await self._unload_if_idle(managed)

    async def _keep_house(self) -> None:
        """Every second: take in catalog changes, unload models whose keep_alive has run out."""
        while not self._closing:
            try:
                await self.refresh()
                now = time.time()
                for managed in list(self._models.values()):
                    expires = managed.expires_at
                    if expires is not None and expires <= now and not managed.pinned:
                        await self._unload_if_idle(managed)
            except Exception:
                log.exception("model housekeeping failed")
            await asyncio.sleep(1)

    # --- admin ----------------------------------------------------------------------------------

    async def load(self, name: str) -> Managed:
        lease = await self.acquire(name, keep_alive=False)
        lease.release()
        return lease.managed

    async def unload(self, name: str) -> bool:
        """Unload now if idle; otherwise once the requests in flight end. True if unloaded now."""
        managed = self.find(name)
        if managed.loaded is None:
            return True
        managed.unload_requested = True
        return await self._unload_if_idle(managed, reason="asked to")

    async def remove(self, name: str) -> Entry:
        """Uninstall a model; refused while requests are in flight on it."""
        managed = self.find(name)
        if self._registry is None or managed.entry.id not in {e.id for e in self._registry.entries()}:
            raise ValueError(f"model '{managed.entry.id}' is not installed in the store (it was given with --model)")
        if managed.loaded is not None and managed.loaded.users:
            raise RuntimeError(f"model '{managed.entry.id}' has {managed.loaded.users} request(s) in flight")
        await self._unload_if_idle(managed, reason="removed")
        entry = await asyncio.to_thread(self._registry.remove, managed.entry.id)
        await self.refresh()
        return entry

    # --- health and shutdown --------------------------------------------------------------------

    def health(self) -> None:
        """Raises NotReady while start-up loads run or after one failed."""
        if self._closing:
            raise NotReady("the server is shutting down", None)
        for task in self._startup:
            if not task.done():
                raise NotReady("models are loading", 2)
            if task.exception() is not None:
                raise NotReady(f"a model failed to load: {task.exception()}", None)

    def interrupt(self) -> None:
        """Shutdown has begun: refuse new requests and end running ones now, so their
        clients get an answer instead of being cut off when the server's grace period ends."""
        self._closing = True
        for managed in self._models.values():
            if managed.loaded is not None:
                managed.loaded.runner.stop()

    async def close(self) -> None:
        """Refuse new requests, end the running ones, and free every model once nobody holds it."""
        self._closing = True
        if self._housekeeping is not None:
            self._housekeeping.cancel()
        await asyncio.gather(*self._startup, *(m.loading for m in self._models.values() if m.loading),
                             return_exceptions=True)
        for managed in self._models.values():
            await self._unload(managed, reason="shutting down")

