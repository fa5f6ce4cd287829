"""What files and clients hand the engine is checked where it enters, by type and range: a bad
sampling default is refused when the model is installed (its key named), never a failed request
later; a damaged catalog is a clear error naming the file; every request number is bounded."""

from __future__ import annotations

import json

import pytest
from conftest import SCRIPT, wait_until
from test_cli import edgellm
from tiny_models import write_model

from edgellm import limits
from edgellm.errors import InvalidRequest
from edgellm.protocol import openai as proto
from edgellm.store.registry import Registry, StoreError


@pytest.mark.parametrize("sampling,says", [
    ({"top_k": 40.0}, "general.sampling.top_k must be an integer"),  # once a 500 on every request
    ({"temp": 7.5}, "general.sampling.temp must be from 0 to 2, got 7.5"),
    ({"penalty_last_n": 2**31 - 1}, "general.sampling.penalty_last_n must be from -1 to 1048576"),
])
def test_a_model_file_with_a_bad_sampling_default_is_refused_at_install_with_the_key_named(tmp_path, sampling, says):
    bad = write_model(tmp_path / "bad.gguf", script=SCRIPT, sampling=sampling)
    result = edgellm("models", "add", str(bad), "--state-dir", str(tmp_path / "state"))
    assert result.returncode == 1 and result.stderr.count("\n") == 1 and "Traceback" not in result.stderr
    assert says in result.stderr
    assert Registry(tmp_path / "state").entries() == []  # nothing installed
    served = edgellm("serve", "--model", str(bad), "--port", "0", "--state-dir", str(tmp_path / "state"))
    assert served.returncode != 0 and says in served.stderr and "Traceback" not in served.stderr


def test_a_good_sampling_default_becomes_the_request_default(server_factory, tmp_path):
    greedy = write_model(tmp_path / "greedy.gguf", script=SCRIPT, sampling={"temp": 0.0, "top_k": 40})
    server = server_factory(greedy)
    # No temperature in the request: the file's 0 applies, and the scripted model's greedy reply comes out.
    replies = {server.post("/v1/completions", {"prompt": " Hello", "max_tokens": 4}).json()["choices"][0]["text"]
               for _ in range(3)}
    assert replies == {" world!"}


def test_catalog_records_are_checked_when_read(tmp_path, models):
    state = tmp_path / "state"
    Registry(state).add(models["scripted"])
    catalog = state / "models" / "catalog.json"
    doc = json.loads(catalog.read_text())
    assert doc["version"] == 3
    good = catalog.read_text()
    for change, says in [
        (lambda r: r.update(defaults={"top_k": 40.0}), "'top_k' must be an integer"),
        (lambda r: r.update(files="x"), "'files' must be a list"),
        (lambda r: r.update(installed="yesterday"), "does not match format"),
        (lambda r: r.pop("sha256"), "'sha256' must be a str"),
        (lambda r: r.update(surprise=1), "unknown fields ['surprise']"),
    ]:
        record = json.loads(good)
        change(record["models"][0])
        catalog.write_text(json.dumps(record))
        with pytest.raises(StoreError, match="catalog.json: models\\[0\\]") as refused:
            Registry(state).entries()
        assert says in str(refused.value)
        listed = edgellm("models", "list", "--state-dir", str(state))
        assert listed.returncode == 1 and "catalog.json: models[0]" in listed.stderr
        assert "Traceback" not in listed.stderr


def test_a_version_1_catalog_is_read_with_its_old_names(tmp_path, models):
    state = tmp_path / "state"
    Registry(state).add(models["scripted-chatml"])
    catalog = state / "models" / "catalog.json"
    doc = json.loads(catalog.read_text())
    record = doc["models"][0]
    record["chat_template"] = record.pop("has_chat_template")  # version 1: the file's flag...
    record["template"] = "{{ 'x' }}"  # ...and a bundle's template under another name
    catalog.write_text(json.dumps({"version": 1, "models": [record]}))
    [entry] = Registry(state).entries()
    assert entry.has_chat_template is True and entry.chat_template == "{{ 'x' }}"


def test_a_damaged_catalog_is_reported_by_health_while_the_model_file_still_serves(server_factory, models, tmp_path):
    state = tmp_path / "state"
    Registry(state).add(models["random"])
    catalog = state / "models" / "catalog.json"
    catalog.write_text(catalog.read_text().replace('"size"', '"size": "big", "x"', 1))
    server = server_factory(models["scripted"], state_dir=state, wait_ready=False)
    r = wait_until(lambda: (r := server.get("/health")).status_code == 503 and "catalog.json: models[0]" in r.text
                   and r, 30, message="the health check to name the catalog")
    assert r.json()["error"]["code"] == "model_not_ready"
    assert server.post("/v1/completions", {"prompt": " Hello", "temperature": 0}).json()["choices"][0]["text"] \
        == " world!"


CHAT = {"messages": [{"role": "user", "content": "Hi"}]}


@pytest.mark.parametrize("field,value", [
    ("logit_bias", {str(i): 1 for i in range(limits.MAX_LOGIT_BIAS + 1)}),
    ("stop", ["x" * (limits.MAX_STOP_LENGTH + 1)]),
    ("top_k", limits.INT32_MAX + 1),
    ("max_tokens", limits.MAX_TOKENS + 1),
    ("temperature", float("nan")),
])
def test_request_numbers_and_lists_are_bounded(field, value):
    with pytest.raises(InvalidRequest) as refused:
        proto.parse_chat({**CHAT, field: value})
    assert refused.value.param == field


def test_the_bounds_are_the_documented_ones():
    """docs/api.md lists every bound of limits.py with its value."""
    from conftest import ROOT

    doc = (ROOT / "docs" / "api.md").read_text()
    for name in limits.SAMPLING:
        assert f"| `{name}` |" in doc, name
    for value in (limits.MAX_TOKENS, limits.MAX_STOPS, limits.MAX_STOP_LENGTH, limits.MAX_LOGIT_BIAS,
                  limits.MAX_EMBEDDING_INPUTS, limits.MAX_TOOLS, limits.INT32_MAX):
        assert f"{value:,}".replace(",", " ") in doc or str(value) in doc, value


@pytest.mark.parametrize("body,param", [
    ({"messages": [{"role": "user", "content": "Hi", "name": 7}]}, "messages[0].name"),
    ({**CHAT, "response_format": {"type": "json_schema", "json_schema": {"name": ["x"], "schema": {}}}},
     "response_format.json_schema.name"),
    ({**CHAT, "response_format": {"type": "json_schema", "json_schema": {"strict": "yes", "schema": {}}}},
     "response_format.json_schema.strict"),
])
def test_fields_edgellm_does_not_use_are_still_checked(body, param):
    # Found by the fuzz against /openapi.json: these were accepted whatever their type.
    with pytest.raises(InvalidRequest) as refused:
        proto.parse_chat(body)
    assert refused.value.param == param
