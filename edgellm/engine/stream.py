"""The bridge from the scheduler thread to the event loop.

The scheduler thread must never block on a slow client, and the event loop
must never block on llama.cpp. What the thread produces during one scheduler
step goes into an Outbox, which hands it to the event loop in a single
call_soon_threadsafe per loop; each request handler iterates its Stream.
cancel() is a flag the scheduler checks before each step.
"""

from __future__ import annotations

import asyncio
from collections import defaultdict
from dataclasses import dataclass

_END = object()


@dataclass(frozen=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int = 0  # prompt tokens whose KV was reused instead of computed

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


class QueueFull(Exception):
    """Too many requests are waiting; retry_after estimates when one will fit, in seconds."""

    def __init__(self, waiting: int, retry_after: int) -> None:
        super().__init__(f"the server is busy: {waiting} requests are already waiting; retry in {retry_after} s")
        self.retry_after = retry_after


class Stream:
    """Async iterator over the pieces of one generation."""

    def __init__(self) -> None:
        self.loop = asyncio.get_running_loop()
        self._queue: asyncio.Queue = asyncio.Queue()
        self._ended = False
        self.cancelled = False

    def cancel(self) -> None:
        """Ask the scheduler to stop this generation before its next step."""
        self.cancelled = True

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


class Outbox:
    """What the scheduler thread produced for the event loop since the last flush."""

    def __init__(self) -> None:
        self._items: list[tuple[Stream, object]] = []

    def put(self, stream: Stream, item: Piece | BaseException) -> None:
        self._items.append((stream, item))

    def end(self, stream: Stream) -> None:
        self._items.append((stream, _END))

    def flush(self) -> None:
        """Hand everything over: one wake-up of each event loop, however many streams."""
        if not self._items:
            return
        by_loop: dict[asyncio.AbstractEventLoop, list] = defaultdict(list)
        for stream, item in self._items:
            by_loop[stream.loop].append((stream, item))
        self._items = []
        for loop, items in by_loop.items():
            try:
                loop.call_soon_threadsafe(_deliver, items)
            except RuntimeError:  # the loop is closed: nobody is listening any more
                for stream, _ in items:
                    stream.cancelled = True


def _deliver(items: list[tuple[Stream, object]]) -> None:
    for stream, item in items:
        stream._queue.put_nowait(item)
