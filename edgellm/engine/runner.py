"""The scheduler thread: the only code that touches a llama context.

Requests arrive on a thread-safe queue; the thread creates the context, runs
each request's prefill and decode steps, and hands text back through the
request's Stream. One sequence runs at a time for now; callers only see
submit() -> Stream and Stream.cancel(), so batching can replace the loop
without changing them.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import math
import queue
import threading
import time
from dataclasses import dataclass

import llama_cpp.llama_cpp as C
import psutil

from edgellm.config import EngineConfig
from edgellm.engine.model import Model
from edgellm.engine.sampling import Sampler
from edgellm.engine.stream import EngineError, Piece, ShuttingDown, Stream, Usage
from edgellm.engine.text import TextAssembler

log = logging.getLogger("edgellm.engine")

_FLASH_ATTN = {
    "auto": C.LLAMA_FLASH_ATTN_TYPE_AUTO,
    "on": C.LLAMA_FLASH_ATTN_TYPE_ENABLED,
    "off": C.LLAMA_FLASH_ATTN_TYPE_DISABLED,
}


@dataclass
class GenerationRequest:
    """A tokenized prompt ready to run; the runner takes ownership of `sampler`."""

    prompt: list[int]
    sampler: Sampler
    max_tokens: int | None = None
    stops: tuple[str, ...] = ()


@dataclass
class _Job:
    request: GenerationRequest
    stream: Stream


@dataclass
class _EmbedJob:
    inputs: list[list[int]]
    future: concurrent.futures.Future
    cancelled: bool = False


def physical_cores() -> int:
    return psutil.cpu_count(logical=False) or psutil.cpu_count() or 1


class Runner:
    """Owns one llama context on its own thread."""

    def __init__(self, model: Model, settings: EngineConfig) -> None:
        self.model = model
        self.settings = settings
        self.n_threads = settings.n_threads or physical_cores()
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        self._closing = False
        self._closing_lock = threading.Lock()  # nothing is queued after the stop sentinel
        ready: concurrent.futures.Future[tuple[int, int]] = concurrent.futures.Future()
        self._thread = threading.Thread(target=self._main, args=(ready,), name="edgellm-runner", daemon=True)
        self._thread.start()
        # llama.cpp adjusts both (n_ctx is padded to 256, n_batch capped at n_ctx for causal
        # models): use what it chose.
        self.n_ctx, self.n_batch = ready.result()

    # --- called from the event loop -------------------------------------------------

    def submit(self, request: GenerationRequest) -> Stream:
        """Queue a generation; iterate the returned Stream for its pieces. Takes over the sampler."""
        stream = Stream()
        self._enqueue(_Job(request, stream), on_refusal=request.sampler.close)
        return stream

    async def embed(self, inputs: list[list[int]]) -> list[list[float]]:
        """L2-normalised embeddings, one per tokenized input; cancelling stops between inputs."""
        job = _EmbedJob(inputs, concurrent.futures.Future())
        self._enqueue(job)
        try:
            return await asyncio.wrap_future(job.future)
        except asyncio.CancelledError:
            job.cancelled = True
            raise

    def _enqueue(self, job: _Job | _EmbedJob, on_refusal=lambda: None) -> None:
        with self._closing_lock:
            if self._closing:
                on_refusal()
                raise ShuttingDown("the server is shutting down")
            self._jobs.put(job)

    def stop(self) -> None:
        """Take no more work; the job in hand and queued jobs end with ShuttingDown. Does not wait."""
        with self._closing_lock:
            if not self._closing:
                self._closing = True
                self._jobs.put(None)

    def close(self) -> None:
        """stop(), then wait for the thread to free the context."""
        self.stop()
        self._thread.join()

    # --- the scheduler thread ---------------------------------------------------------

    def _context_params(self):
        s = self.settings
        params = C.llama_context_default_params()
        n_ctx = s.n_ctx
        if self.model.n_ctx_train and n_ctx > self.model.n_ctx_train:
            log.warning("n_ctx %d is larger than the model was trained for; using %d", n_ctx, self.model.n_ctx_train)
            n_ctx = self.model.n_ctx_train
        params.n_ctx = n_ctx
        if self.model.is_embedding:
            # Non-causal models see a whole input in one micro-batch, and llama.cpp does not
            # cap their batch at the context as it does for causal ones.
            params.n_batch = params.n_ubatch = min(s.n_batch, n_ctx)
        else:
            params.n_batch = s.n_batch
            params.n_ubatch = min(s.n_ubatch, s.n_batch)
        params.n_seq_max = 1
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
        ready.set_result((n_ctx, n_batch))
        try:
            while (job := self._jobs.get()) is not None:
                if isinstance(job, _EmbedJob):
                    self._embed(ctx, batch, job)
                else:
                    self._generate(ctx, batch, job)
        finally:
            self._drain()
            C.llama_batch_free(batch)
            C.llama_free(ctx)

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
                job.stream.put(ShuttingDown("the server is shutting down"))

    def _decode(self, ctx, batch, tokens: list[int], start: int, outputs: str) -> None:
        """One llama_decode of `tokens` at positions start.. ; outputs: 'last' or 'all'."""
        n = len(tokens)
        if not 0 < n <= self.n_batch:  # llama.cpp aborts the process on a batch over n_batch
            raise EngineError(f"cannot decode {n} tokens at once (batch size {self.n_batch})")
        for i, token in enumerate(tokens):
            batch.token[i] = token
            batch.pos[i] = start + i
            batch.n_seq_id[i] = 1
            batch.seq_id[i][0] = 0
            batch.logits[i] = outputs == "all"
        batch.logits[n - 1] = outputs != "none"
        batch.n_tokens = n
        rc = C.llama_decode(ctx, batch)
        if rc != 0:
            raise EngineError(f"llama_decode failed with status {rc}")

    def _generate(self, ctx, batch, job: _Job) -> None:
        request, stream = job.request, job.stream
        try:
            if self._stopped(stream):
                return
            C.llama_memory_clear(C.llama_get_memory(ctx), True)
            started = time.perf_counter()
            prompt = request.prompt
            # Never more than n_batch tokens per decode: llama.cpp aborts the process otherwise.
            for start in range(0, len(prompt), self.n_batch):
                if self._stopped(stream):
                    return
                chunk = prompt[start:start + self.n_batch]
                last = start + len(chunk) == len(prompt)
                self._decode(ctx, batch, chunk, start, "last" if last else "none")
            prefilled = time.perf_counter()

            n_past = len(prompt)
            limit = self.n_ctx - n_past
            if request.max_tokens is not None:
                limit = min(limit, request.max_tokens)
            text = TextAssembler(request.stops)
            generated = 0
            finish = "length"
            while generated < limit and not self._stopped(stream):
                token = C.llama_sampler_sample(request.sampler.ptr, ctx, -1)
                if self.model.is_eog(token):
                    finish = "stop"
                    break
                generated += 1
                out = text.feed(self.model.piece(token))
                if out:
                    stream.put(Piece(out))
                if text.stopped:
                    finish = "stop"
                    break
                if generated < limit:
                    self._decode(ctx, batch, [token], n_past, "last")
                    n_past += 1
            if self._stopped(stream):
                log.info("generation cancelled after %d tokens", generated)
                return
            stream.put(Piece(text.finish(), finish_reason=finish, usage=Usage(len(prompt), generated)))
            self._log_done(len(prompt), generated, finish, started, prefilled)
        except Exception as e:  # one failed request must not take the thread down
            log.exception("generation failed")
            stream.put(e if isinstance(e, EngineError) else EngineError(str(e)))
        finally:
            request.sampler.close()
            if self._closing and not stream.cancelled:
                stream.put(ShuttingDown("the server is shutting down"))
            stream.end()

    def _stopped(self, stream: Stream) -> bool:
        return stream.cancelled or self._closing

    def _log_done(self, n_prompt: int, n_gen: int, finish: str, started: float, prefilled: float) -> None:
        done = time.perf_counter()
        decode_s = done - prefilled
        rate = n_gen / decode_s if decode_s > 0 else math.inf
        log.info("generated %d tokens at %.1f tok/s after a %d-token prompt in %.0f ms (finish: %s)",
                 n_gen, rate, n_prompt, (prefilled - started) * 1000, finish)

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
        C.llama_memory_clear(C.llama_get_memory(ctx), True)
        self._decode(ctx, batch, tokens, 0, "all")
        ptr = C.llama_get_embeddings_seq(ctx, 0)
        if not ptr:
            raise EngineError("the model produced no pooled embedding")
        vector = ptr[:C.llama_model_n_embd_out(self.model.ptr)]
        norm = math.sqrt(sum(v * v for v in vector)) or 1.0
        return [v / norm for v in vector]
