"""The box's own web console: static files shipped in the package (edgellm/web), served at `/`.

The page holds no secret and needs no key to load: it asks the operator for the API key (and
the admin key for admin actions), keeps them in sessionStorage and sends them in headers only.
Every response here carries a strict Content-Security-Policy (no inline script, no eval, no
other origin), and frames are refused, so a page elsewhere on the LAN can neither script nor
frame it; the Host and Origin policy (policy.py) applies as to every route. `/` answers
Ollama's "Ollama is running" to clients that do not ask for HTML (Ollama's clients check it).
"""

from __future__ import annotations

from importlib import resources

from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route

from edgellm.errors import NotFound

_TYPES = {".html": "text/html; charset=utf-8", ".js": "text/javascript; charset=utf-8",
          ".css": "text/css; charset=utf-8", ".svg": "image/svg+xml"}
HEADERS = {
    "content-security-policy": "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
                               "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
    "x-content-type-options": "nosniff",
    "x-frame-options": "DENY",
    "referrer-policy": "no-referrer",
    "cache-control": "no-cache",
}


def _asset(name: str) -> Response:
    suffix = name[name.rfind("."):] if "." in name else ""
    if "/" in name or name.startswith(".") or suffix not in _TYPES:
        raise NotFound("no such file")
    path = resources.files("edgellm.web") / name
    if not path.is_file():
        raise NotFound("no such file")
    return Response(path.read_bytes(), media_type=_TYPES[suffix], headers=HEADERS)


async def index(request: Request) -> Response:
    if "text/html" not in request.headers.get("accept", ""):
        return PlainTextResponse("Ollama is running")  # what Ollama's clients look for
    return _asset("index.html")


async def asset(request: Request) -> Response:
    return _asset(request.path_params["name"])


routes = [
    Route("/", index, methods=["GET", "HEAD"]),
    Route("/console/{name}", asset, methods=["GET", "HEAD"]),
]
