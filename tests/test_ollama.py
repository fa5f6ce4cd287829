"""Ollama's native API (/api), driven by the official `ollama` Python client over real HTTP: replays of
what Home Assistant's Ollama integration and Open WebUI send, model management, pull from a stick, and
the errors in Ollama's shape. Tool calls are checked with jsonschema, embeddings and times by value."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime

import httpx
import jsonschema
import ollama
import pytest
from conftest import ROOT, InProcess, wait_until
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_cli import edgellm
from tiny_models import write_model

from edgellm.config import Config, ModelsConfig, ServerConfig
from edgellm.engine.pool import Pool
from edgellm.store.registry import Registry

QWEN = (ROOT / "tests" / "fixtures" / "templates" / "Qwen-Qwen2.5-7B-Instruct.jinja").read_text()
API_KEY, ADMIN_KEY = "user-key-1", "admin-key-1"
OBSIDIAN = "app://obsidian.md"
# What Home Assistant's Assist sends as tools (its intents), in the shape the ollama client keeps.
HASS_TOOLS = [
    {"type": "function", "function": {"name": "HassTurnOn", "description": "Turns on/opens a device or entity",
                                      "parameters": {"type": "object", "properties": {
                                          "name": {"type": "string", "enum": ["Hall light", "Desk lamp"]},
                                          "area": {"type": "string", "enum": ["Hall", "Office"]}},
                                          "required": ["name"]}}},
    {"type": "function", "function": {"name": "HassLightSet", "description": "Sets the brightness of a light",
                                      "parameters": {"type": "object", "properties": {
                                          "name": {"type": "string", "enum": ["Hall light"]},
                                          "brightness": {"type": "integer", "enum": [0, 50, 100]}},
                                          "required": ["name", "brightness"]}}},
]
SCHEMAS = {t["function"]["name"]: t["function"]["parameters"] for t in HASS_TOOLS}
ASK = [{"role": "user", "content": "Turn on the hall light"}]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def site(tmp_path_factory, models):
    """Installed: a model that always calls a tool, a chat model, a fill-in-the-middle one and an
    embedding model; a stick (pull_dir) with a signed bundle of another; keys; Ollama's port."""
    d = tmp_path_factory.mktemp("ollama")
    files = {
        # Greedy decoding writes <tool_call> right after the prompt; the grammar writes the rest.
        "caller": write_model(d / "caller.gguf", script={"\n": "<tool_call>"}, chat_template=QWEN,
                              special=("<tool_call>", "</tool_call>")),
        "chat": write_model(d / "chat.gguf", seed=5, chat_template=QWEN, sampling={"temp": 0.7, "top_k": 20}),
        "coder": write_model(d / "coder.gguf", seed=6, special=("<|fim_prefix|>", "<|fim_suffix|>", "<|fim_middle|>")),
    }
    state = d / "state"
    registry = Registry(state).open()
    for path in [*files.values(), models["embedding"], models["scripted"]]:  # scripted: " tick tock" forever
        registry.add(path)
    assert edgellm("keygen", "-o", str(d / "site")).returncode == 0
    (state / "trusted-keys").mkdir()
    shutil.copy(d / "site.pub", state / "trusted-keys")
    stick = d / "stick"
    stick.mkdir()
    made = edgellm("bundle", "create", str(write_model(d / "pulled.gguf", seed=9)), "-o", str(stick / "pulled.edgellm"),
                   "--key", str(d / "site.key"))
    assert made.returncode == 0, made.stderr
    port = free_port()
    config = (f'[server]\napi_keys = ["{API_KEY}"]\nadmin_keys = ["{ADMIN_KEY}"]\ncors_origins = ["{OBSIDIAN}"]\n'
              f'[models]\nmin_keep_alive = "30s"\nmax_loaded = 4\n'
              f'[ollama]\nport = {port}\npull_dir = "{stick}"\nallow_unsigned_create = true\n')
    return {"dir": d, "state": state, "config": config, "port": port, "files": files}


@pytest.fixture(scope="module")
def server(server_factory, site):
    return server_factory(None, state_dir=site["state"], config=site["config"], api_key=API_KEY)


@pytest.fixture(scope="module")
def client(server) -> Iterator[ollama.Client]:
    with ollama.Client(host=server.url, headers={"Authorization": f"Bearer {API_KEY}"}, timeout=60) as c:
        yield c


@pytest.fixture(scope="module")
def admin(server) -> Iterator[ollama.Client]:
    with ollama.Client(host=server.url, headers={"Authorization": f"Bearer {ADMIN_KEY}"}, timeout=60) as c:
        yield c


def valid_calls(calls) -> list[tuple[str, dict]]:
    assert calls, "no tool calls"
    out = []
    for call in calls:
        arguments = call.function.arguments
        assert isinstance(arguments, dict)  # Ollama's: an object, not a JSON string
        jsonschema.validate(arguments, SCHEMAS[call.function.name])
        out.append((call.function.name, arguments))
    return out


def running(client: ollama.Client) -> dict[str, ollama.ProcessResponse.Model]:
    return {m.model: m for m in client.ps().models}


# --- Home Assistant ----------------------------------------------------------------------

def test_home_assistant_sequence(client):
    """What its integration does: tags (5 s timeout), ps, a streamed chat with Assist's tools,
    keep_alive -1 and num_ctx 8192, the tool's result sent back, and ps again."""
    with ollama.Client(host=str(client._client.base_url), headers={"Authorization": f"Bearer {API_KEY}"},
                       timeout=5) as quick:
        assert "caller:latest" in {m.model for m in quick.list().models}
        quick.ps()
    options = {"num_ctx": 8192, "temperature": 0, "num_predict": 300}
    parts = list(client.chat(model="caller", messages=ASK, tools=HASS_TOOLS, stream=True, keep_alive=-1,
                             options=options, think=False))
    assert [p.done for p in parts][-1] is True and not any(p.done for p in parts[:-1])
    calls = [c for p in parts for c in (p.message.tool_calls or [])]
    named = valid_calls(calls)
    final = parts[-1]
    assert final.done_reason == "stop" and final.eval_count > 0 and final.prompt_eval_count > 0
    assert final.total_duration >= final.eval_duration > 0 and final.prompt_eval_duration > 0
    model = running(client)["caller:latest"]
    assert model.expires_at.year == 9999  # keep_alive -1: until evicted
    assert model.size > 0 and model.size_vram == 0 and model.context_length == 4096

    history = [*ASK, {"role": "assistant", "content": "", "tool_calls": [
        {"function": {"name": name, "arguments": args}} for name, args in named]},
        *({"role": "tool", "content": json.dumps({"success": True}), "tool_name": name} for name, _ in named)]
    again = client.chat(model="caller", messages=history, tools=HASS_TOOLS, keep_alive=-1, options=options)
    assert again.done and again.prompt_eval_count > final.prompt_eval_count  # the result is in the prompt
    valid_calls(again.message.tool_calls)


def test_tags_answer_at_once_while_a_model_loads(site, monkeypatch):
    """Home Assistant gives /api/tags 5 s: a load in progress must not hold it up."""
    gate = threading.Event()
    original = Pool._load_now

    def slow(self, *args, **kwargs):
        gate.wait(30)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(Pool, "_load_now", slow)
    state = site["dir"] / "state-inprocess"
    shutil.copytree(site["state"], state)
    config = Config(server=ServerConfig(state_dir=str(state)), models=ModelsConfig(min_keep_alive="0"))
    with InProcess(config) as app, ThreadPoolExecutor(1) as pool, ollama.Client(host=app.url, timeout=5) as c:
        loading = pool.submit(c.chat, model="chat", messages=ASK, options={"num_predict": 2})
        wait_until(lambda: any(s["state"] == "loading" for s in app.service.status()), 10, message="a load")
        started = time.monotonic()
        assert "chat:latest" in {m.model for m in c.list().models}
        assert c.ps().models == []
        assert time.monotonic() - started < 5
        gate.set()
        assert loading.result(30).done


# --- Open WebUI --------------------------------------------------------------------------

def test_open_webui_sequence(server, client, admin):
    """Version (numeric x.y.z), tags and ps merged by name, `:latest` lookups, NDJSON chat, unload."""
    assert all(part.isdigit() for part in httpx.get(server.url + "/api/version").json()["version"].split("."))
    tags = {m.model: m for m in client.list().models}
    assert {"caller:latest", "chat:latest", "coder:latest", "embedding:latest"} <= set(tags)
    assert all(m.digest and len(m.digest) == 64 and m.details.format == "gguf" for m in tags.values())
    client.chat(model="chat:latest", messages=ASK, options={"num_predict": 2})
    assert set(running(client)) <= set(tags) and "chat:latest" in running(client)

    with httpx.stream("POST", server.url + "/api/chat", headers=server.headers(), timeout=60,
                      json={"model": "chat", "messages": ASK, "options": {"num_predict": 5}}) as r:
        assert r.status_code == 200 and r.headers["content-type"] == "application/x-ndjson"
        lines = [json.loads(line) for line in r.iter_lines()]
    assert [line["done"] for line in lines] == [False] * (len(lines) - 1) + [True]
    assert lines[-1]["done_reason"] == "length" and lines[-1]["eval_count"] == 5
    text = "".join(line["message"]["content"] for line in lines)
    whole = client.chat(model="chat", messages=ASK, options={"num_predict": 5, "temperature": 0})
    again = client.chat(model="chat", messages=ASK, options={"num_predict": 5, "temperature": 0})
    assert whole.message.content == again.message.content and isinstance(text, str)
    datetime.fromisoformat(lines[0]["created_at"].replace("Z", "+00:00"))

    # Unload: an API key's takes effect once idle for [models] min_keep_alive (30 s); an admin key's at once.
    unloaded = client.generate(model="chat", prompt="", keep_alive=0)
    assert unloaded.done and unloaded.done_reason == "unload"
    expires = running(client)["chat:latest"].expires_at
    assert (expires - datetime.now(UTC)).total_seconds() <= 31
    admin.generate(model="chat", prompt="", keep_alive=0)
    wait_until(lambda: "chat:latest" not in running(client), 10, message="the unload")
    loaded = client.generate(model="chat")  # no prompt and no keep_alive: load it, for the default keep_alive
    assert loaded.done_reason == "load" and "chat:latest" in running(client)
    loaded = client.chat(model="chat", messages=[], keep_alive="1h30m")  # Go's durations, as Ollama's clients write
    assert loaded.done_reason == "load"
    assert 89 * 60 < (running(client)["chat:latest"].expires_at - datetime.now(UTC)).total_seconds() <= 90 * 60


# --- show, embed, generate ---------------------------------------------------------------

def test_an_unload_asked_while_a_reply_streams_holds_when_it_ends(server, client):
    """keep_alive 0 with nothing to generate, while the model has a request in flight: the model
    stays for that request, and afterwards is kept no longer than the unload allows ([models]
    min_keep_alive, 30 s here), however long the request in flight asked to keep it."""
    client.generate(model="scripted", prompt=" tick", raw=True, keep_alive="1h", options={"num_predict": 1})
    with httpx.stream("POST", server.url + "/api/generate", headers=server.headers(), timeout=60,
                      json={"model": "scripted", "prompt": " tick", "raw": True, "keep_alive": "2h",
                            "options": {"num_predict": 1500, "temperature": 0}}) as r:  # seconds of work
        lines = r.iter_lines()
        next(lines)  # generating now
        assert client.generate(model="scripted", prompt="", keep_alive=0).done_reason == "unload"
        assert json.loads(list(lines)[-1])["done"] is True

    def in_flight() -> int:
        models = server.get("/admin/models", headers={"Authorization": f"Bearer {ADMIN_KEY}"}).json()["data"]
        return next(m["in_flight"] for m in models if m["id"] == "scripted")

    # Its lease ends as the response closes, a moment after the last line.
    wait_until(lambda: in_flight() == 0, 10, message="the reply's lease to end")
    expires = running(client)["scripted:latest"].expires_at
    assert (expires - datetime.now(UTC)).total_seconds() <= 31


def test_show_describes_each_model(client, site):
    caller = client.show("caller")
    assert caller.capabilities == ["completion", "tools"] and caller.template == QWEN
    assert caller.details.family == "llama" and caller.details.quantization_level == "F16"
    assert caller.modelinfo["general.architecture"] == "llama" and caller.modelinfo["general.parameter_count"] > 0
    assert caller.modelinfo["tokenizer.ggml.tokens"] is None  # the vocabulary: null, as Ollama's non-verbose show
    assert client.show("chat:latest").parameters.splitlines() == ["temperature 0.7", "top_k 20"]
    assert client.show("coder").capabilities == ["completion"]
    assert client.show("embedding").capabilities == ["embedding"]


def test_embed_and_the_legacy_embeddings(client):
    result = client.embed(model="embedding", input=["the hall light", "a desk lamp"])
    assert len(result.embeddings) == 2 and len(result.embeddings[0]) == len(result.embeddings[1]) > 0
    one = client.embed(model="embedding:latest", input="the hall light")
    assert one.embeddings[0] == pytest.approx(result.embeddings[0], abs=1e-5)
    assert client.embeddings(model="embedding", prompt="the hall light").embedding == pytest.approx(
        result.embeddings[0], abs=1e-5)
    long = "the hall light " * 400  # past what the model embeds at once: cut by default, as Ollama's
    assert len(client.embed(model="embedding", input=long).embeddings[0]) == len(result.embeddings[0])
    with pytest.raises(ollama.ResponseError) as e:
        client.embed(model="embedding", input=long, truncate=False)
    assert e.value.status_code == 400 and "at most" in e.value.error
    with pytest.raises(ollama.ResponseError) as e:
        client.embed(model="chat", input="x")
    assert e.value.status_code == 400 and "embeddings" in e.value.error
    with pytest.raises(ollama.ResponseError) as e:
        client.chat(model="embedding", messages=ASK)
    assert e.value.status_code == 400 and "embedding model" in e.value.error


def test_generate_templated_raw_suffix_and_formats(client):
    templated = client.generate(model="chat", prompt="hello", system="Be brief.", options={"num_predict": 3})
    raw = client.generate(model="chat", prompt="hello", raw=True, options={"num_predict": 3})
    assert templated.prompt_eval_count > raw.prompt_eval_count  # the template's turn markers
    assert raw.done and raw.eval_count == 3 and isinstance(raw.response, str)
    fim = client.generate(model="coder", prompt="def add(a, b):", suffix="    return c", options={"num_predict": 4})
    assert fim.done and fim.prompt_eval_count > 0
    with pytest.raises(ollama.ResponseError) as e:
        client.generate(model="chat", prompt="x", suffix="y")
    assert e.value.status_code == 400 and "fill-in-the-middle" in e.value.error
    as_json = client.generate(model="chat", prompt="a light", format="json", options={"num_predict": 200})
    assert isinstance(json.loads(as_json.response), dict)
    schema = {"type": "object", "properties": {"on": {"type": "boolean"}}, "required": ["on"]}
    shaped = client.chat(model="chat", messages=ASK, format=schema, options={"num_predict": 100})
    jsonschema.validate(json.loads(shaped.message.content), schema)
    with pytest.raises(ollama.ResponseError) as e:
        client.chat(model="chat", messages=[{"role": "user", "content": "what is this?", "images": [b"\x89PNG"]}])
    assert e.value.status_code == 400 and "images" in e.value.error


def test_options_are_mapped_and_checked(client):
    reply = client.chat(model="chat", messages=ASK, options={"num_predict": 4, "top_k": 1, "mirostat": 2,
                                                             "repeat_last_n": 8, "stop": ["\u0000never"]})
    assert reply.eval_count == 4 and reply.done_reason == "length"  # mirostat: unknown here, ignored
    for options, field in [({"temperature": "hot"}, "options.temperature"), ({"top_p": 3}, "options.top_p"),
                           ({"num_predict": 0}, "options.num_predict"), ({"stop": 5}, "options.stop")]:
        with pytest.raises(ollama.ResponseError) as e:
            client.chat(model="chat", messages=ASK, options=options)
        assert e.value.status_code == 400 and field in e.value.error, e.value.error
    with pytest.raises(ollama.ResponseError) as e:  # num_ctx: the request's window, within the model's
        client.chat(model="chat", messages=ASK, options={"num_ctx": 16})
    assert e.value.status_code == 400 and "16 tokens" in e.value.error
    capped = client.chat(model="chat", messages=ASK, options={"num_ctx": 100})
    assert capped.prompt_eval_count + capped.eval_count <= 100 and capped.done_reason == "length"


# --- model management --------------------------------------------------------------------

def test_blobs_create_copy_delete(admin, client, site, tmp_path):
    uploads = site["state"] / "models" / "uploads"
    uploads.mkdir(parents=True, exist_ok=True)
    stale = uploads / ("sha256-" + "5" * 64)  # uploaded two days ago and never installed
    stale.write_bytes(b"old")
    os.utime(stale, (time.time() - 2 * 86400,) * 2)
    path = write_model(tmp_path / "upload.gguf", seed=11)
    digest = "sha256:" + hashlib.sha256(path.read_bytes()).hexdigest()
    head = httpx.head(f"{admin._client.base_url}/api/blobs/{digest}", headers=admin._client.headers)
    assert head.status_code == 404
    assert admin.create_blob(path) == digest
    assert not stale.exists()
    # An upload announced as a petabyte is refused before a byte of it is kept (a raw socket: no
    # client library sends a length it does not have).
    url = httpx.URL(str(admin._client.base_url))
    with socket.create_connection((url.host, url.port), timeout=10) as raw:
        raw.sendall(f"POST /api/blobs/sha256:{'6' * 64} HTTP/1.1\r\nHost: {url.host}\r\n"
                    f"Authorization: Bearer {ADMIN_KEY}\r\nContent-Length: {1 << 50}\r\n\r\nGGUF".encode())
        answer = b""
        while b"MiB spare" not in answer and (chunk := raw.recv(65536)):
            answer += chunk
    assert answer.startswith(b"HTTP/1.1 507") and b"MiB are free" in answer
    assert httpx.head(f"{admin._client.base_url}/api/blobs/{digest}", headers=admin._client.headers).status_code == 200
    statuses = [p.status for p in admin.create(model="uploaded", files={"upload.gguf": digest}, stream=True)]
    assert statuses[-1] == "success"
    assert "uploaded:latest" in {m.model for m in client.list().models}
    assert client.chat(model="uploaded:latest", messages=ASK, options={"num_predict": 2}).done
    assert admin.copy("uploaded", "kitchen-box").status == "success"
    assert {"uploaded:latest", "kitchen-box:latest"} <= {m.model for m in client.list().models}
    assert client.generate(model="kitchen-box", prompt="hi", options={"num_predict": 1}).done
    for clash in [lambda: admin.copy("uploaded", "chat"), lambda: admin.create(model="chat:latest", from_="uploaded"),
                  lambda: admin.create(model="chat", files={"upload.gguf": digest})]:
        with pytest.raises(ollama.ResponseError) as e:
            clash()
        assert e.value.status_code == 409
    assert admin.show("chat").template == QWEN  # untouched
    # Deleting a name takes that name; the model goes with its last one (Ollama's `rm` of a copy).
    assert admin.delete("kitchen-box").status == "success"
    assert "uploaded:latest" in {m.model for m in client.list().models}
    assert admin.copy("uploaded", "kitchen-box").status == "success"
    assert admin.delete("uploaded").status == "success"
    names = {m.model for m in client.list().models}
    assert "uploaded:latest" not in names and "kitchen-box:latest" in names
    assert client.generate(model="kitchen-box", prompt="hi", options={"num_predict": 1}).done
    assert admin.delete("kitchen-box:latest").status == "success"
    assert "kitchen-box:latest" not in {m.model for m in client.list().models}
    with pytest.raises(ollama.ResponseError) as e:
        admin.delete("uploaded")
    assert e.value.status_code == 404 and e.value.error == "model 'uploaded' not found"

    # A blob whose content is not its name is refused, and nothing is kept.
    wrong = "sha256:" + "0" * 64
    r = httpx.post(f"{admin._client.base_url}/api/blobs/{wrong}", headers=admin._client.headers, content=b"GGUF..")
    assert r.status_code == 400 and "SHA-256" in r.json()["error"]
    assert httpx.head(f"{admin._client.base_url}/api/blobs/{wrong}", headers=admin._client.headers).status_code == 404
    junk = b"not a model, whatever its name says"
    junk_digest = "sha256:" + hashlib.sha256(junk).hexdigest()
    r = httpx.post(f"{admin._client.base_url}/api/blobs/{junk_digest}", headers=admin._client.headers, content=junk)
    assert r.status_code == 201
    for kwargs in [{"files": {"a.gguf": wrong}}, {"files": {"a.gguf": junk_digest}},
                   {"from_": "chat", "system": "You are a pirate."}, {}]:
        with pytest.raises(ollama.ResponseError) as e:
            admin.create(model="nope", **kwargs)
        assert e.value.status_code == 400, e.value.error
    assert "nope:latest" not in {m.model for m in client.list().models}


def test_management_takes_an_admin_key(client, server):
    for call in [lambda: client.delete("chat"), lambda: client.copy("chat", "x"),
                 lambda: client.create(model="x", from_="chat")]:
        with pytest.raises(ollama.ResponseError) as e:
            call()
        assert e.value.status_code == 401 and e.value.error == "invalid admin key"
    r = httpx.post(server.url + "/api/blobs/sha256:" + "1" * 64, headers=server.headers(), content=b"x")
    assert r.status_code == 401
    assert "chat:latest" in {m.model for m in client.list().models}


def test_pull_installs_from_the_stick_with_progress(client, admin):
    with pytest.raises(ollama.ResponseError) as e:
        client.show("pulled")
    assert e.value.status_code == 404
    statuses = list(client.pull("pulled", stream=True))
    assert statuses[0].status == "pulling manifest" and statuses[-1].status == "success"
    progress = [s for s in statuses if s.total]
    assert progress and progress[-1].completed == progress[-1].total > 0
    assert "pulled:latest" in {m.model for m in client.list().models}
    assert client.generate(model="pulled:latest", prompt="hi", raw=True, options={"num_predict": 1}).done
    assert client.pull("pulled").status == "success"  # there already
    with pytest.raises(ollama.ResponseError) as e:
        client.pull("llama3.2")
    assert e.value.status_code == 404 and "no internet" in e.value.error and "no bundle in" in e.value.error


def test_a_box_that_needs_signatures_and_has_no_stick(server_factory, site, tmp_path):
    """Defaults: uploaded blobs cannot become models (they carry no signature), and pull says
    at once why it cannot download, and what to do instead. And a client that cannot send a key
    (Home Assistant's integration) at an address in [server] keyless_addresses uses the API
    without one, but never the admin API."""
    state = tmp_path / "state"
    shutil.copytree(site["state"], state)
    box = server_factory(None, state_dir=state, config=f'[server]\napi_keys = ["{API_KEY}"]\n'
                                                      f'admin_keys = ["{ADMIN_KEY}"]\n'
                                                      'keyless_addresses = ["127.0.0.2"]\n'
                                                      f'[ollama]\npull_dir = "{tmp_path / "no-stick"}"\n')
    path = write_model(tmp_path / "u.gguf", seed=12)
    # The peer's address counts, never what a header claims it is.
    spoofed = httpx.get(box.url + "/api/tags", headers={"X-Forwarded-For": "127.0.0.2", "X-Real-IP": "127.0.0.2"})
    assert spoofed.status_code == 401
    with ollama.Client(host=box.url, timeout=10, transport=httpx.HTTPTransport(local_address="127.0.0.2")) as c:
        assert "chat:latest" in {m.model for m in c.list().models}
        assert c.chat(model="chat", messages=ASK, options={"num_predict": 1}).done
        for call in [lambda: c.delete("chat"), lambda: c.create_blob(path)]:
            with pytest.raises(ollama.ResponseError) as e:
                call()
            assert e.value.status_code == 401
        assert httpx.get(box.url + "/api/tags", headers={"Authorization": "Bearer wrong"}).status_code == 401
    with ollama.Client(host=box.url, timeout=10, headers={"Authorization": f"Bearer {ADMIN_KEY}"}) as c:
        with pytest.raises(ollama.ResponseError) as e:
            c.create_blob(path)
        assert e.value.status_code == 403 and "allow_unsigned_create" in e.value.error
        with pytest.raises(ollama.ResponseError) as e:
            list(c.pull("llama3.2", stream=True))
        assert e.value.status_code == 404 and "is the stick in?" in e.value.error
    with ollama.Client(host=server_factory(None, state_dir=tmp_path / "bare").url, timeout=10) as c:
        with pytest.raises(ollama.ResponseError) as e:
            c.pull("llama3.2")
        assert e.value.status_code == 404 and "set [ollama] pull_dir" in e.value.error


# --- errors, keys, browsers, the second port ----------------------------------------------

def test_errors_are_in_ollamas_shape(server):
    url = server.url
    for response, status in [
        (httpx.post(url + "/api/chat", json={"model": "nope", "messages": ASK}, headers=server.headers()), 404),
        (httpx.post(url + "/api/chat", json={"messages": ASK}, headers=server.headers()), 400),
        (httpx.post(url + "/api/chat", content=b"{", headers={**server.headers(), "content-type": "application/json"}),
         400),
        (httpx.post(url + "/api/chat", json={"model": "chat", "messages": "hi"}, headers=server.headers()), 400),
        (httpx.post(url + "/api/generate", json={"model": "chat", "prompt": "x", "keep_alive": "soon"},
                    headers=server.headers()), 400),
        (httpx.get(url + "/api/chat", headers=server.headers()), 405),
        (httpx.get(url + "/api/nothing", headers=server.headers()), 404),
        (httpx.get(url + "/api/tags"), 401),
        (httpx.get(url + "/api/tags", headers={"Authorization": "Bearer wrong"}), 401),
        (httpx.post(url + "/api/chat", json={}, headers={**server.headers(), "Origin": "http://evil.example"}), 403),
        (httpx.post(url + "/api/chat", content=b" " * (5 << 20),
                    headers={**server.headers(), "content-type": "application/json"}), 413),
    ]:
        assert response.status_code == status, response.text
        body = response.json()
        assert list(body) == ["error"] and isinstance(body["error"], str) and body["error"]
    assert httpx.post(url + "/api/chat", json={"model": "nope", "messages": ASK},
                      headers=server.headers()).json() == {"error": "model 'nope' not found"}
    # Public: how clients tell a server is there (no key).
    assert httpx.get(url + "/").text == "Ollama is running" and httpx.head(url + "/").status_code == 200
    assert httpx.get(url + "/api/version").status_code == 200


def test_curl_form_bodies_but_not_from_web_pages(server):
    """`curl -d` (Ollama's own examples) sends application/x-www-form-urlencoded: taken under /api
    from a client that is not a web page; a page's form is refused before any key is looked at."""
    body = json.dumps({"model": "chat", "prompt": "hi", "stream": False, "options": {"num_predict": 1}})
    form = {"content-type": "application/x-www-form-urlencoded"}
    r = httpx.post(server.url + "/api/generate", content=body, headers={**server.headers(), **form})
    assert r.status_code == 200 and r.json()["done"] is True
    r = httpx.post(server.url + "/api/generate", content=body, headers={**form, "Origin": OBSIDIAN})
    assert r.status_code == 415 and "error" in r.json()
    r = httpx.post(server.url + "/v1/completions", content=body, headers={**server.headers(), **form})
    assert r.status_code == 415


def test_an_app_origin_in_cors_origins_may_call(server):
    """Obsidian's plugins call from app://obsidian.md: listed, its preflight and its calls pass."""
    pre = httpx.options(server.url + "/api/chat", headers={"Origin": OBSIDIAN, "Access-Control-Request-Method": "POST",
                                                           "Access-Control-Request-Headers": "content-type"})
    assert pre.status_code == 204 and pre.headers["access-control-allow-origin"] == OBSIDIAN
    r = httpx.get(server.url + "/api/tags", headers={**server.headers(), "Origin": OBSIDIAN})
    assert r.status_code == 200 and r.headers["access-control-allow-origin"] == OBSIDIAN


def test_ollamas_own_port_serves_the_same_api(server, site):
    with ollama.Client(host=f"http://127.0.0.1:{site['port']}", headers={"Authorization": f"Bearer {API_KEY}"}) as c:
        assert "chat:latest" in {m.model for m in c.list().models}
        assert c.generate(model="chat", prompt="hi", options={"num_predict": 1}).done
    assert f"127.0.0.1:{site['port']}" in server.log()


@pytest.mark.parametrize("section, problem", [
    ("[server]\nkeyless_addresses = [\"192.168.1.300\"]\n", "keyless_addresses"),
    ("[server]\nport = 11434\n[ollama]\nport = 11434\n", "[ollama] port"),
    ("[ollama]\nport = 70000\n", "[ollama] port"),
    ("[ollama]\nallow_unsigned_create = \"yes\"\n", "allow_unsigned_create"),
])
def test_ollama_and_keyless_settings_are_checked(tmp_path, section, problem):
    config = tmp_path / "edgellm.toml"
    config.write_text(section)
    result = edgellm("serve", "--config", str(config), "--state-dir", str(tmp_path / "state"))
    assert result.returncode != 0 and problem in result.stderr and len(result.stderr.strip().splitlines()) == 1


# --- fuzz: what a client can send to /api ---------------------------------------------------

sys.path.insert(0, str(ROOT / "tools" / "fuzz"))
import fuzzing  # noqa: E402

from edgellm.protocol.openapi import document  # noqa: E402

_VALUES = fuzzing.json_values()


def _mostly(good: st.SearchStrategy) -> st.SearchStrategy:
    """Usually a value of the field's kind, sometimes any JSON at all."""
    return st.one_of(good, good, good, _VALUES)


_OPTIONS = st.dictionaries(st.sampled_from(["num_predict", "num_ctx", "temperature", "top_k", "top_p", "min_p",
                                            "seed", "stop", "repeat_last_n", "repeat_penalty", "mirostat"]),
                           _mostly(st.integers(-3, 50) | st.floats(0, 2)), max_size=4)
_CALLS = st.lists(st.fixed_dictionaries({"function": st.fixed_dictionaries(
    {"name": _mostly(st.sampled_from(["HassTurnOn", "HassLightSet"]))},
    optional={"arguments": _mostly(st.just({"name": "Hall light"}))})}), max_size=2)
_MESSAGES = st.lists(st.fixed_dictionaries(
    {"role": _mostly(st.sampled_from(["user", "assistant", "system", "tool"]))},
    optional={"content": _mostly(st.text(max_size=20)), "tool_name": _mostly(st.sampled_from(["HassTurnOn"])),
              "images": st.just([]) | _VALUES, "tool_calls": _mostly(_CALLS)}), max_size=3)
_BODIES = st.tuples(
    st.sampled_from(["/api/chat", "/api/generate", "/api/embed", "/api/embeddings", "/api/show", "/api/pull"]),
    st.fixed_dictionaries({"model": _mostly(st.sampled_from(["chat", "chat:latest", "caller", "embedding", "coder",
                                                             "nope"]))},
                          optional={"messages": _mostly(_MESSAGES), "prompt": _mostly(st.text(max_size=20)),
                                    "options": _mostly(_OPTIONS), "tools": _mostly(st.just(HASS_TOOLS)),
                                    "format": _mostly(st.sampled_from(["json", "", {"type": "object"}])),
                                    "stream": _mostly(st.booleans()),
                                    "keep_alive": _mostly(st.sampled_from(["5m", 60, -1, 0, "0"])),
                                    "think": _mostly(st.booleans()), "raw": _mostly(st.booleans()),
                                    "suffix": _mostly(st.text(max_size=8)), "system": _mostly(st.text(max_size=8)),
                                    "input": _mostly(st.text(min_size=1, max_size=8)), "images": _VALUES}))


@settings(max_examples=int(os.environ.get("EDGELLM_OLLAMA_EXAMPLES", "120")), derandomize=True, database=None,
          deadline=None, print_blob=False, suppress_health_check=list(HealthCheck))
@given(case=_BODIES)
def test_fuzzed_bodies_get_an_answer_in_ollamas_shape(server, case):
    """Never a 500; errors are {"error": "..."}; what succeeds is as the OpenAPI document says."""
    path, body = case
    options = body.get("options")
    if not isinstance(options, dict):
        body.setdefault("options", {"num_predict": 4})  # short replies: many examples, little time
    elif not isinstance(options.get("num_predict"), int) or options["num_predict"] > 8 or options["num_predict"] < 0:
        options["num_predict"] = 4
    content = json.dumps(body).encode()
    request = fuzzing.Case("POST", path, content, (("content-type", "application/json"),), "ollama")
    with httpx.Client(base_url=server.url, headers=server.headers(), timeout=60) as http:
        fuzzing.check(_SCHEMAS, request, fuzzing.send(http, request))
    assert server.proc.poll() is None


_SCHEMAS = fuzzing.Schemas(document("test"))
