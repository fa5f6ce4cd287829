"""API and admin keys: `Authorization: Bearer KEY` or `x-api-key: KEY` on every route but the public ones."""

from __future__ import annotations

import hashlib
import hmac
import ipaddress

from starlette.types import ASGIApp, Receive, Scope, Send

from edgellm.errors import EdgeError
from edgellm.serving.errors import send_error
from edgellm.serving.policy import host_name, is_loopback

# `/` and /api/version: how Ollama's clients tell that a server is there, before any key.
PUBLIC_PATHS = frozenset({"/health", "/", "/api/version"})
# Ollama's model management changes what is installed: the operator's, as /admin is.
ADMIN_PATHS = frozenset({"/api/delete", "/api/copy", "/api/create"})


def _digest(key: str) -> bytes:
    # Comparing fixed-length digests keeps the comparison constant-time whatever the key lengths.
    return hashlib.sha256(key.encode()).digest()


class APIKeyAuth:
    """ASGI middleware. /admin/* and Ollama's model management take admin keys only, everything
    else but the public paths the API keys or an admin key (whose requests are marked `admin`).

    With no keys of a kind configured, those routes are open: the server then
    listens on loopback only (the CLI refuses a network address without API
    keys), except that the admin API stays closed on a network address, and
    even on loopback opens only to a loopback Host without an Origin header (no
    web page, whatever it does, can load or remove models then). Public routes
    learn whether the request could have used the others (`authorized`), to
    tell it more.
    """

    def __init__(self, app: ASGIApp, keys: frozenset[str], admin_keys: frozenset[str] = frozenset(),
                 *, loopback: bool = True, keyless: tuple[str, ...] = ()) -> None:
        """`keyless`: addresses and networks whose clients may use the API (never the admin API)
        without a key: apps that cannot send one ([server] keyless_addresses)."""
        self.app = app
        self._digests = [_digest(k) for k in keys]
        self._admin_digests = [_digest(k) for k in admin_keys]
        self._admin_open = loopback and not admin_keys
        self._keyless = [ipaddress.ip_network(n, strict=False) for n in keyless]

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        presented = _presented_key(scope)
        digest = _digest(presented) if presented is not None else None
        if scope["path"] in PUBLIC_PATHS or scope["path"].startswith("/console/"):  # (the console's files)
            scope.setdefault("state", {})["authorized"] = not self._digests or _valid(digest, self._digests)
            await self.app(scope, receive, send)
            return
        path = scope["path"]
        admin = path == "/admin" or path.startswith(("/admin/", "/api/blobs/")) or path in ADMIN_PATHS
        digests = self._admin_digests if admin else self._digests
        # An admin key opens the API too, with the operator's say: a keep_alive beyond the bounds.
        as_admin = not admin and _valid(digest, self._admin_digests)
        if as_admin or _valid(digest, digests):
            # Whose request it is, for what must not cross between keys (cached prompts): a digest, not the key.
            assert digest is not None
            scope.setdefault("state", {}).update(api_key_id=digest.hex()[:16], admin=as_admin)
            await self.app(scope, receive, send)
            return
        client = self._keyless_client(scope) if presented is None and not admin else None
        if client is not None:
            # Whose request it is, for cached prompts: each such address is a key of its own.
            scope.setdefault("state", {}).update(api_key_id=_digest(f"address {client}").hex()[:16], admin=False)
            await self.app(scope, receive, send)
            return
        if not digests and (not admin or (self._admin_open and _from_this_machine(scope))):
            await self.app(scope, receive, send)
            return
        if admin and not digests:
            why = ("opens only to requests for a loopback address without an Origin header (no web page)"
                   if self._admin_open else "is closed on a network address")
            await send_error(send, EdgeError(f"the admin API without admin keys {why}: set [server] admin_keys or "
                                             "admin_key_file", status=403, code="admin_disabled"), path)
            return
        kind = "admin key" if admin else "API key"
        message = (f"missing {kind}: send 'Authorization: Bearer KEY' or 'x-api-key: KEY'" if presented is None
                   else f"invalid {kind}")
        await send_error(send, EdgeError(message, status=401, code="invalid_api_key"), path)


    def _keyless_client(self, scope: Scope) -> str | None:
        """The client's address, when it may go without a key."""
        if not self._keyless or not scope.get("client"):
            return None
        try:
            address = ipaddress.ip_address(scope["client"][0])
        except ValueError:
            return None
        if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped:  # ::ffff:192.168.1.20
            address = address.ipv4_mapped
        return str(address) if any(address in network for network in self._keyless) else None


def _from_this_machine(scope: Scope) -> bool:
    headers = dict(scope["headers"])
    return b"origin" not in headers and is_loopback(host_name(headers.get(b"host", b"").decode("latin-1")))


def _valid(digest: bytes | None, digests: list[bytes]) -> bool:
    """Whether the presented key's digest is one of these (compared in constant time)."""
    return digest is not None and any(hmac.compare_digest(digest, d) for d in digests)


def _presented_key(scope: Scope) -> str | None:
    for name, value in scope["headers"]:
        if name == b"authorization":
            scheme, _, token = value.decode("latin-1").partition(" ")
            if scheme.lower() == "bearer" and token.strip():
                return token.strip()
        elif name == b"x-api-key" and value.strip():
            return value.decode("latin-1").strip()
    return None
