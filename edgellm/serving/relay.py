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
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from edgellm.engine.service import GenerationService
from edgellm.errors import LocalFailure, Unsupported
from edgellm.metrics import Metrics
from edgellm.protocol import sse
from edgellm.protocol.openai import error_body
from edgellm.relay.upstream import MAX_SMALL_BODY, Upstream, UpstreamError
from edgellm.relay.vllm import translate_guided, upstream_error
from edgellm.serving.disconnect import unless_disconnected, until_disconnect

log = logging.getLogger("edgellm.relay")

SERVED_BY = b"x-edgellm-served-by"


async def route(request: Request, body: dict[str, object], path: str,
                local: Callable[[], Awaitable[ASGIApp]]) -> ASGIApp:
    """Serve here or upstream, as the policies say."""
    upstream: Upstream | None = request.app.state.upstream
    if upstream is None or upstream.config.offline:
        return await local()
    service: GenerationService = request.app.state.service
    model = body.get("model")
    name = model if isinstance(model, str) else None
    here = service.has(name)
    if not here and upstream.config.missing and upstream.has(name):
        return await relay(request, body, path, upstream, reason="missing")
    if here and upstream.config.overflow and upstream.has(name) and upstream.usable and not upstream.saturated:
        assert name is not None
        wait = service.estimated_wait(name)
        if wait > upstream.ttft_budget:
            log.info("model %s: local wait about %.1f s; relaying upstream", name, wait)
            return await relay(request, body, path, upstream, reason="overflow")
    try:
        return await local()
    except LocalFailure as e:
        model = name or service.resolve(None)
        if not (upstream.config.fallback and upstream.has(model) and upstream.usable):
            raise
        log.warning("model %s failed here before its first byte (%s); relaying upstream", model, e)
        return await relay(request, body, path, upstream, reason="fallback")


async def relay(request: Request, body: dict[str, object], path: str, upstream: Upstream, *,
                reason: str) -> ASGIApp:
    """Send the request upstream; `reason` is the [relay] policy that chose to (missing, overflow,
    fallback), counted by name in edgellm_relayed."""
    body, problem = translate_guided(body)
    if problem:
        raise Unsupported(problem, param="structured_outputs")
    if upstream.breaker.state == "open":
        raise UpstreamError(f"the upstream is unavailable (circuit open after {upstream.breaker.failures} "
                            "failures); try again shortly", status=503, code="upstream_unavailable",
                            retry_after=max(1.0, upstream.breaker.cooldown))
    request.app.state.metrics.relayed.labels(reason).inc()
    # A client that leaves while the upstream thinks cancels the request there too.
    response = await unless_disconnected(request, upstream.send(path, json.dumps(body).encode()))
    return Passthrough(response, request.app.state.metrics)


class Passthrough:
    """The upstream's response, passed on as its bytes arrive: no re-encoding, no buffering.
    A client that leaves closes the upstream connection at once, which cancels the request
    there. Errors before the body become OpenAI's shape; a stream cut halfway ends with an
    error event, never a hang."""

    def __init__(self, response: aiohttp.ClientResponse, metrics: Metrics) -> None:
        self.response = response
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        response = self.response
        try:
            if response.status >= 400:
                answer = await response.content.read(MAX_SMALL_BODY)  # a hostile one may be any size
                body = json.dumps(error_body(upstream_error(response.status, answer))).encode()
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
                error = UpstreamError("upstream: the response broke off")
                await send({"type": "http.response.body", "body": sse.event(error_body(error)), "more_body": True})
        await send({"type": "http.response.body", "body": b"", "more_body": False})

    def _count(self, chunk: bytes) -> None:
        for line in chunk.splitlines():
            if b'"usage"' not in line:
                continue
            try:  # the upstream's own JSON: counted when it makes sense, never trusted to
                doc = json.loads(line.removeprefix(b"data: "))
            except (ValueError, RecursionError):
                continue
            usage = doc.get("usage") if isinstance(doc, dict) else None
            if not isinstance(usage, dict):
                continue
            for kind in ("prompt", "completion"):
                n = usage.get(f"{kind}_tokens")
                if isinstance(n, int) and not isinstance(n, bool) and 0 <= n < 1 << 31:
                    self.metrics.upstream_tokens.labels(kind).inc(n)


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
