"""create_app(): the one place where the parts are built and wired together."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from starlette.applications import Starlette
from starlette.middleware import Middleware

from edgellm.config import Config
from edgellm.engine.pool import Pool
from edgellm.metrics import Metrics
from edgellm.serving import health, metrics, openai
from edgellm.serving.auth import APIKeyAuth
from edgellm.serving.errors import HANDLERS


def create_app(config: Config, api_keys: frozenset[str] = frozenset()) -> Starlette:
    stats = Metrics()
    pool = Pool(config.model.path, config.model.id, config.engine, config.model.chat_template, stats)

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        pool.start()  # loads in the background: /health says 503 until it is ready
        yield
        await pool.close()

    app = Starlette(
        routes=[*health.routes, *metrics.routes, *openai.routes],
        middleware=[Middleware(APIKeyAuth, keys=api_keys)],
        exception_handlers=HANDLERS,
        lifespan=lifespan,
    )
    app.state.pool = pool
    app.state.metrics = stats
    app.state.max_body_bytes = config.server.max_body_bytes
    app.state.log_prompts = config.log.prompts
    return app
