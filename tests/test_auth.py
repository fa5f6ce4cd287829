"""API keys: Bearer or x-api-key, from the config or a key file; /health stays public."""

from __future__ import annotations

import openai
import pytest
from test_errors import assert_error


@pytest.fixture(scope="module")
def server(server_factory, models, tmp_path_factory):
    key_file = tmp_path_factory.mktemp("keys") / "api-keys"
    key_file.write_text("# one key per line\nfile-key-2\n\n")
    return server_factory(models["scripted"], api_key="config-key-1", config=(
        f'[server]\napi_keys = ["config-key-1"]\napi_key_file = "{key_file}"\n'))


def complete(server, headers: dict):
    return server.post("/v1/completions", {"prompt": "Hello", "temperature": 0}, headers=headers)


def test_bearer_key_from_the_config(server):
    assert complete(server, {"Authorization": "Bearer config-key-1"}).status_code == 200


def test_x_api_key_from_the_key_file(server):
    r = server.post("/v1/completions", {"prompt": "Hello"}, headers={"Authorization": "", "x-api-key": "file-key-2"})
    assert r.status_code == 200


@pytest.mark.parametrize("headers,says", [
    ({"Authorization": ""}, "missing API key"),
    ({"Authorization": "Bearer wrong"}, "invalid API key"),
    ({"Authorization": "Basic Y29uZmlnLWtleS0x"}, "missing API key"),
    ({"Authorization": "", "x-api-key": "# one key per line"}, "invalid API key"),
])
def test_missing_or_wrong_key_is_401(server, headers, says):
    r = complete(server, headers)
    assert_error(r, 401, code="invalid_api_key", says=says)
    assert r.headers["www-authenticate"].startswith("Bearer")
    assert complete(server, {}).status_code == 200  # the right key still works afterwards


def test_every_route_but_health_needs_a_key(server):
    no_key = {"Authorization": ""}
    assert server.get("/health", headers=no_key).status_code == 200
    for path in ("/v1/models", "/v1/models/scripted", "/nowhere"):
        assert_error(server.get(path, headers=no_key), 401)


def test_openai_sdk_with_and_without_the_key(server):
    good = openai.OpenAI(base_url=server.base_url, api_key="config-key-1", max_retries=0)
    assert good.completions.create(model="scripted", prompt="Hello", temperature=0).choices[0].text == " world!"
    bad = openai.OpenAI(base_url=server.base_url, api_key="nope", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()


def test_keys_are_never_logged(server):
    log = server.log()
    assert "config-key-1" not in log and "file-key-2" not in log


def test_prompts_are_not_logged_by_default(server):
    server.post("/v1/chat/completions", {"messages": [{"role": "user", "content": "secret-prompt-xyzzy"}]})
    assert "xyzzy" not in server.log()


def test_prompts_are_logged_when_asked(server_factory, models):
    server = server_factory(models["scripted"], config="[log]\nprompts = true\n")
    server.post("/v1/chat/completions", {"messages": [{"role": "user", "content": "visible-prompt-plugh"}]})
    assert "plugh" in server.log()
