"""GET /health: public; 200 when ready, 503 while start-up loads run, or while a model is failed
(it did not load, or stopped working) until it loads again.

Whoever could use the API (a valid key, or none needed) gets the reason and whether the board
throttles; anyone else on the LAN gets only ok, loading or failed: a load error names files."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

import psutil
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from edgellm.errors import EdgeError
from edgellm.update.layout import Layout

if TYPE_CHECKING:
    from edgellm.tls import Serving


async def health(request: Request) -> JSONResponse:
    authorized = getattr(request.state, "authorized", True)
    try:
        request.app.state.service.health()  # raises NotReady -> 503 while loading, or with what failed
    except EdgeError as e:
        if authorized:
            raise
        return JSONResponse({"status": "loading" if e.retry_after else "failed"}, status_code=e.status,
                            headers=e.headers)
    detail = {**request.app.state.thermals.health(), **_box(request)} if authorized else {}
    return JSONResponse({"status": "ok", **detail})


def _box(request: Request) -> dict[str, object]:
    """What the console's status page shows besides: version, uptime, memory, and the last
    software update's outcome (update/layout.py: state, from, to, message, at), or null."""
    state = request.app.state
    memory = psutil.virtual_memory()
    return {"version": state.version, "uptime_seconds": round(time.time() - state.started, 1),
            "memory": {"used": memory.total - memory.available, "available": memory.available,
                       "total": memory.total, "budget": state.config.memory_limit},
            "ollama_port": state.ollama_port, "tls": _tls(state.certificate),
            "update": Layout(state.config.update.root).status()}


def _tls(certificate: Serving | None) -> dict[str, object] | None:
    """The fingerprint presented, and a rotation's next one: a client pinned to the old certificate
    learns the new one here, over a connection the old one secures."""
    if certificate is None:
        return None
    presented = certificate.presented
    return {"fingerprint": presented.fingerprint, "next_fingerprint": presented.next_fingerprint or None,
            "next_after": presented.next_after or None}


routes = [Route("/health", health, methods=["GET"])]
