"""create_app(): the one place where the parts are built and wired together."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

from starlette.applications import Starlette
from starlette.middleware import Middleware

from edgellm.config import Config, is_loopback
from edgellm.engine import gguf
from edgellm.engine.pool import Pool
from edgellm.metrics import Metrics
from edgellm.serving import admin, health, metrics, openai
from edgellm.serving.auth import APIKeyAuth
from edgellm.serving.errors import HANDLERS
from edgellm.store.registry import Entry, ModelFile, Registry, describe, model_id_for


def command_line_model(config: Config) -> Entry:
    """The --model file as a model entry, served from where it is (not installed, not hashed)."""
    path = Path(config.model.path)
    parts = gguf.split_parts(path)
    files = [ModelFile(name=p.name, sha256="", size=p.stat().st_size) for p in parts]
    return describe(parts, model_id=config.model.id or model_id_for(path), source="command line", files=files)


def create_app(config: Config, api_keys: frozenset[str] = frozenset(),
               admin_keys: frozenset[str] = frozenset()) -> Starlette:
    stats = Metrics()
    extra = [(command_line_model(config), config.model.chat_template)] if config.model.path else []
    pool = Pool(config.engine, config.models, registry=Registry(config.server.state_dir), extra=extra,
                metrics=stats)

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        await pool.start()  # loads the --model file and the preload list in the background
        yield
        await pool.close()

    app = Starlette(
        routes=[*health.routes, *metrics.routes, *openai.routes, *admin.routes],
        middleware=[Middleware(APIKeyAuth, keys=api_keys, admin_keys=admin_keys,
                               loopback=is_loopback(config.server.host))],
        exception_handlers=HANDLERS,
        lifespan=lifespan,
    )
    app.state.pool = pool
    app.state.metrics = stats
    app.state.max_body_bytes = config.server.max_body_bytes
    app.state.log_prompts = config.log.prompts
    return app
