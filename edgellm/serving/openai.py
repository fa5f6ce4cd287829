"""Routes of the OpenAI-compatible API under /v1.

Each route is: read the body, parse it (protocol), find the model (pool),
prepare tokens and a sampler off the event loop, submit to the runner, and
turn the pieces that come back into one JSON body or server-sent events.
"""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator, Callable

from starlette.concurrency import run_in_threadpool
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from edgellm.engine.pool import Lease, Loaded, Pool
from edgellm.engine.sampling import Sampler, SamplingParams
from edgellm.engine.scheduler import GenerationRequest
from edgellm.engine.stream import EngineError, Piece, Stream
from edgellm.protocol import requests as proto
from edgellm.protocol.errors import APIError, invalid
from edgellm.protocol.responses import SSE_DONE, Reply, embeddings_body, model_object, sse
from edgellm.serving.disconnect import unless_disconnected
from edgellm.serving.errors import ClientGone, to_api_error
from edgellm.serving.relay import route

log = logging.getLogger("edgellm.serving")

# Headers that keep proxies (nginx and friends) from buffering a token stream.
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def _pool(request: Request) -> Pool:
    return request.app.state.pool


def _no_constants(name: str) -> None:
    raise ValueError(f"{name} is not valid JSON")


async def read_json(request: Request) -> dict:
    """The request body as a JSON object, refusing bodies over the configured limit."""
    limit = request.app.state.max_body_bytes
    too_big = APIError(413, f"request body is larger than the {limit}-byte limit", code="body_too_large")
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise too_big
    body = bytearray()
    try:
        async for chunk in request.stream():
            body += chunk
            if len(body) > limit:
                raise too_big
    except ClientDisconnect:
        raise ClientGone from None
    try:
        data = json.loads(body, parse_constant=_no_constants)
        if b"\\u" in body:  # an escaped lone surrogate is valid JSON but not text: it fails here
            json.dumps(data, ensure_ascii=False).encode()
    except RecursionError:
        raise invalid("the request body is nested too deeply", code="invalid_json") from None
    except UnicodeEncodeError:
        raise invalid("the request body contains a lone UTF-16 surrogate escape, which is not text",
                      code="invalid_json") from None
    except (ValueError, UnicodeDecodeError) as e:
        raise invalid(f"the request body is not valid JSON: {e}", code="invalid_json") from None
    if not isinstance(data, dict):
        raise invalid("the request body must be a JSON object", code="invalid_json")
    return data


# --- models ------------------------------------------------------------------------------

async def list_models(request: Request) -> JSONResponse:
    entries = _pool(request).entries()
    data = [model_object(e.id, e.created) for e in entries]
    upstream = request.app.state.upstream
    if upstream is not None and not upstream.config.offline:
        local = {e.id for e in entries}
        data += [{**model_object(m, 0), "owned_by": "upstream"} for m in sorted(upstream.models - local)]
    return JSONResponse({"object": "list", "data": data})


async def get_model(request: Request) -> JSONResponse:
    managed = _pool(request).find(request.path_params["model_id"])
    return JSONResponse(model_object(managed.entry.id, managed.entry.created))


# --- completions -------------------------------------------------------------------------

async def chat_completions(request: Request) -> Response:
    body = await read_json(request)
    return await route(request, body, "/chat/completions", lambda: _chat(request, body))


async def _chat(request: Request, body: dict) -> Response:
    parsed = proto.parse_chat(body)
    lease = await _generative(request, parsed.options)
    _log_prompt(request, parsed.messages)
    model, template = lease.loaded.model, lease.loaded.template
    return await _generate(request, lease, lambda: model.tokenize(template.render(parsed.messages)),
                           parsed.options, chat=True)


async def completions(request: Request) -> Response:
    body = await read_json(request)
    return await route(request, body, "/completions", lambda: _completion(request, body))


async def _completion(request: Request, body: dict) -> Response:
    parsed = proto.parse_completion(body)
    lease = await _generative(request, parsed.options)
    _log_prompt(request, parsed.prompt)
    loaded, prompt = lease.loaded, parsed.prompt
    if isinstance(prompt, str):
        def tokenize() -> list[int]:
            return loaded.model.tokenize(prompt)
    else:
        def tokenize() -> list[int]:
            return _checked_tokens(loaded, prompt, "prompt")
    return await _generate(request, lease, tokenize, parsed.options, chat=False)


def _log_prompt(request: Request, prompt: object) -> None:
    """Prompts are the users' business: logged only when [log] prompts = true."""
    if request.app.state.log_prompts:
        log.info("prompt for %s: %s", request.url.path, json.dumps(prompt, ensure_ascii=False))


async def _generative(request: Request, options: proto.GenerationOptions) -> Lease:
    """A lease on the requested model, loading it if need be, if it can generate text."""
    lease = await _pool(request).acquire(options.model, keep_alive=options.keep_alive)
    if lease.loaded.template is None:
        lease.release()
        raise invalid(f"model '{lease.loaded.id}' is an embedding model; use /v1/embeddings", "model",
                      code="model_not_supported")
    return lease


def _checked_tokens(loaded: Loaded, tokens: list[int], param: str) -> list[int]:
    bad = next((t for t in tokens if not 0 <= t < loaded.model.n_vocab), None)
    if bad is not None:
        raise invalid(f"token id {bad} is outside the vocabulary (0..{loaded.model.n_vocab - 1})", param)
    return tokens


async def _generate(request: Request, lease: Lease, tokenize: Callable[[], list[int]],
                    options: proto.GenerationOptions, *, chat: bool) -> Response:
    """Run a generation on a leased model; the lease ends when the response does."""
    param = "messages" if chat else "prompt"
    loaded = lease.loaded
    sampling = SamplingParams(**{**loaded.defaults, **options.sampling})

    def prepare() -> GenerationRequest:
        """Tokens and a sampler, built in a worker thread (it may take milliseconds)."""
        with loaded.held():
            prompt = tokenize()
            n_ctx = loaded.runner.n_ctx
            if not prompt:
                raise invalid("the prompt is empty", param)
            if len(prompt) >= n_ctx:
                raise invalid(f"the prompt is {len(prompt)} tokens but the context holds {n_ctx} tokens "
                              "(and needs room for at least one generated token)", param,
                              code="context_length_exceeded")
            _checked_tokens(loaded, list(sampling.logit_bias), "logit_bias")
            sampler = Sampler(loaded.model, sampling)
            return GenerationRequest(prompt, sampler, options.max_tokens, options.stops)

    reply = Reply(model=loaded.id, chat=chat)
    stream: Stream | None = None
    handed_over = False
    try:
        stream = loaded.runner.submit(await run_in_threadpool(prepare))
        if not options.stream:
            text, last = await unless_disconnected(request, _collect(stream))
            return JSONResponse(reply.body(text, last.finish_reason, last.usage))
        # Wait for the first piece before answering, so a failure before the first
        # byte still gets a proper status code instead of a broken 200 stream.
        first = await unless_disconnected(request, anext(stream))
        handed_over = True  # from here the response cancels the stream and ends the lease
        return GenerationResponse(_events(stream, first, reply, options.include_usage), stream, lease.release)
    finally:
        if not handed_over:
            if stream is not None:
                stream.cancel()  # a no-op once the generation has finished
            lease.release()


class GenerationResponse(StreamingResponse):
    """SSE for one generation. However the response ends (done, error, client gone,
    cancelled before it started), the generation is cancelled and the model released."""

    def __init__(self, events: AsyncIterator[bytes], stream: Stream, release: Callable[[], None]) -> None:
        super().__init__(events, media_type="text/event-stream", headers=SSE_HEADERS)
        self._stream = stream
        self._release = release

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._stream.cancel()
            self._release()


async def _collect(stream: Stream) -> tuple[str, Piece]:
    parts = []
    async for piece in stream:
        parts.append(piece.text)
        if piece.finish_reason:
            return "".join(parts), piece
    raise EngineError("the generation ended without a result")


async def _events(stream: Stream, first: Piece, reply: Reply, include_usage: bool) -> AsyncIterator[bytes]:
    """The server-sent events of one generation, starting from its first piece."""
    try:
        if reply.chat:
            yield sse(reply.chunk("", first=True))
        piece: Piece | None = first
        while piece is not None:
            if piece.text:
                yield reply.text_event(piece.text)
            if piece.finish_reason:
                yield sse(reply.chunk(None, piece.finish_reason))
                if include_usage:
                    yield sse(reply.usage_chunk(piece.usage))
                yield SSE_DONE
                return
            piece = await anext(stream, None)
        yield sse(to_api_error(EngineError("the generation ended without a result")).body())
    except EngineError as e:
        yield sse(to_api_error(e).body())


# --- embeddings --------------------------------------------------------------------------

async def embeddings(request: Request) -> Response:
    body = await read_json(request)
    return await route(request, body, "/embeddings", lambda: _embeddings(request, body))


async def _embeddings(request: Request, body: dict) -> Response:
    parsed = proto.parse_embeddings(body)
    lease = await _pool(request).acquire(parsed.model, keep_alive=parsed.keep_alive)
    try:
        return await _embed(request, lease.loaded, parsed)
    finally:
        lease.release()


async def _embed(request: Request, loaded: Loaded, parsed: proto.EmbeddingRequest) -> Response:
    if not loaded.model.is_embedding:
        raise invalid(f"model '{loaded.id}' does not support embeddings (it declares no pooling type)", "model",
                      code="model_not_supported")
    # One input is decoded in one batch, and never past the positions the model was trained for.
    limit = min(loaded.runner.n_batch, loaded.model.n_ctx_train or loaded.runner.n_batch)

    def prepare() -> list[list[int]]:
        with loaded.held():
            inputs = [loaded.model.tokenize(x) if isinstance(x, str) else _checked_tokens(loaded, x, "input")
                      for x in parsed.inputs]
        for i, tokens in enumerate(inputs):
            if not tokens:
                raise invalid(f"input {i} is empty once tokenized", "input")
            if len(tokens) > limit:
                raise invalid(f"input {i} is {len(tokens)} tokens but this model embeds at most {limit} at once",
                              "input", code="context_length_exceeded")
        return inputs

    inputs = await run_in_threadpool(prepare)
    vectors = await unless_disconnected(request, loaded.runner.embed(inputs))
    return JSONResponse(embeddings_body(loaded.id, vectors, parsed.encoding_format, sum(map(len, inputs))))


routes = [
    Route("/v1/models", list_models, methods=["GET"]),
    Route("/v1/models/{model_id:path}", get_model, methods=["GET"]),
    Route("/v1/chat/completions", chat_completions, methods=["POST"]),
    Route("/v1/completions", completions, methods=["POST"]),
    Route("/v1/embeddings", embeddings, methods=["POST"]),
]
