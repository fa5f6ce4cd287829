"""What one API key can make the box do to everyone else's requests is bounded.

The audit's attacks: per-request keep_alive 0 forced a reload for the next client (14 loads in
12 requests); embeddings were admitted past max_queue (32 of 32 with a queue of 4). Now a
request's keep_alive is held within [models] min_keep_alive and max_keep_alive unless an admin
key sent it, and embeddings wait in the same bounded admission as generations.
"""

from __future__ import annotations

import concurrent.futures

import httpx
import pytest
from conftest import metric

API_KEY, ADMIN_KEY = "an-api-key-0123456789", "an-admin-key-0123456789"


@pytest.fixture(scope="module")
def server(server_factory, models):
    config = (f'[server]\napi_keys = ["{API_KEY}"]\nadmin_keys = ["{ADMIN_KEY}"]\n'
              '[models]\nmin_keep_alive = "1m"\nmax_keep_alive = "10m"\n')
    return server_factory(models["scripted"], api_key=API_KEY, config=config)


def _complete(server, key: str, keep_alive) -> httpx.Response:
    return server.post("/v1/completions", {"prompt": "Hello", "max_tokens": 2, "keep_alive": keep_alive},
                       headers={"Authorization": f"Bearer {key}"})


def _expires_in(server) -> float | None:
    import calendar
    import time

    r = httpx.get(server.url + "/admin/models", headers={"Authorization": f"Bearer {ADMIN_KEY}"})
    expires = r.json()["data"][0]["expires_at"]
    return None if expires is None else calendar.timegm(time.strptime(expires, "%Y-%m-%dT%H:%M:%SZ")) - time.time()


def test_keep_alive_zero_from_an_api_key_cannot_force_reloads(server):
    loads = metric(server, "edgellm_model_loads_total", model="scripted")
    for _ in range(12):
        assert _complete(server, API_KEY, 0).status_code == 200
    assert metric(server, "edgellm_model_loads_total", model="scripted") == loads  # no reload at all
    assert 50 < _expires_in(server) <= 61  # held at min_keep_alive


def test_an_api_keys_keep_alive_is_held_within_the_maximum(server):
    for asked in (-1, "24h"):
        assert _complete(server, API_KEY, asked).status_code == 200
        assert 590 < _expires_in(server) <= 601


def test_an_admin_key_may_go_beyond_the_bounds(server):
    assert _complete(server, ADMIN_KEY, -1).status_code == 200
    assert _expires_in(server) is None  # until evicted
    loads = metric(server, "edgellm_model_loads_total", model="scripted")
    assert _complete(server, ADMIN_KEY, 0).status_code == 200  # unloads after this request
    assert _complete(server, API_KEY, "5m").status_code == 200
    assert metric(server, "edgellm_model_loads_total", model="scripted") == loads + 1


def test_embeddings_are_admitted_only_within_the_queue(server_factory, models):
    server = server_factory(models["embedding"], config="[engine]\nparallel = 1\nmax_queue = 4\n")
    body = {"input": ["the cat sat on the mat " * 8] * 4}

    def embed(_: int) -> httpx.Response:
        return httpx.post(server.url + "/v1/embeddings", json=body, timeout=120)

    with concurrent.futures.ThreadPoolExecutor(32) as pool:
        responses = list(pool.map(embed, range(32)))
    statuses = sorted(r.status_code for r in responses)
    assert set(statuses) <= {200, 429}
    refused = [r for r in responses if r.status_code == 429]
    assert len(refused) >= 16, statuses  # 1 running + 4 waiting at a time, not all 32
    assert all(r.json()["error"]["code"] == "queue_full" and int(r.headers["Retry-After"]) >= 1 for r in refused)
    assert httpx.post(server.url + "/v1/embeddings", json={"input": "the cat"}, timeout=30).status_code == 200
