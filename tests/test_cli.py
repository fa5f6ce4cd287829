"""The command line and the config file: one-line errors with exit status 2, flags over the file."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import socket
import subprocess
import sys
import tomllib
import uuid
from pathlib import Path

import pytest
from conftest import ROOT

from edgellm import __version__
from edgellm.config import Config, ConfigError, from_dict, load
from edgellm.store.registry import Registry


def edgellm(*args: str, cwd: Path | None = None, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "edgellm", *args], capture_output=True, text=True, cwd=cwd,
                          timeout=timeout)


def assert_one_line_error(result: subprocess.CompletedProcess, *fragments: str, status: int = 2) -> str:
    assert result.returncode == status, result
    assert result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.stderr
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    return lines[0]


def test_version():
    result = edgellm("--version")
    assert result.returncode == 0 and result.stdout.strip() == f"edgellm {__version__}"


def test_console_script_is_installed():
    script = Path(sys.executable).parent / "edgellm"
    result = subprocess.run([str(script), "--version"], capture_output=True, text=True)
    assert result.stdout.strip() == f"edgellm {__version__}"


@pytest.mark.parametrize("text,fragments", [
    ("[engine]\nn_cxt = 4096\n", ["[engine] n_cxt", "unknown key", "n_ctx"]),
    ("[engines]\nn_ctx = 4096\n", ["'engines'", "unknown section"]),
    ("port = 80\n", ["'port'", "unknown"]),
    ("[server]\nport = \"8080\"\n", ["[server] port", "expected an integer, got a string"]),
    ("[server]\napi_keys = \"secret\"\n", ["[server] api_keys", "expected an array of strings"]),
    ("[server]\napi_keys = [1]\n", ["[server] api_keys", "array of strings"]),
    ("[log]\nprompts = 1\n", ["[log] prompts", "expected a boolean"]),
    ("[engine]\nflash_attn = \"maybe\"\n", ["[engine] flash_attn", "auto, on, off"]),
    ("[server]\nport = 70000\n", ["[server] port", "0 to 65535"]),
    ("[engine]\nn_ctx = 0\n", ["[engine] n_ctx", "from 16"]),
    ("[server\nport = 1\n", ["not valid TOML"]),
    ("server = 5\n", ["'server' must be a table"]),
])
def test_config_errors_are_one_line_naming_key_and_file(tmp_path, models, text, fragments):
    config = tmp_path / "edgellm.toml"
    config.write_text(text)
    result = edgellm("serve", "--config", str(config), "--model", str(models["scripted"]))
    assert_one_line_error(result, str(config), *fragments)


def test_missing_config_file(tmp_path):
    missing = tmp_path / "nope.toml"
    assert_one_line_error(edgellm("serve", "--config", str(missing)), str(missing), "no such config file")


def test_missing_model_file_from_the_flag(tmp_path):
    assert_one_line_error(edgellm("serve", "--model", str(tmp_path / "x.gguf")), "--model", "no such file")


def test_missing_model_file_from_the_config(tmp_path):
    config = tmp_path / "edgellm.toml"
    config.write_text(f'[model]\npath = "{tmp_path / "gone.gguf"}"\n')
    assert_one_line_error(edgellm("serve", "--config", str(config)), str(config), "[model] path", "no such file")


def test_a_file_that_is_not_gguf(tmp_path):
    fake = tmp_path / "model.gguf"
    fake.write_text("not a model")
    assert_one_line_error(edgellm("serve", "--model", str(fake)), "--model", "not a GGUF file")


def test_a_file_with_a_damaged_header(tmp_path):
    damaged = tmp_path / "model.gguf"
    damaged.write_bytes(b"GGUF" + b"\x07\x00\x00\x00" + b"\x00" * 32)
    assert_one_line_error(edgellm("serve", "--model", str(damaged)), "--model", "GGUF version 7 is not supported")


def test_serving_with_no_model_yet(server_factory, tmp_path):
    # An appliance starts before its first model arrives: it serves, and says what to do.
    server = server_factory(None)
    assert server.get("/v1/models").json()["data"] == []
    r = server.post("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}]})
    assert r.status_code == 404 and "edgellm models add" in r.json()["error"]["message"]
    assert "no models yet" in server.log()


@pytest.mark.parametrize("args,fragment", [
    (["serve", "--port", "http"], "not a port number"),
    (["serve", "--port", "99999"], "port must be 0-65535"),
    (["serve", "--bogus"], "unrecognized arguments: --bogus"),
    (["frobnicate"], "invalid choice"),
    ([], "required"),
])
def test_usage_errors_are_one_line(args, fragment):
    assert_one_line_error(edgellm(*args), fragment)


def test_lan_bind_without_keys_is_refused(models):
    # Refused before anything binds, so no socket ever opens on a real interface.
    result = edgellm("serve", "--model", str(models["scripted"]), "--host", "0.0.0.0")
    assert_one_line_error(result, "refusing to listen on 0.0.0.0 without API keys", "--insecure-no-auth")


def test_port_in_use_is_one_line_and_status_1(models):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = str(taken.getsockname()[1])
        result = edgellm("serve", "--model", str(models["scripted"]), "--port", port)
    assert result.returncode == 1
    assert f"cannot listen on 127.0.0.1:{port}" in result.stderr
    assert "Traceback" not in result.stderr


def test_flags_override_the_file(server_factory, models, tmp_path):
    # The file names a model that does not exist and port 1; the flags (--model, --port 0) win,
    # while the file's other keys (the model id) still apply.
    server = server_factory(models["scripted"], config=(
        f'[server]\nport = 1\n[model]\npath = "{tmp_path / "absent.gguf"}"\nid = "from-the-file"\n'))
    assert not server.url.endswith(":1")
    assert [m["id"] for m in server.get("/v1/models").json()["data"]] == ["from-the-file"]


def test_example_config_documents_every_key_with_its_default():
    example = ROOT / "docs" / "edgellm.example.toml"
    data = tomllib.loads(example.read_text())
    defaults = Config()
    for section in ("server", "model", "engine", "update", "log"):
        documented = set(data[section])
        fields = {f.name for f in dataclasses.fields(getattr(defaults, section))}
        assert documented == fields, section
    assert dataclasses.replace(load(example), source="defaults") == defaults


def test_from_dict_turns_arrays_into_tuples():
    config = from_dict({"server": {"api_keys": ["a", "b"]}}, "test.toml")
    assert config.server.api_keys == ("a", "b")
    with pytest.raises(ConfigError, match=r"test.toml: \[server\] api_keys"):
        from_dict({"server": {"api_keys": [True]}}, "test.toml")


@pytest.fixture
def netns():
    """A network namespace of our own: binding 0.0.0.0 in it reaches no real interface."""
    if shutil.which("ip") is None:
        pytest.skip("iproute2 is not installed")
    name = f"edgellm-test-{uuid.uuid4().hex[:8]}"
    if subprocess.run(["ip", "netns", "add", name], capture_output=True).returncode != 0:
        pytest.skip("cannot create network namespaces here")
    subprocess.run(["ip", "-n", name, "link", "set", "lo", "up"], check=True)
    yield name
    subprocess.run(["ip", "netns", "delete", name], check=True)


def test_lan_bind_with_insecure_no_auth_starts_and_warns(netns, models):
    proc = subprocess.Popen(["ip", "netns", "exec", netns, sys.executable, "-m", "edgellm", "serve",
                             "--model", str(models["scripted"]), "--host", "0.0.0.0", "--port", "0",
                             "--insecure-no-auth"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        lines = []
        for line in proc.stdout:
            lines.append(line)
            if "listening on http" in line:
                break
        log = "".join(lines)
        assert "anyone on the network can use this service" in log
        assert "listening on https://0.0.0.0:" in log  # TLS on the LAN ([server] tls = "auto")
    finally:
        proc.terminate()
        proc.wait(15)
        proc.stdout.close()


def test_config_file_that_is_not_utf8(tmp_path, models):
    config = tmp_path / "edgellm.toml"
    config.write_bytes(b"[server]\nhost = \"\xff\xfe\"\n")
    result = edgellm("serve", "--config", str(config), "--model", str(models["scripted"]))
    assert_one_line_error(result, str(config), "not UTF-8")


def test_sigterm_during_a_stream_shuts_down_promptly(server_factory, models):
    import httpx

    server = server_factory(models["scripted"], config="[engine]\nn_ctx = 32768\n")
    with httpx.stream("POST", server.url + "/v1/completions", timeout=10,
                      json={"prompt": "tick", "stream": True}) as r:
        lines = r.iter_lines()
        next(lines)
        server.proc.terminate()
        try:  # the stream ends, with an error event or a closed connection, instead of hanging
            for _ in lines:
                pass
        except (httpx.RemoteProtocolError, httpx.ReadError):
            pass  # a closed connection; a hang would be a ReadTimeout, which fails the test
    assert server.proc.wait(15) is not None
    assert "Traceback" not in server.log()


def test_serve_reads_the_config_systemd_hands_over(tmp_path, models):
    """On the appliance the config is root's alone; the service gets it as a credential."""
    creds = tmp_path / "creds"
    creds.mkdir()
    (creds / "edgellm.toml").write_text('[server]\nport = 70000\n')  # refused: proof that it was read
    result = subprocess.run([sys.executable, "-m", "edgellm", "serve", "--model", str(models["scripted"]),
                             "--state-dir", str(tmp_path / "state")], capture_output=True, text=True, timeout=60,
                            env={**os.environ, "CREDENTIALS_DIRECTORY": str(creds)})
    assert_one_line_error(result, f"{creds / 'edgellm.toml'}: [server] port")


def test_a_config_on_stdin(tmp_path, models):
    """`--config -`: a file root opened for a process that may not open it (the USB import)."""
    state = tmp_path / "from-stdin"
    Registry(state).add(models["random"])
    result = subprocess.run([sys.executable, "-m", "edgellm", "models", "list", "--json", "--config", "-"],
                            input=f'[server]\nstate_dir = "{state}"\n', capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and [e["id"] for e in json.loads(result.stdout)] == ["random"]
    bad = subprocess.run([sys.executable, "-m", "edgellm", "models", "list", "--config", "-"],
                         input="[server]\nport = 'x'\n", capture_output=True, text=True, timeout=60)
    assert_one_line_error(bad, "stdin: [server] port")
