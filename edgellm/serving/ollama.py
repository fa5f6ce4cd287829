"""Routes of Ollama's native API under /api (and `/`): HTTP only.

The same generation service as /v1 serves them: tool calls valid by construction, JSON
grammars, keep_alive on the shared pool. Chat and generate stream NDJSON unless
`stream: false`; model management (delete, copy, create, blobs) takes an admin key
(auth.py); pull installs from the bundles in [ollama] pull_dir, as this box has no
internet to download from. Errors are `{"error": "..."}` (errors.py, by path).
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import threading
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp

from edgellm.engine.service import (
    CallArguments,
    CallStart,
    EmbedRequest,
    Finish,
    GenerateRequest,
    Generation,
    GenerationService,
    ModelInfo,
    Text,
)
from edgellm.errors import EdgeError, InvalidRequest, NotFound, Unsupported
from edgellm.protocol import ollama as proto
from edgellm.serving.body import read_json
from edgellm.serving.disconnect import unless_disconnected
from edgellm.serving.importing import ImportJob
from edgellm.serving.openai import KEEPALIVE_AFTER, tool_use
from edgellm.serving.sse import NDJSON, EventStream
from edgellm.serving.upload import Upload

if TYPE_CHECKING:
    from edgellm.bundles.importer import Outcome
    from edgellm.progress import Progress

log = logging.getLogger("edgellm.ollama")
DIGEST = re.compile(r"sha256[:-]([0-9a-f]{64})")


def _service(request: Request) -> GenerationService:
    return request.app.state.service


def _line(obj: dict[str, Any]) -> bytes:
    return json.dumps(obj, ensure_ascii=False).encode() + b"\n"


async def _known_as(request: Request, name: str) -> str:
    """The name a model is known by here that a client's name means: as given, or with or without
    `:latest`. The catalog is read again first if none matches (installed a moment ago by the CLI?)."""
    service = _service(request)
    for attempt in range(2):
        for candidate in proto.candidates(name):
            if service.has(candidate):
                return candidate
        if attempt == 0:
            await service.refresh()
    raise NotFound(f"model '{name}' not found", code="model_not_found", param="model")


async def _find(request: Request, name: str) -> str:
    """The id of the model a client's name means."""
    found = _service(request).resolve(await _known_as(request, name))
    assert found is not None
    return found


def _unused(request: Request, name: str, param: str) -> None:
    """A 409 when a model answers to `name` already (as given, or with or without `:latest`)."""
    if any(_service(request).has(n) for n in proto.candidates(name)):
        raise EdgeError(f"a model named '{name}' exists already; delete it first", status=409, code="name_taken",
                        param=param)


def _details(model: ModelInfo) -> dict[str, object]:
    return proto.details(model.architecture, model.parameters, model.quantization)


def _privileged(request: Request) -> bool:
    return getattr(request.state, "admin", False)


# --- what is here ------------------------------------------------------------------------

async def version(request: Request) -> JSONResponse:
    return JSONResponse({"version": proto.VERSION})


async def tags(request: Request) -> JSONResponse:
    """Every installed model under each of its names (an alias is a copy, to Ollama's clients)."""
    models = [proto.listed(name, modified=m.created, size=m.size, sha256=m.sha256, details=_details(m))
              for m in _service(request).models() for name in (m.id, *m.aliases)]
    return JSONResponse({"models": models})


async def ps(request: Request) -> JSONResponse:
    models = []
    for r in _service(request).running():
        m = r.model
        models.append({**proto.listed(m.id, modified=m.created, size=r.memory, sha256=m.sha256, details=_details(m)),
                       "expires_at": proto.FOREVER if r.expires_at is None else proto.timestamp(r.expires_at),
                       "size_vram": r.gpu_memory, "context_length": r.n_ctx})
    return JSONResponse({"models": models})


async def show(request: Request) -> JSONResponse:
    body = await read_json(request)
    name = proto.model_name(body if "model" in body or "name" not in body else {"model": body["name"]})
    m = _service(request).model(await _find(request, name))
    capabilities = ["embedding"] if m.embedding else ["completion", *(["tools"] if m.tools else [])]
    parameters = proto.parameters_text(m.defaults)
    return JSONResponse({
        "license": m.license,
        "modelfile": f"# Modelfile of {m.id}, as edgellm serves it\nFROM {m.id}\n"
                     + "".join(f"PARAMETER {line}\n" for line in parameters.splitlines()),
        "parameters": parameters,
        "template": m.template,
        "details": _details(m),
        "model_info": proto.model_info(m.metadata, m.parameters),
        "capabilities": capabilities,
        "modified_at": proto.timestamp(m.created),
    })


# --- generation --------------------------------------------------------------------------

async def chat(request: Request) -> ASGIApp:
    body = await read_json(request)
    parsed = proto.parse_chat(body)
    options = parsed.options
    model = await _find(request, options.model)
    reply = proto.Reply(proto.tagged(options.model), chat=True)
    if not parsed.messages:  # Ollama's way to load (or with keep_alive 0, unload) a model
        return await _load_only(request, model, options, reply)
    return await _generate(request, _wanted(request, model, options, messages=parsed.messages,
                                            tools=parsed.tools), options.stream, reply)


async def generate(request: Request) -> ASGIApp:
    body = await read_json(request)
    parsed = proto.parse_generate(body)
    options = parsed.options
    model = await _find(request, options.model)
    reply = proto.Reply(proto.tagged(options.model), chat=False)
    if not parsed.prompt and parsed.suffix is None:
        return await _load_only(request, model, options, reply)
    if parsed.raw or parsed.suffix is not None:
        wanted = _wanted(request, model, options, prompt=parsed.prompt, suffix=parsed.suffix)
    else:  # the prompt as the user's turn, through the model's chat template (as Ollama's template does)
        messages: list[dict[str, Any]] = [{"role": "user", "content": parsed.prompt}]
        if parsed.system:
            messages.insert(0, {"role": "system", "content": parsed.system})
        wanted = _wanted(request, model, options, messages=messages)
    return await _generate(request, wanted, options.stream, reply)


def _wanted(request: Request, model: str, options: proto.Options, *, messages: list[dict[str, Any]] | None = None,
            prompt: str | None = None, suffix: str | None = None,
            tools: proto.ToolOptions | None = None) -> GenerateRequest:
    return GenerateRequest(model=model, messages=messages, prompt=prompt, max_tokens=options.max_tokens,
                           stops=options.stops, sampling=options.sampling, keep_alive=options.keep_alive,
                           chat_template_kwargs=options.chat_template_kwargs,
                           partition=getattr(request.state, "api_key_id", ""), privileged=_privileged(request),
                           tools=tool_use(tools), n_ctx=options.num_ctx, suffix=suffix)


async def _load_only(request: Request, model: str, options: proto.Options, reply: proto.Reply) -> JSONResponse:
    """Nothing to generate: load the model for keep_alive, or with keep_alive 0 let it go."""
    service = _service(request)
    if options.keep_alive is not False and options.keep_alive == 0:  # (False: not given, which == 0 too)
        service.expire(model, privileged=_privileged(request))
        return JSONResponse(reply.final("unload", proto.Timing()))
    seconds = await unless_disconnected(request, service.touch(model, keep_alive=options.keep_alive,
                                                               privileged=_privileged(request)))
    return JSONResponse(reply.final("load", proto.Timing(total=seconds, load=seconds)))


class _Clock:
    """When a generation was asked for, submitted, and first answered: its durations."""

    def __init__(self, generation: Generation, started: float) -> None:
        self.started = started
        self.load = generation.load_seconds
        self.submitted = time.monotonic()
        self.first: float | None = None

    def answered(self) -> None:
        if self.first is None:
            self.first = time.monotonic()

    def timing(self) -> proto.Timing:
        now = time.monotonic()
        first = self.first or now
        return proto.Timing(total=now - self.started, load=self.load, prompt=first - self.submitted,
                            generation=now - first)


class _Calls:
    """Tool calls as their events come, handed out whole (Ollama sends each call in one object)."""

    def __init__(self) -> None:
        self.calls: list[list[str]] = []  # [name, argument pieces...]
        self.given = 0

    def add(self, event: CallStart | CallArguments) -> list[dict[str, object]]:
        """The calls this event completes: a new call ends the one before it."""
        if isinstance(event, CallStart):
            done = self.rest()
            self.calls.append([event.name])
            return done
        self.calls[event.index].append(event.text)
        return []

    def rest(self) -> list[dict[str, object]]:
        out = [proto.tool_call(name, "".join(args), i) for i, (name, *args) in enumerate(self.calls)
               if i >= self.given]
        self.given = len(self.calls)
        return [call for call in out if call is not None]


async def _generate(request: Request, wanted: GenerateRequest, stream: bool, reply: proto.Reply) -> ASGIApp:
    started = time.monotonic()
    generation = await unless_disconnected(request, _service(request).generate(wanted))
    clock = _Clock(generation, started)
    handed_over = False
    try:
        if not stream:
            return JSONResponse(await unless_disconnected(request, _whole(generation, reply, clock)))
        # The first event before answering, as /v1 does: a failure before it still gets its status.
        first = await unless_disconnected(request, generation.first(KEEPALIVE_AFTER))
        handed_over = True  # from here the response closes the generation
        return EventStream(_lines(generation, first, reply, clock), on_close=generation.close, headers=NDJSON)
    finally:
        if not handed_over:
            generation.close()


async def _whole(generation: Generation, reply: proto.Reply, clock: _Clock) -> dict[str, Any]:
    parts: list[str] = []
    calls = _Calls()
    async for event in generation:
        clock.answered()
        if isinstance(event, Finish):
            return reply.final(proto.done_reason(event.reason), clock.timing(), text="".join(parts),
                               calls=calls.rest(), prompt_tokens=event.usage.prompt_tokens,
                               completion_tokens=event.usage.completion_tokens)
        if isinstance(event, Text):
            parts.append(event.text)
        else:
            calls.add(event)
    raise EdgeError("the generation ended without a result")


async def _lines(generation: Generation, first: object, reply: proto.Reply, clock: _Clock) -> AsyncIterator[bytes]:
    calls = _Calls()
    try:
        event = first if first is not None else await anext(aiter(generation))
        events = aiter(generation)
        while True:
            clock.answered()
            if isinstance(event, Finish):
                done = calls.rest()
                if done:
                    yield _line(reply.piece("", done))
                yield _line(reply.final(proto.done_reason(event.reason), clock.timing(),
                                        prompt_tokens=event.usage.prompt_tokens,
                                        completion_tokens=event.usage.completion_tokens))
                return
            if isinstance(event, Text):
                yield _line(reply.piece(event.text))
            elif isinstance(event, CallStart | CallArguments):
                done = calls.add(event)
                if done:
                    yield _line(reply.piece("", done))
            event = await anext(events)
    except StopAsyncIteration:
        yield _line(proto.error_body(EdgeError("the generation ended without a result")))
    except EdgeError as e:
        yield _line(proto.error_body(e))


# --- embeddings --------------------------------------------------------------------------

async def embed(request: Request) -> JSONResponse:
    return await _embed(request, legacy=False)


async def embeddings(request: Request) -> JSONResponse:
    return await _embed(request, legacy=True)


async def _embed(request: Request, *, legacy: bool) -> JSONResponse:
    parsed = proto.parse_embed(await read_json(request), legacy=legacy)
    started = time.monotonic()
    wanted = EmbedRequest(model=await _find(request, parsed.model), inputs=list(parsed.inputs),
                          keep_alive=parsed.keep_alive, privileged=_privileged(request), truncate=parsed.truncate)
    result = await unless_disconnected(request, _service(request).embed(wanted))
    if legacy:
        return JSONResponse({"embedding": result.vectors[0]})
    return JSONResponse({"model": proto.tagged(parsed.model), "embeddings": result.vectors,
                         "total_duration": int((time.monotonic() - started) * 1e9), "load_duration": 0,
                         "prompt_eval_count": result.prompt_tokens})


# --- model management (admin keys) -------------------------------------------------------

async def delete(request: Request) -> Response:
    """One name goes, as Ollama's `rm` of a copy; the model goes with its last name."""
    body = await read_json(request)
    await _service(request).forget(await _known_as(request, proto.model_name(body)))
    return Response(status_code=200)


async def copy(request: Request) -> Response:
    body = await read_json(request)
    source = await _find(request, proto.model_name(body, "source"))
    destination = proto.model_name(body, "destination")
    _unused(request, destination, "destination")
    await _service(request).alias(source, destination)
    return Response(status_code=200)


def _may_create(request: Request) -> None:
    config = request.app.state.config
    if config.bundles.policy == "require-signature" and not config.ollama.allow_unsigned_create:
        raise EdgeError("models from uploaded files carry no signature, and [bundles] policy requires one: import a "
                        "signed bundle instead, or set [ollama] allow_unsigned_create = true", status=403,
                        code="signature_required")


def _digest(request: Request) -> str:
    match = DIGEST.fullmatch(request.path_params["digest"])
    if match is None:
        raise InvalidRequest("a blob is named sha256:<64 lowercase hex digits>", param="digest")
    return match[1]


async def blob(request: Request) -> Response:
    """HEAD: whether a file with this digest is here; POST: upload one (checked as it arrives)."""
    sha = _digest(request)
    registry = request.app.state.registry
    if request.method == "HEAD":
        return Response(status_code=200 if registry.has_content(sha) else 404)
    _may_create(request)
    if registry.has_content(sha):
        return Response(status_code=200)
    upload = Upload(asyncio.get_running_loop())
    pump = asyncio.create_task(upload.pump(request))
    try:
        declared = request.headers.get("content-length", "")
        await asyncio.to_thread(registry.receive, upload, sha, int(declared) if declared.isdigit() else None)
    except OSError as e:  # the box's own disk: full, read-only
        raise EdgeError(f"the upload could not be kept: {e.strerror or e}", status=507,
                        code="insufficient_storage") from None
    finally:
        pump.cancel()
    return Response(status_code=201)


async def create(request: Request) -> Response:
    """A model from one uploaded GGUF blob (`files`), or another name for one (`from`)."""
    body = await read_json(request)
    name = proto.model_name(body)
    for unsupported in ("quantize", "adapters", "template", "system", "parameters", "messages"):
        if body.get(unsupported):
            raise Unsupported(f"'{unsupported}' is not supported by /api/create here: a model is created from one "
                              "GGUF file as it is ('files'), or as another name of one ('from')", param=unsupported)
    files = body.get("files") or {}
    source = body.get("from")
    service = _service(request)
    _unused(request, name, "model")
    if files:
        if not isinstance(files, dict) or len(files) != 1 or not all(isinstance(v, str) for v in files.values()):
            raise InvalidRequest("'files' must name one GGUF file and its blob's digest", param="files")
        _may_create(request)
        match = DIGEST.fullmatch(next(iter(files.values())))
        registry = request.app.state.registry
        if match is None or not registry.has_content(match[1]):
            raise InvalidRequest("the blob named in 'files' is not here: upload it first with "
                                 "POST /api/blobs/sha256:<digest>", param="files")
        sha = match[1]
        path = registry.upload(sha) if registry.upload(sha).is_file() else registry.blob(sha)
        await service.install(Path(path), name)
        registry.upload(sha).unlink(missing_ok=True)  # the store holds it now
    elif isinstance(source, str) and source:
        await service.alias(await _find(request, source), name)
    else:
        raise InvalidRequest("'files' (an uploaded GGUF blob) or 'from' (an installed model) is required",
                             param="files")
    statuses = ["using existing layer", "writing manifest", "success"]
    if body.get("stream") is False:
        return JSONResponse({"status": "success"})
    return Response(b"".join(_line({"status": s}) for s in statuses), media_type="application/x-ndjson")


# --- pull: from a directory of bundles -----------------------------------------------------

async def pull(request: Request) -> ASGIApp:
    body = await read_json(request)
    name = proto.model_name(body if "model" in body or "name" not in body else {"model": body["name"]})
    stream = body.get("stream") is not False
    service = _service(request)
    if not any(service.has(n) for n in proto.candidates(name)):
        bundle = await asyncio.to_thread(_bundle_with, request.app.state.config, name)
        failed: list[EdgeError] = []
        lines = _import(request, bundle, failed)
        if not stream:
            async for _ in lines:
                pass
            if failed:
                raise failed[0]
            return JSONResponse({"status": "success"})
        return EventStream(lines, headers=NDJSON, watch_disconnect=False)
    return JSONResponse({"status": "success"})


_SCANNING = threading.Lock()  # one look through pull_dir at a time: each opens every bundle there


def _bundle_with(config: Any, name: str) -> Path:
    """The bundle in [ollama] pull_dir that holds this model (by id or alias); NotFound says why none."""
    offline = (f"model '{name}' not found: it is not installed, and this box downloads nothing (it has no "
               "internet)")
    directory = config.ollama.pull_dir
    if not directory:
        raise NotFound(f"{offline}; set [ollama] pull_dir to a directory of signed bundles (a USB stick) for "
                       "/api/pull to install from, or import a bundle with `edgellm bundle import`",
                       code="model_not_found")
    wanted = set(proto.candidates(name))
    if not _SCANNING.acquire(blocking=False):
        raise EdgeError("another pull is looking through [ollama] pull_dir; try again in a moment", status=429,
                        code="busy", retry_after=2)
    try:
        return _scan(Path(directory), wanted, offline)
    finally:
        _SCANNING.release()


def _scan(directory: Path, wanted: set[str], offline: str) -> Path:
    from edgellm.bundles.manifest import ManifestError, parse
    from edgellm.bundles.reader import BundleError, find_bundles, open_source

    try:
        paths = find_bundles(directory)
    except (OSError, BundleError) as e:  # none there, or no such directory: the stick is not in
        raise NotFound(f"{offline}; [ollama] pull_dir has no bundles ({e}): is the stick in?",
                       code="model_not_found") from None
    for path in paths:
        try:
            source = open_source(path)
            try:
                manifest = parse(source.manifest()[0], str(path))
            finally:
                source.close()
        except (OSError, BundleError, ManifestError) as e:
            log.warning("pull: skipped %s: %s", path, e)
            continue
        if any(wanted & {m.id, *m.aliases} for m in manifest.models):
            return path
    raise NotFound(f"{offline}; no bundle in {directory} holds it", code="model_not_found")


async def _import(request: Request, path: Path, failed: list[EdgeError]) -> AsyncIterator[bytes]:
    """Import a bundle, as Ollama's pull-status stream: manifest, each file's progress, success;
    a failure is the last line, and goes into `failed`."""
    from edgellm.bundles.importer import Policy, import_bundle
    from edgellm.bundles.reader import open_source

    config, registry = request.app.state.config, request.app.state.registry

    def work(progress: Progress) -> list[Outcome]:
        source = open_source(path)
        try:
            return import_bundle(source, registry, Policy.from_config(config), engine=config.engine,
                                 memory_limit=config.memory_limit, progress=progress)
        finally:
            source.close()

    yield _line({"status": "pulling manifest"})
    job = ImportJob(work)
    try:
        async for file, done, total in job.progress():
            yield _line({"status": f"pulling {file}", "digest": file, "total": total, "completed": done})
        job.outcomes()
    except EdgeError as e:
        failed.append(e)
        yield _line(proto.error_body(e))
        return
    finally:
        await job.ended()
    await _service(request).refresh()
    for status in ("verifying sha256 digest", "writing manifest", "success"):
        yield _line({"status": status})


routes = [
    Route("/api/version", version, methods=["GET"]),
    Route("/api/tags", tags, methods=["GET"]),
    Route("/api/ps", ps, methods=["GET"]),
    Route("/api/show", show, methods=["POST"]),
    Route("/api/chat", chat, methods=["POST"]),
    Route("/api/generate", generate, methods=["POST"]),
    Route("/api/embed", embed, methods=["POST"]),
    Route("/api/embeddings", embeddings, methods=["POST"]),
    Route("/api/delete", delete, methods=["DELETE"]),
    Route("/api/copy", copy, methods=["POST"]),
    Route("/api/create", create, methods=["POST"]),
    Route("/api/blobs/{digest}", blob, methods=["HEAD", "POST"]),
    Route("/api/pull", pull, methods=["POST"]),
]
