"""The browser on the LAN as an attacker: DNS rebinding (a foreign Host), cross-site simple
requests, foreign Origins, the admin API opened from a web page, and what /health tells
strangers. Real servers over loopback sockets; each request is what a browser would send."""

from __future__ import annotations

import socket

import httpx
import pytest
from conftest import wait_until
from test_errors import assert_error

KEY = "sk-test-key-0123456789"
APP = "http://homeassistant.local:8123"


@pytest.fixture(scope="module")
def open_server(server_factory, models):
    """The development default: loopback, no keys at all."""
    return server_factory(models["scripted"], config=f'[server]\ncors_origins = ["{APP}"]\n'
                                                     'allowed_hosts = ["llm.example.lan"]\n')


@pytest.fixture(scope="module")
def keyed_server(server_factory, models, tmp_path_factory):
    broken = tmp_path_factory.mktemp("broken") / "secret-name.gguf"
    broken.write_bytes(models["scripted"].read_bytes()[:-4096])
    return server_factory(broken, config=f'[server]\napi_keys = ["{KEY}"]\n', api_key=KEY, wait_ready=False)


def get(server, path: str, **headers: str) -> httpx.Response:
    return httpx.get(server.url + path, headers=headers, timeout=10)


def post(server, path: str, body: bytes, **headers: str) -> httpx.Response:
    return httpx.post(server.url + path, content=body, headers=headers, timeout=30)


CHAT = b'{"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4}'


@pytest.mark.parametrize("path", ["/health", "/v1/models", "/admin/models", "/metrics"])
def test_a_rebinding_name_is_misdirected(open_server, path):
    assert_error(get(open_server, path, host="evil.example:8080"), 421, code="misdirected_request",
                 says="not one of this box's names")


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost", "[::1]", socket.gethostname(),
                                  f"{socket.gethostname().split('.')[0]}.local", "llm.example.lan"])
def test_the_box_answers_to_its_own_names(open_server, host):
    port = open_server.url.rsplit(":", 1)[1]
    assert get(open_server, "/v1/models", host=f"{host}:{port}").status_code == 200


def test_a_cross_site_simple_post_cannot_run_a_chat(open_server):
    # What a page's <form> or fetch(..., {mode: "no-cors"}) sends without any preflight.
    for content_type in ("text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x"):
        assert_error(post(open_server, "/v1/chat/completions", CHAT, **{"content-type": content_type}), 415,
                     code="unsupported_media_type", says="application/json")
    assert_error(post(open_server, "/v1/chat/completions", CHAT, **{"content-type": "text/plain",
                                                                    "origin": "http://evil.example"}),
                 403, code="origin_not_allowed")
    assert post(open_server, "/v1/chat/completions", CHAT, **{"content-type": "application/json"}).status_code == 200


def test_a_foreign_origin_is_refused_and_a_listed_one_is_served_with_cors(open_server):
    assert_error(get(open_server, "/v1/models", origin="http://evil.example"), 403, code="origin_not_allowed")
    preflight = httpx.options(open_server.url + "/v1/chat/completions", timeout=10, headers={
        "origin": APP, "access-control-request-method": "POST",
        "access-control-request-headers": "authorization, content-type"})
    assert preflight.status_code == 204
    assert preflight.headers["access-control-allow-origin"] == APP and preflight.headers["vary"] == "Origin"
    assert "POST" in preflight.headers["access-control-allow-methods"]
    assert "authorization" in preflight.headers["access-control-allow-headers"]
    refused = httpx.options(open_server.url + "/v1/chat/completions", timeout=10, headers={
        "origin": "http://evil.example", "access-control-request-method": "POST"})
    assert refused.status_code == 403 and "access-control-allow-origin" not in refused.headers
    served = post(open_server, "/v1/chat/completions", CHAT, **{"content-type": "application/json", "origin": APP})
    assert served.status_code == 200 and served.headers["access-control-allow-origin"] == APP
    assert served.headers["access-control-allow-origin"] != "*"


def test_a_page_served_by_the_box_itself_is_same_origin(open_server):
    host = open_server.url.removeprefix("http://")
    assert get(open_server, "/v1/models", origin=f"http://{host}").status_code == 200


def test_the_keyless_admin_api_opens_only_to_loopback_without_an_origin(open_server):
    host = open_server.url.removeprefix("http://")
    port = host.rsplit(":", 1)[1]
    assert get(open_server, "/admin/models").status_code == 200  # curl on the box itself
    same_origin = post(open_server, "/admin/models/scripted/unload", b"", origin=f"http://{host}")
    assert_error(same_origin, 403, code="admin_disabled", says="without an Origin header")
    by_name = get(open_server, "/admin/models", host=f"{socket.gethostname()}:{port}")
    assert_error(by_name, 403, code="admin_disabled")


def test_health_tells_a_stranger_only_ok_loading_or_failed(keyed_server):
    failed = wait_until(lambda: (r := get(keyed_server, "/health")).status_code == 503
                        and r.json()["status"] == "failed" and r, 30, message="the load to fail")
    assert failed.json() == {"status": "failed"} and "secret-name" not in failed.text
    detailed = get(keyed_server, "/health", authorization=f"Bearer {KEY}")
    assert_error(detailed, 503, code="model_not_ready", says="failed to load")
    assert "secret-name" in detailed.text  # whoever holds a key learns why
    assert get(keyed_server, "/health", authorization="Bearer wrong-key-0123456789").json() == {"status": "failed"}
