"""Routing between this box and the upstream tier (the passthrough itself: passthrough.py).

Which requests go upstream ([relay] policies): a model not installed here
(`missing`), a request whose estimated local wait exceeds the time-to-first-
token budget while the upstream is healthy (`overflow`), one whose local
attempt failed before its first byte (`fallback`); `offline` turns it all off.
Every response says where it was served: `x-edgellm-served-by: local|upstream`.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

from starlette.requests import Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from edgellm.engine.service import GenerationService
from edgellm.errors import LocalFailure

if TYPE_CHECKING:
    from edgellm.relay.upstream import Upstream

log = logging.getLogger("edgellm.relay")

SERVED_BY = b"x-edgellm-served-by"


async def route(request: Request, body: dict[str, object], path: str,
                local: Callable[[], Awaitable[ASGIApp]]) -> ASGIApp:
    """Serve here or upstream, as the policies say."""
    upstream: Upstream | None = request.app.state.upstream
    if upstream is None or upstream.config.offline:
        return await local()
    from edgellm.serving.passthrough import relay  # aiohttp's side: imported only where there is an upstream

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
