"""Every failure becomes an error in the API's shape with the right status, in one place.

Routes raise EdgeErrors; Starlette's own 404/405 and anything unforeseen are turned into
one here, so no client ever sees a traceback or an HTML page.
"""

from __future__ import annotations

import json

from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.types import Send

from edgellm.engine.errors import EngineError
from edgellm.errors import EdgeError, NotFound
from edgellm.protocol import ollama, openai


class ClientGone(Exception):
    """The client disconnected while we were working for it: nobody is left to answer."""


def to_edge_error(exc: BaseException) -> EdgeError:
    if isinstance(exc, EdgeError):
        return exc
    if isinstance(exc, HTTPException):
        if exc.status_code == 404:
            return NotFound("no such endpoint")
        if exc.status_code == 405:
            return EdgeError("method not allowed on this endpoint", status=405, code="method_not_allowed")
        return EdgeError(str(exc.detail), status=exc.status_code, code="http_error")
    # Starlette re-raises after this response is sent, so uvicorn logs the traceback.
    return EdgeError("internal server error")


async def _handle(request: Request, exc: Exception) -> Response:
    if isinstance(exc, ClientGone):
        return Response(status_code=499)  # nginx's "client closed request", for the access log
    error = to_edge_error(exc)
    if request.url.path.startswith(("/v1/", "/api/")):
        _count(request, error)
    headers = dict(error.headers)
    if isinstance(exc, HTTPException) and exc.headers:
        headers.update(exc.headers)  # a 405's Allow
    return JSONResponse(error_body(request.url.path, error), status_code=error.status, headers=headers)


def error_body(path: str, error: EdgeError) -> dict[str, object]:
    """The error in the shape of the API the path belongs to: Ollama's under /api, else OpenAI's."""
    return ollama.error_body(error) if path.startswith("/api/") else openai.error_body(error)


def _count(request: Request, error: EdgeError) -> None:
    """Requests that never reached the engine; the engine counts the ones that did."""
    if error.status in (429, 503):
        outcome = "rejected"
    elif error.status < 500:
        outcome = "invalid"
    elif not isinstance(error, EngineError):
        outcome = "failed"
    else:
        return
    request.app.state.metrics.requests.labels(outcome).inc()


async def send_error(send: Send, error: EdgeError, path: str, *, extra: list[tuple[bytes, bytes]] | None = None
                     ) -> None:
    """An error response straight from ASGI middleware, before any route (keys, the origin policy)."""
    body = json.dumps(error_body(path, error)).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
               *((k.lower().encode(), v.encode()) for k, v in error.headers.items()), *(extra or [])]
    if error.status == 401:
        headers.append((b"www-authenticate", b'Bearer realm="edgellm"'))
    await send({"type": "http.response.start", "status": error.status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


HANDLERS = {Exception: _handle, HTTPException: _handle, EdgeError: _handle, ClientGone: _handle}
