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
    import time

    import httpx
    from conftest import wait_until

    inputs = [[1] + [300 + i % 100] * 63 for i in range(2048)]  # 64 tokens each: seconds of work
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(server.url + "/v1/embeddings", json={"input": inputs}, timeout=0.5)
    started = time.monotonic()
    assert server.post("/v1/embeddings", {"input": "quick"}).status_code == 200
    assert time.monotonic() - started < 2.0
    line = wait_until(lambda: next((l for l in server.log().splitlines() if "embedding cancelled after" in l), None),
                      5, message="the cancellation log line")
    assert int(line.split("after ")[1].split()[0]) < 2048
