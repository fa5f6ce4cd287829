"""POST /admin/update: a signed software update uploaded as a tar stream, with progress as
server-sent events.

The service runs unprivileged and never installs code itself: it verifies the upload as it
arrives (signature, versions, this box's Python and CPU, every file's SHA-256) and stages it
in STATE_DIR/updates/pending; edgellm-update.service (root, started by a path unit) verifies it
again, installs it beside the running version and restarts the service on it, or rolls back.
Events: `progress` ({"file", "done", "total"}), then `done` ({"version", "staged", "message"})
or `error` (OpenAI's error shape). The query parameter `allow_downgrade=true` accepts an older
version. GET /health's `update` then tells how it went.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

from starlette.requests import Request
from starlette.routing import Route

from edgellm.serving.bundles import flag
from edgellm.serving.importing import upload_events
from edgellm.serving.sse import EventStream
from edgellm.serving.upload import Upload

if TYPE_CHECKING:
    from edgellm.progress import Progress
    from edgellm.update.bundle import Verified


async def upload(request: Request) -> EventStream:
    allow_downgrade = flag(request, "allow_downgrade")
    config = request.app.state.config
    body = Upload(asyncio.get_running_loop())

    def work(progress: Progress) -> tuple[str, Verified | None]:
        from edgellm.bundles.reader import StreamSource
        from edgellm.update.apply import running_here, stage

        running = running_here(config)
        source = StreamSource(body, "upload")
        try:
            return running, stage(source, config, running=running, allow_downgrade=allow_downgrade,
                                  progress=progress)
        finally:
            source.close()

    async def finish(result: tuple[str, Verified | None]) -> dict[str, object]:
        running, verified = result
        if verified is None:
            return {"version": running, "staged": False,
                    "message": f"edgellm {running} runs here already: nothing to do"}
        new = verified.manifest.edgellm_version
        return {"version": new, "staged": True,
                "message": f"edgellm {new} is staged: edgellm-update.service installs it and restarts the service on "
                           "it (this connection then ends); GET /health shows the outcome"}

    return EventStream(upload_events(request, body, work, finish), watch_disconnect=False)


routes = [Route("/admin/update", upload, methods=["POST"])]
