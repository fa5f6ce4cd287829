"""Cached prompts never cross between API keys: neither a slot's cells nor a prompt snapshot of
one key is reused for another, so `cached_tokens` (and the time to the first token) tell a key
nothing about what another key asked.

The audit's attack: key A sends a prompt; key B sends guesses and reads how many tokens were
cached ("...the mat no": 9, "...the dog": 4), recovering A's prompt token by token. Keys that
trust each other (one user's phone and laptop) share when [engine] prompt_cache_shared is set.
"""

from __future__ import annotations

import json

import openai
import pytest
from conftest import wait_until

KEYS = ("key-of-alice-0123456789", "key-of-bob-0123456789ab", "key-of-carol-0123456789", "key-of-dave-01234567890")
SECRET = "Hello world the cat sat on the mat yes"
PREFIX = "Once upon a time the cat sat on the mat and said hello world. " * 30  # past the snapshot minimum


def _server(server_factory, models, shared: bool = False, parallel: int = 4):
    config = (f"[server]\napi_keys = {json.dumps(KEYS)}\n"
              f"[engine]\nparallel = {parallel}\nprompt_cache_shared = {'true' if shared else 'false'}\n")
    return server_factory(models["random"], api_key=KEYS[0], config=config)


def _cached(server, key: str, prompt: str) -> int:
    with openai.OpenAI(base_url=server.base_url, api_key=key, max_retries=0) as client:
        reply = client.completions.create(model="random", prompt=prompt, max_tokens=1, temperature=0)
    return reply.usage.prompt_tokens_details.cached_tokens


@pytest.mark.parametrize("parallel", [1, 4])
def test_another_keys_guesses_get_nothing_from_the_cache(server_factory, models, parallel):
    server = _server(server_factory, models, parallel=parallel)
    assert _cached(server, KEYS[0], SECRET) == 0
    for key, guess in zip(KEYS[1:], (SECRET[:-3] + "no", "Hello world the dog", SECRET), strict=True):
        assert _cached(server, key, guess) == 0, guess  # each key's first request
    # A key's own prompts are cached for it: the keys just do not mix.
    assert _cached(server, KEYS[3], SECRET + " again") > 5


def test_a_snapshot_serves_only_the_key_it_came_from(server_factory, models):
    server = _server(server_factory, models)
    _cached(server, KEYS[0], PREFIX + "tick")
    assert _cached(server, KEYS[0], PREFIX + "tock") > 300  # reused: saved as a snapshot of Alice's
    assert server.post("/admin/models/random/unload").status_code == 200
    wait_until(lambda: server.get("/admin/models").json()["data"][0]["state"] == "unloaded", 10,
               message="the model to unload")
    assert _cached(server, KEYS[1], PREFIX + "tick") == 0  # Bob's first: no snapshot of his
    assert _cached(server, KEYS[0], PREFIX + "tick") > 300  # Alice's is restored for her


def test_keys_configured_to_share_reuse_each_others_prompts(server_factory, models):
    server = _server(server_factory, models, shared=True)
    _cached(server, KEYS[0], SECRET)
    assert _cached(server, KEYS[1], SECRET + " too") > 5
