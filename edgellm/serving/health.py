"""GET /health: public; 200 when ready, 503 (with the reason) while start-up loads run or after one failed.

The detail says whether the board throttles: a slow answer then has a reason."""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route


async def health(request: Request) -> JSONResponse:
    request.app.state.pool.health()  # raises NotReady -> 503 while start-up loads run or after one failed
    return JSONResponse({"status": "ok", **request.app.state.thermals.health()})


routes = [Route("/health", health, methods=["GET"])]
