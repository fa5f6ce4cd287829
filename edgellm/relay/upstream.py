"""One upstream OpenAI-compatible service (vLLM in a datacenter), reached with aiohttp.

aiohttp rather than httpx, by measurement: on this machine it used about half
the CPU per streamed response and far less per short request, and on a Pi that
CPU would be taken from inference. One session, kept-alive connections.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import time
from pathlib import Path

import aiohttp

from edgellm.config import ConfigError, RelayConfig
from edgellm.errors import EdgeError
from edgellm.relay.breaker import Breaker
from edgellm.units import parse_duration

log = logging.getLogger("edgellm.relay")

RETRY_AFTER_LIMIT = 5.0  # seconds: a longer Retry-After goes back to the client instead
MAX_SMALL_BODY = 1 << 20  # bytes of a listing, a metrics page or an error body read from the upstream


async def read_small(response: aiohttp.ClientResponse) -> bytes:
    """The body, or its first MAX_SMALL_BODY bytes: a hostile upstream's may be any size.
    (aiohttp's read(n) gives what has arrived so far, up to n: a body in pieces needs a loop.)"""
    parts: list[bytes] = []
    size = 0
    while size < MAX_SMALL_BODY:
        part = await response.content.read(MAX_SMALL_BODY - size)
        if not part:
            break
        parts.append(part)
        size += len(part)
    return b"".join(parts)
_METRIC_RE = re.compile(rb"^(vllm:num_requests_waiting|vllm:kv_cache_usage_perc|vllm:gpu_cache_usage_perc)"
                        rb"(?:\{[^}]*\})? ([0-9.eE+-]+)", re.M)


class UpstreamError(EdgeError):
    """The upstream could not be reached, did not answer in time, or answered with an error."""

    status = 502
    code = "upstream_error"


class Upstream:
    def __init__(self, config: RelayConfig) -> None:
        self.config = config
        self.base = config.url.rstrip("/")
        self.root = self.base.removesuffix("/v1")  # /health and /metrics live beside /v1
        self.key = _read_key(config)
        self.models: set[str] = set(config.models)
        self.breaker = Breaker(config.breaker_failures, parse_duration(config.breaker_cooldown) or 0.0)
        self.waiting: float | None = None  # vllm:num_requests_waiting
        self.kv_usage: float | None = None  # vllm:kv_cache_usage_perc, 0..1
        self.session: aiohttp.ClientSession | None = None
        self._task: asyncio.Task | None = None
        timeouts = [parse_duration(t) for t in (config.connect_timeout, config.first_byte_timeout,
                                                  config.idle_timeout)]
        self.connect_timeout, self.first_byte_timeout, self.idle_timeout = timeouts
        self.ttft_budget = parse_duration(config.ttft_budget) or 0.0

    async def start(self) -> None:
        self.session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=256, keepalive_timeout=30),
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=self.connect_timeout,
                                          sock_read=self.idle_timeout),
            headers={"Authorization": f"Bearer {self.key}"} if self.key else {}, auto_decompress=False)
        await self._refresh()
        self._task = asyncio.create_task(self._keep_up())

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
        if self.session is not None:
            await self.session.close()

    def has(self, model: str | None) -> bool:
        return model is not None and model in self.models

    @property
    def usable(self) -> bool:
        """Closed circuit (or due for a probe); for overflow also not saturated."""
        return self.breaker.state != "open"

    @property
    def saturated(self) -> bool:
        return (self.waiting is not None and self.waiting >= self.config.max_waiting) or \
            (self.kv_usage is not None and self.kv_usage >= 0.95)

    async def _keep_up(self) -> None:
        every = parse_duration(self.config.refresh) or 60.0
        while True:
            await asyncio.sleep(min(every, 5.0) if self.config.load_metrics or self.breaker.state != "closed"
                                else every)
            try:
                await self._refresh()
            except Exception:
                log.exception("refreshing the upstream's state failed")

    async def _refresh(self) -> None:
        """The upstream's models (unless configured), its load, and a probe when the circuit is half-open."""
        assert self.session is not None, "start() opens the session"
        if self.breaker.state == "half-open":
            try:
                async with self.session.get(self.root + "/health", timeout=aiohttp.ClientTimeout(total=5),
                                            allow_redirects=False) as r:
                    ok = r.status == 200
            except (aiohttp.ClientError, TimeoutError):
                ok = False
            if ok:
                log.info("upstream %s is back: circuit closed", self.root)
                self.breaker.success()
            else:
                self.breaker.failure()
                return
        if not self.config.models:
            try:
                async with self.session.get(self.base + "/models", timeout=aiohttp.ClientTimeout(total=10),
                                            allow_redirects=False) as r:
                    if r.status == 200:
                        data = json.loads(await read_small(r))
                        self.models = {m["id"] for m in data.get("data", []) if isinstance(m.get("id"), str)}
            except (aiohttp.ClientError, TimeoutError, ValueError, KeyError, TypeError, AttributeError,
                    RecursionError) as e:
                log.warning("cannot list the upstream's models: %s", e or type(e).__name__)
        if self.config.load_metrics:
            try:
                async with self.session.get(self.root + "/metrics", timeout=aiohttp.ClientTimeout(total=5),
                                            allow_redirects=False) as r:
                    text = await read_small(r)
                values = {name: float(v) for name, v in _METRIC_RE.findall(text)}
                self.waiting = values.get(b"vllm:num_requests_waiting")
                self.kv_usage = values.get(b"vllm:kv_cache_usage_perc", values.get(b"vllm:gpu_cache_usage_perc"))
            except (aiohttp.ClientError, TimeoutError, ValueError):
                self.waiting = self.kv_usage = None

    async def send(self, path: str, body: bytes) -> aiohttp.ClientResponse:
        """POST to the upstream; returns once its response headers are in (the first byte).
        At most one retry, only before the first byte, honouring a short Retry-After."""
        assert self.session is not None, "start() opens the session"
        for attempt in (1, 2):
            started = time.monotonic()
            try:
                response = await asyncio.wait_for(
                    self.session.post(self.base + path, data=body, headers={"Content-Type": "application/json"},
                                      allow_redirects=False),
                    self.first_byte_timeout)
            except TimeoutError:
                self.breaker.failure()
                raise UpstreamError(f"the upstream did not answer within {self.first_byte_timeout:g} s",
                                    status=504) from None
            except aiohttp.ClientError as e:
                if attempt == 1 and time.monotonic() - started < (self.connect_timeout or 3):
                    continue  # a dropped kept-alive connection: once more, on a fresh one
                self.breaker.failure()  # one request, one failure, retried or not
                raise UpstreamError(f"the upstream cannot be reached ({e or type(e).__name__})") from None
            if 300 <= response.status < 400:  # the prompt is not sent on to wherever it points
                location = response.headers.get("Location", "nowhere")
                response.release()
                self.breaker.failure()
                raise UpstreamError(f"the upstream answered {response.status}, a redirect to {location[:200]}; "
                                    "edgellm does not follow redirects: set [relay] url to where it points",
                                    code="upstream_redirect")
            if response.status in (429, 502, 503, 504):
                retry_after = _seconds(response.headers.get("Retry-After"))
                if attempt == 1 and (retry_after or 0) <= RETRY_AFTER_LIMIT:
                    response.release()
                    await asyncio.sleep(retry_after or 0)
                    continue
                if response.status != 429:
                    self.breaker.failure()
                return response
            if response.status >= 500:
                self.breaker.failure()
            else:
                if self.breaker.state != "closed":
                    log.info("upstream %s answered again: circuit closed", self.root)
                self.breaker.success()
            return response
        raise AssertionError("unreachable")


def _seconds(value: str | None) -> float | None:
    try:
        return max(0.0, float(value)) if value else None
    except ValueError:
        return None


def _read_key(config: RelayConfig) -> str:
    """The upstream's API key, from a file or the environment; never logged."""
    if config.api_key_file:
        try:
            return Path(config.api_key_file).read_text().strip()
        except OSError as e:
            raise ConfigError(f"[relay] api_key_file {config.api_key_file}: {e.strerror}") from None
    if config.api_key_env:
        key = os.environ.get(config.api_key_env)
        if not key:
            raise ConfigError(f"[relay] api_key_env: the environment variable {config.api_key_env} is not set")
        return key
    return ""
