"""Every failure becomes an OpenAI-shaped error with the right status, in one place.

Routes raise; the engine's exceptions are translated here, so neither the
engine nor the protocol layer knows about HTTP.
"""

from __future__ import annotations

from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from edgellm.engine.chat import TemplateError
from edgellm.engine.grammar import SchemaError
from edgellm.engine.pool import ModelNotFound, ModelTooLarge, NotReady
from edgellm.engine.stream import EngineError, QueueFull, ShuttingDown
from edgellm.protocol.errors import APIError, invalid


class ClientGone(Exception):
    """The client disconnected while we were working for it: nobody is left to answer."""


def to_api_error(exc: Exception) -> APIError:
    if isinstance(exc, APIError):
        return exc
    if isinstance(exc, ModelNotFound):
        if exc.name is None and exc.available:
            return invalid(str(exc), "model", code="model_required")
        return APIError(404, str(exc), param="model", code="model_not_found")
    if isinstance(exc, ModelTooLarge):
        return invalid(str(exc), "model", code="model_too_large")
    if isinstance(exc, NotReady):
        headers = {"Retry-After": str(exc.retry_after)} if exc.retry_after else {}
        return APIError(503, str(exc), code="model_not_ready", headers=headers)
    if isinstance(exc, SchemaError):
        return invalid(str(exc), "response_format", code="invalid_json_schema")
    if isinstance(exc, TemplateError):
        return invalid(str(exc), "messages", code="chat_template_error")
    if isinstance(exc, QueueFull):
        return APIError(429, str(exc), code="queue_full", headers={"Retry-After": str(exc.retry_after)})
    if isinstance(exc, ShuttingDown):
        return APIError(503, str(exc), code="shutting_down")
    if isinstance(exc, EngineError):
        return APIError(500, f"generation failed: {exc}", code="engine_error")
    if isinstance(exc, HTTPException):
        if exc.status_code == 404:
            return APIError(404, "no such endpoint", code="not_found")
        if exc.status_code == 405:
            return APIError(405, "method not allowed on this endpoint", code="method_not_allowed",
                            headers=dict(exc.headers or {}))
        return APIError(exc.status_code, str(exc.detail))
    # Starlette re-raises after this response is sent, so uvicorn logs the traceback.
    return APIError(500, "internal server error", code="internal_error")


async def _handle(request: Request, exc: Exception) -> Response:
    if isinstance(exc, ClientGone):
        return Response(status_code=499)  # nginx's "client closed request", for the access log
    error = to_api_error(exc)
    if request.url.path.startswith("/v1/"):
        _count(request, error, exc)
    return JSONResponse(error.body(), status_code=error.status, headers=error.headers)


def _count(request: Request, error: APIError, exc: Exception) -> None:
    """Requests that never reached the engine; the engine counts the ones that did."""
    if error.status in (429, 503):
        outcome = "rejected"
    elif error.status < 500:
        outcome = "invalid"
    elif not isinstance(exc, EngineError):
        outcome = "failed"
    else:
        return
    request.app.state.metrics.requests.labels(outcome).inc()


HANDLERS = {
    Exception: _handle,
    HTTPException: _handle,
    APIError: _handle,
    ModelNotFound: _handle,
    ModelTooLarge: _handle,
    NotReady: _handle,
    SchemaError: _handle,
    TemplateError: _handle,
    EngineError: _handle,
    QueueFull: _handle,
    ClientGone: _handle,
}
