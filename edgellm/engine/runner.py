"""The runner: one thread that owns a llama context, fed through a queue.

The event loop calls submit() (generation) or embed(); they only queue work.
The thread creates the context, takes whatever has arrived before each
scheduler step, runs the step (scheduler.py: continuous batching), and hands
the results back through an Outbox in one event-loop wake-up per step.

The thread cannot die unnoticed: whatever ends it other than stop(), every
request it had accepted ends with RunnerFailed, `failure` says why, and
`on_exit` tells its owner (the pool), which loads the model afresh. Start-up
cannot hang either: every failure of the thread resolves the ready future, and
the wait for it is bounded.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import math
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import llama_cpp
import llama_cpp.llama_cpp as C
import psutil

from edgellm.config import EngineConfig
from edgellm.engine.errors import (
    EngineError,
    ModelLoadError,
    QueueFull,
    RunnerFailed,
    ShuttingDown,
    StartTimeout,
)
from edgellm.engine.llama_log import llama_errors, reason
from edgellm.engine.model import Model
from edgellm.engine.prompt_cache import CacheView, Layout, PromptCache
from edgellm.engine.scheduler import Job, Prepared, Scheduler, put
from edgellm.engine.stream import Outbox, Stream
from edgellm.errors import EdgeError
from edgellm.metrics import Metrics

log = logging.getLogger("edgellm.engine")

_FLASH_ATTN = {
    "auto": C.LLAMA_FLASH_ATTN_TYPE_AUTO,
    "on": C.LLAMA_FLASH_ATTN_TYPE_ENABLED,
    "off": C.LLAMA_FLASH_ATTN_TYPE_DISABLED,
}
CACHE_TYPES = {"f16": C.GGML_TYPE_F16, "q8_0": C.GGML_TYPE_Q8_0, "q4_0": C.GGML_TYPE_Q4_0}
# Context creation and the warm-up decode, which pages in every weight: minutes for a big model
# on an SD card, never forever; well inside the appliance unit's 15 minutes to start, which
# also cover reading the weights before this wait begins.
START_TIMEOUT = 300.0


@dataclass(eq=False)
class _EmbedJob:
    inputs: list[list[int]]
    future: concurrent.futures.Future[list[list[float]]]
    cancelled: bool = False


def physical_cores() -> int:
    return psutil.cpu_count(logical=False) or psutil.cpu_count() or 1


class Runner:
    """Owns one llama context on its own thread."""

    def __init__(self, model: Model, settings: EngineConfig, *, model_id: str = "", metrics: Metrics | None = None,
                 on_exit: Callable[[str], None] | None = None, start_timeout: float | None = None,
                 prompt_cache: PromptCache | None = None, model_key: str = "") -> None:
        """`on_exit(reason)` is called from the thread if it ends for any reason but stop().
        `prompt_cache` keeps this model's prompt snapshots under `model_key` (its SHA-256)."""
        self.model = model
        self.settings = settings
        self.model_id = model_id or model.path.stem
        self.metrics = metrics or Metrics()
        self.n_threads = settings.n_threads or physical_cores()
        self._threads_wanted = self.n_threads  # set_threads() changes it; the thread applies it
        self._n_ctx_wanted = min(settings.n_ctx, model.n_ctx_train or settings.n_ctx)
        if self._n_ctx_wanted < settings.n_ctx:
            log.warning("n_ctx %d is larger than the model was trained for; using %d",
                        settings.n_ctx, self._n_ctx_wanted)
        # Embedding models run one input at a time; generation runs `parallel` sequences, each
        # of which needs a place in every batch (llama.cpp caps the batch at the context).
        self.parallel = 1 if model.is_embedding else min(settings.parallel, settings.n_batch, self._n_ctx_wanted)
        self.failure: str | None = None  # why the thread ended, when it ended by itself
        self._on_exit = on_exit
        self._jobs: queue.SimpleQueue[Job | _EmbedJob | None] = queue.SimpleQueue()
        self._stopping = False
        self._accepted: set[Job | _EmbedJob] = set()  # queued or running: what a dying thread must still end
        self._lock = threading.Lock()  # guards both; nothing is queued after the stop sentinel
        self._outbox = Outbox()
        self._scheduler: Scheduler | None = None
        self._embed_seconds = 1.0  # an embeddings request's duration, smoothed (for Retry-After)
        self._prompt_cache = prompt_cache if prompt_cache is not None and prompt_cache.enabled \
            and model_key and not model.is_embedding else None
        self._model_key = model_key
        self.prompt_cache: CacheView | None = None  # this model's snapshots, once the context exists
        ready: concurrent.futures.Future[tuple[int, int]] = concurrent.futures.Future()
        self._thread = threading.Thread(target=self._run, args=(ready,), name="edgellm-runner", daemon=True)
        self._thread.start()
        start_timeout = START_TIMEOUT if start_timeout is None else start_timeout
        try:
            # llama.cpp adjusts both (n_ctx is padded to 256, n_batch capped at n_ctx for causal
            # models): use what it chose.
            self.n_ctx, self.n_batch = ready.result(timeout=start_timeout)
        except TimeoutError:
            self.stop()  # should it get there after all, the thread frees the context and ends
            raise StartTimeout(f"llama.cpp did not set up a context within {start_timeout:g} s",
                               self._thread) from None

    # --- called from the event loop -------------------------------------------------

    def submit(self, request: Prepared) -> Stream:
        """Queue a generation; iterate the returned Stream for its events.

        Raises QueueFull (with a Retry-After estimate) when all `parallel` places are taken and
        max_queue requests already wait for one.
        """
        job = Job(request, Stream())
        with self._lock:
            self._admit(job)
            self._jobs.put(job)
        return job.stream

    async def embed(self, inputs: list[list[int]]) -> list[list[float]]:
        """L2-normalised embeddings, one per tokenized input; cancelling stops between inputs."""
        job = _EmbedJob(inputs, concurrent.futures.Future())
        with self._lock:
            self._admit(job)
            self._jobs.put(job)
        try:
            return await asyncio.wrap_future(job.future)
        except asyncio.CancelledError:
            job.cancelled = True
            raise

    def _admit(self, job: Job | _EmbedJob) -> None:
        """Accept a job, or refuse it: stopped, or `parallel` running and max_queue waiting (hold the lock)."""
        if self._stopping:
            raise ShuttingDown() if self.failure is None else self._failed()
        if len(self._accepted) >= self.parallel + self.settings.max_queue:
            waiting = len(self._accepted) - self.parallel
            retry = math.ceil(self._mean_duration() * (waiting + 1) / self.parallel)
            raise QueueFull(f"the server is busy: {waiting} requests are already waiting; retry in {retry} s",
                            retry_after=max(1, retry))
        self._accepted.add(job)

    def _released(self, job: Job | _EmbedJob) -> None:
        with self._lock:
            self._accepted.discard(job)

    def _mean_duration(self) -> float:
        if self.model.is_embedding:
            return self._embed_seconds
        return self._scheduler.mean_duration if self._scheduler else 2.0

    def estimated_wait(self) -> float:
        """Seconds a new request would wait for a place: 0 while one is free."""
        waiting = len(self._accepted) - self.parallel + 1
        return self._mean_duration() * waiting / self.parallel if waiting > 0 else 0.0

    def set_threads(self, n: int) -> None:
        """Use n threads from the next decode step on (thermal throttling)."""
        self._threads_wanted = max(1, n)

    def stop(self) -> None:
        """Take no more work; running and queued requests end with ShuttingDown. Does not wait."""
        with self._lock:
            if not self._stopping:
                self._stopping = True
                self._jobs.put(None)

    def close(self) -> None:
        """stop(), then wait for the thread to free the context."""
        self.stop()
        self._thread.join()

    def _failed(self) -> RunnerFailed:
        return RunnerFailed(f"model '{self.model_id}' stopped working ({self.failure}); "
                            "it is loaded afresh on the next request", retry_after=1)

    # --- the thread -------------------------------------------------------------------

    def _context_params(self) -> C.llama_context_params:
        s = self.settings
        params = C.llama_context_default_params()
        n_ctx = params.n_ctx = self._n_ctx_wanted
        if self.model.is_embedding:
            # Non-causal models see a whole input in one micro-batch, and llama.cpp does not
            # cap their batch at the context as it does for causal ones.
            params.n_batch = params.n_ubatch = min(s.n_batch, n_ctx)
        else:
            params.n_batch = s.n_batch
            params.n_ubatch = min(s.n_ubatch, s.n_batch)
        params.n_seq_max = self.parallel
        params.kv_unified = True  # all sequences share the cells: one long request may use them all
        params.swa_full = True  # sliding-window layers keep every cell, so that a cached prefix can be reused
        params.n_threads = self.n_threads
        params.n_threads_batch = self.n_threads
        params.flash_attn_type = _FLASH_ATTN[s.flash_attn]
        params.type_k = CACHE_TYPES[s.cache_type_k]
        params.type_v = CACHE_TYPES[s.cache_type_v]
        params.embeddings = self.model.is_embedding
        params.no_perf = True
        return params

    def _run(self, ready: concurrent.futures.Future[tuple[int, int]]) -> None:
        try:
            self._main(ready)
        except BaseException as e:
            reason = f"{type(e).__name__}: {e}" if str(e) else type(e).__name__
            if not ready.done():  # it never started: the load fails with the reason
                ready.set_exception(e if isinstance(e, EdgeError) else ModelLoadError(
                    f"the runner failed while starting ({reason})"))
                return
            log.exception("the runner thread of model %s failed; its requests end, and the model is loaded "
                          "afresh on the next one", self.model_id)
            self.failure = reason
            self._end_accepted(self._failed())
            if self._on_exit is not None:
                self._on_exit(reason)
            return
        self._end_accepted(ShuttingDown())

    def _main(self, ready: concurrent.futures.Future[tuple[int, int]]) -> None:
        with llama_errors() as errors:
            ctx = C.llama_init_from_model(self.model.ptr, self._context_params())
        if not ctx:
            raise ModelLoadError("llama.cpp could not create a context: "
                                 f"{reason(errors, 'not enough memory for n_ctx?')}")
        try:
            n_ctx = C.llama_n_ctx(ctx)
            n_batch = min(C.llama_n_batch(ctx), n_ctx)
            batch = C.llama_batch_init(n_batch, 0, 1)
            try:
                self._warm_up(ctx, batch)
                if self._prompt_cache is not None:
                    self.prompt_cache = self._prompt_cache.view(self._layout())
                scheduler = self._scheduler = Scheduler(
                    ctx, batch, self.model, model_id=self.model_id, n_ctx=n_ctx, n_batch=n_batch,
                    parallel=self.parallel, outbox=self._outbox, metrics=self.metrics, on_release=self._released,
                    cache=self.prompt_cache)
                ready.set_result((n_ctx, n_batch))
                try:
                    self._serve(scheduler, ctx, batch)
                finally:
                    scheduler.abandon()
            finally:
                C.llama_batch_free(batch)
        finally:
            C.llama_free(ctx)

    def _layout(self) -> Layout:
        """What this context's KV state fits: the model, the element types and their arrangement
        (flash attention stores V untransposed), and the llama.cpp that wrote it."""
        s = self.settings
        return Layout(self._model_key, f"type_k={s.cache_type_k} type_v={s.cache_type_v} flash_attn={s.flash_attn} "
                                       f"swa_full=1 llama_cpp={llama_cpp.__version__} "
                                       f"state={C.LLAMA_STATE_SEQ_VERSION}")

    def _serve(self, scheduler: Scheduler, ctx: C.llama_context_p, batch: C.llama_batch) -> None:
        """Step until stopped; an exception here ends the thread (and the model is loaded afresh)."""
        threads = self.n_threads
        while self._take_jobs(scheduler, ctx, batch):
            if self._threads_wanted != threads:
                threads = self._threads_wanted
                C.llama_set_n_threads(ctx, threads, threads)
            scheduler.step()
            self._outbox.flush()

    def _end_accepted(self, error: EngineError) -> None:
        """End every request accepted and not yet ended with `error` (the thread is done with them)."""
        with self._lock:
            self._stopping = True
            jobs, self._accepted = self._accepted, set()
        for job in jobs:
            if isinstance(job, _EmbedJob):
                if not job.future.done():
                    job.future.set_exception(error)
            else:
                self._outbox.put(job.stream, error)
                self._outbox.end(job.stream)
        self._outbox.flush()

    def _warm_up(self, ctx: C.llama_context_p, batch: C.llama_batch) -> None:
        """One tiny decode before the first request: it reads every weight into memory (so the
        first request is not slow and the measured RSS is honest) and proves that the backend
        can run this model, while a failure can still be reported as a failed load."""
        tokens = [t if t >= 0 else 0 for t in (self.model.bos, self.model.eos)]
        for i, token in enumerate(tokens):
            put(batch, i, token, i, 0, i == len(tokens) - 1)
        batch.n_tokens = len(tokens)
        status = C.llama_decode(ctx, batch)
        C.llama_memory_clear(C.llama_get_memory(ctx), True)
        if status != 0:
            raise ModelLoadError(f"a first test decode failed (llama_decode status {status})")

    def _take_jobs(self, scheduler: Scheduler, ctx: C.llama_context_p, batch: C.llama_batch) -> bool:
        """Move what has arrived into the scheduler (waiting when idle); False once stopping."""
        block = not scheduler.busy
        while True:
            try:
                job = self._jobs.get(block=block)
            except queue.Empty:
                return True
            block = False
            if job is None:
                return False
            if isinstance(job, _EmbedJob):
                self._embed(ctx, batch, job)
            else:
                scheduler.add(job)

    def _embed(self, ctx: C.llama_context_p, batch: C.llama_batch, job: _EmbedJob) -> None:
        started = time.perf_counter()
        try:
            if not job.future.set_running_or_notify_cancel():
                return  # the client went away while this waited
            vectors: list[list[float]] = []
            for tokens in job.inputs:
                if job.cancelled or self._stopping:
                    log.info("embedding cancelled after %d of %d inputs", len(vectors), len(job.inputs))
                    self.metrics.requests.labels("cancelled").inc()
                    job.future.set_exception(ShuttingDown() if self._stopping else EngineError("cancelled"))
                    return
                vectors.append(self._embedding(ctx, batch, tokens))
            job.future.set_result(vectors)
            self.metrics.requests.labels("completed").inc()
        except EngineError as e:
            log.error("embedding failed: %s", e)
            self.metrics.requests.labels("failed").inc()
            job.future.set_exception(e)
        finally:
            if job.future.done():  # else the thread is failing, and ends the job as it goes
                self._released(job)
            self._embed_seconds += 0.2 * (time.perf_counter() - started - self._embed_seconds)

    def _embedding(self, ctx: C.llama_context_p, batch: C.llama_batch, tokens: list[int]) -> list[float]:
        n = len(tokens)
        if not 0 < n <= self.n_batch:  # llama.cpp aborts the process on a batch over n_batch
            raise EngineError(f"cannot embed {n} tokens at once (batch size {self.n_batch})")
        C.llama_memory_clear(C.llama_get_memory(ctx), True)
        for i, token in enumerate(tokens):
            put(batch, i, token, i, 0, True)
        batch.n_tokens = n
        status = C.llama_decode(ctx, batch)
        if status != 0:
            raise EngineError(f"llama_decode failed with status {status}")
        ptr = C.llama_get_embeddings_seq(ctx, 0)
        if not ptr:
            raise EngineError("the model produced no pooled embedding")
        vector = ptr[:C.llama_model_n_embd_out(self.model.ptr)]
        C.llama_memory_clear(C.llama_get_memory(ctx), True)  # no cells outlive the request (none is reused)
        norm = math.sqrt(sum(v * v for v in vector)) or 1.0
        return [v / norm for v in vector]
