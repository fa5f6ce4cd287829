"""Response shapes that the hot path renders by template must equal the general ones."""

from __future__ import annotations

import json

import pytest

from edgellm.protocol.openai import Reply
from edgellm.protocol.sse import event as sse


@pytest.mark.parametrize("chat", [True, False])
@pytest.mark.parametrize("text", ["hi", 'a "quote" and a \\ backslash', "€ 漢字 \U0001F600", "\n\t\x01", ""])
def test_text_event_equals_the_full_chunk(chat, text):
    reply = Reply(model='a "model"', chat=chat)
    event = reply.text_event(text)
    assert event == sse(reply.chunk(text))
    body = json.loads(event.removeprefix(b"data: "))
    assert (body["choices"][0]["delta"]["content"] if chat else body["choices"][0]["text"]) == text
