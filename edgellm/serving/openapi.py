"""GET /openapi.json: the OpenAPI 3.1 description of the API (protocol/openapi.py).

Behind the API key like /v1/models: it holds no secret, but it is of use only to a client that
may call the API, and a box on a LAN need not tell strangers what it serves."""

from __future__ import annotations

import json

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from edgellm.protocol.openapi import document


def routes(version: str) -> list[Route]:
    """The route, with the document rendered once: it never changes while the server runs."""
    body = json.dumps(document(version)).encode()

    async def openapi(request: Request) -> Response:
        return Response(body, media_type="application/json")

    return [Route("/openapi.json", openapi, methods=["GET"])]
