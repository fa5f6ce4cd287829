"""API and admin keys: `Authorization: Bearer KEY` or `x-api-key: KEY` on every route but the public ones."""

from __future__ import annotations

import hashlib
import hmac
import json

from starlette.types import ASGIApp, Receive, Scope, Send

from edgellm.errors import EdgeError
from edgellm.protocol.openai import error_body

PUBLIC_PATHS = frozenset({"/health"})


def _digest(key: str) -> bytes:
    # Comparing fixed-length digests keeps the comparison constant-time whatever the key lengths.
    return hashlib.sha256(key.encode()).digest()


class APIKeyAuth:
    """ASGI middleware. /admin/* takes admin keys only, everything else but /health the API keys.

    With no keys of a kind configured, those routes are open: the server then
    listens on loopback only (the CLI refuses a network address without API
    keys), except that the admin API stays closed on a network address.
    """

    def __init__(self, app: ASGIApp, keys: frozenset[str], admin_keys: frozenset[str] = frozenset(),
                 *, loopback: bool = True) -> None:
        self.app = app
        self._digests = [_digest(k) for k in keys]
        self._admin_digests = [_digest(k) for k in admin_keys]
        self._admin_open = loopback and not admin_keys

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in PUBLIC_PATHS:
            await self.app(scope, receive, send)
            return
        admin = scope["path"].startswith("/admin/") or scope["path"] == "/admin"
        digests = self._admin_digests if admin else self._digests
        if (not digests and (not admin or self._admin_open)) or _valid(scope, digests):
            await self.app(scope, receive, send)
            return
        if admin and not digests:
            await _refuse(send, EdgeError("the admin API is closed on a network address without admin keys: "
                                          "set [server] admin_keys or admin_key_file", status=403,
                                          code="admin_disabled"))
            return
        presented = _presented_key(scope)
        kind = "admin key" if admin else "API key"
        message = (f"missing {kind}: send 'Authorization: Bearer KEY' or 'x-api-key: KEY'" if presented is None
                   else f"invalid {kind}")
        await _refuse(send, EdgeError(message, status=401, code="invalid_api_key"))


def _valid(scope: Scope, digests: list[bytes]) -> bool:
    presented = _presented_key(scope)
    if presented is None:
        return False
    digest = _digest(presented)
    return any(hmac.compare_digest(digest, d) for d in digests)


async def _refuse(send: Send, error: EdgeError) -> None:
    body = json.dumps(error_body(error)).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    if error.status == 401:
        headers.append((b"www-authenticate", b'Bearer realm="edgellm"'))
    await send({"type": "http.response.start", "status": error.status, "headers": headers})
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
