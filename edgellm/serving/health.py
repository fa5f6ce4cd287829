"""GET /health: public; 200 when ready, 503 (with the reason) while start-up loads run or after one failed."""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route


async def health(request: Request) -> JSONResponse:
    request.app.state.pool.health()  # raises NotReady -> 503 while start-up loads run or after one failed
    return JSONResponse({"status": "ok"})


routes = [Route("/health", health, methods=["GET"])]
