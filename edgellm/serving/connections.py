"""HTTP limits uvicorn does not enforce itself, so that no client on the LAN, idle, slow or huge,
can take the box's memory or its file descriptors.

uvicorn with httptools reads a request head of any size (one 128 MiB header line is held
whole before the 401) and never times out a connection that has not finished its head
(idle sockets and a slowloris stay open until the descriptors run out). This subclass of
its httptools protocol, given to uvicorn as its `http` class, adds:

- a cap on the head: the request target (414) and the whole head in bytes and in header
  lines (431), counted as bytes arrive, before the parser can buffer more; and the same cap
  on what a chunked body sends besides its data (chunk lines and trailers: httptools
  buffers a trailer line whole, as it would a header);
- a connection whose response is complete while its request body still arrives (a 401 to
  an upload) is closed: nothing would read the body, and each byte would keep it open;
- a time limit from connect (and from the first byte of each further request) to the end
  of the head (408), and the longest silence allowed while a body arrives;
- a cap on open connections below the descriptor limit: one more is answered 503 at once.

Keep-alive idle connections are uvicorn's own timeout_keep_alive.
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass
from typing import ClassVar

import httptools
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from edgellm.errors import EdgeError
from edgellm.protocol.openai import error_body


@dataclass(frozen=True)
class Limits:
    max_header_bytes: int  # the request line and headers
    max_headers: int  # header lines
    max_target_bytes: int  # the request target (path and query)
    header_timeout: float  # seconds from connect, or a request's first byte, to the end of its head
    body_timeout: float  # seconds of silence while a body arrives
    max_connections: int


def bounded(limits: Limits) -> type[HttpToolsProtocol]:
    """uvicorn's httptools protocol with these limits."""
    return type("BoundedHttpToolsProtocol", (BoundedHttpToolsProtocol,), {"limits": limits})


def refusal(error: EdgeError) -> bytes:
    """A whole response to a request the server will not read on: the error, and the connection closes."""
    body = json.dumps(error_body(error)).encode()
    head = [f"HTTP/1.1 {error.status} {_REASONS[error.status]}", "content-type: application/json",
            f"content-length: {len(body)}", "connection: close", *(f"{k}: {v}" for k, v in error.headers.items())]
    return ("\r\n".join(head) + "\r\n\r\n").encode() + body


_REASONS = {408: "Request Timeout", 414: "URI Too Long", 431: "Request Header Fields Too Large",
            503: "Service Unavailable"}


class BoundedHttpToolsProtocol(HttpToolsProtocol):
    limits: ClassVar[Limits]

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        self._refused: EdgeError | None = None
        self._timer: asyncio.TimerHandle | None = None
        if len(self.connections) >= self.limits.max_connections:
            self.transport = transport
            self._refuse(EdgeError(f"the server holds {self.limits.max_connections} connections, its most; "
                                   "try again shortly", status=503, code="too_many_connections", retry_after=1))
            return
        super().connection_made(transport)
        self._head_begins()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        if self.flow is None:  # refused before it was set up
            return
        super().connection_lost(exc)

    # --- the head ---------------------------------------------------------------------------

    def _head_begins(self) -> None:
        self._in_head = True
        self._message_done = False
        self._head_bytes = 0
        self._header_lines = 0
        self._arm(self.limits.header_timeout)

    def data_received(self, data: bytes) -> None:
        if self._refused is not None:
            return
        if not self._in_head:
            self._after_head += len(data)
            self._feed(data)
            # What is not body data: chunk lines (a few bytes each) and trailers. Checked once per
            # read, so at most one read more than the cap is ever buffered.
            framing = self._after_head - self._body_bytes - 16 * self._chunks
            if not self._message_done and not self._in_head and framing > self.limits.max_header_bytes:
                self._refuse(EdgeError(f"the request body's chunk lines and trailers are larger than "
                                       f"{self.limits.max_header_bytes} bytes", status=431, code="headers_too_large"))
            return
        room = self.limits.max_header_bytes - self._head_bytes
        self._head_bytes += min(len(data), room)
        self._feed(data[:room])
        if self._refused is not None or not self._in_head:
            if self._refused is None and len(data) > room:
                self.data_received(data[room:])  # the rest belongs to the body (or the next request)
            return
        if len(data) > room:  # the head goes on past the limit: nothing more of it is read
            self._refuse(EdgeError(f"the request head is larger than {self.limits.max_header_bytes} bytes",
                                   status=431, code="headers_too_large"))

    def _feed(self, data: bytes) -> None:
        """uvicorn's data_received, but a refusal made in a parser callback stops the parsing quietly."""
        self._unset_keepalive_if_required()
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            if self._should_upgrade():
                self.handle_websocket_upgrade()
            else:
                self._unsupported_upgrade_warning()
        except httptools.HttpParserError:
            if self._refused is None:
                self.logger.warning("Invalid HTTP request received.")
                self.send_400_response("Invalid HTTP request received.")

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._message_done = False
        if not self._in_head:  # the next request on this connection
            self._head_begins()

    def on_url(self, url: bytes) -> None:
        super().on_url(url)
        if len(self.url) > self.limits.max_target_bytes:
            self._stop(EdgeError(f"the request target is longer than {self.limits.max_target_bytes} bytes",
                                 status=414, code="uri_too_long"))

    def on_header(self, name: bytes, value: bytes) -> None:
        self._header_lines += 1
        if self._header_lines > self.limits.max_headers:
            self._stop(EdgeError(f"the request has more than {self.limits.max_headers} header lines",
                                 status=431, code="too_many_headers"))
        super().on_header(name, value)

    def on_headers_complete(self) -> None:
        self._in_head = False
        self._after_head = self._body_bytes = self._chunks = 0
        self._arm(self.limits.body_timeout)
        super().on_headers_complete()

    # --- the body -----------------------------------------------------------------------------

    def on_body(self, body: bytes) -> None:
        self._arm(self.limits.body_timeout)
        self._body_bytes += len(body)
        super().on_body(body)

    def on_chunk_header(self) -> None:
        self._chunks += 1

    def on_message_complete(self) -> None:
        self._disarm()
        self._message_done = True
        super().on_message_complete()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self._message_done and not self.transport.is_closing():
            # The unread body is not waited for. A close with unread bytes would reset the
            # connection and could lose the answer, so: end our side, drop what still comes,
            # and close a second later.
            self._refused = EdgeError("the response was sent before the body arrived")
            self._disarm()
            if self.transport.can_write_eof():
                self.transport.write_eof()
            self.loop.call_later(1.0, self.transport.close)

    # --- timers and refusals ------------------------------------------------------------------

    def _arm(self, seconds: float) -> None:
        self._disarm()
        self._timer = self.loop.call_later(seconds, self._too_slow)

    def _disarm(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _too_slow(self) -> None:
        self._timer = None
        if self._in_head and (self.cycle is None or self.cycle.response_complete):
            what = "the request head" if self._head_bytes else "a request"
            self._refuse(EdgeError(f"{what} did not arrive within {self.limits.header_timeout:g} s",
                                   status=408, code="request_timeout"))
        elif self.flow.read_paused:  # the app is not reading (an import writing to disk): not the client's silence
            self._arm(self.limits.body_timeout)
        elif not self.transport.is_closing():  # a body gone silent: the app sees the client leave
            self.logger.info("closing a connection whose request body stalled for %g s", self.limits.body_timeout)
            self.transport.close()

    def _stop(self, error: EdgeError) -> None:
        """Refuse from inside a parser callback, and stop the parser (its error is then expected)."""
        self._refuse(error)
        raise _Refused

    def _refuse(self, error: EdgeError) -> None:
        self._refused = error
        self._disarm()
        if not self.transport.is_closing():
            if self.cycle is None or not self.cycle.response_started:  # else the app's answer is under way
                self.transport.write(refusal(error))
            self.transport.close()


class _Refused(Exception):
    """Raised in a parser callback to stop parsing a request already refused."""
