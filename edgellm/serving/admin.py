"""The admin API under /admin: installed models and their state. Needs an admin key (see auth.py)."""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from edgellm.engine.service import GenerationService


def _service(request: Request) -> GenerationService:
    return request.app.state.service


async def list_models(request: Request) -> JSONResponse:
    return JSONResponse({"object": "list", "data": _service(request).status()})


async def load_model(request: Request) -> JSONResponse:
    return JSONResponse(await _service(request).load(request.path_params["model_id"]))


async def unload_model(request: Request) -> JSONResponse:
    now, status = await _service(request).unload(request.path_params["model_id"])
    # Requests in flight finish first: then it unloads on its own (202).
    return JSONResponse(status, status_code=200 if now else 202)


async def delete_model(request: Request) -> JSONResponse:
    model_id = await _service(request).remove(request.path_params["model_id"])
    return JSONResponse({"id": model_id, "object": "model", "deleted": True})


routes = [
    Route("/admin/models", list_models, methods=["GET"]),
    Route("/admin/models/{model_id:path}/load", load_model, methods=["POST"]),
    Route("/admin/models/{model_id:path}/unload", unload_model, methods=["POST"]),
    Route("/admin/models/{model_id:path}", delete_model, methods=["DELETE"]),
]
