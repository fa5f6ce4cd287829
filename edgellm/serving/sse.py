"""Streamed responses: server-sent events (token streams, bundle import progress) and Ollama's NDJSON.

Not Starlette's StreamingResponse: a token stream must end (and release its model)
however the response ends, and an upload's event stream must leave the request's
messages alone, because the upload's body is still being read from them.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable

from starlette.types import Receive, Scope, Send

from edgellm.serving.disconnect import until_disconnect

# The last two keep proxies (nginx and friends) from buffering.
HEADERS = [(b"content-type", b"text/event-stream; charset=utf-8"), (b"cache-control", b"no-cache"),
           (b"x-accel-buffering", b"no")]
NDJSON = [(b"content-type", b"application/x-ndjson"), (b"cache-control", b"no-cache"), (b"x-accel-buffering", b"no")]


class EventStream:
    """An ASGI response sending `events` as they come. `on_close` runs however it ends. With
    `watch_disconnect`, a client that goes away ends it at once; without, the request's
    messages are not read."""

    def __init__(self, events: AsyncIterator[bytes], *, on_close: Callable[[], None] | None = None,
                 watch_disconnect: bool = True, headers: list[tuple[bytes, bytes]] = HEADERS) -> None:
        self.events = events
        self.headers = headers
        self.on_close = on_close
        self.watch_disconnect = watch_disconnect

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await send({"type": "http.response.start", "status": 200, "headers": self.headers})
            if not self.watch_disconnect:
                await self._pump(send)
                return
            pump = asyncio.ensure_future(self._pump(send))
            watcher = asyncio.ensure_future(until_disconnect(receive))
            try:
                await asyncio.wait({pump, watcher}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                for task in (pump, watcher):
                    task.cancel()
                # Both are done before on_close runs; an error while streaming is raised, not lost.
                outcome, _ = await asyncio.gather(pump, watcher, return_exceptions=True)
            if isinstance(outcome, Exception):
                raise outcome
        finally:
            if self.on_close is not None:
                self.on_close()

    async def _pump(self, send: Send) -> None:
        async for chunk in self.events:
            await send({"type": "http.response.body", "body": chunk, "more_body": True})
        await send({"type": "http.response.body", "body": b"", "more_body": False})
