"""Routes of the OpenAI-compatible API under /v1: HTTP only.

Each route reads the body, parses it (protocol/openai.py), lets the relay decide where it
is served, calls the generation service, and renders what comes back as one JSON body or
as server-sent events.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route
from starlette.types import ASGIApp

from edgellm.engine.errors import EngineError
from edgellm.engine.service import (
    CallArguments,
    CallEvent,
    CallStart,
    EmbedRequest,
    Finish,
    GenerateRequest,
    Generation,
    GenerationService,
    Text,
    Tool,
    ToolUse,
)
from edgellm.errors import EdgeError
from edgellm.protocol import openai as proto
from edgellm.protocol import sse
from edgellm.serving.body import read_json
from edgellm.serving.disconnect import unless_disconnected
from edgellm.serving.relay import route
from edgellm.serving.sse import EventStream

# Seconds without an event before a stream sends a keep-alive comment: a long prefill on a small
# board must not look like a dead connection to a proxy (nginx gives up after 60 s).
KEEPALIVE_AFTER = 10.0


def _service(request: Request) -> GenerationService:
    return request.app.state.service


# --- models ------------------------------------------------------------------------------

async def list_models(request: Request) -> JSONResponse:
    models = _service(request).models()
    data = [proto.model_object(m.id, m.created) for m in models]
    upstream = request.app.state.upstream
    if upstream is not None and not upstream.config.offline:
        local = {m.id for m in models}
        data += [{**proto.model_object(m, 0), "owned_by": "upstream"} for m in sorted(upstream.models - local)]
    return JSONResponse({"object": "list", "data": data})


async def get_model(request: Request) -> JSONResponse:
    model = _service(request).model(request.path_params["model_id"])
    return JSONResponse(proto.model_object(model.id, model.created))


# --- completions -------------------------------------------------------------------------

async def chat_completions(request: Request) -> ASGIApp:
    body = await read_json(request)

    async def local() -> ASGIApp:
        parsed = proto.parse_chat(body)
        wanted = _generation(request, parsed.options, messages=parsed.messages,
                             chat_template_kwargs=parsed.chat_template_kwargs, tools=tool_use(parsed.tools))
        return await _generate(request, wanted, parsed.options, chat=True)

    return await route(request, body, "/chat/completions", local)


async def completions(request: Request) -> ASGIApp:
    body = await read_json(request)

    async def local() -> ASGIApp:
        parsed = proto.parse_completion(body)
        return await _generate(request, _generation(request, parsed.options, prompt=parsed.prompt), parsed.options,
                               chat=False)

    return await route(request, body, "/completions", local)


def tool_use(options: proto.ToolOptions | None) -> ToolUse | None:
    if options is None:
        return None
    return ToolUse(tuple(Tool(t.name, t.description, t.parameters) for t in options.tools), options.choice,
                   options.name, options.parallel)


def _generation(request: Request, options: proto.GenerationOptions, *,
                messages: list[dict[str, object]] | None = None, prompt: str | list[int] | None = None,
                chat_template_kwargs: dict[str, object] | None = None, tools: ToolUse | None = None) -> GenerateRequest:
    return GenerateRequest(model=options.model, messages=messages, prompt=prompt, max_tokens=options.max_tokens,
                           stops=options.stops, sampling=options.sampling, keep_alive=options.keep_alive,
                           chat_template_kwargs=chat_template_kwargs or {},
                           partition=getattr(request.state, "api_key_id", ""),
                           privileged=getattr(request.state, "admin", False), tools=tools)


async def _generate(request: Request, wanted: GenerateRequest, options: proto.GenerationOptions, *,
                    chat: bool) -> ASGIApp:
    generation = await unless_disconnected(request, _service(request).generate(wanted))
    reply = proto.Reply(model=generation.model, chat=chat)
    handed_over = False
    try:
        if not options.stream:
            text, calls, finish = await unless_disconnected(request, _collect(generation))
            return JSONResponse(reply.body(text, finish.reason, finish.usage, calls))
        # Wait a while for the first event before answering, so a failure before the first
        # byte (a full KV cache, a runner that stops) still gets a proper status code.
        first = await unless_disconnected(request, generation.first(KEEPALIVE_AFTER))
        handed_over = True  # from here the response closes the generation
        return EventStream(_events(generation, first, reply, options.include_usage), on_close=generation.close)
    finally:
        if not handed_over:
            generation.close()


def _ended_early() -> EngineError:  # the engine always ends a stream with Finish or an error
    return EngineError("the generation ended without a result")


async def _collect(generation: Generation) -> tuple[str, list[tuple[str, str, str]], Finish]:
    """The text, the tool calls (id, name, arguments) and the end of a generation."""
    parts: list[str] = []
    calls: list[list[str]] = []
    async for event in generation:
        if isinstance(event, Finish):
            return "".join(parts), [(id, name, "".join(args)) for id, name, *args in calls], event
        if isinstance(event, Text):
            parts.append(event.text)
        elif isinstance(event, CallStart):
            calls.append([event.id, event.name])
        else:
            calls[event.index].append(event.text)
    raise _ended_early()


def _call_event(reply: proto.Reply, event: CallStart | CallArguments) -> bytes:
    if isinstance(event, CallStart):
        piece = {"id": event.id, "type": "function", "function": {"name": event.name, "arguments": ""}}
        return sse.event(reply.call_chunk(event.index, piece))
    return sse.event(reply.call_chunk(event.index, {"function": {"arguments": event.text}}))


async def _events(generation: Generation, first: CallEvent | None, reply: proto.Reply, include_usage: bool
                  ) -> AsyncIterator[bytes]:
    """The server-sent events of one generation, from its first event (None: not there yet)."""
    try:
        if reply.chat:
            yield sse.event(reply.chunk("", first=True))
        while first is None:  # a long prefill: comments until the first token
            yield sse.KEEPALIVE
            first = await generation.first(KEEPALIVE_AFTER)
        event: CallEvent = first
        events = aiter(generation)
        while True:
            if isinstance(event, Finish):
                yield sse.event(reply.chunk(None, event.reason))
                if include_usage:
                    yield sse.event(reply.usage_chunk(event.usage))
                yield sse.DONE
                return
            yield reply.text_event(event.text) if isinstance(event, Text) else _call_event(reply, event)
            event = await anext(events)
    except StopAsyncIteration:
        yield sse.event(proto.error_body(_ended_early()))
    except EdgeError as e:
        yield sse.event(proto.error_body(e))


# --- embeddings --------------------------------------------------------------------------

async def embeddings(request: Request) -> ASGIApp:
    body = await read_json(request)

    async def local() -> ASGIApp:
        parsed = proto.parse_embeddings(body)
        wanted = EmbedRequest(model=parsed.model, inputs=parsed.inputs, keep_alive=parsed.keep_alive,
                              privileged=getattr(request.state, "admin", False))
        result = await unless_disconnected(request, _service(request).embed(wanted))
        return JSONResponse(proto.embeddings_body(result.model, result.vectors, parsed.encoding_format,
                                                  result.prompt_tokens))

    return await route(request, body, "/embeddings", local)


routes = [
    Route("/v1/models", list_models, methods=["GET"]),
    Route("/v1/models/{model_id:path}", get_model, methods=["GET"]),
    Route("/v1/chat/completions", chat_completions, methods=["POST"]),
    Route("/v1/completions", completions, methods=["POST"]),
    Route("/v1/embeddings", embeddings, methods=["POST"]),
]
