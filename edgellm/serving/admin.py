"""The admin API under /admin: installed models and their state. Needs an admin key (see auth.py)."""

from __future__ import annotations

import time

from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from edgellm.engine.pool import Managed, Pool
from edgellm.protocol.errors import APIError, invalid


def _pool(request: Request) -> Pool:
    return request.app.state.pool


def _iso(seconds: float | None) -> str | None:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(seconds)) if seconds else None


def model_status(managed: Managed) -> dict:
    entry = managed.entry
    return {
        **entry.record(),
        "state": managed.state,
        "backend": managed.backend or None,
        "gpu_layers": managed.gpu_layers if managed.loaded else None,
        "estimate_bytes": managed.estimate.total,
        "rss_delta_bytes": managed.rss_delta,
        "in_flight": managed.loaded.users if managed.loaded else 0,
        "last_used": _iso(managed.last_used),
        "expires_at": _iso(managed.expires_at),
        "pinned": managed.pinned,
    }


async def list_models(request: Request) -> JSONResponse:
    pool = _pool(request)
    return JSONResponse({"object": "list", "data": [model_status(m) for m in pool.models()]})


async def load_model(request: Request) -> JSONResponse:
    managed = await _pool(request).load(request.path_params["model_id"])
    return JSONResponse(model_status(managed))


async def unload_model(request: Request) -> JSONResponse:
    pool = _pool(request)
    name = request.path_params["model_id"]
    now = await pool.unload(name)
    # Requests in flight finish first: then it unloads on its own (202).
    return JSONResponse(model_status(pool.find(name)), status_code=200 if now else 202)


async def delete_model(request: Request) -> JSONResponse:
    try:
        entry = await _pool(request).remove(request.path_params["model_id"])
    except ValueError as e:
        raise invalid(str(e), "model", code="not_installed") from None
    except RuntimeError as e:
        raise APIError(409, f"{e}; try again when they have finished", param="model", code="model_busy") from None
    return JSONResponse({"id": entry.id, "object": "model", "deleted": True})


routes = [
    Route("/admin/models", list_models, methods=["GET"]),
    Route("/admin/models/{model_id:path}/load", load_model, methods=["POST"]),
    Route("/admin/models/{model_id:path}/unload", unload_model, methods=["POST"]),
    Route("/admin/models/{model_id:path}", delete_model, methods=["DELETE"]),
]
