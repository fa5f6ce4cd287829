"""Routes of the OpenAI-compatible API under /v1.

Each route is: read the body, parse it (protocol), find the model (pool),
prepare tokens and a sampler off the event loop, submit to the runner, and
turn the pieces that come back into one JSON body or server-sent events.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator, Awaitable
from typing import TypeVar

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from edgellm.engine.pool import Loaded, Pool
from edgellm.engine.runner import GenerationRequest
from edgellm.engine.sampling import Sampler
from edgellm.engine.stream import EngineError, Piece, Stream
from edgellm.protocol import requests as proto
from edgellm.protocol.errors import APIError, invalid
from edgellm.protocol.responses import SSE_DONE, Reply, embeddings_body, model_object, sse
from edgellm.serving.errors import to_api_error

T = TypeVar("T")
log = logging.getLogger("edgellm.serving")

# Headers that keep proxies (nginx and friends) from buffering a token stream.
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


class ClientGone(Exception):
    """The client disconnected while we were working for it."""


def _pool(request: Request) -> Pool:
    return request.app.state.pool


async def read_json(request: Request) -> dict:
    """The request body as a JSON object, refusing bodies over the configured limit."""
    limit = request.app.state.max_body_bytes
    too_big = APIError(413, f"request body is larger than the {limit}-byte limit", code="body_too_large")
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise too_big
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise too_big
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError) as e:
        raise invalid(f"the request body is not valid JSON: {e}", code="invalid_json") from None
    if not isinstance(data, dict):
        raise invalid("the request body must be a JSON object", code="invalid_json")
    return data


async def _until_disconnect(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def _unless_disconnected(request: Request, work: Awaitable[T]) -> T:
    """Await `work`, but give up with ClientGone as soon as the client disconnects."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_until_disconnect(request))
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        if not task.done():
            task.cancel()
    if task.cancelled():
        raise ClientGone
    return task.result()


# --- models ------------------------------------------------------------------------------

async def list_models(request: Request) -> JSONResponse:
    pool = _pool(request)
    return JSONResponse({"object": "list", "data": [model_object(i, pool.created) for i in pool.ids()]})


async def get_model(request: Request) -> JSONResponse:
    pool = _pool(request)
    model_id = request.path_params["model_id"]
    if model_id not in pool.ids():
        raise APIError(404, f"model '{model_id}' does not exist here", param="model", code="model_not_found")
    return JSONResponse(model_object(model_id, pool.created))


# --- completions -------------------------------------------------------------------------

async def chat_completions(request: Request) -> Response:
    parsed = proto.parse_chat(await read_json(request))
    loaded = _generative(_pool(request), parsed.options.model)
    _log_prompt(request, parsed.messages)
    render = loaded.template.render
    prompt = await run_in_threadpool(lambda: loaded.model.tokenize(render(parsed.messages)))
    return await _generate(request, loaded, prompt, parsed.options, chat=True)


async def completions(request: Request) -> Response:
    parsed = proto.parse_completion(await read_json(request))
    loaded = _generative(_pool(request), parsed.options.model)
    _log_prompt(request, parsed.prompt)
    if isinstance(parsed.prompt, str):
        prompt = await run_in_threadpool(loaded.model.tokenize, parsed.prompt)
    else:
        prompt = _checked_tokens(loaded, parsed.prompt, "prompt")
    return await _generate(request, loaded, prompt, parsed.options, chat=False)


def _log_prompt(request: Request, prompt: object) -> None:
    """Prompts are the users' business: logged only when [log] prompts = true."""
    if request.app.state.log_prompts:
        log.info("prompt for %s: %s", request.url.path, json.dumps(prompt, ensure_ascii=False))


def _generative(pool: Pool, name: str | None) -> Loaded:
    loaded = pool.get(name)
    if loaded.template is None:
        raise invalid(f"model '{loaded.id}' is an embedding model; use /v1/embeddings", "model",
                      code="model_not_supported")
    return loaded


def _checked_tokens(loaded: Loaded, tokens: list[int], param: str) -> list[int]:
    bad = next((t for t in tokens if not 0 <= t < loaded.model.n_vocab), None)
    if bad is not None:
        raise invalid(f"token id {bad} is outside the vocabulary (0..{loaded.model.n_vocab - 1})", param)
    return tokens


async def _generate(request: Request, loaded: Loaded, prompt: list[int], options: proto.GenerationOptions,
                    *, chat: bool) -> Response:
    n_ctx = loaded.runner.n_ctx
    if not prompt:
        raise invalid("the prompt is empty", "messages" if chat else "prompt")
    if len(prompt) >= n_ctx:
        raise invalid(f"the prompt is {len(prompt)} tokens but the context holds {n_ctx} tokens "
                      "(and needs room for at least one generated token)",
                      "messages" if chat else "prompt", code="context_length_exceeded")
    _checked_tokens(loaded, list(options.sampling.logit_bias), "logit_bias")
    sampler = await run_in_threadpool(Sampler, loaded.model, options.sampling)
    stream = loaded.runner.submit(GenerationRequest(prompt, sampler, options.max_tokens, options.stops))
    reply = Reply(model=loaded.id, chat=chat)
    try:
        if not options.stream:
            text, last = await _unless_disconnected(request, _collect(stream))
            return JSONResponse(reply.body(text, last.finish_reason, last.usage))
        # Wait for the first piece before answering, so a failure before the first
        # byte still gets a proper status code instead of a broken 200 stream.
        first = await _unless_disconnected(request, anext(stream))
    except ClientGone:
        stream.cancel()
        return Response(status_code=499)
    except BaseException:
        stream.cancel()
        raise
    return StreamingResponse(_events(stream, first, reply, options.include_usage),
                             media_type="text/event-stream", headers=SSE_HEADERS)


async def _collect(stream: Stream) -> tuple[str, Piece]:
    parts = []
    async for piece in stream:
        parts.append(piece.text)
        if piece.finish_reason:
            return "".join(parts), piece
    raise EngineError("the generation ended without a result")


async def _events(stream: Stream, first: Piece, reply: Reply, include_usage: bool) -> AsyncIterator[bytes]:
    """SSE for one generation; leaving early (the client went away) cancels it."""
    try:
        if reply.chat:
            yield sse(reply.chunk("", first=True))
        piece: Piece | None = first
        while piece is not None:
            if piece.text:
                yield sse(reply.chunk(piece.text))
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
    finally:
        stream.cancel()


# --- embeddings --------------------------------------------------------------------------

async def embeddings(request: Request) -> Response:
    parsed = proto.parse_embeddings(await read_json(request))
    loaded = _pool(request).get(parsed.model)
    if not loaded.model.is_embedding:
        raise invalid(f"model '{loaded.id}' does not support embeddings (it declares no pooling type)", "model",
                      code="model_not_supported")
    model = loaded.model
    inputs = await run_in_threadpool(
        lambda: [model.tokenize(x) if isinstance(x, str) else _checked_tokens(loaded, x, "input")
                 for x in parsed.inputs])
    limit = loaded.runner.n_batch  # an embedding input is decoded in one batch
    for i, tokens in enumerate(inputs):
        if len(tokens) > limit:
            raise invalid(f"input {i} is {len(tokens)} tokens but this model embeds at most {limit} at once",
                          "input", code="context_length_exceeded")
    try:
        vectors = await _unless_disconnected(request, loaded.runner.embed(inputs))
    except ClientGone:
        return Response(status_code=499)
    return JSONResponse(embeddings_body(loaded.id, vectors, parsed.encoding_format, sum(map(len, inputs))))


routes = [
    Route("/v1/models", list_models, methods=["GET"]),
    Route("/v1/models/{model_id:path}", get_model, methods=["GET"]),
    Route("/v1/chat/completions", chat_completions, methods=["POST"]),
    Route("/v1/completions", completions, methods=["POST"]),
    Route("/v1/embeddings", embeddings, methods=["POST"]),
]
