"""A real edgellm server on a loopback port for the fuzz and soak tools, and the tiny models they
serve by default (tests/tiny_models.py: random weights, milliseconds to write).

The server is this checkout's `python -m edgellm serve --port 0`, in its own process, so that
the tools measure what a deployment runs (its RSS and descriptors included)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import httpx

ROOT = Path(__file__).resolve().parent.parent
T = TypeVar("T")
# The tools' own clients (httpx reads the proxy variables) talk to loopback directly, never via a proxy.
os.environ.setdefault("NO_PROXY", "127.0.0.1,localhost")


def wait_for(predicate: Callable[[], T | None], seconds: float, what: str, interval: float = 0.05) -> T:
    """Poll `predicate` until it returns something truthy; a deadline instead of a sleep."""
    deadline = time.monotonic() + seconds
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {seconds:g} s waiting for {what}")
        time.sleep(interval)


def tiny_models(directory: Path) -> dict[str, Path]:
    """Two chat models (random weights, a ChatML template) and an embedding model, written once."""
    sys.path.insert(0, str(ROOT / "tests"))
    from tiny_models import CHATML, write_model

    directory.mkdir(parents=True, exist_ok=True)
    made = {}
    for role, seed, kwargs in (("chat", 3, {"chat_template": CHATML}), ("embed", 4, {"pooling": 1}),
                               ("other", 5, {"chat_template": CHATML})):
        path = made[role] = directory / f"tiny-{role}.gguf"
        if not path.exists():
            write_model(path, seed=seed, **kwargs)
    return made


def server_env() -> dict[str, str]:
    """The environment for `python -m edgellm`: this checkout's package, loopback without a proxy."""
    return {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
            "NO_PROXY": "127.0.0.1,localhost"}


class LocalServer:
    """`python -m edgellm serve` on 127.0.0.1 with an OS-chosen port and no keys (loopback is open);
    stopped by stop() or `with`."""

    def __init__(self, workdir: Path, *, model: Path | None = None, install: tuple[Path, ...] = (),
                 config: str = "") -> None:
        workdir.mkdir(parents=True, exist_ok=True)
        self.state_dir = workdir / "state"
        self.log_path = workdir / "server.log"
        env = server_env()
        for path in install:  # into the store, as `edgellm models add` does
            subprocess.run([sys.executable, "-m", "edgellm", "models", "add", str(path), "--state-dir",
                            str(self.state_dir)], env=env, check=True, capture_output=True, timeout=60)
        cmd = [sys.executable, "-m", "edgellm", "serve", "--port", "0", "--state-dir", str(self.state_dir)]
        if model is not None:
            cmd += ["--model", str(model)]
        if config:
            (workdir / "edgellm.toml").write_text(config)
            cmd += ["--config", str(workdir / "edgellm.toml")]
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT, cwd=workdir, env=env)
        try:
            self.url: str = wait_for(self._listening, 30, "the server to listen")
            wait_for(self._healthy, 60, "the server to be ready")
        except BaseException:
            self.stop()
            raise

    @property
    def pid(self) -> int:
        return self.proc.pid

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def _alive(self) -> None:
        if self.proc.poll() is not None:
            raise RuntimeError(f"the server exited with {self.proc.returncode}:\n{self.log()[-4000:]}")

    def _listening(self) -> str | None:
        self._alive()
        for line in self.log().splitlines():
            if "listening on http" in line:
                return line.split("listening on ")[1].split()[0]
        return None

    def _healthy(self) -> bool:
        self._alive()
        try:
            return httpx.get(self.url + "/health", timeout=5).status_code == 200
        except httpx.HTTPError:
            return False

    def stop(self) -> int | None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self._log.close()
        return self.proc.returncode

    def __enter__(self) -> LocalServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
