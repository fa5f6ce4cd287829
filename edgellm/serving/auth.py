"""API keys: `Authorization: Bearer KEY` or `x-api-key: KEY` on every route but the public ones."""

from __future__ import annotations

import hashlib
import hmac
import json

from starlette.types import ASGIApp, Receive, Scope, Send

from edgellm.protocol.errors import APIError

PUBLIC_PATHS = frozenset({"/health"})


def _digest(key: str) -> bytes:
    # Comparing fixed-length digests keeps the comparison constant-time whatever the key lengths.
    return hashlib.sha256(key.encode()).digest()


class APIKeyAuth:
    """ASGI middleware; with no keys configured it lets everything through (loopback use)."""

    def __init__(self, app: ASGIApp, keys: frozenset[str]) -> None:
        self.app = app
        self._digests = [_digest(k) for k in keys]

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not self._digests or scope["path"] in PUBLIC_PATHS:
            await self.app(scope, receive, send)
            return
        presented = _presented_key(scope)
        if presented is not None:
            digest = _digest(presented)
            if any(hmac.compare_digest(digest, d) for d in self._digests):
                await self.app(scope, receive, send)
                return
        message = ("missing API key: send 'Authorization: Bearer KEY' or 'x-api-key: KEY'" if presented is None
                   else "invalid API key")
        error = APIError(401, message, code="invalid_api_key")
        body = json.dumps(error.body()).encode()
        await send({"type": "http.response.start", "status": 401, "headers": [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(body)).encode()),
            (b"www-authenticate", b'Bearer realm="edgellm"'),
        ]})
        await send({"type": "http.response.body", "body": body})


def _presented_key(scope: Scope) -> str | None:
    for name, value in scope["headers"]:
        if name == b"authorization":
            scheme, _, token = value.decode("latin-1").partition(" ")
            if scheme.lower() == "bearer" and token.strip():
                return token.strip()
        elif name == b"x-api-key" and value.strip():
            return value.decode("latin-1").strip()
    return None
