"""Where a request may come from: the Host it names, the web page (Origin) behind it, and the
media type of its body. Against the browser on the LAN, not the client with a key.

A page a user opens can make their browser talk to the box: through DNS rebinding (a name
of the attacker's that resolves to the box, so the page reads the answers) and through
cross-site "simple" requests (a POST with Content-Type text/plain needs no preflight). So:

- Host must be one of the box's names: loopback, its host name and NAME.local (and the
  DNS-SD name's), its addresses, and [server] allowed_hosts; else 421.
- A request with an Origin header is served only from the same origin or from a page in
  [server] cors_origins, whose preflights are answered and whose responses carry that
  origin (never `*`); any other Origin gets 403.
- A JSON API route takes its body only as application/json; else 415 (a cross-site form or
  text/plain POST cannot make one without a preflight). Ollama's /api also takes curl's form
  type from requests without an Origin (no web page can send those).
"""

from __future__ import annotations

import ipaddress
import socket
import time
from collections.abc import Callable, Iterable

import psutil
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from edgellm.errors import EdgeError
from edgellm.serving.errors import send_error

LOOPBACK_NAMES = frozenset({"localhost", "localhost.localdomain", "ip6-localhost", "ip6-loopback"})
ALLOWED_METHODS = "GET, HEAD, POST, DELETE, OPTIONS"
ALLOWED_HEADERS = "authorization, content-type, x-api-key"
EXPOSED_HEADERS = "retry-after, x-edgellm-served-by"
_ADDRESSES_EVERY = 10.0  # seconds between readings of the interfaces' addresses


def host_name(header: str) -> str:
    """The name a Host header gives, without its port, lowercased: "[::1]:80" -> "::1"."""
    value = header.strip().lower()
    if value.startswith("["):
        return value[1:value.find("]")] if "]" in value else value
    name = value.rsplit(":", 1)[0] if value.count(":") == 1 else value
    return name.rstrip(".")


def is_loopback(name: str) -> bool:
    if name in LOOPBACK_NAMES or name.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


def interface_addresses() -> set[str]:
    return {a.address.split("%")[0].lower() for addrs in psutil.net_if_addrs().values() for a in addrs
            if a.family in (socket.AF_INET, socket.AF_INET6)}


class BoxNames:
    """The names the box answers to; its addresses are read again every few seconds (DHCP)."""

    def __init__(self, configured: Iterable[str] = (), announced: str = "",
                 addresses: Callable[[], set[str]] = interface_addresses) -> None:
        hostname = socket.gethostname().lower().rstrip(".")
        short = hostname.split(".")[0]
        self.names = {hostname, short, f"{short}.local", *(n.lower().rstrip(".") for n in configured)}
        if announced:
            self.names.add(f"{announced.lower().replace(' ', '-')}.local")
        self._addresses = addresses
        self._read: tuple[float, set[str]] = (-_ADDRESSES_EVERY, set())

    def __contains__(self, name: str) -> bool:
        if is_loopback(name) or name in self.names:
            return True
        read_at, addresses = self._read
        if time.monotonic() - read_at >= _ADDRESSES_EVERY:
            self._read = read_at, addresses = time.monotonic(), self._addresses()
        return name in addresses


class OriginPolicy:
    """ASGI middleware: the Host, Origin and Content-Type rules above, before any key is looked at."""

    def __init__(self, app: ASGIApp, *, names: BoxNames, cors_origins: Iterable[str] = ()) -> None:
        self.app = app
        self.names = names
        self.cors_origins = frozenset(o.lower().rstrip("/") for o in cors_origins)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = {name.decode(): value.decode("latin-1") for name, value in scope["headers"]
                   if name in (b"host", b"origin", b"content-type", b"access-control-request-method")}
        host = headers.get("host", "")
        if host_name(host) not in self.names:
            await send_error(send, EdgeError(
                f"the Host header {host!r} is not one of this box's names; if it is, add it to [server] allowed_hosts",
                status=421, code="misdirected_request"), scope["path"])
            return
        origin = headers.get("origin")
        listed = origin is not None and origin.lower().rstrip("/") in self.cors_origins
        if origin is not None and not listed and not same_origin(origin, host):
            await send_error(send, EdgeError(f"requests from web pages at {origin} are not allowed; list the page "
                                             "in [server] cors_origins if it should be", status=403,
                                             code="origin_not_allowed"), scope["path"])
            return
        if listed and scope["method"] == "OPTIONS" and "access-control-request-method" in headers:
            await send({"type": "http.response.start", "status": 204, "headers": _cors(origin) + [
                (b"access-control-allow-methods", ALLOWED_METHODS.encode()),
                (b"access-control-allow-headers", ALLOWED_HEADERS.encode()),
                (b"access-control-max-age", b"600")]})
            await send({"type": "http.response.body", "body": b""})
            return
        path = scope["path"]
        if scope["method"] in ("POST", "DELETE") and not _json_accepted(path, headers):
            await send_error(send, EdgeError("the request body must be sent as Content-Type: application/json",
                                             status=415, code="unsupported_media_type"), path,
                             extra=_cors(origin) if listed else [])
            return
        if not listed:
            await self.app(scope, receive, send)
            return

        async def sending(message: Message) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), *_cors(origin)]}
            await send(message)

        await self.app(scope, receive, sending)


def _json_accepted(path: str, headers: dict[str, str]) -> bool:
    """Whether a POST's (or DELETE's) body may be read as JSON. Under /v1 only as application/json.
    Under /api also without a Content-Type or as a form (what `curl -d` sends, as in Ollama's own
    examples), but only from a request no web page made (no Origin); Ollama's blobs are files."""
    media = headers.get("content-type", "").split(";")[0].strip().lower()
    if path.startswith("/v1/"):
        return media == "application/json"
    if path.startswith("/api/") and not path.startswith("/api/blobs/"):
        return media == "application/json" or (
            "origin" not in headers and media in ("", "application/x-www-form-urlencoded"))
    return True


def same_origin(origin: str, host: str) -> bool:
    """An Origin naming exactly the Host the request was sent to (the box's own pages)."""
    scheme, _, rest = origin.lower().partition("://")
    return scheme in ("http", "https") and rest == host.strip().lower()


def _cors(origin: str | None) -> list[tuple[bytes, bytes]]:
    assert origin is not None
    return [(b"access-control-allow-origin", origin.encode("latin-1")), (b"vary", b"Origin"),
            (b"access-control-expose-headers", EXPOSED_HEADERS.encode())]
