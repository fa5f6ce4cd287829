"""GET /openapi.json is a valid OpenAPI 3.1 document of every route, and a property-based fuzz of
every JSON route against real servers finds no 5xx, no error out of the API's shape, no reply
the document does not describe and no accepted body it calls invalid (tools/fuzz/fuzzing.py).

Derandomized with few examples per kind of request, so that `make test` stays short and
repeatable; tools/fuzz/run.py runs the same cases for as long as it is asked to."""

from __future__ import annotations

import json
import re
import sys
from collections.abc import Iterator
from dataclasses import dataclass

import httpx
import pytest
from conftest import ROOT, Server, metric, wait_until
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from openapi_spec_validator import validate
from tiny_models import CHATML, write_model

from edgellm import __version__
from edgellm.app import create_app
from edgellm.config import Config, ServerConfig
from edgellm.protocol.openapi import DURATION_PATTERN, document
from edgellm.units import parse_duration

sys.path.insert(0, str(ROOT / "tools" / "fuzz"))
import fuzzing  # noqa: E402

MAX_BODY = 65536
CONFIG = f"[engine]\nn_ctx = 256\nn_threads = 1\n[server]\nmax_body_bytes = {MAX_BODY}\n"
DOCUMENT = document(__version__)
ROUTES, PROBES = fuzzing.ROUTES, fuzzing.PROBES
VALID_EXAMPLES, MALFORMED_EXAMPLES, OTHER_EXAMPLES = 150, 25, 250
SETTINGS = settings(derandomize=True, database=None, deadline=None, print_blob=False,
                    suppress_health_check=list(HealthCheck))
# Found by the fuzz once, fixed since; kept as regressions (test_bodies_the_fuzz_found and the
# tiny temperature below): surrogates written as UTF-8 bytes, a 400-digit keep_alive (both 500s),
# and a temperature of 1e-45 with a grammar, on which llama.cpp aborted the whole process.
FOUND = [
    ("embeddings", b'{"input": "\xed\xa0\x80"}'),
    ("completions", b'{"prompt": "\xed\xa0\x80", "max_tokens": 2}'),
    ("chat", b'{"messages": [{"role": "user", "content": "\xed\xa0\x80"}], "max_tokens": 2}'),
    ("completions", b'{"prompt": "x", "model": "\xed\xa0\x80"}'),
    ("completions", b'{"prompt": "x", "max_tokens": 2, "keep_alive": 1' + b"0" * 400 + b"}"),
    ("embeddings", b'{"input": "x", "keep_alive": 1' + b"0" * 400 + b"}"),
]


@dataclass
class Target:
    server: Server
    client: httpx.Client
    model: str
    schemas: fuzzing.Schemas

    def still_serving(self) -> None:
        """After any fuzz, the service still answers /health and a normal request."""
        assert self.client.get("/health").status_code == 200
        path, body = PROBES["embeddings" if self.model == "embedding" else "completions"]
        r = self.client.post(path, json=body)
        assert r.status_code == 200, r.text




def schemas(model_id: str) -> fuzzing.Schemas:
    """The document's strategies, with short replies (max_tokens), the served model or another,
    and keep_alive values that keep the model loaded (a reload per example would take most of
    the time; tools/fuzz/run.py takes any)."""
    short = st.integers(1, 8)
    staying = st.from_regex(DURATION_PATTERN, fullmatch=True).filter(lambda d: (parse_duration(d) or 60) >= 60) | \
        st.integers(60, 10**6) | st.floats(-1e9, -1)
    examples = st.sampled_from([{}, {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]},
                                {"type": "array", "items": {"type": "boolean"}, "maxItems": 3},
                                {"enum": ["x", 1, None]}, {"type": "string", "maxLength": 4}])
    return fuzzing.Schemas(DOCUMENT, {"max_tokens": short, "max_completion_tokens": short, "num_predict": short,
                                      "model": st.sampled_from([model_id, None]) | st.text(max_size=8),
                                      "schema": examples | fuzzing.json_values(), "keep_alive": staying})


@pytest.fixture(scope="module")
def targets(server_factory, models, tmp_path_factory) -> Iterator[dict[str, Target]]:
    chat_model = write_model(tmp_path_factory.mktemp("fuzz") / "fuzz-chat.gguf", seed=3, chat_template=CHATML)
    chat, embed = server_factory(chat_model, config=CONFIG), server_factory(models["embedding"], config=CONFIG)
    with httpx.Client(base_url=chat.url, timeout=60) as c, httpx.Client(base_url=embed.url, timeout=60) as e:
        chat_target = Target(chat, c, "fuzz-chat", schemas("fuzz-chat"))
        embed_target = Target(embed, e, "embedding", schemas("embedding"))
        yield {"chat": chat_target, "completions": chat_target, "embeddings": embed_target,
               "ollama_chat": chat_target, "ollama_generate": chat_target, "ollama_show": chat_target,
               "ollama_embed": embed_target}


def fuzz(target: Target, cases: st.SearchStrategy, examples: int) -> None:
    @settings(SETTINGS, max_examples=examples)
    @given(case=cases)
    def run(case: fuzzing.Case) -> None:
        fuzzing.check(target.schemas, case, fuzzing.send(target.client, case))

    run()
    target.still_serving()


# --- the document ------------------------------------------------------------------------------

def test_the_document_is_valid_openapi_3_1():
    validate(DOCUMENT)  # openapi-spec-validator: the structure, and every schema against 2020-12
    assert DOCUMENT["openapi"].startswith("3.1") and DOCUMENT["info"]["version"] == __version__


def test_every_route_is_documented_and_nothing_else(tmp_path):
    app = create_app(Config(server=ServerConfig(state_dir=str(tmp_path))))
    served = {(re.sub(r"\{(\w+)(:\w+)?\}", r"{\1}", route.path), method)
              for route in app.routes for method in route.methods - {"HEAD"}}
    documented = {(path, method.upper()) for path, item in DOCUMENT["paths"].items() for method in item}
    assert served == documented


# Ollama's routes: a body for each, and the status a box serving its --model file answers with
# (nothing of it can be copied, deleted or re-created: it is not installed; uploads need a signature).
OLLAMA_PROBES = {
    "/api/show": ({"model": "{model}"}, 200),
    "/api/chat": ({"model": "{model}", "messages": [{"role": "user", "content": "Hi"}],
                   "options": {"num_predict": 2}}, 200),
    "/api/generate": ({"model": "{model}", "prompt": "Hi", "stream": False, "options": {"num_predict": 2}}, 200),
    "/api/embed": ({"model": "embedding", "input": "the cat"}, 200),
    "/api/embeddings": ({"model": "embedding", "prompt": "the cat"}, 200),
    "/api/pull": ({"model": "{model}"}, 200),
    "/api/delete": ({"model": "no-such-model"}, 404),
    "/api/copy": ({"source": "{model}", "destination": "a-copy"}, 400),
    "/api/create": ({"model": "a-copy", "from": "{model}"}, 400),
    "/api/blobs/{digest}": (None, 403),
}


def test_every_documented_route_answers_as_documented(targets):
    """One plain request to each documented route: no 404 or 405, and the reply as documented."""
    for path, item in DOCUMENT["paths"].items():
        for method in item:
            target = targets["embeddings" if "embed" in path else "chat"]
            concrete = path.replace("{model_id}", "no-such-model" if method == "delete" else target.model)
            concrete = concrete.replace("{digest}", "sha256:" + "0" * 64).replace("{name}", "console.js")
            body, status = OLLAMA_PROBES.get(path, (next((b for p, b in PROBES.values() if p == path), None),
                                                    404 if method == "delete" else 200))
            if body is not None:
                body = json.loads(json.dumps(body).replace("{model}", target.model))
            case = fuzzing.Case(method.upper(), concrete, None if body is None else json.dumps(body).encode(),
                                (("content-type", "application/json"),), "documented")
            response = fuzzing.send(target.client, case)
            fuzzing.check(target.schemas, case, response)
            assert response.status_code == status, (path, method, response.text)
            if method == "delete" and path.startswith("/admin/"):
                assert response.json()["error"]["code"] == "model_not_found"


def test_the_document_needs_the_api_key_like_v1_models(server_factory):
    server = server_factory(None, api_key="fuzz-key", config='[server]\napi_keys = ["fuzz-key"]\n')
    refused = httpx.get(server.url + "/openapi.json")
    assert refused.status_code == 401 and refused.json()["error"]["code"] == "invalid_api_key"
    assert server.get("/openapi.json").json() == DOCUMENT
    assert httpx.get(server.url + "/health").status_code == 200  # public, as documented (security: [])
    assert DOCUMENT["paths"]["/openapi.json"]["get"]["security"] == DOCUMENT["paths"]["/v1/models"]["get"]["security"]


# --- the fuzz ------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["valid", *fuzzing.MALFORMED])
@pytest.mark.parametrize("route", ROUTES)
def test_json_route(targets, route, kind):
    target = targets[route]
    json_route = fuzzing.JsonRoute(*ROUTES[route], target.schemas, max_body=MAX_BODY)
    fuzz(target, json_route.cases(kind), VALID_EXAMPLES if kind == "valid" else MALFORMED_EXAMPLES)


def test_other_routes_and_admin(targets):
    fuzz(targets["chat"], fuzzing.other_cases(["fuzz-chat"], hardware=False), OTHER_EXAMPLES)


def test_bundle_uploads_that_are_no_bundle(targets):
    fuzz(targets["chat"], fuzzing.bundle_cases(), 30)


@pytest.mark.parametrize("route,body", FOUND)
def test_bodies_the_fuzz_found(targets, route, body):
    target = targets[route]
    case = fuzzing.Case("POST", ROUTES[route][0], body, (("content-type", "application/json"),), "found")
    fuzzing.check(target.schemas, case, fuzzing.send(target.client, case))


def test_a_tiny_temperature_with_a_grammar_does_not_end_the_server(server_factory, tmp_path):
    model = write_model(tmp_path / "doomed.gguf", seed=3, chat_template=CHATML)  # its own server: it may die
    server = server_factory(model, config=CONFIG)
    body = {"prompt": "x", "temperature": 1e-45, "min_p": 0, "response_format": {"type": "json_object"},
            "max_tokens": 16}
    with httpx.Client(base_url=server.url, timeout=30) as client:
        try:
            reply = client.post("/v1/completions", json=body)
        except httpx.HTTPError as e:
            server.proc.wait(10)
            raise AssertionError(f"no answer ({e!r}); the server exited with {server.proc.returncode}") from None
        assert reply.status_code == 200, reply.text
        choice = reply.json()["choices"][0]
        if choice["finish_reason"] == "stop":  # the grammar's end: a whole JSON object
            json.loads(choice["text"])
        assert client.get("/health").status_code == 200


def test_nothing_is_left_running_after_the_fuzz(targets):
    for target in (targets["chat"], targets["embeddings"]):
        wait_until(lambda t=target: all(metric(t.server, name, model=t.model) == 0 for name in (
            "edgellm_kv_cells_used", "edgellm_kv_cells_untracked", "edgellm_running_sequences",
            "edgellm_queue_depth")), 10,
            message="the KV cells, sequences and queue to empty")
        assert target.server.proc.poll() is None

