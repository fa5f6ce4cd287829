"""A bundle import run for a route (an upload, Ollama's pull): in a worker thread, with its
progress handed to the event loop a few times a second, and every failure an EdgeError."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TYPE_CHECKING, Generic, TypeVar

from starlette.requests import Request

from edgellm.errors import EdgeError
from edgellm.protocol import sse
from edgellm.protocol.openai import error_body
from edgellm.serving.upload import Upload

if TYPE_CHECKING:
    from edgellm.progress import Progress

log = logging.getLogger("edgellm.bundles")
EVERY = 0.2  # seconds between progress reports of one file: a few a second are plenty
T = TypeVar("T")


class ImportJob(Generic[T]):
    def __init__(self, work: Callable[[Progress], T]) -> None:
        """Start `work` in a worker thread; it gets the callback to report its progress to."""
        loop = asyncio.get_running_loop()
        self._reports: asyncio.Queue[tuple[str, int, int]] = asyncio.Queue()
        last = 0.0

        def report(stage: str, file: str, done: int, total: int) -> None:
            nonlocal last
            now = time.monotonic()
            if done >= total or now - last >= EVERY:
                last = now
                loop.call_soon_threadsafe(self._reports.put_nowait, (file, done, total))

        self._job = asyncio.ensure_future(asyncio.to_thread(work, report))

    async def progress(self) -> AsyncIterator[tuple[str, int, int]]:
        """(file, bytes done, bytes in all), as they come, until the work has ended."""
        while not self._job.done() or not self._reports.empty():
            getter = asyncio.ensure_future(self._reports.get())
            await asyncio.wait({getter, self._job}, return_when=asyncio.FIRST_COMPLETED)
            if getter.done():
                yield getter.result()
            else:
                getter.cancel()

    def outcomes(self) -> T:
        """What the ended work installed; an EdgeError when it failed, whatever the failure."""
        try:
            return self._job.result()
        except EdgeError:  # a refused bundle (bundle_refused, bad_signature, ...), a busy store
            raise
        except OSError as e:  # the box's own disk: full, read-only, gone
            raise EdgeError(f"the import failed: {e}", code="import_failed") from None
        except Exception:
            log.exception("an import failed")
            raise EdgeError("internal error while importing (see the log)") from None

    async def ended(self) -> None:
        await asyncio.wait({self._job})


async def upload_events(request: Request, body: Upload, work: Callable[[Progress], T],
                        finish: Callable[[T], Awaitable[dict[str, object]]]) -> AsyncIterator[bytes]:
    """The server-sent events of an upload that `work` reads in a worker thread: `progress`
    ({"file", "done", "total"}), then `done` (what `finish` makes of the result) or `error`."""
    pump = asyncio.create_task(body.pump(request))
    job = ImportJob(work)
    try:
        async for name, done, total in job.progress():
            yield sse.event({"file": name, "done": done, "total": total}, "progress")
        try:
            result = job.outcomes()
        except EdgeError as e:
            yield sse.event(error_body(e), "error")
            return
        yield sse.event(await finish(result), "done")
    finally:
        pump.cancel()  # and so the work sees the end, if the client went away mid-upload
        await job.ended()
