"""POST /v1/embeddings on a model that declares a pooling type."""

from __future__ import annotations

import base64
import math
import struct

import openai
import pytest
from test_errors import assert_error
from tiny_models import N_EMBD


@pytest.fixture(scope="module")
def server(server_factory, models):
    return server_factory(models["embedding"], config="[engine]\nn_batch = 64\n")


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.base_url, api_key="unused", max_retries=0)


def norm(vector: list[float]) -> float:
    return math.sqrt(sum(v * v for v in vector))


def test_one_input(client):
    r = client.embeddings.create(model="embedding", input="the cat sat on the mat")
    assert len(r.data) == 1 and r.data[0].index == 0
    assert len(r.data[0].embedding) == N_EMBD
    assert norm(r.data[0].embedding) == pytest.approx(1.0, abs=1e-4)
    assert r.usage.prompt_tokens == r.usage.total_tokens > 0


def test_several_inputs_keep_their_order(client):
    texts = ["the cat", "the mat", "the cat"]
    r = client.embeddings.create(model="embedding", input=texts)
    vectors = [d.embedding for d in r.data]
    assert [d.index for d in r.data] == [0, 1, 2]
    assert vectors[0] == pytest.approx(vectors[2], abs=1e-5)
    assert vectors[0] != pytest.approx(vectors[1], abs=1e-3)
    single = client.embeddings.create(model="embedding", input="the mat").data[0].embedding
    assert single == pytest.approx(vectors[1], abs=1e-5)


def test_token_ids_and_base64(client, server):
    floats = client.embeddings.create(model="embedding", input=[[1, 300, 301]]).data[0].embedding
    raw = server.post("/v1/embeddings", {"input": [1, 300, 301], "encoding_format": "base64"}).json()
    packed = base64.b64decode(raw["data"][0]["embedding"])
    assert list(struct.unpack(f"<{N_EMBD}f", packed)) == pytest.approx(floats, abs=1e-6)


@pytest.mark.parametrize("body,param", [
    ({"input": ""}, "input"),
    ({"input": []}, "input"),
    ({"input": 5}, "input"),
    ({"input": ["ok", 5]}, "input"),
    ({"input": "ok", "encoding_format": "hex"}, "encoding_format"),
    ({"input": "ok", "dimensions": 8}, "dimensions"),
    ({"input": [[1, 10**7]]}, "input"),
])
def test_bad_input(server, body, param):
    assert_error(server.post("/v1/embeddings", body), 400, param=param)
    assert server.post("/v1/embeddings", {"input": "still works"}).status_code == 200


def test_input_longer_than_a_batch(server):
    r = server.post("/v1/embeddings", {"input": "the cat sat on the mat " * 30})
    error = assert_error(r, 400, param="input", code="context_length_exceeded")
    assert "at most 64" in error["message"]


def test_inputs_are_limited_to_the_trained_positions(server_factory, tmp_path):
    from tiny_models import write_model

    short = write_model(tmp_path / "short-embedding.gguf", seed=3, pooling=1, n_ctx_train=128)
    server = server_factory(short, config="[engine]\nn_batch = 512\n")
    r = server.post("/v1/embeddings", {"input": "the cat sat on the mat " * 30})
    error = assert_error(r, 400, param="input", code="context_length_exceeded")
    assert "at most 128" in error["message"]


def test_disconnect_stops_a_long_embedding_job(server):
    import httpx
    from conftest import metric, wait_until

    inputs = [[1] + [300 + i % 100] * 63 for i in range(2048)]  # 64 tokens each: seconds of work
    before = {o: metric(server, "edgellm_requests_total", outcome=o) for o in ("cancelled", "completed")}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(server.url + "/v1/embeddings", json={"input": inputs}, timeout=0.5)
    wait_until(lambda: metric(server, "edgellm_requests_total", outcome="cancelled") == before["cancelled"] + 1, 5,
               message="the job to be cancelled")
    assert server.post("/v1/embeddings", {"input": "quick"}).status_code == 200
    # The long job was cut short, never completed; the quick one was.
    assert metric(server, "edgellm_requests_total", outcome="completed") == before["completed"] + 1


def test_embeddings_are_admitted_like_generations(models, monkeypatch, tmp_path):
    """With every place taken and max_queue waiting, the next embeddings request gets a 429 with
    Retry-After, not an unbounded queue (the first one is held inside the runner here)."""
    import concurrent.futures
    import threading

    import httpx
    from conftest import InProcess, wait_until

    from edgellm.config import Config, EngineConfig, ModelConfig, ServerConfig
    from edgellm.engine.runner import Runner

    gate, holding = threading.Event(), threading.Event()
    real = Runner._embedding

    def held(self, ctx, batch, tokens):
        holding.set()
        gate.wait(30)
        return real(self, ctx, batch, tokens)

    monkeypatch.setattr(Runner, "_embedding", held)
    config = Config(server=ServerConfig(state_dir=str(tmp_path)), model=ModelConfig(path=str(models["embedding"])),
                    engine=EngineConfig(max_queue=1))
    with InProcess(config) as server, concurrent.futures.ThreadPoolExecutor(2) as pool:
        post = lambda: httpx.post(server.url + "/v1/embeddings", json={"input": "the cat"}, timeout=30)  # noqa: E731
        running = pool.submit(post)
        wait_until(holding.is_set, 10, message="the first request to run")
        alone = server.service.estimated_wait("embedding")  # a request after it would wait for one
        waiting = pool.submit(post)  # takes the one place in the queue
        wait_until(lambda: server.service.estimated_wait("embedding") > alone, 10, message="the second to queue")
        refused = post()
        assert_error(refused, 429, code="queue_full", says="busy")
        assert int(refused.headers["retry-after"]) >= 1
        gate.set()
        assert running.result(30).status_code == waiting.result(30).status_code == 200
        assert post().status_code == 200
