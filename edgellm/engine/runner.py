"""The runner: one thread that owns a llama context, fed through a queue.

The event loop calls submit() (generation) or embed(); they only queue work.
The thread creates the context, takes whatever has arrived before each
scheduler step, runs the step (scheduler.py: continuous batching), and hands
the results back through an Outbox in one event-loop wake-up per step.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import math
import queue
import threading
from dataclasses import dataclass

import llama_cpp.llama_cpp as C
import psutil

from edgellm.config import EngineConfig
from edgellm.engine.model import Model
from edgellm.engine.scheduler import GenerationRequest, Job, Scheduler
from edgellm.engine.stream import EngineError, Outbox, QueueFull, ShuttingDown, Stream
from edgellm.metrics import Metrics

log = logging.getLogger("edgellm.engine")

_FLASH_ATTN = {
    "auto": C.LLAMA_FLASH_ATTN_TYPE_AUTO,
    "on": C.LLAMA_FLASH_ATTN_TYPE_ENABLED,
    "off": C.LLAMA_FLASH_ATTN_TYPE_DISABLED,
}


@dataclass
class _EmbedJob:
    inputs: list[list[int]]
    future: concurrent.futures.Future
    cancelled: bool = False


def physical_cores() -> int:
    return psutil.cpu_count(logical=False) or psutil.cpu_count() or 1


class Runner:
    """Owns one llama context on its own thread."""

    def __init__(self, model: Model, settings: EngineConfig, *, model_id: str = "", metrics: Metrics | None = None
                 ) -> None:
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
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        self._closing = False
        self._in_flight = 0  # accepted generations not yet ended: running, queued, or on their way
        self._lock = threading.Lock()  # guards both; nothing is queued after the stop sentinel
        self._outbox = Outbox()
        self._scheduler: Scheduler | None = None
        ready: concurrent.futures.Future[tuple[int, int]] = concurrent.futures.Future()
        self._thread = threading.Thread(target=self._main, args=(ready,), name="edgellm-runner", daemon=True)
        self._thread.start()
        # llama.cpp adjusts both (n_ctx is padded to 256, n_batch capped at n_ctx for causal
        # models): use what it chose.
        self.n_ctx, self.n_batch = ready.result()

    # --- called from the event loop -------------------------------------------------

    def submit(self, request: GenerationRequest) -> Stream:
        """Queue a generation; iterate the returned Stream for its pieces. Takes over the sampler.

        Raises QueueFull (with a Retry-After estimate) when all `parallel` places are taken and
        max_queue requests already wait for one.
        """
        stream = Stream()
        with self._lock:
            if self._closing:
                request.sampler.close()
                raise ShuttingDown("the server is shutting down")
            if self._in_flight >= self.parallel + self.settings.max_queue:
                request.sampler.close()
                waiting = self._in_flight - self.parallel
                retry = math.ceil(self._scheduler.mean_duration * (waiting + 1) / self.parallel)
                raise QueueFull(waiting, max(1, retry))
            self._in_flight += 1
            self._jobs.put(Job(request, stream))
        return stream

    def _released(self) -> None:
        with self._lock:
            self._in_flight -= 1

    async def embed(self, inputs: list[list[int]]) -> list[list[float]]:
        """L2-normalised embeddings, one per tokenized input; cancelling stops between inputs."""
        job = _EmbedJob(inputs, concurrent.futures.Future())
        with self._lock:
            if self._closing:
                raise ShuttingDown("the server is shutting down")
            self._jobs.put(job)
        try:
            return await asyncio.wrap_future(job.future)
        except asyncio.CancelledError:
            job.cancelled = True
            raise

    def estimated_wait(self) -> float:
        """Seconds a new request would wait for a place: 0 while one is free."""
        waiting = self._in_flight - self.parallel + 1
        if waiting <= 0:
            return 0.0
        mean = self._scheduler.mean_duration if self._scheduler else 2.0
        return mean * waiting / self.parallel

    @property
    def in_flight(self) -> int:
        return self._in_flight

    @property
    def alive(self) -> bool:
        """False when the thread died with the context still in use: only a restart helps then."""
        return self._closing or self._thread.is_alive()

    def set_threads(self, n: int) -> None:
        """Use n threads from the next decode step on (thermal throttling)."""
        self._threads_wanted = max(1, n)

    def stop(self) -> None:
        """Take no more work; running and queued requests end with ShuttingDown. Does not wait."""
        with self._lock:
            if not self._closing:
                self._closing = True
                self._jobs.put(None)

    def close(self) -> None:
        """stop(), then wait for the thread to free the context."""
        self.stop()
        self._thread.join()

    # --- the thread -------------------------------------------------------------------

    def _context_params(self):
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
        params.n_threads = self.n_threads
        params.n_threads_batch = self.n_threads
        params.flash_attn_type = _FLASH_ATTN[s.flash_attn]
        params.embeddings = self.model.is_embedding
        params.no_perf = True
        return params

    def _main(self, ready: concurrent.futures.Future) -> None:
        ctx = C.llama_init_from_model(self.model.ptr, self._context_params())
        if not ctx:
            ready.set_exception(EngineError("llama.cpp could not create a context (not enough memory for n_ctx?)"))
            return
        n_ctx = C.llama_n_ctx(ctx)
        n_batch = min(C.llama_n_batch(ctx), n_ctx)
        batch = C.llama_batch_init(n_batch, 0, 1)
        try:
            self._warm_up(ctx, batch)
        except EngineError as e:
            C.llama_batch_free(batch)
            C.llama_free(ctx)
            ready.set_exception(e)
            return
        scheduler = self._scheduler = Scheduler(
            ctx, batch, self.model, model_id=self.model_id, n_ctx=n_ctx, n_batch=n_batch, parallel=self.parallel,
            outbox=self._outbox, metrics=self.metrics, on_release=self._released)
        ready.set_result((n_ctx, n_batch))
        try:
            threads = self.n_threads
            while self._take_jobs(scheduler, ctx, batch):
                if self._threads_wanted != threads:
                    threads = self._threads_wanted
                    C.llama_set_n_threads(ctx, threads, threads)
                try:
                    scheduler.step()
                except Exception as e:  # a bug must end the requests in hand, not the service
                    log.exception("scheduler step failed")
                    scheduler.stop_all(EngineError(str(e)))
                self._outbox.flush()
        except BaseException:
            log.exception("the engine thread failed; this model takes no more requests")
            raise
        finally:
            with self._lock:  # whatever ended the loop, later submits are refused, not left hanging
                self._closing = True
            scheduler.stop_all(ShuttingDown("the server is shutting down"))
            self._drain()
            self._outbox.flush()
            C.llama_batch_free(batch)
            C.llama_free(ctx)

    def _warm_up(self, ctx, batch) -> None:
        """One tiny decode before the first request: it reads every weight into memory (so the
        first request is not slow and the measured RSS is honest) and proves that the backend
        can run this model, while a failure can still be reported as a failed load."""
        tokens = [t if t >= 0 else 0 for t in (self.model.bos, self.model.eos)]
        for i, token in enumerate(tokens):
            batch.token[i] = token
            batch.pos[i] = i
            batch.n_seq_id[i] = 1
            batch.seq_id[i][0] = 0
            batch.logits[i] = i == len(tokens) - 1
        batch.n_tokens = len(tokens)
        status = C.llama_decode(ctx, batch)
        C.llama_memory_clear(C.llama_get_memory(ctx), True)
        if status != 0:
            raise EngineError(f"a first test decode failed (llama_decode status {status})")

    def _take_jobs(self, scheduler: Scheduler, ctx, batch) -> bool:
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

    def _drain(self) -> None:
        """End whatever is still queued at shutdown, so no client waits forever."""
        while True:
            try:
                job = self._jobs.get_nowait()
            except queue.Empty:
                return
            if isinstance(job, _EmbedJob):
                job.future.cancel()
            elif job is not None:
                job.request.sampler.close()
                self._outbox.put(job.stream, ShuttingDown("the server is shutting down"))
                self._outbox.end(job.stream)
                self._released()

    def _embed(self, ctx, batch, job: _EmbedJob) -> None:
        if not job.future.set_running_or_notify_cancel():
            return  # the client went away while this waited
        try:
            vectors = []
            for tokens in job.inputs:
                if job.cancelled or self._closing:
                    log.info("embedding cancelled after %d of %d inputs", len(vectors), len(job.inputs))
                    job.future.set_exception(ShuttingDown("the server is shutting down") if self._closing
                                             else EngineError("cancelled"))
                    return
                vectors.append(self._embedding(ctx, batch, tokens))
            job.future.set_result(vectors)
        except Exception as e:
            log.exception("embedding failed")
            job.future.set_exception(e if isinstance(e, EngineError) else EngineError(str(e)))

    def _embedding(self, ctx, batch, tokens: list[int]) -> list[float]:
        n = len(tokens)
        if not 0 < n <= self.n_batch:  # llama.cpp aborts the process on a batch over n_batch
            raise EngineError(f"cannot embed {n} tokens at once (batch size {self.n_batch})")
        C.llama_memory_clear(C.llama_get_memory(ctx), True)
        for i, token in enumerate(tokens):
            batch.token[i] = token
            batch.pos[i] = i
            batch.n_seq_id[i] = 1
            batch.seq_id[i][0] = 0
            batch.logits[i] = True
        batch.n_tokens = n
        status = C.llama_decode(ctx, batch)
        if status != 0:
            raise EngineError(f"llama_decode failed with status {status}")
        ptr = C.llama_get_embeddings_seq(ctx, 0)
        if not ptr:
            raise EngineError("the model produced no pooled embedding")
        vector = ptr[:C.llama_model_n_embd_out(self.model.ptr)]
        norm = math.sqrt(sum(v * v for v in vector)) or 1.0
        return [v / norm for v in vector]
