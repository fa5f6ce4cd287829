"""The relay's passthrough: a request sent upstream, and the upstream's response passed on.

Apart from routing (relay.py) because it is aiohttp's side: route() imports it only where
an upstream is configured, so a box without one never loads aiohttp.
"""

from __future__ import annotations

import asyncio
import json
import logging

import aiohttp
from starlette.requests import Request
from starlette.types import ASGIApp, Receive, Scope, Send

from edgellm.errors import Unsupported
from edgellm.metrics import Metrics
from edgellm.protocol import sse
from edgellm.protocol.openai import error_body
from edgellm.relay.upstream import Upstream, UpstreamError, read_small
from edgellm.relay.vllm import translate_guided, upstream_error
from edgellm.serving.disconnect import unless_disconnected, until_disconnect
from edgellm.serving.relay import SERVED_BY

log = logging.getLogger("edgellm.relay")


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
                answer = await read_small(response)  # a hostile one may be any size
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
