"""A runner thread cannot die unnoticed, and a load can neither hang nor leave the pool stuck.

The faults are real exceptions raised inside the real engine (a scheduler step, a warm-up
decode) through monkeypatch, in a real app on a real socket (conftest.InProcess).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import socket
import threading

import httpx
import pytest
from conftest import InProcess, wait_until
from test_errors import assert_error

from edgellm.config import Config, EngineConfig, ModelConfig, ModelsConfig, ServerConfig
from edgellm.engine.errors import ModelLoadError
from edgellm.engine.model import Model
from edgellm.engine.runner import Runner
from edgellm.engine.scheduler import Scheduler
from edgellm.sdnotify import Notifier, supervise

HELLO = {"prompt": " Hello", "temperature": 0, "max_tokens": 8}


def failing_steps(monkeypatch, *, after: int = 0, times: int = 1) -> dict[str, int]:
    """Scheduler steps raise (a bug in a step) `times` times, after `after` good steps each time."""
    real_step = Scheduler.step
    state = {"times": times, "steps": 0}

    def step(self: Scheduler) -> None:
        state["steps"] += 1
        if state["times"] > 0 and state["steps"] > after:
            state["times"] -= 1
            state["steps"] = 0
            raise RuntimeError("a bug in a scheduler step")
        real_step(self)

    monkeypatch.setattr(Scheduler, "step", step)
    return state


def config(tmp_path, model, **models: object) -> Config:
    return Config(server=ServerConfig(state_dir=str(tmp_path)), model=ModelConfig(path=str(model)),
                  models=ModelsConfig(**models))


def admin_state(server: InProcess) -> dict:
    [model] = httpx.get(server.url + "/admin/models").json()["data"]
    return model


def test_a_dead_runner_fails_its_requests_shows_as_failed_and_the_next_request_loads_it_again(
        models, monkeypatch, tmp_path):
    failing_steps(monkeypatch)
    with InProcess(config(tmp_path, models["scripted"])) as server:
        r = httpx.post(server.url + "/v1/completions", json=HELLO, timeout=30)
        assert_error(r, 503, code="runner_failed", says="stopped working (RuntimeError: a bug in a scheduler step)")
        failed = wait_until(lambda: (m := admin_state(server))["state"] == "failed" and m, 10,
                            message="the model to show as failed")
        assert "RuntimeError: a bug in a scheduler step" in failed["failure"]
        assert_error(httpx.get(server.url + "/health"), 503, code="model_not_ready", says="stopped working")
        assert "failed: scripted stopped working" in server.service.summary()  # systemd's STATUS line
        assert server.service.broken() == []  # one failure: it can be brought back
        r = httpx.post(server.url + "/v1/completions", json=HELLO, timeout=30)
        assert r.status_code == 200 and r.json()["choices"][0]["text"] == " world!"
        assert admin_state(server)["state"] == "loaded" and admin_state(server)["failure"] is None
        assert httpx.get(server.url + "/health").status_code == 200


def test_a_stream_cut_by_a_dead_runner_ends_with_an_error_event(models, monkeypatch, tmp_path):
    failing_steps(monkeypatch, after=3)  # the prompt and two tokens go through first
    with InProcess(config(tmp_path, models["scripted"])) as server:
        with httpx.stream("POST", server.url + "/v1/completions", json={**HELLO, "stream": True}, timeout=30) as r:
            assert r.status_code == 200
            events = [line.removeprefix("data: ") for line in r.iter_lines() if line.startswith("data: ")]
        assert '"text":" wor' in events[0]  # text arrived before the failure (maybe joined with what followed)
        assert '"code":"runner_failed"' in events[-1] and "[DONE]" not in events
        r = httpx.post(server.url + "/v1/completions", json=HELLO, timeout=30)
        assert r.json()["choices"][0]["text"] == " world!"


def test_a_model_that_keeps_failing_is_broken_and_the_watchdog_stops(models, monkeypatch, tmp_path):
    failing_steps(monkeypatch, times=3)
    systemd = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    systemd.bind(str(tmp_path / "notify"))
    systemd.settimeout(5)
    notifier = Notifier({"NOTIFY_SOCKET": str(tmp_path / "notify"), "WATCHDOG_USEC": "200000"})
    with InProcess(config(tmp_path, models["scripted"])) as server:
        supervising = asyncio.run_coroutine_threadsafe(supervise(notifier, server.service, server.url), server.loop)
        try:
            assert b"READY=1" in systemd.recv(4096)
            assert systemd.recv(4096) == b"WATCHDOG=1"
            for _ in range(3):
                r = httpx.post(server.url + "/v1/completions", json=HELLO, timeout=30)
                assert_error(r, 503, code="runner_failed")
            wait_until(lambda: server.service.broken() == ["scripted"], 10, message="the model to be broken")
            r = httpx.post(server.url + "/v1/completions", json=HELLO, timeout=30)
            assert_error(r, 503, code="model_not_ready", says="restart the service")
            # The pings stop: after the status that says so, no WATCHDOG=1 for five intervals and more.
            seen = []
            systemd.settimeout(0.5)
            with pytest.raises(TimeoutError):
                while True:
                    seen.append(systemd.recv(4096))
            said = next(i for i, m in enumerate(seen) if b"waiting for a restart" in m)
            assert b"WATCHDOG=1" not in seen[said:]
        finally:
            supervising.cancel()
            notifier.close()
            systemd.close()


def test_a_runner_that_cannot_start_fails_the_load_and_blocks_nothing(models, monkeypatch, tmp_path):
    """Any exception while the runner starts (not only llama.cpp's) fails that load with the
    reason, at once; other models still load and unload meanwhile."""
    broken = {"on": True}
    real_warm_up = Runner._warm_up

    def warm_up(self: Runner, ctx, batch) -> None:
        if broken["on"] and self.model_id == "scripted":
            raise RuntimeError("the driver crashed")
        real_warm_up(self, ctx, batch)

    monkeypatch.setattr(Runner, "_warm_up", warm_up)
    state = tmp_path / "state"
    state.mkdir()
    from edgellm.store.registry import Registry
    Registry(state).add(models["random"], alias="other")
    conf = Config(server=ServerConfig(state_dir=str(state)), model=ModelConfig(path=str(models["scripted"])))
    with InProcess(conf) as server:
        r = httpx.post(server.url + "/v1/completions", json={**HELLO, "model": "scripted"}, timeout=30)
        assert_error(r, 503, code="model_not_ready", says="failed to load")
        assert "RuntimeError: the driver crashed" in r.json()["error"]["message"]
        other = httpx.post(server.url + "/v1/completions", json={**HELLO, "model": "other"}, timeout=30)
        assert other.status_code == 200
        assert httpx.post(server.url + "/admin/models/other/unload").json()["state"] == "unloaded"
        broken["on"] = False
        r = httpx.post(server.url + "/v1/completions", json={**HELLO, "model": "scripted"}, timeout=30)
        assert r.json()["choices"][0]["text"] == " world!"


def test_a_load_whose_runner_is_too_slow_to_start_fails_and_frees_the_weights_only_after(
        models, monkeypatch, tmp_path):
    from edgellm.engine import runner as runner_module

    gate, freed = threading.Event(), []
    real_warm_up, real_close = Runner._warm_up, Model.close

    def slow_warm_up(self: Runner, ctx, batch) -> None:
        gate.wait(30)
        real_warm_up(self, ctx, batch)

    def close(self: Model) -> None:
        freed.append([t.name for t in threading.enumerate() if t.name == "edgellm-runner"])
        real_close(self)

    monkeypatch.setattr(Runner, "_warm_up", slow_warm_up)
    monkeypatch.setattr(Model, "close", close)
    monkeypatch.setattr(runner_module, "START_TIMEOUT", 0.3)
    with InProcess(config(tmp_path, models["scripted"], load_timeout="30s")) as server:
        r = httpx.post(server.url + "/v1/completions", json=HELLO, timeout=30)
        assert_error(r, 503, code="model_not_ready", says="did not set up a context within 0.3 s")
        assert freed == []  # the runner's thread still reads the weights
        gate.set()
        wait_until(lambda: freed, 10, message="the weights to be freed")
        assert freed == [[]]  # once its thread had ended


def test_the_wait_for_a_runner_to_start_is_bounded(models, monkeypatch):
    gate = threading.Event()
    real_warm_up = Runner._warm_up

    def slow_warm_up(self: Runner, ctx, batch) -> None:
        gate.wait(30)
        real_warm_up(self, ctx, batch)

    monkeypatch.setattr(Runner, "_warm_up", slow_warm_up)
    model = Model(models["scripted"])
    try:
        threads = set(threading.enumerate())
        with pytest.raises(ModelLoadError, match="did not set up a context within 0.2 s"):
            Runner(model, EngineConfig(n_ctx=256), start_timeout=0.2)
        [thread] = set(threading.enumerate()) - threads
        gate.set()  # it gets there after all: it frees its context and ends by itself
        thread.join(10)
        assert not thread.is_alive()
    finally:
        gate.set()
        model.close()


def test_a_long_prefill_sends_keep_alive_comments_that_clients_skip(models, monkeypatch, tmp_path):
    """While the first token is slow in coming (held back here), the stream sends SSE comments,
    so a proxy sees a live connection; the official SDK reads through them."""
    import openai

    from edgellm.engine.service import Generation
    from edgellm.serving import openai as routes

    gate = threading.Event()
    real_step = Scheduler.step

    def held_step(self: Scheduler) -> None:
        gate.wait(30)
        real_step(self)

    real_first = Generation.first
    quiet: list[float] = []

    async def first(self: Generation, timeout: float):
        event = await real_first(self, timeout)
        if event is None:
            quiet.append(timeout)
        return event

    monkeypatch.setattr(Scheduler, "step", held_step)
    monkeypatch.setattr(Generation, "first", first)
    monkeypatch.setattr(routes, "KEEPALIVE_AFTER", 0.2)
    with InProcess(config(tmp_path, models["scripted-chatml"])) as server:
        with httpx.stream("POST", server.url + "/v1/completions", json={**HELLO, "stream": True}, timeout=30) as r:
            lines = r.iter_lines()
            assert next(lines) == ": keep-alive" and r.status_code == 200
            assert next(lines) == ""
            assert next(lines) == ": keep-alive"
            gate.set()
            data = [line for line in lines if line.startswith("data: ")]
        assert data[-1] == "data: [DONE]"
        assert "".join(json.loads(d[6:])["choices"][0]["text"] for d in data[:-1]) == " world!"

        gate.clear()
        quiet.clear()
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0)
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            chat = pool.submit(lambda: "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(
                model="scripted-chatml", messages=[{"role": "user", "content": "Hi"}], temperature=0, stream=True)))
            wait_until(lambda: len(quiet) >= 3, 10, message="keep-alive comments")
            gate.set()
            assert chat.result(30) == "Once upon a time"
