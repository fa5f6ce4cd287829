"""A chat template is code from a model file: rendering it is bounded in time and size, and stops
when the client leaves.

Each bomb here ran unbounded before (an audit's findings): nested range(100000) loops kept a core
busy after the client had gone; `'a' * 10**7` and a huge tojson indent were built whole before the
context check. Now each is refused with a 400 naming the limit, within a fraction of a second
and a few MiB, and a client that leaves stops the rendering at once.
"""

from __future__ import annotations

import threading
import time
import tracemalloc

import httpx
import psutil
import pytest
from conftest import SCRIPT, wait_until
from test_errors import assert_error
from tiny_models import write_model

from edgellm.engine.chat import JinjaTemplate, TemplateError
from edgellm.engine.deadline import Abandoned, Deadline, TooComplex

CHAT = "<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n"
SPIN = "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}"
BOMBS = {
    "nested loops": SPIN,
    "nested loops over lists": "{% set l = range(100000) | list %}{% for i in l %}{% for j in l %}{% endfor %}"
                               "{% endfor %}",
    "a long repeat": "{{ 'a' * 10000000 }}",
    "a list repeat": "{{ ([1] * 10000000) | length }}",
    "doubling with ~": "{% set ns = namespace(s='ab') %}{% for i in range(64) %}{% set ns.s = ns.s ~ ns.s %}"
                       "{% endfor %}{{ ns.s | length }}",
    "doubling with +": "{% set ns = namespace(s='ab') %}{% for i in range(64) %}{% set ns.s = ns.s + ns.s %}"
                       "{% endfor %}",
    "doubling a set block": "{% set ns = namespace(s='ab') %}{% for i in range(64) %}{% set x %}{{ ns.s }}"
                            "{{ ns.s }}{% endset %}{% set ns.s = x %}{% endfor %}",
    "a huge indent": "{{ messages | tojson(indent=100000) }}",
    "a huge % width": "{{ '%99999999s' % 'a' }}",
    "a huge format width": "{{ '{:>99999999}'.format('a') }}",
    "a huge center": "{{ 'x'.center(100000000) }}",
    "a huge filter argument": "{{ 'x' | center(100000000) }}",
    "a huge power": "{{ 7 ** 123456789 }}",
    "a long output": "{% for i in range(100000) %}{{ 'abcdefghij' * 100 }}{% endfor %}",
}


def _render(source: str, deadline: Deadline | None = None) -> str:
    return JinjaTemplate(source, "t").render([{"role": "user", "content": "Hi"}], deadline=deadline,
                                             max_chars=4096 * 64)


@pytest.mark.parametrize("name", sorted(BOMBS))
def test_each_bomb_is_refused_quickly_and_small(name):
    tracemalloc.start()
    start = time.monotonic()
    try:
        with pytest.raises((TooComplex, TemplateError)):
            _render(BOMBS[name], Deadline(1.0))
        elapsed = time.monotonic() - start
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert elapsed < 3, f"{name}: {elapsed:.1f} s"
    assert peak < 48 << 20, f"{name}: {peak >> 20} MiB"


def test_the_limits_are_named():
    with pytest.raises(TooComplex, match="more than 1 s"):
        _render(SPIN, Deadline(1.0))
    with pytest.raises(TooComplex, match="more than 262144 characters"):
        _render(BOMBS["a long repeat"])
    with pytest.raises(TooComplex, match="indent above 16"):
        _render(BOMBS["a huge indent"])


def test_templates_within_the_bounds_render_as_before():
    source = ("{% for i in range(3) %}{{ i }}{% endfor %}{{ 'ab' * 3 }}{{ '%5s|' % 'x' }}{{ '{:>4}'.format('y') }}"
              "{{ messages | tojson(indent=2) | length > 0 }}{% set ns = namespace(s='') %}"
              "{% for m in messages %}{% set ns.s = ns.s ~ m.content %}{% endfor %}{{ ns.s }}")
    assert _render(source) == "012ababab    x|   yTrueHi"


def test_a_client_that_leaves_stops_the_rendering_at_once():
    deadline = Deadline(60)
    threading.Timer(0.2, deadline.cancel).start()
    start = time.monotonic()
    with pytest.raises(Abandoned):
        _render(SPIN, deadline)
    assert time.monotonic() - start < 1.5


@pytest.fixture(scope="module")
def server(server_factory, tmp_path_factory):
    template = ("{% for m in messages %}{% if m.content == 'spin' %}" + SPIN + "{% endif %}"
                "{% if m.content == 'big' %}{{ 'a' * 10000000 }}{% endif %}" + CHAT + "{% endfor %}"
                "<|im_start|>assistant\n")
    path = write_model(tmp_path_factory.mktemp("bomb") / "bomb.gguf", script=SCRIPT, chat_template=template)
    return server_factory(path)


def _chat(server, content: str, **kwargs) -> httpx.Response:
    return server.post("/v1/chat/completions", {"messages": [{"role": "user", "content": content}],
                                                "max_tokens": 4}, **kwargs)


def test_over_http_a_bomb_is_a_400_and_the_service_goes_on(server):
    r = _chat(server, "big")
    assert_error(r, 400, code="request_too_complex")
    r = _chat(server, "spin")
    assert_error(r, 400, code="request_too_complex")
    assert "more than 5 s" in r.json()["error"]["message"]
    assert _chat(server, "Hello").status_code == 200


def test_over_http_a_client_that_leaves_frees_the_core(server):
    process = psutil.Process(server.proc.pid)
    with pytest.raises(httpx.ReadTimeout):
        _chat(server, "spin", timeout=0.5)
    # The rendering would spin for the 5 s deadline; it stops once the server sees the client gone.
    start = time.monotonic()
    wait_until(lambda: process.cpu_percent(interval=0.25) < 25, 3, message="the server's CPU to go idle")
    assert time.monotonic() - start < 3
