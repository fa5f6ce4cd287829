"""A lean process: a server with no model loaded holds neither llama.cpp nor the libraries of
parts it does not use, and the CLI imports only what a command needs. The timings themselves
are measured by tools/bench/startup.py, not asserted here."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT

from edgellm.store.registry import Registry

# Native libraries an idle server must not have mapped (a fragment of each one's path): what
# only a loaded model uses (llama.cpp, numpy for sampling, jinja2's markupsafe for chat
# templates), the relay's client, and the bundle importer's signatures.
NOT_WHEN_IDLE = ("libllama", "libggml", "/numpy/", "/markupsafe/", "/aiohttp/", "/cryptography/")


def mapped(pid: int) -> str:
    """The paths of the files the process has mapped: its loaded libraries among them."""
    return Path(f"/proc/{pid}/maps").read_text()


def rss_mib(pid: int) -> float:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(next(line for line in status.splitlines() if line.startswith("VmRSS:")).split()[1]) / 1024


@pytest.fixture(scope="module")
def idle(server_factory, models, tmp_path_factory):
    """A server with a model installed in its store, none loaded, after /health answered."""
    state = tmp_path_factory.mktemp("state")
    Registry(state).add(models["scripted"])
    return server_factory(None, state_dir=state)


def test_an_idle_server_answers_without_the_libraries_it_does_not_use(idle):
    assert idle.get("/health").json()["status"] == "ok"
    assert [m["id"] for m in idle.get("/v1/models").json()["data"]] == ["scripted"]
    assert "edgellm_requests_total" in idle.get("/metrics").text
    maps = mapped(idle.proc.pid)
    assert [lib for lib in NOT_WHEN_IDLE if lib in maps] == []


def test_an_idle_server_stays_small(idle):
    # 39 MiB measured on x86-64; 77 MiB when llama.cpp and the rest were imported at start.
    assert rss_mib(idle.proc.pid) < 60


def test_the_first_request_loads_llama_cpp(server_factory, models, tmp_path):
    state = tmp_path / "state"
    Registry(state).add(models["scripted"])
    server = server_factory(None, state_dir=state)
    assert "libllama" not in mapped(server.proc.pid)
    r = server.post("/v1/completions", {"model": "scripted", "prompt": " Hello", "max_tokens": 4, "temperature": 0})
    assert r.json()["choices"][0]["text"] == " world!"
    assert "libllama" in mapped(server.proc.pid)
    assert "backend cpu" in server.log()  # the backend plan is made by the first load


def test_the_model_loads_once_the_socket_listens(server_factory, models):
    server = server_factory(models["scripted"])
    log = server.log()
    assert log.index("listening on http") < log.index("model scripted ready")


@pytest.mark.parametrize("args", [["--version"], ["frobnicate"], ["serve", "--config", "/nonexistent"]])
def test_the_cli_answers_without_importing_the_server(args):
    # What `edgellm ARGS` imports, read from a fresh interpreter once main() has answered.
    code = (f"import sys\nfrom edgellm.cli import main\ntry:\n    main({args!r})\nexcept SystemExit:\n    pass\n"
            "print(' '.join(sorted(sys.modules)))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=60)
    imported = set(done.stdout.splitlines()[-1].split())
    assert "edgellm.cli" in imported
    assert imported & {"asyncio", "logging", "uvicorn", "starlette", "edgellm.app", "edgellm.store.registry",
                       "llama_cpp"} == set()
