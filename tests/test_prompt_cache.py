"""Keeping computed prompts: slot choice that does not throw a long cached prefix away, and prompt
snapshots that survive an unload and a restart, verified before llama.cpp ever sees them."""

from __future__ import annotations

import ctypes
import random
from pathlib import Path

import httpx
import openai
import pytest
from conftest import metric, wait_until
from test_cli import edgellm

from edgellm.engine.prompt_cache import MIN_TOKENS, Layout, PromptCache, common_prefix

LAYOUT = Layout("a" * 64, "type_k=f16 type_v=f16")
OTHER = Layout("b" * 64, "type_k=f16 type_v=f16")


def state(size: int, seed: int) -> ctypes.Array[ctypes.c_uint8]:
    data = (ctypes.c_uint8 * size)()
    data[:] = random.Random(seed).randbytes(size)
    return data


def tokens(n: int, start: int = 0) -> list[int]:
    return list(range(start, start + n))


# --- the cache itself ---------------------------------------------------------------------------


def test_common_prefix_agrees_with_a_plain_loop():
    rng = random.Random(3)
    for _ in range(300):
        a = [rng.randrange(3) for _ in range(rng.randrange(40))]
        b = a[:rng.randrange(len(a) + 1)] + [rng.randrange(3) for _ in range(rng.randrange(10))]
        n = 0
        while n < min(len(a), len(b)) and a[n] == b[n]:
            n += 1
        assert common_prefix(a, b) == common_prefix(b, a) == n


def test_the_longest_shared_prefix_is_found_and_short_ones_are_not_kept(tmp_path):
    view = PromptCache(None, memory=1 << 20, disk=0).view(LAYOUT)
    view.add(tokens(200), state(1000, 1))
    view.add(tokens(300, 1000), state(1000, 2))
    prompt = tokens(150) + [7, 7, 7]
    found = view.find(prompt)
    assert found is not None and found[0] == tokens(200) and bytes(found[1]) == bytes(state(1000, 1))
    assert view.find(tokens(MIN_TOKENS - 1) + [9999]) is None  # too short a match to be worth a restore
    assert view.covered(tokens(250)) == 200
    # A longer prefix of the same tokens replaces the shorter one (restoring and cutting it gives the same).
    view.add(tokens(400), state(1000, 3))
    assert view.find(tokens(199))[0] == tokens(400)
    assert PromptCache(None, memory=1 << 20, disk=0).view(OTHER).find(tokens(200)) is None


def test_ram_keeps_the_most_recently_used_within_its_limit():
    view = PromptCache(None, memory=2500, disk=0).view(LAYOUT)
    view.add(tokens(200, 0), state(1000, 1))
    view.add(tokens(200, 1000), state(1000, 2))
    assert view.find(tokens(200, 0)) is not None  # now the most recently used
    view.add(tokens(200, 2000), state(1000, 3))  # over the limit: the least recently used goes
    assert view.find(tokens(200, 1000)) is None
    assert view.find(tokens(200, 0)) is not None and view.find(tokens(200, 2000)) is not None
    assert not view.accepts(2501) and view.accepts(2500)


def test_snapshots_persist_and_a_new_process_finds_them(tmp_path):
    cache = PromptCache(tmp_path, memory=1 << 20, disk=1 << 20)
    cache.view(LAYOUT).add(tokens(300), state(5000, 1))
    cache.close()
    files = list(tmp_path.rglob("*.kv"))
    assert len(files) == 1
    later = PromptCache(tmp_path, memory=1 << 20, disk=1 << 20)
    found = later.view(LAYOUT).find(tokens(300) + [5])
    assert found is not None and found[0] == tokens(300) and bytes(found[1]) == bytes(state(5000, 1))
    assert later.view(OTHER).find(tokens(300)) is None  # another model's layout never sees it


@pytest.mark.parametrize("damage", ["truncated", "flipped byte", "foreign file", "temp file"])
def test_a_damaged_or_foreign_file_is_deleted_never_returned(tmp_path, damage):
    cache = PromptCache(tmp_path, memory=1 << 20, disk=1 << 20)
    cache.view(LAYOUT).add(tokens(300), state(5000, 1))
    cache.close()
    (path,) = tmp_path.rglob("*.kv")
    raw = bytearray(path.read_bytes())
    if damage == "truncated":
        path.write_bytes(raw[:-100])
    elif damage == "flipped byte":
        raw[-10] ^= 0xFF
        path.write_bytes(raw)
    elif damage == "foreign file":
        path.write_bytes(random.Random(5).randbytes(len(raw)))
    else:  # a power cut during a write leaves its temp file, never a half-written .kv
        path.rename(path.with_name(path.name + ".tmp123"))
        path = path.with_name(path.name + ".tmp123")
    later = PromptCache(tmp_path, memory=1 << 20, disk=1 << 20)
    assert later.view(LAYOUT).find(tokens(300)) is None
    assert not path.exists()


def test_the_disk_keeps_the_most_recently_used_within_its_limit(tmp_path):
    cache = PromptCache(tmp_path, memory=0, disk=2 * 5200)  # two files of ~5.1 KB
    view = cache.view(LAYOUT)
    for i in range(3):
        view.add(tokens(200, i * 1000), state(4000, i))
        assert cache.flush()
    assert len(list(tmp_path.rglob("*.kv"))) == 2
    assert view.find(tokens(200, 0)) is None
    assert view.find(tokens(200, 2000)) is not None


def test_a_model_no_longer_installed_takes_its_snapshots_with_it(tmp_path):
    cache = PromptCache(tmp_path, memory=1 << 20, disk=1 << 20)
    cache.view(LAYOUT).add(tokens(300), state(1000, 1))
    cache.view(OTHER).add(tokens(300), state(1000, 2))
    assert cache.flush()
    cache.retain([LAYOUT.model])
    assert [p.parent.parent.name for p in tmp_path.rglob("*.kv")] == [LAYOUT.model]
    assert cache.view(OTHER).find(tokens(300)) is None
    assert cache.view(LAYOUT).find(tokens(300)) is not None


# --- slot choice, through the server ----------------------------------------------------------


@pytest.fixture
def connect():
    """openai clients for servers, closed at the end of the test (an open socket is a warning)."""
    clients: list[openai.OpenAI] = []

    def make(server) -> openai.OpenAI:
        clients.append(openai.OpenAI(base_url=server.base_url, api_key="unused", max_retries=0))
        return clients[-1]

    yield make
    for client in clients:
        client.close()


SYSTEM = "You control a smart home. " + " ".join(f"the lamp {i} in the {['hall', 'den'][i % 2]} is on;"
                                                   for i in range(60))
NO_SNAPSHOTS = "[engine]\nparallel = {parallel}\nprompt_cache_memory = \"0\"\nprompt_cache_disk = \"0\"\n"


def chat(client, model: str, user: str, system: bool = True):
    messages = [{"role": "system", "content": SYSTEM}] if system else []
    reply = client.chat.completions.create(model=model, temperature=0, max_tokens=4,
                                           messages=[*messages, {"role": "user", "content": user}])
    return reply.usage.prompt_tokens_details.cached_tokens


def test_an_unrelated_short_request_does_not_take_the_slot_of_a_long_prompt(connect, server_factory, models):
    server = server_factory(models["scripted-chatml"], config=NO_SNAPSHOTS.format(parallel=4))
    client = connect(server)
    assert chat(client, "scripted-chatml", "turn on lamp 3") == 0
    system_cached = chat(client, "scripted-chatml", "turn off lamp 4")
    assert system_cached > 400  # the system prompt, in the slot it was computed in
    chat(client, "scripted-chatml", "Hello there", system=False)  # shares its first tokens with it, no more
    assert chat(client, "scripted-chatml", "is the hall lit?") >= 0.95 * system_cached


def test_with_every_slot_cached_the_least_valuable_one_is_reused(connect, server_factory, models):
    server = server_factory(models["scripted-chatml"], config=NO_SNAPSHOTS.format(parallel=2))
    client = connect(server)
    chat(client, "scripted-chatml", "turn on lamp 3")
    system_cached = chat(client, "scripted-chatml", "turn off lamp 4")
    chat(client, "scripted-chatml", "Hello there", system=False)  # the other slot
    chat(client, "scripted-chatml", "Good morning, what is new", system=False)  # both slots hold a cache now
    assert chat(client, "scripted-chatml", "is the den lit?") >= 0.95 * system_cached


# --- snapshots, through the server -------------------------------------------------------------

PREFIX = "Once upon a time the cat sat on the mat and said hello world. " * 30


def complete(client, suffix: str):
    reply = client.completions.create(model="random", prompt=PREFIX + suffix, max_tokens=12, temperature=0)
    return reply.choices[0].text, reply.usage.prompt_tokens_details.cached_tokens


def snapshot_files(state_dir: Path) -> list[Path]:
    return sorted((state_dir / "prompt-cache").rglob("*.kv"))


def test_a_reused_prefix_is_restored_after_an_unload_and_a_restart_with_the_same_output(
        connect, server_factory, models, tmp_path):
    state_dir = tmp_path / "state"
    server = server_factory(models["random"], state_dir=state_dir)
    client = connect(server)
    cold_text, cached = complete(client, "tick")
    assert cached == 0
    _, reused = complete(client, "tock")  # a second request reuses the prefix: it is saved
    assert reused > 300
    assert metric(server, "edgellm_prompt_cache_saved_total", model="random") == 1

    assert server.post("/admin/models/random/unload").status_code == 200
    wait_until(lambda: server.get("/admin/models").json()["data"][0]["state"] == "unloaded", 10,
               message="the model to unload")
    text, restored = complete(client, "tick")
    assert text == cold_text  # the restored state continues exactly as the computed one did
    assert restored >= reused
    assert metric(server, "edgellm_prompt_cache_restored_tokens_total", model="random") == restored
    assert metric(server, "edgellm_prompt_cache_bytes", tier="disk") > 0

    server.stop()
    assert len(snapshot_files(state_dir)) == 1
    again = server_factory(models["random"], state_dir=state_dir)
    client = connect(again)
    text, restored = complete(client, "tick")
    assert text == cold_text and restored >= reused
    assert metric(again, "edgellm_prompt_cache_restored_tokens_total", model="random") == restored


def test_a_damaged_snapshot_is_computed_again_never_loaded(connect, server_factory, models, tmp_path):
    state_dir = tmp_path / "state"
    server = server_factory(models["random"], state_dir=state_dir)
    client = connect(server)
    cold_text, _ = complete(client, "tick")
    complete(client, "tock")
    server.stop()
    (path,) = snapshot_files(state_dir)
    raw = bytearray(path.read_bytes())
    raw[len(raw) // 2] ^= 0x55  # inside the KV state: the header still looks right
    path.write_bytes(raw)

    again = server_factory(models["random"], state_dir=state_dir)
    client = connect(again)
    text, cached = complete(client, "tick")
    assert (text, cached) == (cold_text, 0)
    assert metric(again, "edgellm_prompt_cache_restored_tokens_total", model="random") == 0
    assert not path.exists()


def test_removing_a_model_deletes_its_snapshots(connect, server_factory, models, tmp_path):
    state_dir = tmp_path / "state"
    assert edgellm("models", "add", str(models["random"]), "--state-dir", str(state_dir)).returncode == 0
    server = server_factory(None, state_dir=state_dir)
    client = connect(server)
    complete(client, "tick")
    complete(client, "tock")
    wait_until(lambda: snapshot_files(state_dir), 10, message="the snapshot to reach the disk")
    assert httpx.delete(server.url + "/admin/models/random").status_code == 200
    wait_until(lambda: not list((state_dir / "prompt-cache").iterdir()), 10, message="the snapshots to go")


def test_evicted_cells_are_saved_only_when_they_extend_a_reused_prefix(connect, server_factory, models):
    server = server_factory(models["random"], config="[engine]\nparallel = 1\n")
    client = connect(server)

    def send(prompt: str) -> int:
        reply = client.completions.create(model="random", prompt=prompt, max_tokens=4, temperature=0)
        return reply.usage.prompt_tokens_details.cached_tokens

    def saved() -> float:
        return metric(server, "edgellm_prompt_cache_saved_total", model="random")

    other = "tick tock " * 200
    send(PREFIX + "tick")
    send(other)  # takes the only slot from a one-off request: nothing is worth saving
    assert saved() == 0
    assert send(other + "Hello world " * 100) > 300  # reuses the prefix: saved
    assert saved() == 1
    send(PREFIX + "tock")  # evicts the prefix and what extends it: the extension is saved too
    assert saved() == 2
    assert send(other + "Hello world " * 100 + "euro") > 500  # restored, the extension included
