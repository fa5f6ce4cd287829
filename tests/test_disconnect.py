"""A client that goes away stops its generation and frees the engine for the next request.

The abandoned request asks for a reply as long as a 32k context: tens of seconds
of decoding on this machine. If the disconnect did not stop it, the next
request would queue behind it; instead it must finish in well under a second
or two.
"""

from __future__ import annotations

import time

import httpx
import pytest
from conftest import wait_until

FREED_WITHIN_S = 2.0


@pytest.fixture(scope="module")
def server(server_factory, models):
    return server_factory(models["scripted"], config="[engine]\nn_ctx = 32768\n")


def _next_request_latency(server) -> float:
    started = time.monotonic()
    r = server.post("/v1/completions", {"prompt": "Hello", "temperature": 0})
    elapsed = time.monotonic() - started
    assert r.status_code == 200 and r.json()["choices"][0]["text"] == " world!"
    return elapsed


def _cancelled_lines(server) -> list[str]:
    return [line for line in server.log().splitlines() if "generation cancelled after" in line]


def test_streamed_disconnect_frees_the_engine(server):
    before = len(_cancelled_lines(server))
    with httpx.stream("POST", server.url + "/v1/completions",
                      json={"prompt": "tick", "stream": True, "temperature": 0}, timeout=30) as r:
        events = 0
        for line in r.iter_lines():
            events += line.startswith("data: ")
            if events >= 20:
                break  # leaving the block closes the connection mid-stream
    latency = _next_request_latency(server)
    print(f"\nnext request completed {latency * 1000:.0f} ms after a streamed disconnect")
    assert latency < FREED_WITHIN_S
    cancelled = wait_until(lambda: _cancelled_lines(server)[before:], 5, message="the cancellation log line")
    assert int(cancelled[0].split("after ")[1].split()[0]) < 32768 // 2


def test_non_streamed_disconnect_frees_the_engine(server):
    before = len(_cancelled_lines(server))
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(server.url + "/v1/completions", json={"prompt": "tick", "temperature": 0}, timeout=0.5)
    latency = _next_request_latency(server)
    print(f"\nnext request completed {latency * 1000:.0f} ms after a non-streamed disconnect")
    assert latency < FREED_WITHIN_S
    wait_until(lambda: _cancelled_lines(server)[before:], 5, message="the cancellation log line")


def test_many_disconnects_leave_the_engine_healthy(server):
    for _ in range(5):
        with httpx.stream("POST", server.url + "/v1/completions", timeout=30,
                          json={"prompt": "tick", "stream": True, "max_tokens": 30000}) as r:
            next(r.iter_lines())
    assert _next_request_latency(server) < FREED_WITHIN_S
