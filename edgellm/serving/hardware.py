"""GET /admin/hardware: what `edgellm doctor --json` prints, from the running service."""

from __future__ import annotations

import asyncio

from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from edgellm.hardware.report import report


async def get_hardware(request: Request) -> JSONResponse:
    root, engine = request.app.state.hardware
    return JSONResponse(await asyncio.to_thread(report, root, engine))


routes = [Route("/admin/hardware", get_hardware, methods=["GET"])]
