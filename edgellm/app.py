"""create_app(): the one place where the parts are built and wired together."""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

from starlette.applications import Starlette
from starlette.middleware import Middleware

from edgellm import __version__
from edgellm.config import Config, is_loopback
from edgellm.engine.pool import Pool
from edgellm.engine.prompt_cache import PromptCache
from edgellm.engine.service import GenerationService
from edgellm.hardware.plan import Planner
from edgellm.hardware.watch import ThermalWatch
from edgellm.metrics import Metrics
from edgellm.modelfile import gguf
from edgellm.serving import admin, bundles, console, hardware, health, metrics, ollama, openai, openapi, update
from edgellm.serving.auth import APIKeyAuth
from edgellm.serving.errors import HANDLERS
from edgellm.serving.policy import BoxNames, OriginPolicy
from edgellm.serving.relay import ServedBy
from edgellm.store.registry import Entry, ModelFile, Registry, describe, model_id_for
from edgellm.tls import Serving
from edgellm.units import parse_duration, parse_size


def command_line_model(config: Config) -> Entry:
    """The --model file as a model entry, served from where it is (not installed, not hashed)."""
    path = Path(config.model.path)
    parts = gguf.split_parts(path)
    files = [ModelFile(name=p.name, sha256="", size=p.stat().st_size) for p in parts]
    entry = describe(parts, model_id=config.model.id or model_id_for(path), source="command line", files=files)
    entry.chat_template = config.model.chat_template
    return entry


def create_app(config: Config, api_keys: frozenset[str] = frozenset(),
               admin_keys: frozenset[str] = frozenset(), *, hardware_root: str | Path = "/", port: int = 0,
               ollama_port: int = 0, certificate: Serving | None = None) -> Starlette:
    """`hardware_root`: where the hardware probe reads /proc, /sys, /dev and /etc (tests: a fixture).
    `port`: the port the API listens on, announced on the LAN (0: not announced); `ollama_port`:
    the second one, for Ollama's clients ([ollama] port; 0: none); `certificate`: what the API
    presents when it speaks TLS (its fingerprint is announced)."""
    stats = Metrics()
    plan = Planner(hardware_root, config.engine)  # made by the first load
    extra = [command_line_model(config)] if config.model.path else []
    engine = dataclasses.replace(config.engine, n_threads=plan.threads)
    registry = Registry(config.server.state_dir)
    prompt_cache = PromptCache(Path(config.server.state_dir) / "prompt-cache",
                               memory=parse_size(config.engine.prompt_cache_memory),
                               disk=parse_size(config.engine.prompt_cache_disk), metrics=stats)
    pool = Pool(engine, config.models, plan=plan, registry=registry, extra=extra, metrics=stats,
                prompt_cache=prompt_cache)
    service = GenerationService(pool, log_prompts=config.log.prompts,
                                shared_prompt_cache=config.engine.prompt_cache_shared)
    thermals = ThermalWatch(Path(hardware_root), stats, on_threads=pool.set_threads, threads=plan.threads,
                            throttle_threads=config.engine.throttle_threads)

    upstream = None
    if config.relay.url:
        from edgellm.relay.upstream import Upstream  # aiohttp: only for a box with an upstream

        upstream = Upstream(config.relay)

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        await pool.start()  # loads the --model file and the preload list in the background
        if upstream is not None:
            await upstream.start()
        watching = asyncio.create_task(thermals.run())
        announcer = None
        if config.discovery.enabled and port:
            from edgellm.discovery import Announcer, device_id  # zeroconf: only where discovery is on

            announcer = Announcer(name=config.discovery.name, port=port, host=config.server.host,
                                  interfaces=list(config.discovery.interfaces), key_required=bool(api_keys),
                                  device=device_id(config.server.state_dir),
                                  models=lambda: [m.id for m in service.models()], ollama_port=ollama_port,
                                  fingerprints=(lambda: (certificate.presented.fingerprint,
                                                         certificate.presented.next_fingerprint))
                                  if certificate else None)
            await announcer.start()
        yield
        if announcer is not None:
            await announcer.close()  # goodbye packets first: clients stop coming at once
        watching.cancel()
        if upstream is not None:
            await upstream.close()
        await pool.close()

    app = Starlette(
        routes=[*health.routes, *metrics.routes, *openai.routes, *ollama.routes, *admin.routes, *hardware.routes,
                *bundles.routes, *update.routes, *openapi.routes(__version__), *console.routes],
        middleware=[Middleware(ServedBy),
                    Middleware(OriginPolicy, names=BoxNames(config.server.allowed_hosts, config.discovery.name),
                               cors_origins=config.server.cors_origins),
                    Middleware(APIKeyAuth, keys=api_keys, admin_keys=admin_keys,
                               loopback=is_loopback(config.server.host), keyless=config.server.keyless_addresses)],
        exception_handlers=HANDLERS,
        lifespan=lifespan,
    )
    app.state.pool = pool  # for the lifespan and shutdown only: routes use the service
    app.state.service = service
    app.state.registry = registry
    app.state.upstream = upstream
    app.state.config = config
    app.state.thermals = thermals
    app.state.hardware = (hardware_root, config.engine)
    app.state.metrics = stats
    app.state.started = time.time()
    app.state.version = __version__
    app.state.ollama_port = ollama_port
    app.state.certificate = certificate
    app.state.max_body_bytes = config.server.max_body_bytes
    app.state.body_timeout = parse_duration(config.server.body_timeout) or 60.0
    return app
