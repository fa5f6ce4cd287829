"""The bridge from the scheduler thread to the event loop.

The scheduler thread must never block on a slow client, and the event loop
must never block on llama.cpp. Each item the thread produces is handed to the
loop with call_soon_threadsafe onto an asyncio queue; the request handler
iterates the Stream. cancel() is a flag the thread checks before each decode.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

_END = object()


@dataclass(frozen=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


@dataclass(frozen=True)
class Piece:
    """Text for the client; the last piece of a stream carries finish_reason and usage."""

    text: str
    finish_reason: str | None = None
    usage: Usage | None = None


class EngineError(Exception):
    """Generation failed inside llama.cpp; the request ends, the service goes on."""


class ShuttingDown(EngineError):
    """The engine is stopping and takes no more work."""


class Stream:
    """Async iterator over the pieces of one generation."""

    def __init__(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._queue: asyncio.Queue = asyncio.Queue()
        self._ended = False
        self.cancelled = False

    def cancel(self) -> None:
        """Ask the scheduler to stop this generation before its next decode step."""
        self.cancelled = True

    # Called from the scheduler thread.
    def put(self, item: Piece | BaseException) -> None:
        try:
            self._loop.call_soon_threadsafe(self._queue.put_nowait, item)
        except RuntimeError:  # the loop is closed: nobody is listening any more
            self.cancelled = True

    def end(self) -> None:
        self.put(_END)  # type: ignore[arg-type]

    # Called on the event loop.
    def __aiter__(self) -> Stream:
        return self

    async def __anext__(self) -> Piece:
        if self._ended:
            raise StopAsyncIteration
        item = await self._queue.get()
        if item is _END:
            self._ended = True
            raise StopAsyncIteration
        if isinstance(item, BaseException):
            self._ended = True
            raise item
        return item
