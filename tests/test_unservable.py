"""A model file that cannot be described never stops the service: it is shown as failed with the
reason, a request for it is told why, and every other model (installed before or after it)
serves. The audit's file: a GGUF whose `embedding_length` is an f32 NaN, which `models add`
accepted and which then stopped `serve` at start-up. `models add` refuses it now; the store may
still hold one (installed by an older version, a blob damaged since), so the service copes."""

from __future__ import annotations

import httpx
import pytest
from conftest import wait_until
from test_cli import edgellm
from tiny_models import write_model

from edgellm.store.registry import Registry, describe


@pytest.fixture(scope="module")
def broken(tmp_path_factory):
    return write_model(tmp_path_factory.mktemp("broken") / "broken.gguf", embedding_length=float("nan"))


def _install_anyway(path, state) -> None:
    """Put a file in the store past `models add`'s check, as an older edgellm did."""
    registry = Registry(state)
    registry.open()
    with registry.locked():
        files = [registry._install(path, None)]
        entry = describe([registry.blob(files[0].sha256)], model_id="broken", source="file:x", files=files)
        registry._write([*registry.entries(), entry])


def test_models_add_refuses_such_a_file(broken, tmp_path):
    r = edgellm("models", "add", str(broken), "--state-dir", str(tmp_path / "state"))
    assert r.returncode == 1 and r.stderr.count("\n") == 1 and "embedding_length is nan" in r.stderr


def _ids(server) -> list[str]:
    return [m["id"] for m in server.get("/v1/models").json()["data"]]


def test_a_bad_file_installed_before_start_is_failed_and_the_rest_serve(server_factory, models, broken, tmp_path):
    state = tmp_path / "state"
    _install_anyway(broken, state)
    assert edgellm("models", "add", str(models["scripted"]), "--state-dir", str(state)).returncode == 0
    server = server_factory(None, state_dir=state)
    assert _ids(server) == ["scripted"]
    listed = {m["id"]: m for m in server.get("/admin/models").json()["data"]}
    assert listed["broken"]["state"] == "failed"
    assert "embedding_length" in listed["broken"]["failure"]
    r = server.post("/v1/completions", {"model": "broken", "prompt": "Hi"})
    assert r.status_code == 503 and r.json()["error"]["code"] == "model_failed"
    assert "embedding_length" in r.json()["error"]["message"]
    assert server.post("/v1/completions", {"model": "scripted", "prompt": "Hello", "temperature": 0}
                       ).json()["choices"][0]["text"] == " world!"
    assert httpx.get(server.url + "/health").status_code == 200  # the box serves: /admin/models says what failed


def test_models_installed_after_a_bad_one_are_picked_up(server_factory, models, broken, tmp_path):
    state = tmp_path / "state"
    server = server_factory(None, state_dir=state, wait_ready=False)
    _install_anyway(broken, state)
    assert edgellm("models", "add", str(models["scripted"]), "--state-dir", str(state)).returncode == 0
    wait_until(lambda: "scripted" in _ids(server), 10, message="the model installed after the bad one")
    assert server.post("/v1/completions", {"model": "scripted", "prompt": "Hello", "temperature": 0}
                       ).json()["choices"][0]["text"] == " world!"
    assert edgellm("models", "remove", "broken", "--state-dir", str(state)).returncode == 0
    wait_until(lambda: [m["id"] for m in server.get("/admin/models").json()["data"]] == ["scripted"], 10,
               message="the bad model to go from the listing")
