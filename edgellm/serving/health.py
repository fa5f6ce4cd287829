"""GET /health: public; 200 when ready, 503 (with the reason) while start-up loads run, or while a
model is failed (it did not load, or stopped working) until it loads again.

The detail says whether the board throttles: a slow answer then has a reason."""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route


async def health(request: Request) -> JSONResponse:
    request.app.state.service.health()  # raises NotReady -> 503 while loading, or with what failed
    return JSONResponse({"status": "ok", **request.app.state.thermals.health()})


routes = [Route("/health", health, methods=["GET"])]
