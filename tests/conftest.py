"""Shared fixtures: tiny GGUF models and real edgellm servers on loopback."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from tiny_models import CHATML, SPACE, write_model

ROOT = Path(__file__).resolve().parent.parent
DEMO_MODEL = ROOT / ".edgellm" / "demo" / "gemma-3-270m-q4_k_m.gguf"

# Greedy decoding of the scripted models follows these successors exactly.
SCRIPT = {
    SPACE + "Hello": SPACE + "wor", SPACE + "wor": "ld", "ld": "!", "!": "</s>",
    SPACE + "euro": "<0xE2>", "<0xE2>": "<0x82>", "<0x82>": "<0xAC>", "<0xAC>": "</s>",
    SPACE + "tick": SPACE + "tock", SPACE + "tock": SPACE + "tick",
    # Chat: the chatml prompt ends with "assistant\n", the built-in llama2 one with "[/INST]".
    "\n": "Once", "Once": SPACE + "upon", SPACE + "upon": SPACE + "a", SPACE + "a": SPACE + "time",
    SPACE + "time": "</s>",
    "]": SPACE + "yes", SPACE + "yes": "</s>",
}


def wait_until(predicate, timeout: float, interval: float = 0.02, message: str = "condition"):
    """Poll `predicate` until it returns a truthy value or `timeout` seconds pass."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {message}")
        time.sleep(interval)


class Server:
    """`python -m edgellm serve` in a subprocess, on a free loopback port."""

    def __init__(self, model: Path | None, tmp: Path, *, config: str = "", args: tuple[str, ...] = (),
                 api_key: str | None = None, wait_ready: bool = True, state_dir: Path | None = None,
                 env: dict[str, str] | None = None, wrap: list[str] | None = None) -> None:
        """`wrap`: a command to run the server under (prlimit ...)."""
        self.log_path = tmp / "server.log"
        self.state_dir = state_dir or tmp / "state"
        cmd = [sys.executable, "-m", "edgellm", "serve", "--port", "0", "--state-dir", str(self.state_dir),
               *(["--model", str(model)] if model else [])]
        if config:
            (tmp / "edgellm.toml").write_text(config)
            cmd += ["--config", str(tmp / "edgellm.toml")]
        self.api_key = api_key
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen([*(wrap or []), *cmd, *args], stdout=self._log, stderr=subprocess.STDOUT, cwd=tmp,
                                     env={**os.environ, **(env or {})})
        self.verify: object = True  # for httpx: the pinned certificate when the server speaks TLS
        try:
            self.url = wait_until(self._listening_url, 30, message="the server to listen")
            if self.url.startswith("https://"):
                from edgellm.tls import pinned_context

                fingerprint = wait_until(self._fingerprint, 10, message="the certificate's fingerprint")
                host, port = self.url.removeprefix("https://").rsplit(":", 1)
                self.verify = pinned_context(host, int(port), fingerprint)
            if wait_ready:
                wait_until(self._healthy, 60, message="the model to load")
        except BaseException:
            self.stop()
            raise

    def _listening_url(self) -> str | None:
        if self.proc.poll() is not None:
            raise AssertionError(f"server exited early:\n{self.log()}")
        for line in self.log().splitlines():
            if "listening on http" in line:
                return line.split("listening on ")[1].split()[0]
        return None

    def _fingerprint(self) -> str | None:
        found = re.search(r"TLS only, certificate (sha256//\S+)", self.log())
        return found[1] if found else None

    def _healthy(self) -> bool:
        if self.proc.poll() is not None:
            raise AssertionError(f"server exited early:\n{self.log()}")
        return httpx.get(self.url + "/health", verify=self.verify).status_code == 200

    @property
    def base_url(self) -> str:
        return self.url + "/v1"

    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    def post(self, path: str, body: dict | None = None, **kwargs) -> httpx.Response:
        headers = {**self.headers(), **kwargs.pop("headers", {})}
        return httpx.post(self.url + path, json=body, headers=headers,
                          **{"timeout": 60, "verify": self.verify, **kwargs})

    def get(self, path: str, **kwargs) -> httpx.Response:
        headers = {**self.headers(), **kwargs.pop("headers", {})}
        return httpx.get(self.url + path, headers=headers, **{"timeout": 60, "verify": self.verify, **kwargs})

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self) -> int | None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self._log.close()
        return self.proc.returncode


def metric(server, name: str, **labels: str) -> float:
    """One sample of the server's /metrics, read with prometheus_client's own parser; 0 when absent."""
    from prometheus_client.parser import text_string_to_metric_families

    for family in text_string_to_metric_families(server.get("/metrics").text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return sample.value
    return 0.0


class InProcess:
    """The real app (create_app) served by uvicorn on a real loopback socket, in a thread of this
    process: for tests that hold back or break a part of it from inside (a load, a scheduler
    step) with monkeypatch, and for reaching the running service itself."""

    def __init__(self, config, **kwargs) -> None:
        import uvicorn

        from edgellm.app import create_app

        self.app = create_app(config, **kwargs)
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{sock.getsockname()[1]}"
        self.server = uvicorn.Server(uvicorn.Config(self.app, log_config=None))
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_until_complete, args=(self.server.serve(sockets=[sock]),),
                                       daemon=True)

    def __enter__(self) -> InProcess:
        self.thread.start()
        wait_until(lambda: self.server.started, 10, message="uvicorn to start")
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(15)
        self.loop.close()

    @property
    def service(self):
        return self.app.state.service

    def run(self, coroutine, timeout: float = 30):
        """Run a coroutine on the server's event loop and return its result."""
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(timeout)


@pytest.fixture(scope="session")
def models(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("models")
    return {
        "scripted": write_model(d / "scripted.gguf", script=SCRIPT),
        "scripted-chatml": write_model(d / "scripted-chatml.gguf", script=SCRIPT, chat_template=CHATML),
        "random": write_model(d / "random.gguf", seed=1),
        "embedding": write_model(d / "embedding.gguf", seed=2, pooling=1),
    }


@pytest.fixture(scope="module")
def server_factory(tmp_path_factory) -> Iterator:
    """Start servers for one test module; all are stopped at its end."""
    started: list[Server] = []

    def start(model: Path | None, **kwargs) -> Server:
        server = Server(model, tmp_path_factory.mktemp("server"), **kwargs)
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()


@pytest.fixture(scope="module")
def demo_model() -> Path:
    if not DEMO_MODEL.exists():
        pytest.skip(f"demo model not installed at {DEMO_MODEL} (make test installs it)")
    return DEMO_MODEL


os.environ.setdefault("NO_PROXY", "127.0.0.1,localhost")
# Servers and CLI runs in subprocesses import this checkout's edgellm, also where the venv's
# editable install points at another worktree of the repository.
os.environ["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])
