"""A request body read as a blocking file by a worker thread (an importer, the store), while the
event loop fills it: a multi-GiB upload never sits in memory."""

from __future__ import annotations

import asyncio
import time

from starlette.requests import ClientDisconnect, Request

IDLE_TIMEOUT = 60.0  # seconds without a byte of the upload: it is treated as cut off


class Upload:
    """The request body as a blocking file for the importer's thread; the event loop fills it."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.chunks: asyncio.Queue[bytes] = asyncio.Queue(maxsize=16)
        self.buffer = bytearray()
        self.closed = False  # no more chunks will come (the body ended, or the response did)
        self.ended = False  # and the reader has taken them all

    async def _get(self) -> bytes | None:
        idle_since = time.monotonic()
        while not (self.closed and self.chunks.empty()):
            try:
                return await asyncio.wait_for(self.chunks.get(), 0.5)
            except TimeoutError:  # look at `closed` again; a stalled upload ends like a cut one
                if time.monotonic() - idle_since > IDLE_TIMEOUT:
                    self.closed = True
        return None

    def read(self, n: int = -1) -> bytes:
        while not self.ended and (n < 0 or len(self.buffer) < n):
            chunk = asyncio.run_coroutine_threadsafe(self._get(), self.loop).result()
            if chunk is None:
                self.ended = True
            else:
                self.buffer += chunk
        n = len(self.buffer) if n < 0 else n
        data = bytes(self.buffer[:n])
        del self.buffer[:n]
        return data

    async def pump(self, request: Request) -> None:
        try:
            async for chunk in request.stream():
                if chunk:
                    await self.chunks.put(chunk)
        except ClientDisconnect:
            pass
        finally:
            self.closed = True  # the importer then sees where the upload ended
