"""The generation service: the one entry point every front end uses (OpenAI's /v1 today,
Ollama's /api and the console next), so a feature is built once and shows up in all.

generate() takes a request in the engine's own terms (messages or a prompt, options, the
model's name) and does everything between the protocol and the runner: it leases the model
(loading it if need be), applies the chat template, tokenizes, checks the context and the
token ids, merges the model's sampling defaults under the request's, builds the sampler
and owns it until the runner has let go of it, and submits. What comes back is a
Generation: an async iterator of Text and Finish events, raising an EdgeError on failure.
embed() does the same for embeddings. Front ends never see a model, a runner or a sampler.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeVar, cast

from edgellm.engine.calls import CallArguments, CallEvent, CallReader, CallStart
from edgellm.engine.deadline import Deadline
from edgellm.engine.errors import NotGenerative
from edgellm.engine.pool import Lease, Pool
from edgellm.engine.stream import Finish, Stream, Text, Usage
from edgellm.engine.tools import Tool, ToolUse, call_grammar, rendering, with_tools
from edgellm.errors import InvalidRequest

if TYPE_CHECKING:
    from pathlib import Path

    from edgellm.engine.catalog import Known
    from edgellm.engine.loader import Loaded
    from edgellm.engine.scheduler import Prepared

log = logging.getLogger("edgellm.engine")
T = TypeVar("T")

__all__ = ["CallArguments", "CallEvent", "CallStart", "Embeddings", "EmbedRequest", "Finish", "GenerateRequest",
           "Generation", "GenerationService", "ModelInfo", "Running", "Text", "Tool", "ToolUse", "Usage"]


@dataclass(frozen=True)
class GenerateRequest:
    """What to generate. Exactly one of `messages` (chat, through the model's chat template) and
    `prompt` (text, or token ids) is set. `sampling` holds only the knobs the client set."""

    model: str | None
    messages: list[dict[str, object]] | None = None
    prompt: str | list[int] | None = None
    max_tokens: int | None = None
    stops: tuple[str, ...] = ()
    sampling: dict[str, object] = field(default_factory=dict)
    keep_alive: float | None | bool = False  # seconds, None (until evicted), False (the default)
    chat_template_kwargs: dict[str, object] = field(default_factory=dict)  # more variables for the template
    partition: str = ""  # whose cached prompts it may reuse: the API key's id ("" for a box without keys)
    privileged: bool = False  # an admin key's: keep_alive is not bounded by [models] min/max_keep_alive
    tools: ToolUse | None = None  # tools the reply may call (chat only)
    n_ctx: int | None = None  # the client's context window (Ollama's num_ctx), within the model's
    suffix: str | None = None  # fill in the middle: the text after the gap (with a text prompt)

    @property
    def param(self) -> str:
        """The request field that holds the input, for errors about it."""
        return "messages" if self.messages is not None else "prompt"


@dataclass(frozen=True)
class EmbedRequest:
    model: str | None
    inputs: list[str | list[int]]
    keep_alive: float | None | bool = False
    privileged: bool = False
    truncate: bool = False  # an input longer than the model embeds at once is cut (Ollama's), not refused


@dataclass(frozen=True)
class Embeddings:
    model: str
    vectors: list[list[float]]
    prompt_tokens: int


@dataclass(frozen=True)
class ModelInfo:
    """An installed model, as the APIs' listings describe it."""

    id: str
    created: int  # install time, Unix seconds
    aliases: tuple[str, ...]
    size: int = 0  # bytes of its files
    sha256: str = ""
    architecture: str = ""
    quantization: str = ""
    parameters: int = 0
    embedding: bool = False
    license: str = ""
    defaults: dict[str, int | float] = field(default_factory=dict)  # its recommended sampling settings
    template: str = ""  # its chat template: Jinja, a built-in format's name, or "" (llama.cpp's default)
    tools: bool = False  # the template renders tools itself
    metadata: dict[str, object] = field(default_factory=dict)  # the GGUF header's values (arrays: short ones)


@dataclass(frozen=True)
class Running:
    """A loaded model."""

    model: ModelInfo
    memory: int  # bytes it takes: measured when it loaded, else the estimate
    gpu_memory: int  # the part of that on the GPU
    expires_at: float | None  # when it unloads if still idle (Unix seconds); None: only when evicted
    n_ctx: int


def _info(known: Known) -> ModelInfo:
    entry, head = known.entry, known.headers[0]
    template = entry.chat_template or str(head.get("tokenizer.chat_template") or "")
    metadata = {**{k: None for k in head.array_lengths}, **head.metadata}  # long arrays are not kept: null
    metadata.pop("tokenizer.chat_template", None)
    return ModelInfo(entry.id, entry.created, tuple(entry.aliases), size=entry.size, sha256=entry.sha256,
                     architecture=entry.architecture, quantization=entry.quantization, parameters=entry.parameters,
                     embedding=entry.embedding, license=entry.license, defaults=dict(entry.defaults),
                     template=template, tools=not entry.embedding and rendering(template or None) != "text",
                     metadata=metadata)


class Generation:
    """One generation on its way: iterate it for its events; close() when the response has ended
    (it cancels what is still running and ends the model's lease)."""

    def __init__(self, stream: Stream, lease: Lease, prompt_tokens: int, reader: CallReader | None = None,
                 load_seconds: float = 0.0) -> None:
        self.model = lease.loaded.id
        self.prompt_tokens = prompt_tokens
        self.load_seconds = load_seconds  # from the request to its submission: a load, the template, tokens
        self._stream = stream
        # Without tools the events come straight from the runner's stream: nothing per token here.
        self._events: AsyncIterator[CallEvent] = stream if reader is None else _read(stream, reader)
        self._lease = lease
        self._pending: asyncio.Future[CallEvent] | None = None

    def __aiter__(self) -> AsyncIterator[CallEvent]:
        if self._pending is None:
            return self._events
        return self._after_pending()

    async def _after_pending(self) -> AsyncIterator[CallEvent]:
        """The event first() was still waiting for, then the rest."""
        assert self._pending is not None
        pending, self._pending = self._pending, None
        yield await pending
        async for event in self._events:
            yield event

    async def first(self, timeout: float) -> CallEvent | None:
        """The next event, or None when none came within `timeout` seconds (it is not lost: the
        next call or iteration gets it)."""
        if self._pending is None:
            self._pending = asyncio.ensure_future(anext(self._events))
        done, _ = await asyncio.wait({self._pending}, timeout=timeout)
        if not done:
            return None
        pending, self._pending = self._pending, None
        return pending.result()

    def close(self) -> None:
        if self._pending is not None:
            self._pending.cancel()
        self._stream.cancel()  # a no-op once the generation has finished
        self._lease.release()


async def _read(stream: Stream, reader: CallReader) -> AsyncIterator[CallEvent]:
    async for event in stream:
        for out in reader.feed(event):
            yield out


class GenerationService:
    def __init__(self, pool: Pool, *, log_prompts: bool = False, shared_prompt_cache: bool = False) -> None:
        """`shared_prompt_cache`: every API key may reuse every other's cached prompts (one user's
        keys); else each key's are its own, so that no key learns what another's prompts are."""
        self._pool = pool
        self._log_prompts = log_prompts
        self._shared_prompt_cache = shared_prompt_cache

    # --- the models, for listings and for the relay's routing ---------------------------------

    def models(self) -> list[ModelInfo]:
        return [_info(s.known) for s in self._pool.states()]

    def model(self, name: str) -> ModelInfo:
        return _info(self._pool.find(name).known)

    def running(self) -> list[Running]:
        """The loaded models (Ollama's /api/ps)."""
        out = []
        for state in self._pool.states():
            loaded = state.loaded
            if loaded is None:
                continue
            memory = state.rss_delta or state.known.estimate.total
            layers = state.known.headers[0].arch_int("block_count", 0) + 1  # and the output layer
            on_gpu = 0 if loaded.backend == "cpu" else memory * min(loaded.gpu_layers, layers) // layers
            expires = state.expires_at
            if expires is None and state.keep_alive is not None:  # busy now: idle from its end
                expires = time.time() + state.keep_alive
            out.append(Running(_info(state.known), memory, on_gpu, expires, loaded.runner.n_ctx))
        return out

    def has(self, name: str | None) -> bool:
        return self._pool.has(name)

    def resolve(self, name: str | None) -> str | None:
        """The id of the model a request naming `name` would get here, or None if none would."""
        if name is None:
            states = self._pool.states()
            return states[0].known.id if len(states) == 1 else None
        return self._pool.find(name).known.id if self._pool.has(name) else None

    def estimated_wait(self, name: str) -> float:
        return self._pool.estimated_wait(name)

    # --- generation -----------------------------------------------------------------------------

    async def generate(self, request: GenerateRequest) -> Generation:
        started = time.monotonic()
        lease = await self._pool.acquire(request.model, keep_alive=request.keep_alive,
                                         privileged=request.privileged)
        try:
            loaded = lease.loaded
            if loaded.chat_template is None:
                raise NotGenerative(f"model '{loaded.id}' is an embedding model; use /v1/embeddings")
            if self._log_prompts:
                log.info("prompt for %s: %s", loaded.id, json.dumps(request.messages or request.prompt,
                                                                    ensure_ascii=False))
            deadline = Deadline()
            partition = "" if self._shared_prompt_cache else request.partition
            prepared, reader = await _in_thread(lambda: self._prepare(loaded, request, partition, deadline),
                                                abandon=lambda p: p[0].sampler.close(), cancel=deadline.cancel)
            try:
                stream = loaded.runner.submit(prepared)
            except BaseException:
                prepared.sampler.close()
                raise
            stream.when_finished(prepared.sampler.close)  # the runner is done with it
            return Generation(stream, lease, len(prepared.prompt), reader, time.monotonic() - started)
        except BaseException:
            lease.release()
            raise

    @staticmethod
    def _prepare(loaded: Loaded, request: GenerateRequest, partition: str,
                 deadline: Deadline) -> tuple[Prepared, CallReader | None]:
        """Tokens and a sampler (and what reads the tool calls back), in a worker thread (templates
        and long prompts take milliseconds; a hostile template or schema is stopped by the deadline)."""
        # Here, with a model loaded: they import llama.cpp, which an idle server does without (pool.py).
        from edgellm.engine.sampling import Sampler, SamplingParams
        from edgellm.engine.scheduler import Prepared

        with loaded.held():
            model, param, n_ctx, template = loaded.model, request.param, loaded.runner.n_ctx, loaded.chat_template
            use = request.tools
            calls, reader, visible = None, None, frozenset[int]()  # (with tools the reply may call)
            if request.messages is not None:
                assert template is not None
                messages, tools = request.messages, None
                if use is not None:
                    messages, tools = with_tools(template.tool_syntax, template.tool_rendering, use, messages)
                if use is not None and use.callable:
                    calls = call_grammar(template.tool_syntax, use, check=deadline.check)
                    reader, visible = CallReader(template.tool_syntax, calls), template.tool_markers
                prompt = template.tokens(model, messages, tools=tools, kwargs=request.chat_template_kwargs,
                                         deadline=deadline, n_ctx=n_ctx)
            elif isinstance(request.prompt, str) and request.suffix is not None:
                prompt = _infill(loaded, request.prompt, request.suffix)
            elif isinstance(request.prompt, str):
                prompt = model.tokenize(request.prompt)  # a raw prompt is the client's whole prompt, markers too
            else:
                prompt = _checked_tokens(loaded, request.prompt or [], param)
            deadline.check()
            if not prompt:
                raise InvalidRequest("the prompt is empty", param=param)
            window = min(n_ctx, request.n_ctx or n_ctx)
            if len(prompt) >= window:
                raise InvalidRequest(f"the prompt is {len(prompt)} tokens but the context holds {window} tokens "
                                     "(and needs room for at least one generated token)", param=param,
                                     code="context_length_exceeded")
            max_tokens = request.max_tokens
            if window < n_ctx:  # the client's window ends the reply where the model's would not
                max_tokens = min(max_tokens or window, window - len(prompt))
            sampling = SamplingParams(**cast(dict[str, Any], {**loaded.defaults, **request.sampling}))
            _checked_tokens(loaded, list(sampling.logit_bias), "logit_bias")
            cache = loaded.runner.prompt_cache
            # find() may read the snapshot from disk: here, in a worker thread, not in the runner.
            snapshot = cache.partition(partition).find(prompt) if cache is not None else None
            sampler = Sampler(model, sampling, check=deadline.check, calls=calls, visible=visible)
            # A forced call ends where its grammar says: a stop string ("\n", say) would cut it short.
            stops = () if calls is not None and calls.forced else request.stops
            prepared = Prepared(prompt, sampler, max_tokens, stops, snapshot=snapshot,
                                partition=partition, visible=visible)
            return prepared, reader

    # --- embeddings -----------------------------------------------------------------------------

    async def embed(self, request: EmbedRequest) -> Embeddings:
        lease = await self._pool.acquire(request.model, keep_alive=request.keep_alive,
                                         privileged=request.privileged)
        try:
            loaded = lease.loaded
            if not loaded.model.is_embedding:
                raise NotGenerative(f"model '{loaded.id}' does not support embeddings (it declares no pooling "
                                    "type)")
            inputs = await _in_thread(lambda: self._tokenize_inputs(loaded, request.inputs, request.truncate))
            vectors = await loaded.runner.embed(inputs)
            return Embeddings(loaded.id, vectors, sum(map(len, inputs)))
        finally:
            lease.release()

    @staticmethod
    def _tokenize_inputs(loaded: Loaded, raw: list[str | list[int]], truncate: bool) -> list[list[int]]:
        # One input is decoded in one batch, and never past the positions the model was trained for.
        limit = min(loaded.runner.n_batch, loaded.model.n_ctx_train or loaded.runner.n_batch)
        with loaded.held():
            inputs = [loaded.model.tokenize(x) if isinstance(x, str) else _checked_tokens(loaded, x, "input")
                      for x in raw]
        if truncate:
            inputs = [tokens[:limit] for tokens in inputs]
        for i, tokens in enumerate(inputs):
            if not tokens:
                raise InvalidRequest(f"input {i} is empty once tokenized", param="input")
            if len(tokens) > limit:
                raise InvalidRequest(f"input {i} is {len(tokens)} tokens but this model embeds at most {limit} "
                                     "at once", param="input", code="context_length_exceeded")
        return inputs

    # --- the operator's view: the admin API, /health, systemd's STATUS and watchdog ---------------

    def status(self) -> list[dict[str, object]]:
        """Every model with its state; those whose files cannot be served are "failed", with why."""
        return [*(self._pool.describe(s) for s in self._pool.states()), *self._pool.unservable()]

    async def load(self, name: str) -> dict[str, object]:
        return self._pool.describe(await self._pool.load(name))

    async def unload(self, name: str) -> tuple[bool, dict[str, object]]:
        """Unload now if idle (True), else once the requests in flight end (False); and its status."""
        now = await self._pool.unload(name)
        return now, self._pool.describe(self._pool.find(name))

    async def remove(self, name: str) -> str:
        """Uninstall a model; the id it had."""
        return (await self._pool.remove(name)).id

    async def touch(self, name: str, *, keep_alive: float | None | bool, privileged: bool) -> float:
        """Load a model (if it is not) and keep it for `keep_alive`, generating nothing; the seconds
        it took (Ollama's request with an empty prompt)."""
        started = time.monotonic()
        (await self._pool.acquire(name, keep_alive=keep_alive, privileged=privileged)).release()
        return time.monotonic() - started

    def expire(self, name: str, *, privileged: bool) -> float | None:
        """Unload a model soon: see Pool.expire."""
        return self._pool.expire(name, privileged=privileged)

    async def forget(self, name: str) -> None:
        """Take one name from a model; the model goes with its last name."""
        await self._pool.forget(name)

    async def alias(self, name: str, alias: str) -> str:
        """Give an installed model another name; its id."""
        return (await self._pool.alias(name, alias)).id

    async def install(self, path: Path, model_id: str) -> str:
        """Install a GGUF file under this name; the model's id (an installed model with the same
        file keeps its id and gets the name as an alias)."""
        return (await self._pool.install(path, model_id)).id

    async def refresh(self) -> None:
        """Take in the store's changes now (an import just finished) rather than within a second."""
        await self._pool.refresh()

    async def started(self) -> None:
        await self._pool.started()

    def health(self) -> None:
        """Raises NotReady (503) with the reason while the service is not fully able to serve."""
        self._pool.health()

    def summary(self) -> str:
        return self._pool.summary()

    def broken(self) -> list[str]:
        """Models that stopped working and cannot be brought back without a restart."""
        return self._pool.broken()


def _infill(loaded: Loaded, prefix: str, suffix: str) -> list[int]:
    """A fill-in-the-middle prompt: the model's markers around the text before and after the gap."""
    model = loaded.model
    if model.fim is None:
        raise InvalidRequest(f"model '{loaded.id}' has no fill-in-the-middle tokens: 'suffix' needs a model made "
                             "for filling in code", param="suffix")
    pre, suf, mid = model.fim
    def text(s: str) -> list[int]:
        return model.tokenize(s, add_special=False, parse_special=False)
    return [*model.tokenize("", add_special=True), pre, *text(prefix), suf, *text(suffix), mid]


def _checked_tokens(loaded: Loaded, tokens: list[int], param: str) -> list[int]:
    bad = next((t for t in tokens if not 0 <= t < loaded.model.n_vocab), None)
    if bad is not None:
        raise InvalidRequest(f"token id {bad} is outside the vocabulary (0..{loaded.model.n_vocab - 1})",
                             param=param)
    return tokens


async def _in_thread(work: Callable[[], T], abandon: Callable[[T], None] | None = None,
                     cancel: Callable[[], None] | None = None) -> T:
    """Run `work` in a worker thread. If the caller is cancelled meanwhile (the client left),
    `cancel` tells the work to stop, and whatever it built is still cleaned up: `abandon` gets it
    once it is done (to close a sampler)."""
    task = asyncio.ensure_future(asyncio.to_thread(work))
    try:
        return await asyncio.shield(task)
    except asyncio.CancelledError:
        if cancel is not None:
            cancel()
        def clean_up(done: asyncio.Future[T]) -> None:
            if done.cancelled() or done.exception() is not None:
                return  # (Abandoned, most likely: nobody is left to tell)
            if abandon is not None:
                abandon(done.result())
        task.add_done_callback(clean_up)
        raise
