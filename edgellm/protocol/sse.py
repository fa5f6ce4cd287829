"""Server-sent events, as bytes: token streams, bundle import progress, and the relay's own
error event all frame their events here."""

from __future__ import annotations

import json

DONE = b"data: [DONE]\n\n"  # OpenAI's end of a token stream
KEEPALIVE = b": keep-alive\n\n"  # a comment: clients skip it, proxies see the connection is alive


def event(data: object, name: str | None = None) -> bytes:
    """One event: `data` as compact JSON, with an `event:` line when named."""
    head = f"event: {name}\n".encode() if name else b""
    return head + b"data: " + json.dumps(data, ensure_ascii=False, separators=(",", ":")).encode() + b"\n\n"
