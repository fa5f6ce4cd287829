"""GET /health: public; 200 when ready, 503 while start-up loads run, or while a model is failed
(it did not load, or stopped working) until it loads again.

Whoever could use the API (a valid key, or none needed) gets the reason and whether the board
throttles; anyone else on the LAN gets only ok, loading or failed: a load error names files."""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from edgellm.errors import EdgeError


async def health(request: Request) -> JSONResponse:
    authorized = getattr(request.state, "authorized", True)
    try:
        request.app.state.service.health()  # raises NotReady -> 503 while loading, or with what failed
    except EdgeError as e:
        if authorized:
            raise
        return JSONResponse({"status": "loading" if e.retry_after else "failed"}, status_code=e.status,
                            headers=e.headers)
    detail = request.app.state.thermals.health() if authorized else {}
    return JSONResponse({"status": "ok", **detail})


routes = [Route("/health", health, methods=["GET"])]
