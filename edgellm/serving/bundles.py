"""POST /admin/bundles: import a bundle uploaded as a tar stream, with progress as server-sent events.

The upload is read as it arrives and fed to the same importer the CLI uses
(in a worker thread), so a multi-GiB bundle never sits in memory and gets the
same checks. Events: `progress` ({"file", "done", "total"}), then `done`
({"models": [{"id", "status"}], "warnings": [...]}) or `error` (OpenAI's error shape).
The query parameter `allow_downgrade=true` lets the bundle replace models
installed from newer bundles (`edgellm bundle import --allow-downgrade`);
warnings name the trusted-keys files that were skipped.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING

from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from edgellm.errors import InvalidRequest
from edgellm.serving.importing import upload_events
from edgellm.serving.sse import EventStream
from edgellm.serving.upload import Upload

if TYPE_CHECKING:
    from edgellm.bundles.importer import Outcome
    from edgellm.progress import Progress


log = logging.getLogger("edgellm.bundles")


def flag(request: Request, name: str) -> bool:
    value = request.query_params.get(name, "false").lower()
    if value not in ("true", "1", "false", "0"):
        raise InvalidRequest(f"{name} must be true or false, got {value!r}", param=name)
    return value in ("true", "1")


async def upload(request: Request) -> EventStream:
    allow_downgrade = flag(request, "allow_downgrade")
    config = request.app.state.config
    registry = request.app.state.registry
    body = Upload(asyncio.get_running_loop())
    warnings: list[str] = []

    def work(progress: Progress) -> list[Outcome]:
        # The importer (signatures: cryptography; tarfile) is imported by the first upload, not at start.
        from edgellm.bundles.importer import Policy, import_bundle
        from edgellm.bundles.reader import StreamSource

        policy = Policy.from_config(config)
        for warning in policy.skipped:
            log.warning("%s", warning)
        warnings.extend(policy.skipped)
        source = StreamSource(body, "upload")
        try:
            return import_bundle(source, registry, policy, engine=config.engine, memory_limit=config.memory_limit,
                                 progress=progress, allow_downgrade=allow_downgrade)
        finally:
            source.close()

    async def finish(outcomes: list[Outcome]) -> dict[str, object]:
        await request.app.state.service.refresh()  # served at once, not within the next second
        return {"models": [{"id": o.model, "status": o.status} for o in outcomes], "warnings": warnings}

    return EventStream(upload_events(request, body, work, finish), watch_disconnect=False)


async def imports(request: Request) -> JSONResponse:
    """The last imports, from sticks and uploads, newest first (bundles/history.py)."""
    from edgellm.bundles import history

    state_dir = request.app.state.registry.root.parent
    return JSONResponse({"object": "list", "data": await asyncio.to_thread(history.read, state_dir)})


routes = [Route("/admin/bundles", upload, methods=["POST"]), Route("/admin/imports", imports, methods=["GET"])]
