"""Reading a request body: bounded in size, and JSON that is text (no NaN, no lone surrogates)."""

from __future__ import annotations

import asyncio
import json

from starlette.requests import ClientDisconnect, Request

from edgellm.errors import EdgeError, InvalidRequest
from edgellm.serving.errors import ClientGone


class BodyTooLarge(EdgeError):
    status = 413
    code = "body_too_large"


def _no_constants(name: str) -> None:
    raise ValueError(f"{name} is not valid JSON")


async def read_json(request: Request) -> dict[str, object]:
    """The request body as a JSON object, refusing bodies over the configured size, and bodies
    that take longer than [server] body_timeout in all (a trickle never silent long enough for
    the connection's own timeout would hold the request forever)."""
    limit = request.app.state.max_body_bytes
    too_big = BodyTooLarge(f"request body is larger than the {limit}-byte limit")
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise too_big
    body = bytearray()
    seconds = request.app.state.body_timeout
    try:
        async with asyncio.timeout(seconds):
            async for chunk in request.stream():
                body += chunk
                if len(body) > limit:
                    raise too_big
    except ClientDisconnect:
        raise ClientGone from None
    except TimeoutError:
        raise EdgeError(f"the request body did not arrive within {seconds:g} s", status=408,
                        code="request_timeout") from None
    try:
        # Strict UTF-8 (as RFC 8259 asks): json.loads of bytes would let surrogates encoded as UTF-8 through.
        data = json.loads(body.decode("utf-8"), parse_constant=_no_constants)
        if b"\\u" in body:  # an escaped lone surrogate is valid JSON but not text: it fails here
            json.dumps(data, ensure_ascii=False).encode()
    except RecursionError:
        raise InvalidRequest("the request body is nested too deeply", code="invalid_json") from None
    except UnicodeEncodeError:
        raise InvalidRequest("the request body contains a lone UTF-16 surrogate escape, which is not text",
                             code="invalid_json") from None
    except UnicodeDecodeError as e:
        raise InvalidRequest(f"the request body is not UTF-8 text: {e.reason} at byte {e.start}",
                             code="invalid_json") from None
    except ValueError as e:
        raise InvalidRequest(f"the request body is not valid JSON: {e}", code="invalid_json") from None
    if not isinstance(data, dict):
        raise InvalidRequest("the request body must be a JSON object", code="invalid_json")
    return data
