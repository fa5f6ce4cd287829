"""Routing between this box and the upstream tier, and the byte-for-byte passthrough.

Which requests go upstream ([relay] policies): a model not installed here
(`missing`), a request whose estimated local wait exceeds the time-to-first-
token budget while the upstream is healthy (`overflow`), one whose local
attempt failed before its first byte (`fallback`); `offline` turns it all off.
Every response says where it was served: `x-edgellm-served-by: local|upstream`.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Awaitable, Callable

import aiohttp
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from edgellm.engine.pool import ModelNotFound, ModelTooLarge, NotReady
from edgellm.engine.stream import EngineError, QueueFull
from edgellm.protocol.errors import APIError, invalid
from edgellm.relay.upstream import Upstream, UpstreamError
from edgellm.relay.vllm import openai_error, translate_guided
from edgellm.serving.disconnect import unless_disconnected, until_disconnect

log = logging.getLogger("edgellm.relay")

SERVED_BY = b"x-edgellm-served-by"
_LOCAL_FAILURES = (NotReady, QueueFull, EngineError, ModelTooLarge)


async def route(request: Request, body: dict, path: str, local: Callable[[], Awaitable[Response]]) -> Response:
    """Serve here or upstream, as the policies say."""
    upstream: Upstream | None = request.app.state.upstream
    if upstream is None or upstream.config.offline:
        return await local()
    pool = request.app.state.pool
    name = body.get("model") if isinstance(body.get("model"), str) else None
    here = pool.has(name)
    if not here and upstream.config.missing and upstream.has(name):
        return await relay(request, body, path, upstream, why="not installed here")
    if here and upstream.config.overflow and upstream.has(name) and upstream.usable and not upstream.saturated:
        wait = pool.estimated_wait(name)
        if wait > upstream.ttft_budget:
            return await relay(request, body, path, upstream, why=f"local wait about {wait:.1f} s")
    try:
        return await local()
    except _LOCAL_FAILURES as e:
        model = name or _only_model(pool)
        if not (upstream.config.fallback and upstream.has(model) and upstream.usable):
            raise
        log.warning("model %s failed here before its first byte (%s); relaying upstream", model, e)
        return await relay(request, body, path, upstream, why="local failure")


def _only_model(pool) -> str | None:
    try:
        return pool.find(None).entry.id
    except ModelNotFound:
        return None


async def relay(request: Request, body: dict, path: str, upstream: Upstream, *, why: str) -> Response:
    body, problem = translate_guided(body)
    if problem:
        raise invalid(problem, "structured_outputs", code="unsupported_parameter")
    if upstream.breaker.state == "open":
        raise APIError(503, f"the upstream is unavailable (circuit open after {upstream.breaker.failures} "
                            "failures); try again shortly", code="upstream_unavailable",
                       headers={"Retry-After": str(max(1, int(upstream.breaker.cooldown)))})
    request.app.state.metrics.relayed.labels(why.split(" ")[0]).inc()
    try:  # a client that leaves while the upstream thinks cancels the request there too
        response = await unless_disconnected(request, upstream.send(path, json.dumps(body).encode()))
    except UpstreamError as e:
        headers = {"Retry-After": str(int(e.retry_after))} if e.retry_after else {}
        raise APIError(e.status, str(e), code="upstream_error", headers=headers) from None
    return Passthrough(response, request.app.state.metrics)


class Passthrough:
    """The upstream's response, passed on as its bytes arrive: no re-encoding, no buffering.
    A client that leaves closes the upstream connection at once, which cancels the request
    there. Errors before the body become OpenAI's shape; a stream cut halfway ends with an
    error event, never a hang."""

    def __init__(self, response: aiohttp.ClientResponse, metrics) -> None:
        self.response = response
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        response = self.response
        try:
            if response.status >= 400:
                body = json.dumps(openai_error(response.status, await response.read())).encode()
                headers = [(b"content-type", b"application/json"), (SERVED_BY, b"upstream")]
                if "Retry-After" in response.headers:
                    headers.append((b"retry-after", response.headers["Retry-After"].encode()))
                await send({"type": "http.response.start", "status": response.status, "headers": headers})
                await send({"type": "http.response.body", "body": body})
                return
            streaming = response.content_type == "text/event-stream"
            headers = [(b"content-type", response.headers.get("Content-Type", "application/json").encode()),
                       (SERVED_BY, b"upstream")]
            if streaming:
                headers += [(b"cache-control", b"no-cache"), (b"x-accel-buffering", b"no")]
            await send({"type": "http.response.start", "status": response.status, "headers": headers})
            watcher = asyncio.ensure_future(self._close_when_gone(receive))
            try:
                await self._pump(send, streaming)
            finally:
                watcher.cancel()
        finally:
            response.close()

    async def _close_when_gone(self, receive: Receive) -> None:
        await until_disconnect(receive)
        self.response.close()  # ends the read below and the upstream's work

    async def _pump(self, send: Send, streaming: bool) -> None:
        content = self.response.content
        try:
            while chunk := await content.readany():
                if b'"usage"' in chunk:
                    self._count(chunk)
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
        except (aiohttp.ClientError, TimeoutError) as e:
            if self.response.connection is None and self.response.closed:
                return  # the client left: nobody to tell
            log.warning("the upstream's response broke off: %s", e or type(e).__name__)
            if streaming:
                error = {"error": {"message": "upstream: the response broke off", "type": "server_error",
                                   "param": None, "code": "upstream_error"}}
                await send({"type": "http.response.body", "body": f"data: {json.dumps(error)}\n\n".encode(),
                            "more_body": True})
        await send({"type": "http.response.body", "body": b"", "more_body": False})

    def _count(self, chunk: bytes) -> None:
        for line in chunk.splitlines():
            if b'"usage"' not in line:
                continue
            try:
                usage = json.loads(line.removeprefix(b"data: ")).get("usage") or {}
            except (ValueError, AttributeError):
                continue
            self.metrics.upstream_tokens.labels("prompt").inc(usage.get("prompt_tokens") or 0)
            self.metrics.upstream_tokens.labels("completion").inc(usage.get("completion_tokens") or 0)


class ServedBy:
    """ASGI middleware: responses from the API that the relay did not make say `local`."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not scope["path"].startswith("/v1/"):
            await self.app(scope, receive, send)
            return
        metrics = scope["app"].state.metrics if "app" in scope else None

        async def sending(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", []))
                by = next((v for k, v in headers if k == SERVED_BY), None)
                if by is None:
                    headers.append((SERVED_BY, b"local"))
                    message = {**message, "headers": headers}
                if metrics is not None:
                    metrics.served.labels((by or b"local").decode()).inc()
            await send(message)

        await self.app(scope, receive, sending)
