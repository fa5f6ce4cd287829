"""One error model: every failure a client, a file or the box itself can cause is an EdgeError.

An error knows the HTTP status it maps to, a stable `code`, the request field at fault
(`param`) and, when retrying later can help, `retry_after` seconds. Its OpenAI error type
follows from the status through the one table below. Each front end renders it in its
API's shape (protocol/openai.py: {"error": {"message", "type", "param", "code"}}); the
CLI prints the message as one line. Packages define the errors of their own domain as
subclasses, so a caller catches EdgeError, never a tuple of unrelated classes.

A leaf: imports nothing of edgellm's.
"""

from __future__ import annotations

# HTTP status -> OpenAI's error type; any other 4xx is invalid_request_error, any 5xx server_error.
TYPES = {
    401: "authentication_error",
    403: "permission_error",
    429: "rate_limit_error",
}


def error_type(status: int) -> str:
    """OpenAI's `type` for an HTTP status (OpenAI itself answers 404 with invalid_request_error)."""
    return TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")


class EdgeError(Exception):
    """The root of edgellm's errors; subclasses set `status` and `code` for their kind."""

    status: int = 500
    code: str = "internal_error"
    param: str | None = None

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None,
                 status: int | None = None, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.message = message
        if param is not None:
            self.param = param
        if code is not None:
            self.code = code
        if status is not None:
            self.status = status
        self.retry_after = retry_after

    @property
    def type(self) -> str:
        return error_type(self.status)

    @property
    def headers(self) -> dict[str, str]:
        return {"Retry-After": str(max(1, round(self.retry_after)))} if self.retry_after else {}


class InvalidRequest(EdgeError):
    """A 400: the request can never succeed as written; `param` names the field."""

    status = 400
    code = "invalid_request"


class Unsupported(InvalidRequest):
    """A field edgellm knows but cannot honour: refused, never silently dropped."""

    code = "unsupported_parameter"


class NotFound(EdgeError):
    status = 404
    code = "not_found"


class LocalFailure(EdgeError):
    """This box could not serve the request (busy, not ready, failed, too small); another tier
    might: the relay's `fallback` policy sends these upstream."""
