"""The relay: real edgellm upstreams on loopback for the policies and disconnects, and a small
fault-injecting HTTP server for what a healthy upstream never does (hang, 500, cut streams)."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path

import httpx
import pytest
from conftest import wait_until
from test_errors import assert_error


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Faulty:
    """An HTTP/1.1 server on loopback that answers as told: `mode` is one of ok, hang, vllm-400,
    500, cut, busy-once (503 with Retry-After 1, then ok), redirect (302 to another host), huge-error
    (a 500 with a 50 MiB body), bad-usage (a stream whose usage is nonsense). Records the bodies."""

    def __init__(self, mode: str = "ok", port: int | None = None) -> None:
        self.mode = mode
        self.bodies: list[dict] = []
        self.port = port or free_port()
        self.loop = asyncio.new_event_loop()
        ready = threading.Event()
        self.thread = threading.Thread(target=self._run, args=(ready,), daemon=True)
        self.thread.start()
        ready.wait(5)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def _run(self, ready: threading.Event) -> None:
        asyncio.set_event_loop(self.loop)
        self.server = self.loop.run_until_complete(asyncio.start_server(self._serve, "127.0.0.1", self.port))
        ready.set()
        self.loop.run_forever()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = int(re.search(rb"(?i)content-length: (\d+)", head)[1]) if b"ength:" in head else 0
                body = await reader.readexactly(length)
                path = head.split(b" ")[1].decode()
                if path.endswith("/models"):
                    await self._send(writer, 200, {"object": "list", "data": [{"id": "remote", "object": "model"}]})
                    continue
                if path.endswith("/health"):
                    await self._send(writer, 200, {"status": "ok"})
                    continue
                self.bodies.append(json.loads(body))
                mode = self.mode
                if mode == "hang":
                    await asyncio.sleep(3600)
                elif mode == "vllm-400":
                    await self._send(writer, 400, {"object": "error", "message": "bad temperature",
                                                   "type": "BadRequestError", "param": None, "code": 400})
                elif mode == "split-error":  # one error body in two writes: a read must not stop at the first
                    body = json.dumps({"object": "error", "message": "bad temperature " + "x" * 3000,
                                       "type": "BadRequestError", "param": None, "code": 400}).encode()
                    writer.write(b"HTTP/1.1 400 X\r\nContent-Type: application/json\r\n"
                                 b"Content-Length: %d\r\n\r\n" % len(body) + body[:100])
                    await writer.drain()
                    await asyncio.sleep(0.2)
                    writer.write(body[100:])
                    await writer.drain()
                elif mode == "500":
                    await self._send(writer, 500, {"object": "error", "message": "CUDA error",
                                                   "type": "InternalServerError", "param": None, "code": 500})
                elif mode == "redirect":
                    writer.write(b"HTTP/1.1 302 Found\r\nLocation: http://198.51.100.7/v1/completions\r\n"
                                 b"Content-Length: 0\r\n\r\n")
                    await writer.drain()
                elif mode == "huge-error":
                    writer.write(b"HTTP/1.1 500 X\r\nContent-Type: application/json\r\n"
                                 b"Content-Length: %d\r\n\r\n" % (50 << 20))
                    try:
                        for _ in range(50):
                            writer.write(b"x" * (1 << 20))
                            await writer.drain()
                    except ConnectionError:
                        pass
                    return
                elif mode == "bad-usage":
                    writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
                                 b"Transfer-Encoding: chunked\r\n\r\n")
                    for chunk in (b'data: {"choices": [{"index": 0, "text": "ok"}], "usage": "lots"}\n\n',
                                  b'data: {"usage": {"prompt_tokens": "9", "completion_tokens": [1]}}\n\n',
                                  b'data: {"usage": {"prompt_tokens": -5, "completion_tokens": 1e400}}\n\n',
                                  b'data: {"usage": ' + b'[' * 5000 + b'\n\n', b"data: [DONE]\n\n"):
                        writer.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
                    writer.write(b"0\r\n\r\n")
                    await writer.drain()
                elif mode == "busy-once":
                    self.mode = "ok"
                    await self._send(writer, 503, {"error": {"message": "busy"}}, {"Retry-After": "1"})
                elif mode == "cut":
                    writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
                                 b"Transfer-Encoding: chunked\r\n\r\n")
                    chunk = b'data: {"choices": [{"index": 0, "text": "half"}]}\n\n'
                    writer.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
                    await writer.drain()
                    await asyncio.sleep(0.3)  # then dies mid-stream
                    writer.close()
                    return
                else:
                    await self._send(writer, 200, {"id": "x", "object": "text_completion", "model": "remote",
                                                   "choices": [{"index": 0, "text": "fine", "finish_reason": "stop"}],
                                                   "usage": {"prompt_tokens": 2, "completion_tokens": 1,
                                                             "total_tokens": 3}})
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    async def _send(self, writer, status: int, doc: dict, headers: dict | None = None) -> None:
        body = json.dumps(doc).encode()
        extra = "".join(f"{k}: {v}\r\n" for k, v in (headers or {}).items())
        writer.write(f"HTTP/1.1 {status} X\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\n"
                     f"{extra}\r\n".encode() + body)
        await writer.drain()

    def stop(self) -> None:
        async def shutdown() -> None:
            self.server.close()
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

        asyncio.run_coroutine_threadsafe(shutdown(), self.loop).result(5)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)
        self.loop.close()


@pytest.fixture
def faulty():
    servers = []

    def start(mode: str = "ok") -> Faulty:
        servers.append(Faulty(mode))
        return servers[-1]

    yield start
    for s in servers:
        s.stop()


@pytest.fixture(scope="module")
def upstream(server_factory, models):
    """A second edgellm serving the scripted model as 'remote'."""
    return server_factory(models["scripted"], config='[model]\nid = "remote"\n[engine]\nn_ctx = 32768\n')


def relay_config(url: str, extra: str = "") -> str:
    return f'[relay]\nurl = "{url}"\nbreaker_cooldown = "1s"\n{extra}'


def complete(server, model: str = "remote", **fields) -> httpx.Response:
    return server.post("/v1/completions", {"model": model, "prompt": " Hello", "max_tokens": 4, **fields})


def metric(server, name: str) -> float:
    match = re.search(rf"^{re.escape(name)} (\S+)$", server.get("/metrics").text, re.M)
    return float(match[1]) if match else 0.0


def test_missing_models_go_upstream_and_the_listing_merges(server_factory, models, upstream):
    server = server_factory(models["random"], config=relay_config(upstream.base_url))
    reply = complete(server)
    assert reply.status_code == 200 and reply.headers["x-edgellm-served-by"] == "upstream"
    assert reply.json()["choices"][0]["text"] == " world!"
    here = complete(server, "random")
    assert here.status_code == 200 and here.headers["x-edgellm-served-by"] == "local"
    listed = {m["id"]: m["owned_by"] for m in server.get("/v1/models").json()["data"]}
    assert listed == {"random": "edgellm", "remote": "upstream"}

    with httpx.stream("POST", server.url + "/v1/chat/completions", timeout=30, json={
            "model": "remote", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 8, "stream": True,
            "stream_options": {"include_usage": True}}) as r:
        assert r.headers["x-edgellm-served-by"] == "upstream" and r.headers["x-accel-buffering"] == "no"
        lines = [line for line in r.iter_lines() if line.startswith("data: ")]
    assert lines[-1] == "data: [DONE]"
    assert metric(server, 'edgellm_served_total{by="upstream"}') == 2
    assert metric(server, 'edgellm_relayed_total{reason="missing"}') == 2  # the [relay] policy's name
    assert metric(server, 'edgellm_upstream_tokens_total{kind="completion"}') > 0

    offline = server_factory(models["random"], config=relay_config(upstream.base_url, "offline = true\n"))
    assert complete(offline).status_code == 404


def test_fallback_when_the_local_model_fails_before_the_first_byte(server_factory, models, tmp_path, upstream):
    broken = tmp_path / "remote.gguf"
    data = models["scripted"].read_bytes()
    broken.write_bytes(data[:len(data) // 2])  # the header reads, the weights are cut: the load fails here
    server = server_factory(broken, config=relay_config(upstream.base_url), wait_ready=False)
    wait_until(lambda: "failed to load" in server.get("/health").text, 30, message="the local load to fail")
    reply = complete(server)
    assert reply.status_code == 200 and reply.headers["x-edgellm-served-by"] == "upstream"
    assert metric(server, 'edgellm_relayed_total{reason="fallback"}') == 1
    no_fallback = server_factory(broken, config=relay_config(upstream.base_url, "fallback = false\n"),
                                 wait_ready=False)
    wait_until(lambda: "failed to load" in no_fallback.get("/health").text, 30, message="the local load to fail")
    assert complete(no_fallback).status_code == 503
    assert metric(no_fallback, 'edgellm_relayed_total{reason="fallback"}') == 0


def test_overflow_when_the_local_wait_is_over_budget(server_factory, models, upstream):
    server = server_factory(models["scripted"], config=relay_config(
        upstream.base_url, 'overflow = true\nttft_budget = "0.5s"\n') + '[model]\nid = "remote"\n'
        '[engine]\nparallel = 1\nn_ctx = 32768\n')
    with httpx.stream("POST", server.url + "/v1/completions", timeout=30, json={
            "model": "remote", "prompt": " tick", "max_tokens": 100000, "stream": True}) as busy:
        assert busy.headers["x-edgellm-served-by"] == "local"
        lines = busy.iter_lines()  # kept: a dropped iterator would close the stream
        next(lines)
        reply = complete(server)
        assert reply.status_code == 200 and reply.headers["x-edgellm-served-by"] == "upstream"
    assert metric(server, 'edgellm_relayed_total{reason="overflow"}') >= 1
    assert metric(server, 'edgellm_relayed_total{reason="fallback"}') == 0  # told apart from overflow


def test_an_upstream_that_is_down_fails_fast_opens_the_circuit_and_recovers(server_factory, models, faulty):
    port = free_port()
    url = f"http://127.0.0.1:{port}/v1"
    server = server_factory(models["random"], config=relay_config(url, 'models = ["remote"]\n'))
    for _ in range(3):
        started = time.monotonic()
        reply = complete(server)
        assert reply.status_code == 502 and "cannot be reached" in reply.json()["error"]["message"]
        assert time.monotonic() - started < 3
    opened = complete(server)
    assert opened.status_code == 503 and opened.json()["error"]["code"] == "upstream_unavailable"
    assert opened.headers["retry-after"]
    # It comes back: the half-open probe of /health closes the circuit.
    revived = Faulty("ok", port)
    try:
        wait_until(lambda: complete(server).status_code == 200, 15, message="the circuit to close")
        assert "circuit closed" in server.log()
    finally:
        revived.stop()


@pytest.mark.parametrize("mode,status,says", [
    ("hang", 504, "did not answer within 1 s"),
    ("vllm-400", 400, "upstream: bad temperature"),
    ("500", 500, "upstream: CUDA error"),
])
def test_upstream_faults_become_clean_errors(server_factory, models, faulty, mode, status, says):
    upstream = faulty(mode)
    server = server_factory(models["random"], config=relay_config(upstream.url, 'first_byte_timeout = "1s"\n'))
    started = time.monotonic()
    reply = complete(server)
    assert time.monotonic() - started < 5
    assert reply.status_code == status, reply.text
    error = reply.json()["error"]
    assert says in error["message"] and set(error) == {"message", "type", "param", "code"}
    assert error["type"] == ("invalid_request_error" if status == 400 else "server_error")


def test_a_redirecting_upstream_gets_nothing_more(server_factory, models, faulty):
    """The prompt is never sent on to where a 3xx points; the client learns why."""
    upstream = faulty("redirect")
    server = server_factory(models["random"], config=relay_config(upstream.url))
    reply = complete(server)
    assert_error(reply, 502, code="upstream_redirect", says="a redirect to http://198.51.100.7/v1/completions")
    assert len(upstream.bodies) == 1  # it asked once; nobody else was asked


def test_an_upstream_error_body_in_pieces_is_read_whole(server_factory, models, faulty):
    """Found by review: aiohttp's read(n) gives what has arrived, so the error was cut at 100 bytes."""
    upstream = faulty("split-error")
    server = server_factory(models["random"], config=relay_config(upstream.url))
    reply = complete(server)
    assert reply.status_code == 400
    assert reply.json()["error"]["message"].startswith("upstream: bad temperature xxx"), reply.text


def test_a_huge_upstream_error_body_is_read_only_in_part(server_factory, models, faulty):
    upstream = faulty("huge-error")
    server = server_factory(models["random"], config=relay_config(upstream.url))
    before = int(next(line for line in Path(f"/proc/{server.proc.pid}/status").read_text().splitlines()
                      if line.startswith("VmHWM:")).split()[1])
    reply = complete(server)
    assert reply.status_code == 500 and len(reply.json()["error"]["message"]) <= 600
    after = int(next(line for line in Path(f"/proc/{server.proc.pid}/status").read_text().splitlines()
                     if line.startswith("VmHWM:")).split()[1])
    assert after - before < 8 * 1024  # KiB: not the 50 MiB


def streamed_lines(server) -> list[str]:
    """The data lines of a streamed completion relayed to the upstream model."""
    with httpx.stream("POST", server.url + "/v1/completions", timeout=10,
                      json={"model": "remote", "prompt": "x", "stream": True}) as r:
        return [line for line in r.iter_lines() if line.startswith("data: ")]


def test_nonsense_usage_from_the_upstream_leaves_the_stream_whole(server_factory, models, faulty):
    upstream = faulty("bad-usage")
    server = server_factory(models["random"], config=relay_config(upstream.url))
    lines = streamed_lines(server)
    assert lines[-1] == "data: [DONE]" and len(lines) == 5
    assert metric(server, 'edgellm_upstream_tokens_total{kind="prompt"}') == 0


def test_a_malformed_structured_outputs_is_a_400(server_factory, models, upstream):
    server = server_factory(models["random"], config=relay_config(upstream.base_url))
    for value in ("json", ["json"], 5):
        reply = complete(server, guided_json={"type": "object"}, structured_outputs=value)
        assert_error(reply, 400, param="structured_outputs", says="must be an object")


def test_a_cut_stream_ends_with_an_error_event(server_factory, models, faulty):
    upstream = faulty("cut")
    server = server_factory(models["random"], config=relay_config(upstream.url))
    lines = streamed_lines(server)
    assert json.loads(lines[0][6:])["choices"][0]["text"] == "half", lines
    assert json.loads(lines[-1][6:])["error"]["code"] == "upstream_error"


def test_retry_after_is_honoured_once(server_factory, models, faulty):
    upstream = faulty("busy-once")
    server = server_factory(models["random"], config=relay_config(upstream.url))
    started = time.monotonic()
    reply = complete(server)
    assert reply.status_code == 200 and time.monotonic() - started >= 1
    assert len(upstream.bodies) == 2


def test_vllm_parameters_pass_and_guided_fields_are_translated(server_factory, models, faulty):
    upstream = faulty("ok")
    server = server_factory(models["random"], config=relay_config(upstream.url))
    assert complete(server, top_k=5, repetition_penalty=1.1, guided_json={"type": "object"}).status_code == 200
    sent = upstream.bodies[-1]
    assert sent["top_k"] == 5 and sent["repetition_penalty"] == 1.1
    assert sent["structured_outputs"] == {"json": {"type": "object"}} and "guided_json" not in sent
    refused = complete(server, guided_json={}, guided_decoding_backend="xgrammar")
    assert refused.status_code == 400 and "guided_decoding_backend" in refused.json()["error"]["message"]


def test_a_client_that_leaves_cancels_the_upstream_request(server_factory, models, upstream):
    """Streamed or not, a client that hangs up ends the upstream's generation at once."""
    server = server_factory(models["random"], config=relay_config(upstream.base_url))
    port = int(server.url.rsplit(":", 1)[1])

    def cancelled() -> float:
        return metric(upstream, 'edgellm_requests_total{outcome="cancelled"}')

    for stream in (True, False):
        before = cancelled()
        body = json.dumps({"model": "remote", "prompt": " tick", "max_tokens": 100000, "stream": stream}).encode()
        sock = socket.create_connection(("127.0.0.1", port))
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                     b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
        wait_until(lambda: 'edgellm_running_sequences{model="remote"} 1.0' in upstream.get("/metrics").text, 10,
                   message="the upstream to start generating")
        started = time.monotonic()
        sock.close()
        wait_until(lambda before=before: cancelled() > before, 5, message="the upstream to cancel")
        print(f"stream={stream}: upstream cancelled {1000 * (time.monotonic() - started):.0f} ms after the client "
              "left (polling included)")


LLAMA_SERVER = Path.home() / ".cache" / "edgellm-bench" / "build" / "bin" / "llama-server"


@pytest.mark.skipif(not LLAMA_SERVER.exists(), reason="llama-server is built by `make bench` only")
def test_llama_server_as_the_upstream(server_factory, models, tmp_path):
    """Another implementation upstream: llama.cpp's own server, as the benchmark builds it."""
    port = free_port()
    log = open(tmp_path / "llama-server.log", "wb")
    proc = subprocess.Popen([str(LLAMA_SERVER), "-m", str(models["scripted"]), "--alias", "remote", "--port",
                             str(port), "-c", "2048", "-np", "2", "--no-webui"], stdin=subprocess.PIPE, stdout=log,
                            stderr=subprocess.STDOUT, start_new_session=True)
    try:
        url = f"http://127.0.0.1:{port}"
        wait_until(lambda: _status(url + "/health") == 200, 60, message="llama-server to start")
        server = server_factory(models["random"], config=relay_config(url + "/v1"))
        reply = complete(server, temperature=0)
        assert reply.status_code == 200 and reply.headers["x-edgellm-served-by"] == "upstream"
        assert reply.json()["choices"][0]["text"].startswith(" world")
        with httpx.stream("POST", server.url + "/v1/chat/completions", timeout=30, json={
                "model": "remote", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 8,
                "stream": True}) as r:
            events = [line for line in r.iter_lines() if line.startswith("data: ")]
        assert r.headers["x-edgellm-served-by"] == "upstream" and events[-1] == "data: [DONE]"
        bad = server.post("/v1/completions", {"model": "remote", "max_tokens": 4})  # no prompt: its own error
        assert bad.status_code >= 400 and set(bad.json()["error"]) == {"message", "type", "param", "code"}
        assert bad.json()["error"]["message"].startswith("upstream: ")
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(15)
        proc.stdin.close()
        log.close()


def _status(url: str) -> int:
    try:
        return httpx.get(url, timeout=2).status_code
    except httpx.HTTPError:
        return 0


def test_tool_requests_for_upstream_models_pass_through_untouched(server_factory, models, faulty):
    """The upstream (vLLM) parses its own tool calls: edgellm checks nothing of them, not even what
    its own grammar would refuse, and changes nothing."""
    upstream = faulty("ok")
    server = server_factory(models["random"], config=relay_config(upstream.url))
    tools = [{"type": "function", "function": {"name": "look", "parameters": {
        "type": "object", "properties": {"q": {"not": {"type": "null"}}}}}}]
    history = [{"role": "user", "content": "hi"},
               {"role": "assistant", "content": None, "tool_calls": [
                   {"id": "c1", "type": "function", "function": {"name": "look", "arguments": "{\"q\": 1}"}}]},
               {"role": "tool", "tool_call_id": "c1", "content": "found"}]
    body = {"model": "remote", "messages": history, "tools": tools, "tool_choice": "required",
            "parallel_tool_calls": False}
    assert server.post("/v1/chat/completions", body).status_code == 200
    sent = upstream.bodies[-1]
    assert {k: sent[k] for k in body} == body
