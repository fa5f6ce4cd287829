"""Which models are loaded: leased by requests, loaded on demand within the memory budget,
unloaded when idle, and supervised.

Every model the catalog knows (catalog.py) has a ModelState here. A request leases a
model: the first lease loads it, concurrent first leases share that one load, and a
lease is held until the response ends, so a model with requests in flight is never
unloaded. Whether a load fits, and what to unload for it, is the budget's decision
(budget.py); the loading itself is the loader's (loader.py).

States change on the event loop only, between awaits, so no lock guards them:
waiting for room holds nothing, and housekeeping (catalog changes, keep_alive,
dead runners) never waits behind a load. Loads run one at a time once their room
is found (disk and memory bandwidth are what a small board has least of).

A runner thread that ends by itself fails its requests (runner.py) and is noticed
here at once: its model is marked failed, unloaded, and loaded afresh by the next
request. One that cannot be brought back (it stopped MAX_FAILURES times within
FAILURE_WINDOW, or no longer loads after stopping) is `broken`: the service then
stops feeding the systemd watchdog, and a restart is the cure.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, cast

import psutil

from edgellm.config import EngineConfig, ModelsConfig
from edgellm.engine.budget import Budget, Evict, Fits, Refuse
from edgellm.engine.catalog import Catalog, Known, snapshot_key
from edgellm.engine.errors import (
    EngineError,
    ModelBusy,
    ModelLoadError,
    ModelNotFound,
    NotReady,
    ShuttingDown,
    StartTimeout,
)
from edgellm.engine.prompt_cache import PromptCache
from edgellm.hardware.plan import Plan
from edgellm.metrics import Metrics
from edgellm.store.registry import Entry, Registry, StoreError
from edgellm.units import MiB, parse_duration

if TYPE_CHECKING:
    from edgellm.engine.loader import Loaded

log = logging.getLogger("edgellm.engine")

MAX_FAILURES = 3  # runner failures within FAILURE_WINDOW that make a model broken
RESIDENT = ("loading", "loaded", "unloading")  # the phases in which a model holds (or has reserved) memory
# Why a model is unloaded (the label of edgellm_model_unloads_total) -> how the log says it.
UNLOAD_REASONS = {"keep_alive": "keep_alive elapsed", "room": "to make room", "admin": "asked to",
                  "removed": "removed", "failed": "its runner stopped", "shutdown": "shutting down"}
FAILURE_WINDOW = 600.0  # seconds


class ModelState:
    """One model the service knows, and where it is in its life."""

    def __init__(self, known: Known, keep_alive: float | None) -> None:
        self.known = known
        # unloaded -> loading -> loaded -> unloading -> unloaded; failed instead of unloaded when its
        # load failed or its runner stopped (`failure` says why), until it loads again.
        self.phase = "unloaded"
        self.loaded: Loaded | None = None
        self.loading: asyncio.Task[None] | None = None
        self.unloading: asyncio.Task[None] | None = None
        self.last_used = 0.0  # wall-clock seconds
        self.keep_alive = keep_alive  # seconds idle before unloading; None: until evicted
        self.rss_delta: int | None = None  # measured when it loaded
        self.removed = False  # gone from the catalog: unload once idle, do not load again
        self.unload_requested = False  # by the admin API while requests were in flight
        self.keep_at_most: float | None = None  # a client's "unload soon" while busy: caps the next keep_alive
        self.waiters = 0  # requests waiting for it to load: it is as good as busy
        self.waiting = ""  # why its load cannot start yet, while it waits for room
        self.failure = ""  # why it last failed to load or stopped working; "" once it loads again
        self.failed_at: list[float] = []  # when its runner stopped by itself (monotonic), recent ones
        self.broken = False  # it cannot be brought back without a restart

    @property
    def busy(self) -> bool:
        return bool(self.waiters or (self.loaded is not None and self.loaded.users))

    @property
    def expires_at(self) -> float | None:
        if self.loaded is None or self.keep_alive is None or self.loaded.users:
            return None
        return self.last_used + self.keep_alive


class Lease:
    """A request's hold on a loaded model; release() once, when the response has ended."""

    def __init__(self, pool: Pool, state: ModelState, keep_alive: float | None) -> None:
        assert state.loaded is not None
        self.loaded: Loaded = state.loaded
        self._pool = pool
        self._state = state
        self._keep_alive = keep_alive
        self._released = False
        self.loaded.acquire()
        self.loaded.leases += 1

    def release(self) -> None:
        if not self._released:
            self._released = True
            self.loaded.leases -= 1
            self.loaded.release()
            self._pool._after_release(self._state, self._keep_alive)


class Pool:
    def __init__(self, engine: EngineConfig, settings: ModelsConfig, *, plan: Callable[[], Plan],
                 registry: Registry | None = None, extra: list[Entry] | None = None, metrics: Metrics | None = None,
                 budget: Budget | None = None, prompt_cache: PromptCache | None = None) -> None:
        """`plan`: the backends to load on, in order of preference (hardware/plan.py), asked for
        by each load in its thread. `extra`: models served from where they are (the --model file).
        `prompt_cache`: where the runners keep prompt snapshots (prompt_cache.py)."""
        self._engine = engine
        self._plan = plan
        self._settings = settings
        self._registry = registry
        self._catalog = Catalog(registry, extra or [], engine, settings)
        self._preloads = [e.id for e in extra or []] + list(settings.preload)
        self._budget = budget or Budget(settings, engine)
        self._metrics = metrics or Metrics()
        self._prompt_cache = prompt_cache
        self._states: dict[str, ModelState] = {}
        self._retired: set[ModelState] = set()  # gone from the catalog, still holding memory until unloaded
        self._refreshing = asyncio.Lock()  # one catalog refresh at a time: two would both add a new model
        self._one_load = asyncio.Lock()
        self._changed = asyncio.Event()  # set when memory may have been freed: a lease ended, a model unloaded
        self._startup: list[asyncio.Task[None]] = []
        self._housekeeping: asyncio.Task[None] | None = None
        self._closing = False
        self._threads = engine.n_threads
        self.default_keep_alive = parse_duration(settings.keep_alive)
        self._min_keep_alive = parse_duration(settings.min_keep_alive) or 0.0
        self._max_keep_alive = parse_duration(settings.max_keep_alive)  # None: no bound
        self.load_timeout = parse_duration(settings.load_timeout)  # None: wait as long as it takes

    # --- the catalog --------------------------------------------------------------------------

    async def start(self) -> None:
        """Read the catalog, start loading the --model file and the preload list, keep house."""
        if self._registry is not None:
            with contextlib.suppress(StoreError):  # a damaged catalog: health() says so
                await asyncio.to_thread(self._registry.open, wait=False)
        await self.refresh()
        for name in self._preloads:
            if not self._catalog.has(name):
                log.error("cannot preload %r: no such model", name)
                continue
            self._startup.append(asyncio.create_task(self._preload(self.find(name))))
        self._housekeeping = asyncio.create_task(self._keep_house())
        if not self._states:
            log.warning("no models yet: install one with `edgellm models add PATH` (it is picked up at once)")

    async def started(self) -> None:
        """Wait for the start-up loads to end, loaded or failed (health() says which)."""
        await asyncio.gather(*self._startup, return_exceptions=True)

    async def _preload(self, state: ModelState) -> None:
        try:
            await self._ensure_loaded(state, deadline=None)
        except Exception as e:
            log.error("model %s failed to load: %s", state.known.id, e)
            state.failure = state.failure or str(e)
            if state.phase == "unloaded":
                state.phase = "failed"
            return
        state.last_used = time.time()

    async def refresh(self) -> None:
        """Take in catalog changes made by anyone (the CLI, the admin API, an import)."""
        async with self._refreshing:
            came, gone = await self._catalog.refresh()
            # From here to the end there is no await: names and states change together.
            for known in gone:
                state = self._states.pop(known.id)
                state.removed = True  # a replacement gets a new state; this one unloads once idle
                if state.phase in RESIDENT:
                    self._retired.add(state)
                    if not state.busy:
                        self._begin_unload(state, "removed")
            for known in came:
                self._states[known.id] = ModelState(known, self.default_keep_alive)
            for known in self._catalog.all():  # the same files, perhaps under new names
                self._states[known.id].known = known
            if (came or gone) and self._prompt_cache is not None and not self._catalog.problem:
                # A model removed or replaced takes its prompt snapshots with it.
                keys = [snapshot_key(k.entry) for k in self._catalog.all()]
                await asyncio.to_thread(self._prompt_cache.retain, keys)

    def _every(self) -> list[ModelState]:
        """Every state that may hold memory or a runner: the catalog's, and the retired ones."""
        return [*self._states.values(), *self._retired]

    def states(self) -> list[ModelState]:
        return list(self._states.values())

    def has(self, name: str | None) -> bool:
        return self._catalog.has(name)

    def find(self, name: str | None) -> ModelState:
        return self._states[self._catalog.find(name).id]

    def estimated_wait(self, name: str) -> float:
        """Seconds a request for this model would wait for a place (0 when it is not loaded)."""
        if not self._catalog.has(name):
            return 0.0
        loaded = self.find(name).loaded
        return loaded.runner.estimated_wait() if loaded is not None else 0.0

    # --- leases ---------------------------------------------------------------------------------

    async def acquire(self, name: str | None, *, keep_alive: float | None | bool = False,
                      privileged: bool = False) -> Lease:
        """Lease the model called `name` (id or alias; None when only one exists), loading it if
        need be. keep_alive: seconds to stay loaded once idle, None for until evicted, False for
        the configured default; within [models] min_keep_alive and max_keep_alive unless
        `privileged` (an admin key's request)."""
        if self._closing:
            raise ShuttingDown()
        if name is not None and not self._catalog.has(name):
            await self.refresh()  # installed a moment ago by another process?
        state = self.find(name)
        keep = self.default_keep_alive if keep_alive is False else cast("float | None", keep_alive)
        if keep_alive is not False and not privileged:
            keep = self._bounded(keep)
        deadline = None if self.load_timeout is None else time.monotonic() + self.load_timeout
        state.waiters += 1  # from now until the lease: another load must not evict it
        try:
            await self._ensure_loaded(state, deadline)
            if self._closing:
                raise ShuttingDown()
            state.last_used = time.time()
            return Lease(self, state, keep)
        finally:
            state.waiters -= 1

    def _bounded(self, keep: float | None) -> float | None:
        if self._max_keep_alive is not None and (keep is None or keep > self._max_keep_alive):
            keep = self._max_keep_alive
        return None if keep is None else max(keep, self._min_keep_alive)

    def _after_release(self, state: ModelState, keep_alive: float | None) -> None:
        state.last_used = time.time()
        cap = state.keep_at_most
        if cap is not None and state.loaded is not None and state.loaded.users == 0:
            keep_alive = cap if keep_alive is None else min(keep_alive, cap)
            state.keep_at_most = None
        state.keep_alive = keep_alive
        self._changed.set()
        if state.loaded is not None and state.loaded.users == 0 and (
                state.unload_requested or state.removed or (keep_alive == 0 and not state.known.pinned)):
            self._begin_unload(state, "removed" if state.removed else "admin" if state.unload_requested
                               else "keep_alive")

    # --- loading --------------------------------------------------------------------------------

    async def _ensure_loaded(self, state: ModelState, deadline: float | None) -> None:
        """Return once `state`'s model is loaded: joining a load under way or starting one."""
        while state.loaded is None:
            if state.removed:
                raise ModelNotFound(state.known.id, sorted(self._states))
            if len(state.failed_at) >= MAX_FAILURES:
                raise NotReady(f"model '{state.known.id}' stopped working {len(state.failed_at)} times within "
                               f"{FAILURE_WINDOW / 60:.0f} minutes ({state.failure}); restart the service")
            task = state.loading or self._start_load(state)
            remaining = None if deadline is None else max(deadline - time.monotonic(), 0.001)
            try:
                await asyncio.wait_for(asyncio.shield(task), remaining)
            except TimeoutError:
                raise NotReady(f"model '{state.known.id}' {state.waiting or 'is still loading'}",
                               retry_after=5) from None
            except (ModelLoadError, EngineError) as e:
                raise NotReady(f"model '{state.known.id}' failed to load: {e}") from None

    def _start_load(self, state: ModelState) -> asyncio.Task[None]:
        task = state.loading = asyncio.get_running_loop().create_task(self._load(state))

        def done(task: asyncio.Task[None]) -> None:
            state.loading = None
            state.waiting = ""
            if not task.cancelled() and task.exception() is not None:
                # Every waiting request has been told; this is for a load nobody waits for any more.
                log.info("loading model %s did not complete: %s", state.known.id, task.exception())

        task.add_done_callback(done)
        return task

    async def _load(self, state: ModelState) -> None:
        if state.unloading is not None:  # its previous runner is still being put away
            state.waiting = "waits for its previous runner to end"
            await asyncio.shield(state.unloading)
        await self._make_room(state)
        try:
            async with self._one_load:
                if state.removed or self._closing:
                    state.phase = "unloaded"
                    self._retired.discard(state)
                    self._changed.set()  # the room it had taken is free again
                    if self._closing:
                        raise ShuttingDown()
                    return
                process = psutil.Process()
                before = process.memory_info().rss
                started = time.monotonic()
                engine = dataclasses.replace(self._engine, n_threads=self._threads)
                on_exit = self._noticing_exit(asyncio.get_running_loop(), state)
                loaded = await asyncio.to_thread(self._load_now, state.known, engine, on_exit)
        except BaseException as e:
            state.phase = "unloaded"
            if isinstance(e, ModelLoadError | EngineError):
                state.failure = f"failed to load: {e}"
                state.phase = "failed"
                now = time.monotonic()
                state.failed_at = [t for t in state.failed_at if now - t < FAILURE_WINDOW]
                state.broken = state.broken or bool(state.failed_at)  # it stopped lately, and cannot come back
            if isinstance(e, StartTimeout):  # its thread may start yet, holding memory: it counts till then
                state.phase = "unloading"
                state.unloading = asyncio.get_running_loop().create_task(self._outlive(state, e.thread))
            elif state.removed:
                self._retired.discard(state)
            self._changed.set()
            raise
        state.rss_delta = process.memory_info().rss - before
        state.loaded, state.phase = loaded, "loaded"
        self._metrics.loads.labels(state.known.id).inc()
        state.failure = ""
        state.broken = False
        state.last_used = time.time()
        state.unload_requested = False
        self._changed.set()
        runner = loaded.runner
        log.info("model %s ready in %.1f s on %s (%d GPU layers; context %d tokens, batch %d, %d parallel, "
                 "%d threads, flash attention %s; memory +%.0f MiB, estimated %.0f MiB)", state.known.id,
                 time.monotonic() - started, loaded.backend, loaded.gpu_layers, runner.n_ctx, runner.n_batch,
                 runner.parallel, engine.n_threads, self._engine.flash_attn, state.rss_delta / MiB,
                 state.known.estimate.total / MiB)
        if runner.failure is not None:  # it stopped before anyone could be told
            self._runner_exited(state)
        elif state.removed:  # uninstalled while it loaded
            self._begin_unload(state, "removed")

    async def _make_room(self, state: ModelState) -> None:
        """Until the budget says the model fits (it is then resident, as loading): unload what it
        says to, wait (bounded, holding nothing) while it says to wait, or raise its refusal."""
        deadline = time.monotonic() + (self.load_timeout if self.load_timeout is not None else float("inf"))
        while True:
            if self._closing:
                raise ShuttingDown()
            resident = [s for s in self._every() if s.phase in RESIDENT and s is not state]
            decision = self._budget.decide(state.known, resident)
            if isinstance(decision, Fits):
                state.phase = "loading"
                state.waiting = ""
                return
            if isinstance(decision, Refuse):
                raise decision.error
            if isinstance(decision, Evict):
                self._begin_unload(cast(ModelState, decision.victim), "room")
                continue
            state.waiting = decision.why
            if time.monotonic() > deadline:
                raise NotReady(f"model '{state.known.id}' {decision.why}", retry_after=5)
            self._changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), min(deadline - time.monotonic(), 3600))

    # --- unloading ------------------------------------------------------------------------------

    def _begin_unload(self, state: ModelState, reason: str) -> None:
        """Take the model out of service now; its runner and weights are freed in the background.
        `reason`: one of UNLOAD_REASONS."""
        loaded = state.loaded
        if loaded is None:
            return
        log.info("unloading model %s (%s)", state.known.id, UNLOAD_REASONS[reason])
        self._metrics.unloads.labels(state.known.id, reason).inc()
        state.loaded, state.phase = None, "unloading"
        state.unloading = asyncio.get_running_loop().create_task(self._free(state, loaded))

    def _load_now(self, known: Known, engine: EngineConfig, on_exit: Callable[[str], None]) -> Loaded:
        """In a worker thread. The loader brings llama.cpp in (libllama, numpy, jinja2: about
        20 MB resident), so it is imported by the first load, not when the server starts."""
        from edgellm.engine import loader

        return loader.load(known, engine, self._plan(), metrics=self._metrics, on_exit=on_exit,
                           prompt_cache=self._prompt_cache)

    async def _free(self, state: ModelState, loaded: Loaded) -> None:
        try:
            if not await asyncio.to_thread(loaded.close):
                log.warning("model %s is still in use; not freeing its weights", state.known.id)
        finally:
            self._unloaded(state)

    async def _outlive(self, state: ModelState, thread: threading.Thread) -> None:
        """A runner that did not start in time: its memory counts until its thread has ended."""
        try:
            await asyncio.to_thread(thread.join)
        finally:
            self._unloaded(state)

    def _unloaded(self, state: ModelState) -> None:
        state.unloading = None
        state.keep_at_most = None  # done: it is not loaded any more
        if state.phase == "unloading":
            state.phase = "failed" if state.failure else "unloaded"
        if state.removed:
            self._retired.discard(state)
        self._changed.set()

    async def _unload_if_idle(self, state: ModelState, reason: str) -> bool:
        """Unload now unless requests hold the model; True once it is unloaded."""
        if state.busy:
            return False
        self._begin_unload(state, reason)
        if state.unloading is not None:
            await asyncio.shield(state.unloading)
        return True

    # --- supervision ----------------------------------------------------------------------------

    def _noticing_exit(self, loop: asyncio.AbstractEventLoop, state: ModelState) -> Callable[[str], None]:
        """The runner's on_exit: called on its thread, handled on the event loop."""
        def on_exit(reason: str) -> None:
            with contextlib.suppress(RuntimeError):  # the loop is closed: the service is gone anyway
                loop.call_soon_threadsafe(self._runner_exited, state)
        return on_exit

    def _runner_exited(self, state: ModelState) -> None:
        loaded = state.loaded
        if loaded is None or loaded.runner.failure is None:
            return  # already handled, or a runner that was replaced since
        now = time.monotonic()
        state.failed_at = [t for t in state.failed_at if now - t < FAILURE_WINDOW] + [now]
        state.failure = f"stopped working: {loaded.runner.failure}"
        state.broken = len(state.failed_at) >= MAX_FAILURES
        log.error("model %s %s; %s", state.known.id, state.failure,
                  "it cannot be brought back: restart the service" if state.broken
                  else "it is loaded afresh on the next request")
        self._begin_unload(state, "failed")

    def broken(self) -> list[str]:
        """Models that stopped working and cannot be brought back without a restart."""
        return [s.known.id for s in self._every() if s.broken]

    # --- housekeeping ---------------------------------------------------------------------------

    async def _keep_house(self) -> None:
        """Every second: take in catalog changes, notice dead runners, unload models whose
        keep_alive has run out."""
        while not self._closing:
            try:
                await self.refresh()
                now = time.time()
                for state in self._every():
                    if state.loaded is not None and state.loaded.runner.failure is not None:
                        self._runner_exited(state)
                    expires = state.expires_at
                    if expires is not None and expires <= now and not state.known.pinned:
                        await self._unload_if_idle(state, "keep_alive")
            except Exception:
                log.exception("model housekeeping failed")
            await asyncio.sleep(1)

    def set_threads(self, n: int) -> None:
        """Threads for every loaded model's decode steps from now on, and for later loads."""
        self._threads = n
        for state in self._every():
            if state.loaded is not None:
                state.loaded.runner.set_threads(n)

    # --- admin ----------------------------------------------------------------------------------

    async def load(self, name: str) -> ModelState:
        lease = await self.acquire(name, keep_alive=False)
        lease.release()
        return self.find(name)

    async def unload(self, name: str) -> bool:
        """Unload now if idle; otherwise once the requests in flight end. True if unloaded now."""
        state = self.find(name)
        if state.loaded is None:
            return True
        state.unload_requested = True
        return await self._unload_if_idle(state, "admin")

    async def remove(self, name: str) -> Entry:
        """Uninstall a model; refused while requests are in flight on it."""
        state = self.find(name)
        entry = state.known.entry
        registry = await self._check_installed(entry)
        if state.busy:
            raise ModelBusy(f"model '{entry.id}' has requests in flight; try again when they have finished")
        await self._unload_if_idle(state, "removed")
        removed = await asyncio.to_thread(registry.remove, entry.id)
        await self.refresh()
        return removed

    async def forget(self, name: str) -> None:
        """Ollama's delete: this name goes; the model goes with its last one (as remove())."""
        entry = self.find(name).known.entry
        if not entry.aliases:
            await self.remove(name)
            return
        registry = await self._check_installed(entry)
        await asyncio.to_thread(registry.drop_name, name)
        await self.refresh()

    async def _check_installed(self, entry: Entry) -> Registry:
        """The store, if the model is in it; a StoreError for the --model file (served from where it is)."""
        if self._registry is None or entry.id not in {e.id for e in await asyncio.to_thread(self._registry.entries)}:
            raise StoreError(f"model '{entry.id}' is not installed in the store (it was given with --model)",
                             status=400, code="not_installed", param="model")
        return self._registry

    async def alias(self, name: str, alias: str) -> Entry:
        """Give an installed model another name."""
        entry = self.find(name).known.entry
        registry = await self._check_installed(entry)
        aliased = await asyncio.to_thread(registry.alias, entry.id, alias)
        await self.refresh()
        return aliased

    async def install(self, path: Path, model_id: str) -> Entry:
        """Install a GGUF file under this name (an uploaded one: Ollama's /api/create)."""
        if self._registry is None:
            raise StoreError("this server has no model store", status=400, code="not_installed")
        registry = self._registry
        entry, _ = await asyncio.to_thread(lambda: registry.add(path, model_id=model_id, source="upload"))
        await self.refresh()
        return entry

    def expire(self, name: str, *, privileged: bool) -> float | None:
        """A client's "unload now" (Ollama's keep_alive 0 with nothing to generate): at once for an
        admin key's or with [models] min_keep_alive 0, else once idle for min_keep_alive; a model
        with requests in flight (or loading) once they end. The seconds it then stays, or None when
        it is not loaded (or pinned)."""
        state = self.find(name)
        if state.known.pinned or (state.loaded is None and state.loading is None):
            return None
        keep = 0.0 if privileged else self._bounded(0.0)
        assert keep is not None
        if state.busy or state.loaded is None:  # requests in flight, or a load under way: once they end
            state.keep_at_most = keep
        else:
            state.keep_alive = keep
            if keep == 0:
                self._begin_unload(state, "keep_alive")
        return keep

    # --- health and shutdown --------------------------------------------------------------------

    def health(self) -> None:
        """Raises NotReady while start-up loads run, while the catalog cannot be read, and while a
        model is failed (it did not load, or stopped working) until it loads again."""
        if self._closing:
            raise ShuttingDown()
        if any(not task.done() for task in self._startup):
            raise NotReady("models are loading", retry_after=2)
        if self._catalog.problem:
            raise NotReady(self._catalog.problem)
        failed = [f"model '{s.known.id}' {s.failure}" for s in self._states.values() if s.phase == "failed"]
        if failed:  # (not a file that cannot be described: it never was ready, and nothing waits for it)
            raise NotReady("; ".join(failed))

    def describe(self, state: ModelState) -> dict[str, object]:
        """A model with its state, as /admin/models shows it."""
        def iso(seconds: float | None) -> str | None:
            return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(seconds)) if seconds else None

        loaded = state.loaded
        return {
            **state.known.entry.record(),
            "state": state.phase,
            "failure": state.failure or None,
            "backend": loaded.backend if loaded else None,
            "gpu_layers": loaded.gpu_layers if loaded else None,
            "chat_template_in_use": loaded.chat_template.name if loaded and loaded.chat_template else None,
            "tool_call_format": loaded.chat_template.tool_syntax.family if loaded and loaded.chat_template else None,
            "estimate_bytes": state.known.estimate.total,
            "kv_cache": {"type_k": self._engine.cache_type_k, "type_v": self._engine.cache_type_v,
                         "estimate_bytes": state.known.estimate.kv_cache},
            "rss_delta_bytes": state.rss_delta,
            "in_flight": loaded.leases if loaded else 0,
            "last_used": iso(state.last_used),
            "expires_at": iso(state.expires_at),
            "pinned": state.known.pinned,
        }

    def unservable(self) -> list[dict[str, object]]:
        """The installed models whose files cannot be described, as /admin/models shows them."""
        return [{**entry.record(), "state": "failed", "failure": reason}
                for entry, reason in self._catalog.unservable.values()]

    def summary(self) -> str:
        """One line for `systemctl status`: models, loaded ones, requests in flight, failures."""
        loaded = [s.loaded for s in self._states.values() if s.loaded is not None]
        in_flight = sum(lo.leases for lo in loaded)
        line = (f"{len(self._states)} models, {len(loaded)} loaded, "
                f"{in_flight} request{'' if in_flight == 1 else 's'} in flight")
        failed = [f"{s.known.id} {s.failure}" for s in self._states.values() if s.phase == "failed"]
        failed += [f"{i} cannot be served: {reason}" for i, (_, reason) in self._catalog.unservable.items()]
        return line + (f"; failed: {'; '.join(failed)}" if failed else "")

    def interrupt(self) -> None:
        """Shutdown has begun: refuse new requests and end running ones now, so their
        clients get an answer instead of being cut off when the server's grace period ends."""
        self._closing = True
        self._changed.set()  # loads waiting for room give up
        for state in self._every():
            if state.loaded is not None:
                state.loaded.runner.stop()

    async def close(self) -> None:
        """Refuse new requests, end the running ones, and free every model once nobody holds it."""
        self._closing = True
        self._changed.set()
        if self._housekeeping is not None:
            self._housekeeping.cancel()
        await asyncio.gather(*self._startup, *(s.loading for s in self._every() if s.loading), return_exceptions=True)
        for state in self._every():
            self._begin_unload(state, "shutdown")
        await asyncio.gather(*(s.unloading for s in self._every() if s.unloading), return_exceptions=True)
        if self._prompt_cache is not None:
            await asyncio.to_thread(self._prompt_cache.close)  # what is saved reaches the disk: it survives the restart
