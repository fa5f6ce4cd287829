"""Response bodies and server-sent events of the OpenAI API."""

from __future__ import annotations

import base64
import json
import struct
import time
import uuid
from dataclasses import dataclass, field

from edgellm.engine.stream import Usage

SSE_DONE = b"data: [DONE]\n\n"


def sse(data: dict) -> bytes:
    return b"data: " + json.dumps(data, ensure_ascii=False, separators=(",", ":")).encode() + b"\n\n"


def usage_body(usage: Usage) -> dict:
    return {
        "prompt_tokens": usage.prompt_tokens,
        "completion_tokens": usage.completion_tokens,
        "total_tokens": usage.total_tokens,
        "prompt_tokens_details": {"cached_tokens": usage.cached_tokens},
    }


@dataclass
class Reply:
    """The identity every body and chunk of one response shares."""

    model: str
    chat: bool
    id: str = ""
    created: int = field(default_factory=lambda: int(time.time()))

    def __post_init__(self) -> None:
        self.id = self.id or ("chatcmpl-" if self.chat else "cmpl-") + uuid.uuid4().hex[:24]
        # Every text chunk is the same JSON but for the text: render that part per token only.
        marker = "\u0000text\u0000"
        head, tail = sse(self.chunk(marker)).split(json.dumps(marker).encode())
        self._text_head, self._text_tail = head, tail

    def text_event(self, text: str) -> bytes:
        """sse(self.chunk(text)), without building and encoding the whole chunk each token."""
        return self._text_head + json.dumps(text, ensure_ascii=False).encode() + self._text_tail

    def _base(self, obj: str) -> dict:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model}

    def body(self, text: str, finish_reason: str, usage: Usage) -> dict:
        """The whole response of a non-streamed request."""
        if self.chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": text},
                      "logprobs": None, "finish_reason": finish_reason}
            body = self._base("chat.completion")
        else:
            choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}
            body = self._base("text_completion")
        body["choices"] = [choice]
        body["usage"] = usage_body(usage)
        return body

    def chunk(self, text: str | None, finish_reason: str | None = None, *, first: bool = False) -> dict:
        """One streamed chunk; `first` adds the assistant role to a chat delta."""
        if self.chat:
            delta: dict = {"role": "assistant"} if first else {}
            if text is not None:
                delta["content"] = text
            choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
            body = self._base("chat.completion.chunk")
        else:
            choice = {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish_reason}
            body = self._base("text_completion")
        body["choices"] = [choice]
        return body

    def usage_chunk(self, usage: Usage) -> dict:
        """The extra last chunk stream_options.include_usage asks for: no choices, just usage."""
        body = self._base("chat.completion.chunk" if self.chat else "text_completion")
        body["choices"] = []
        body["usage"] = usage_body(usage)
        return body


def model_object(model_id: str, created: int) -> dict:
    return {"id": model_id, "object": "model", "created": created, "owned_by": "edgellm"}


def embeddings_body(model: str, vectors: list[list[float]], encoding_format: str, prompt_tokens: int) -> dict:
    def encode(vector: list[float]):
        if encoding_format == "base64":
            return base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode()
        return vector

    return {
        "object": "list",
        "data": [{"object": "embedding", "index": i, "embedding": encode(v)} for i, v in enumerate(vectors)],
        "model": model,
        "usage": {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens},
    }
