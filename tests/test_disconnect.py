"""A client that goes away stops its generation and frees the engine for the next request.

The abandoned request asks for a reply as long as a 32k context: tens of seconds of
decoding on this machine. What shows that it stopped, without timing anything: the
model's running sequences drop back to zero, the cancellation is counted, and the
tokens generated stop far short of what was asked.
"""

from __future__ import annotations

import httpx
import pytest
from conftest import metric, wait_until


@pytest.fixture(scope="module")
def server(server_factory, models):
    return server_factory(models["scripted"], config="[engine]\nn_ctx = 32768\nparallel = 1\n")


def _next_request_works(server) -> None:
    r = server.post("/v1/completions", {"prompt": "Hello", "temperature": 0})
    assert r.status_code == 200 and r.json()["choices"][0]["text"] == " world!"


def _stopped(server, cancelled_before: float) -> float:
    """Wait until the engine has let go of the abandoned request; the tokens generated in all."""
    wait_until(lambda: metric(server, "edgellm_requests_total", outcome="cancelled") > cancelled_before
               and metric(server, "edgellm_running_sequences", model="scripted") == 0, 5,
               message="the generation to be cancelled")
    return metric(server, "edgellm_generated_tokens_total", model="scripted")


def test_streamed_disconnect_frees_the_engine(server):
    before = metric(server, "edgellm_requests_total", outcome="cancelled")
    with httpx.stream("POST", server.url + "/v1/completions",
                      json={"prompt": "tick", "stream": True, "temperature": 0}, timeout=30) as r:
        events = 0
        for line in r.iter_lines():
            events += line.startswith("data: ")
            if events >= 20:
                break  # leaving the block closes the connection mid-stream
    generated = _stopped(server, before)
    assert generated < 32768 // 2
    assert metric(server, "edgellm_generated_tokens_total", model="scripted") == generated  # and stays there
    _next_request_works(server)  # parallel = 1: it would queue behind the abandoned one otherwise


def test_non_streamed_disconnect_frees_the_engine(server):
    before = metric(server, "edgellm_requests_total", outcome="cancelled")
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(server.url + "/v1/completions", json={"prompt": "tick", "temperature": 0}, timeout=0.5)
    _stopped(server, before)
    _next_request_works(server)


def test_many_disconnects_leave_the_engine_healthy(server):
    before = metric(server, "edgellm_requests_total", outcome="cancelled")
    for _ in range(5):
        with httpx.stream("POST", server.url + "/v1/completions", timeout=30,
                          json={"prompt": "tick", "stream": True, "max_tokens": 30000}) as r:
            next(r.iter_lines())
    wait_until(lambda: metric(server, "edgellm_requests_total", outcome="cancelled") >= before + 5
               and metric(server, "edgellm_running_sequences", model="scripted") == 0, 10,
               message="all five to be cancelled")
    _next_request_works(server)
