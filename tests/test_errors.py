"""Every error: the right status, OpenAI's shape, and a service that keeps serving afterwards."""

from __future__ import annotations

import concurrent.futures
import json
import threading

import httpx
import openai
import pytest
from conftest import InProcess, wait_until


def assert_error(response: httpx.Response, status: int, *, param: str | None = None, code: str | None = None,
                 says: str = "") -> dict:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"}
    error = body["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert isinstance(error["message"], str) and error["message"]
    assert isinstance(error["type"], str) and error["type"]
    assert error["param"] == param
    if code is not None:
        assert error["code"] == code
    assert says.lower() in error["message"].lower()
    return error


@pytest.fixture(scope="module")
def server(server_factory, models):
    return server_factory(models["scripted"], config="[engine]\nn_ctx = 256\nn_batch = 32\nn_ubatch = 32\n"
                                                      "[server]\nmax_body_bytes = 2048\n")


@pytest.fixture
def still_serving(server):
    """After the test's bad request, a good one must still work."""
    yield
    r = server.post("/v1/completions", {"prompt": "Hello", "temperature": 0})
    assert r.status_code == 200 and r.json()["choices"][0]["text"] == " world!"


CHAT = {"messages": [{"role": "user", "content": "Hi"}]}


@pytest.mark.usefixtures("still_serving")
class TestInvalidRequests:
    def test_malformed_json(self, server):
        r = server.post("/v1/chat/completions", content=b'{"messages": [', headers={"content-type": "application/json"})
        assert_error(r, 400, code="invalid_json", says="not valid JSON")

    def test_body_must_be_an_object(self, server):
        assert_error(server.post("/v1/completions", [1, 2]), 400, code="invalid_json", says="JSON object")

    @pytest.mark.parametrize("field,value,param", [
        ("temperature", "hot", "temperature"),
        ("temperature", 3, "temperature"),
        ("max_tokens", "10", "max_tokens"),
        ("max_tokens", -1, "max_tokens"),
        ("max_tokens", 0, "max_tokens"),
        ("max_completion_tokens", -5, "max_completion_tokens"),
        ("top_p", 1.5, "top_p"),
        ("top_k", 2.5, "top_k"),
        ("seed", True, "seed"),
        ("stream", "yes", "stream"),
        ("stop", [1, 2], "stop"),
        ("stop", ["a"] * 17, "stop"),
        ("n", 2, "n"),
        ("logprobs", True, "logprobs"),
        ("tools", [{"type": "function", "function": {"name": "a b"}}], "tools[0].function.name"),
        ("logit_bias", {"x": 1}, "logit_bias"),
        ("logit_bias", {"5": 500}, "logit_bias"),
        ("logit_bias", {"999999": 1}, "logit_bias"),
        ("stream_options", {"include_usage": "yes"}, "stream_options.include_usage"),
        ("response_format", {"type": "xml"}, "response_format.type"),
        ("response_format", {"type": "json_schema"}, "response_format.json_schema"),
        ("model", 7, "model"),
        # Every integer has a maximum (docs/api.md); none wraps into llama.cpp's int32.
        ("top_k", 2**32 + 5, "top_k"),
        ("max_tokens", 2**20 + 1, "max_tokens"),
        ("max_completion_tokens", 2**63, "max_completion_tokens"),
        ("seed", 2**64, "seed"),
        ("seed", -(2**63) - 1, "seed"),
        ("stop", ["x" * 1025], "stop"),
    ])
    def test_bad_chat_field(self, server, field, value, param):
        assert_error(server.post("/v1/chat/completions", {**CHAT, field: value}), 400, param=param)

    @pytest.mark.parametrize("messages,param", [
        (None, "messages"),
        ([], "messages"),
        ("hi", "messages"),
        (["hi"], "messages[0]"),
        ([{"role": "wizard", "content": "hi"}], "messages[0].role"),
        ([{"content": "hi"}], "messages[0].role"),
        ([{"role": "user", "content": 5}], "messages[0].content"),
        ([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}],
         "messages[0].content[0].type"),
    ])
    def test_bad_messages(self, server, messages, param):
        assert_error(server.post("/v1/chat/completions", {"messages": messages}), 400, param=param)

    def test_unknown_role_names_the_roles(self, server):
        r = server.post("/v1/chat/completions", {"messages": [{"role": "wizard", "content": "hi"}]})
        assert_error(r, 400, param="messages[0].role", says="system, developer, user, assistant, tool")

    @pytest.mark.parametrize("prompt", [None, 5, [], [["a"], 1], ["one", "two"]])
    def test_bad_prompt(self, server, prompt):
        assert_error(server.post("/v1/completions", {"prompt": prompt}), 400, param="prompt")

    def test_prompt_token_outside_vocabulary(self, server):
        assert_error(server.post("/v1/completions", {"prompt": [1, 10**6]}), 400, param="prompt", says="vocabulary")

    def test_unsupported_schema_keyword_is_refused_not_ignored(self, server):
        schema = {"type": "object", "properties": {"code": {"type": "string", "pattern": "^[A-Z]{3}$"}}}
        r = server.post("/v1/chat/completions", {**CHAT, "response_format": {
            "type": "json_schema", "json_schema": {"name": "x", "schema": schema}}})
        assert_error(r, 400, param="response_format", code="invalid_json_schema", says="'pattern'")

    def test_prompt_longer_than_context_states_both_numbers(self, server):
        r = server.post("/v1/completions", {"prompt": "the cat sat on the mat " * 50})
        error = assert_error(r, 400, param="prompt", code="context_length_exceeded")
        n_prompt = int(error["message"].split("prompt is ")[1].split()[0])
        assert n_prompt > 256 and "holds 256 tokens" in error["message"]

    def test_prompt_longer_than_a_batch_is_decoded_in_chunks(self, server):
        # n_batch is 32 here: this prompt takes several decode calls, never one over the limit.
        r = server.post("/v1/completions", {"prompt": "the cat sat " * 40 + "tick", "max_tokens": 2,
                                            "temperature": 0})
        assert r.status_code == 200, r.text
        assert r.json()["usage"]["prompt_tokens"] > 3 * 32
        assert r.json()["choices"][0]["text"] == " tock tick"

    def test_embeddings_on_a_generative_model(self, server):
        r = server.post("/v1/embeddings", {"input": "hello"})
        assert_error(r, 400, param="model", code="model_not_supported", says="does not support embeddings")


@pytest.mark.usefixtures("still_serving")
class TestOtherStatuses:
    def test_unknown_model(self, server):
        assert_error(server.post("/v1/chat/completions", {**CHAT, "model": "gpt-9"}), 404, param="model",
                     code="model_not_found", says="gpt-9")
        assert_error(server.get("/v1/models/gpt-9"), 404, param="model", code="model_not_found")

    def test_unknown_route(self, server):
        assert_error(server.get("/v2/everything"), 404, code="not_found")

    def test_wrong_method(self, server):
        assert_error(server.get("/v1/chat/completions"), 405)

    def test_body_over_the_limit(self, server):
        big = {**CHAT, "padding": "x" * 4096}
        assert_error(server.post("/v1/chat/completions", big), 413, code="body_too_large", says="2048")

    def test_chunked_body_over_the_limit(self, server):
        def chunks():
            yield b'{"messages": [], "pad": "'
            for _ in range(10):
                yield b"x" * 1000
            yield b'"}'

        r = httpx.post(server.url + "/v1/chat/completions", content=chunks(),
                       headers={"content-type": "application/json"})
        assert_error(r, 413, code="body_too_large")

    def test_sdk_sees_typed_errors(self, server):
        client = openai.OpenAI(base_url=server.base_url, api_key="x", max_retries=0)
        with pytest.raises(openai.NotFoundError):
            client.chat.completions.create(model="nope", messages=[{"role": "user", "content": "hi"}])
        with pytest.raises(openai.BadRequestError) as caught:
            client.chat.completions.create(model="scripted", messages=[{"role": "user", "content": "hi"}], n=3)
        assert caught.value.param == "n"


def test_chat_on_an_embedding_model_is_refused(server_factory, models):
    server = server_factory(models["embedding"])
    assert_error(server.post("/v1/chat/completions", CHAT), 400, param="model", code="model_not_supported")


def test_a_model_that_fails_to_load_is_a_503_with_the_reason(server_factory, models, tmp_path):
    # A sound header with its tensor data cut short: the CLI's header check passes, llama.cpp refuses.
    broken = tmp_path / "broken.gguf"
    broken.write_bytes(models["scripted"].read_bytes()[:-4096])
    server = server_factory(broken, wait_ready=False)
    r = wait_until(lambda: (r := server.get("/health")).status_code == 503 and "failed" in r.text and r, 30,
                   message="the load to fail")
    assert_error(r, 503, code="model_not_ready", says="failed to load")
    assert "retry-after" not in r.headers  # retrying will not help
    assert "not within the file bounds" in r.text  # llama.cpp's own reason reaches the operator
    assert_error(server.post("/v1/completions", {"prompt": "x"}), 503, says="failed to load")
    assert server.get("/v1/models").status_code == 200  # and the service is still up


def test_requests_wait_for_a_loading_model_within_a_bound(models, monkeypatch, tmp_path):
    """The real app on a real socket, with the real load held back until the test has looked."""
    from edgellm.config import Config, ModelConfig, ModelsConfig, ServerConfig
    from edgellm.engine import loader

    gate = threading.Event()
    real_load = loader.load

    def held_load(*args, **kwargs):
        gate.wait(30)
        return real_load(*args, **kwargs)

    monkeypatch.setattr(loader, "load", held_load)
    config = Config(server=ServerConfig(state_dir=str(tmp_path)), models=ModelsConfig(load_timeout="1s"),
                    model=ModelConfig(path=str(models["scripted"])))
    with InProcess(config) as server:
        try:
            r = httpx.get(server.url + "/health")
            assert_error(r, 503, code="model_not_ready", says="loading")
            assert r.headers["retry-after"] == "2"
            # A request waits for the load, but no longer than load_timeout (1 s here): then 503 + Retry-After.
            r = httpx.post(server.url + "/v1/completions", json={"prompt": "Hello"}, timeout=30)
            assert_error(r, 503, code="model_not_ready", says="still loading")
            assert r.headers["retry-after"] == "5"
            # Once the load goes on, a waiting request gets its answer.
            waiting = concurrent.futures.ThreadPoolExecutor(1).submit(
                httpx.post, server.url + "/v1/completions", json={"prompt": "Hello", "temperature": 0}, timeout=30)
            gate.set()
            assert waiting.result(30).json()["choices"][0]["text"] == " world!"
            assert httpx.get(server.url + "/health").json()["status"] == "ok"
        finally:
            gate.set()


@pytest.mark.usefixtures("still_serving")
class TestHostileBodies:
    def test_lone_surrogate_escape(self, server):
        body = b'{"messages": [{"role": "user", "content": "bad \\ud800 text"}]}'
        r = server.post("/v1/chat/completions", content=body, headers={"content-type": "application/json"})
        assert_error(r, 400, code="invalid_json", says="surrogate")

    @pytest.mark.parametrize("literal", [b"NaN", b"Infinity", b"-Infinity"])
    def test_non_finite_numbers(self, server, literal):
        body = b'{"prompt": "Hello", "temperature": ' + literal + b"}"
        r = server.post("/v1/completions", content=body, headers={"content-type": "application/json"})
        assert_error(r, 400, code="invalid_json", says="not valid JSON")

    def test_deeply_nested_body(self, server):
        body = b'{"prompt": "x", "extra": ' + b"[" * 100000 + b"]" * 100000 + b"}"
        r = server.post("/v1/completions", content=body, headers={"content-type": "application/json"})
        assert r.status_code in (400, 413)
        assert_error(r, r.status_code)

    @pytest.mark.parametrize("schema,says", [
        ('{"type": "integer", "minimum": 1e400}', "finite"),
        ('{"allOf": [{"properties": ["a"]}]}', "'properties' must be an object"),
        ('{"allOf": [{"required": 5}]}', "'required' an array"),
    ])
    def test_hostile_schemas(self, server, schema, says):
        body = ('{"messages": [{"role": "user", "content": "Hi"}], "response_format": {"type": "json_schema", '
                f'"json_schema": {{"name": "x", "schema": {schema}}}}}}}')
        r = server.post("/v1/chat/completions", content=body.encode(), headers={"content-type": "application/json"})
        assert_error(r, 400, param="response_format", says=says)

    def test_ignore_eos_with_a_grammar_still_ends_the_json(self, server):
        # ignore_eos must not forbid the end of a finished JSON document (llama.cpp would abort).
        schema = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"],
                  "additionalProperties": False}
        r = server.post("/v1/chat/completions", {**CHAT, "ignore_eos": True, "max_tokens": 50, "temperature": 0,
                                                 "response_format": {"type": "json_schema", "json_schema": {
                                                     "name": "ok", "schema": schema}}})
        assert r.status_code == 200
        choice = r.json()["choices"][0]
        assert choice["finish_reason"] == "stop"
        assert isinstance(json.loads(choice["message"]["content"])["ok"], bool)


def test_reranking_models_are_refused_at_load(server_factory, tmp_path):
    from tiny_models import write_model

    reranker = write_model(tmp_path / "reranker.gguf", pooling=4)
    server = server_factory(reranker, wait_ready=False)
    r = wait_until(lambda: (r := server.get("/health")).status_code == 503 and "rerank" in r.text and r, 30,
                   message="the load to fail")
    assert_error(r, 503, says="reranking model")


@pytest.mark.parametrize("status,kind", [(400, "invalid_request_error"), (401, "authentication_error"),
                                         (403, "permission_error"), (404, "invalid_request_error"),
                                         (409, "invalid_request_error"), (413, "invalid_request_error"),
                                         (429, "rate_limit_error"), (500, "server_error"), (503, "server_error")])
def test_the_one_status_to_type_table(status, kind):
    """OpenAI's types by status, as its API answers them (404 included: invalid_request_error)."""
    from edgellm.errors import EdgeError, error_type
    from edgellm.protocol.openai import error_body

    assert error_type(status) == kind
    body = error_body(EdgeError("x", status=status, code="c"))
    assert body == {"error": {"message": "x", "type": kind, "param": None, "code": "c"}}
