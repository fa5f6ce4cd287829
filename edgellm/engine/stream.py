"""The bridge from a runner thread to the event loop, and the events that cross it.

The runner thread must never block on a slow client, and the event loop must
never block on llama.cpp. What the thread produces during one scheduler step
goes into an Outbox, which hands it to the event loop in a single
call_soon_threadsafe per loop; each request iterates its Stream. cancel() is a
flag the scheduler checks before each step.

A generation's events are Text pieces and, last, one Finish; a failure ends the
stream by raising an EdgeError from the iteration. Text pieces that are already
waiting when the reader comes for the next event arrive as one: a reader that
falls behind (many streams, a slow client) catches up with one response write
instead of one per token, and a reader that keeps up sees every token at once.
"""

from __future__ import annotations

import asyncio
from collections import defaultdict, deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import cast

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
class Text:
    """Generated text, whole characters only, that no stop string can take back."""

    text: str


@dataclass(frozen=True)
class Finish:
    """The end of a generation: why it stopped ("stop" or "length") and the token counts."""

    reason: str
    usage: Usage


Event = Text | Finish


class Stream:
    """Async iterator over the events of one generation."""

    def __init__(self) -> None:
        self.loop = asyncio.get_running_loop()
        self._items: deque[object] = deque()
        self._waiter: asyncio.Future[None] | None = None  # the reader, waiting for an item
        self._ended = False  # the reader has seen the end
        self._finished: list[Callable[[], None]] | None = []  # None once the runner is done with it
        self.cancelled = False

    def cancel(self) -> None:
        """Ask the scheduler to stop this generation before its next step."""
        self.cancelled = True

    def when_finished(self, callback: Callable[[], None]) -> None:
        """Call `callback` on the event loop once the runner has let go of this generation for good."""
        if self._finished is None:
            callback()
        else:
            self._finished.append(callback)

    def _put(self, item: object) -> None:
        if item is _END and self._finished is not None:
            callbacks, self._finished = self._finished, None
            for callback in callbacks:
                callback()
        self._items.append(item)
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    def __aiter__(self) -> Stream:
        return self

    async def __anext__(self) -> Event:
        if self._ended:
            raise StopAsyncIteration
        items = self._items
        while not items:
            self._waiter = self.loop.create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        item = items.popleft()
        if isinstance(item, Text) and items and isinstance(items[0], Text):
            parts = [item.text]
            while items and isinstance(items[0], Text):
                parts.append(cast(Text, items.popleft()).text)
            return Text("".join(parts))
        if item is _END:
            self._ended = True
            raise StopAsyncIteration
        if isinstance(item, BaseException):
            self._ended = True
            raise item
        return cast(Event, item)


class Outbox:
    """What a runner thread produced for the event loop since the last flush."""

    def __init__(self) -> None:
        self._items: list[tuple[Stream, object]] = []

    def put(self, stream: Stream, item: Event | BaseException) -> None:
        self._items.append((stream, item))

    def end(self, stream: Stream) -> None:
        """The runner is done with `stream`: nothing more comes, and what it lent may be freed."""
        self._items.append((stream, _END))

    def flush(self) -> None:
        """Hand everything over: one wake-up of each event loop, however many streams."""
        if not self._items:
            return
        items, self._items = self._items, []
        loop = items[0][0].loop
        if all(stream.loop is loop for stream, _ in items):  # the usual case: one event loop
            self._send(loop, items)
            return
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[Stream, object]]] = defaultdict(list)
        for stream, item in items:
            by_loop[stream.loop].append((stream, item))
        for loop, some in by_loop.items():
            self._send(loop, some)

    @staticmethod
    def _send(loop: asyncio.AbstractEventLoop, items: list[tuple[Stream, object]]) -> None:
        try:
            loop.call_soon_threadsafe(_deliver, items)
        except RuntimeError:  # the loop is closed: nobody is listening any more
            for stream, _ in items:
                stream.cancelled = True


def _deliver(items: list[tuple[Stream, object]]) -> None:
    for stream, item in items:
        stream._put(item)
