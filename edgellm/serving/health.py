"""GET /health: public, 200 when a model is ready to serve, 503 (with the reason) while not."""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route


async def health(request: Request) -> JSONResponse:
    request.app.state.pool.get(None)  # raises NotReady -> 503 while loading or after a failed load
    return JSONResponse({"status": "ok"})


routes = [Route("/health", health, methods=["GET"])]
