"""Continuous batching: many streams at once, equal to one at a time, with backpressure and prefix reuse."""

from __future__ import annotations

import asyncio
import random
import threading
import time

import httpx
import openai
import pytest
from conftest import wait_until
from test_errors import assert_error


def metric(server, name: str, labels: str = 'model="{model}"') -> float:
    """One sample from GET /metrics."""
    model = server.get("/v1/models").json()["data"][0]["id"]
    wanted = f"{name}{{{labels.format(model=model)}}}" if labels else name
    for line in server.get("/metrics").text.splitlines():
        if line.startswith(wanted + " "):
            return float(line.split()[-1])
    raise AssertionError(f"{wanted} not in /metrics")


def complete_concurrently(server, model: str, prompts: list[str], max_tokens: int, max_retries: int = 0) -> list:
    """Greedy completions of all `prompts` at once, through the async openai SDK."""
    async def run():
        client = openai.AsyncOpenAI(base_url=server.base_url, api_key="unused", max_retries=max_retries)
        results = await asyncio.gather(*(client.completions.create(
            model=model, prompt=p, max_tokens=max_tokens, temperature=0) for p in prompts))
        await client.close()
        return results

    return asyncio.run(run())


PROMPTS = ["the cat", "the mat sat on", "Hello world", "Once upon a time", "yes no yes", "tick tock",
           "a name", "the user"]


def test_concurrent_greedy_equals_one_by_one(server_factory, models):
    config = "[engine]\nparallel = 4\nn_ubatch = 32\nn_batch = 64\n"
    alone = server_factory(models["random"], config=config)
    client = openai.OpenAI(base_url=alone.base_url, api_key="unused", max_retries=0)
    one_by_one = [client.completions.create(model="random", prompt=p, max_tokens=24, temperature=0).choices[0].text
                  for p in PROMPTS]
    together = server_factory(models["random"], config=config)  # a fresh cache: nothing reused
    concurrent = [r.choices[0].text for r in complete_concurrently(together, "random", PROMPTS, 24)]
    assert concurrent == one_by_one
    # And they really ran together: far fewer decode steps than one at a time.
    assert metric(together, "edgellm_decode_steps_total") < 0.6 * metric(alone, "edgellm_decode_steps_total")


@pytest.fixture(scope="module")
def busy_server(server_factory, models):
    return server_factory(models["scripted"], config="[engine]\nparallel = 4\nmax_queue = 16\nn_ctx = 8192\n")


def expected_ticks(n: int) -> str:
    return "".join(" tock" if i % 2 == 0 else " tick" for i in range(n))


def test_sixteen_streams_with_random_cancellations(busy_server):
    server = busy_server
    rng = random.Random(7)
    cancel_after = {i: rng.randint(1, 20) if rng.random() < 0.4 else None for i in range(16)}
    max_tokens = 40

    async def one(client: httpx.AsyncClient, i: int) -> tuple[str, str | None]:
        # Streams to be cancelled ask for far more tokens, so they are still running when their client leaves.
        body = {"prompt": "tick", "max_tokens": max_tokens if cancel_after[i] is None else 20000,
                "temperature": 0, "stream": True}
        text, finish, chunks = "", None, 0
        async with client.stream("POST", server.url + "/v1/completions", json=body) as r:
            assert r.status_code == 200
            async for line in r.aiter_lines():
                if not line.startswith("data: {"):
                    continue
                choice = httpx.Response(200, content=line[6:]).json()["choices"][0]
                text += choice["text"]
                finish = choice["finish_reason"] or finish
                chunks += 1
                if cancel_after[i] is not None and chunks >= cancel_after[i]:
                    return "cancelled", None  # leaving the block closes the connection
        return text, finish

    async def run_all():
        async with httpx.AsyncClient(timeout=60) as client:
            return await asyncio.wait_for(asyncio.gather(*(one(client, i) for i in range(16))), 60)

    results = asyncio.run(run_all())
    for i, (text, finish) in enumerate(results):
        if cancel_after[i] is None:
            assert (text, finish) == (expected_ticks(max_tokens), "length"), i
    assert sum(c is not None for c in cancel_after.values()) >= 4
    # Every running sequence has ended and handed its cells back.
    wait_until(lambda: metric(server, "edgellm_running_sequences") == 0, 10, message="no running sequences")
    assert metric(server, "edgellm_kv_cells_used") == 0
    assert metric(server, "edgellm_queue_depth") == 0
    assert metric(server, "edgellm_requests_total", 'outcome="cancelled"') >= 1


def test_past_the_queue_limit_clients_get_429_with_retry_after(server_factory, models):
    server = server_factory(models["scripted"], config="[engine]\nparallel = 1\nmax_queue = 2\nn_ctx = 32768\n")
    long = {"prompt": "tick", "max_tokens": 30000, "temperature": 0}

    def occupy():  # one runs, two wait in line; each gives up (and is cancelled) after a few seconds
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(server.url + "/v1/completions", json=long, timeout=4)

    threads = [threading.Thread(target=occupy) for _ in range(3)]
    try:
        threads[0].start()
        wait_until(lambda: metric(server, "edgellm_running_sequences") == 1, 10, message="one running")
        threads[1].start()
        threads[2].start()
        wait_until(lambda: metric(server, "edgellm_queue_depth") == 2, 10, message="two requests queued")
        rejected = httpx.post(server.url + "/v1/completions", json=long, timeout=10)
    finally:
        for thread in threads:
            if thread.is_alive():
                thread.join(15)
    assert_error(rejected, 429, code="queue_full", says="busy")
    assert int(rejected.headers["retry-after"]) >= 1
    assert metric(server, "edgellm_requests_total", 'outcome="rejected"') >= 1


def test_sdk_retries_a_429_by_itself(server_factory, models):
    # One place, no queue: the second of two concurrent requests is refused with 429,
    # and the openai SDK waits for Retry-After and tries again on its own.
    server = server_factory(models["scripted"], config="[engine]\nparallel = 1\nmax_queue = 0\n")

    results = complete_concurrently(server, "scripted", ["tick"] * 2, 200, max_retries=3)
    assert [r.usage.completion_tokens for r in results] == [200, 200]
    assert metric(server, "edgellm_requests_total", 'outcome="rejected"') >= 1


def test_prefix_reuse_reports_cached_tokens_and_answers_sooner(server_factory, models):
    server = server_factory(models["scripted-chatml"], config="[engine]\nn_ctx = 8192\nn_batch = 256\n")
    system = "You are a helpful assistant. " + "the cat sat on the mat " * 500
    client = openai.OpenAI(base_url=server.base_url, api_key="unused", max_retries=0)

    def ask(question: str) -> tuple[float, object]:
        started = time.monotonic()
        stream = client.chat.completions.create(
            model="scripted-chatml", temperature=0, stream=True, stream_options={"include_usage": True},
            messages=[{"role": "system", "content": system}, {"role": "user", "content": question}])
        first, usage = None, None
        for chunk in stream:
            if first is None and chunk.choices and chunk.choices[0].delta.content:
                first = time.monotonic() - started
            usage = chunk.usage or usage
        return first, usage

    def decoded() -> float:  # tokens llama_decode has computed so far: the work, not the time
        return metric(server, "edgellm_batch_tokens_sum")

    start = decoded()
    ttft_cold, cold = ask("Hi")
    middle = decoded()
    ttft_warm, warm = ask("Hello")
    assert cold.prompt_tokens_details.cached_tokens == 0
    assert warm.prompt_tokens_details.cached_tokens > 3000  # the whole system prompt
    assert warm.prompt_tokens_details.cached_tokens < warm.prompt_tokens
    print(f"\ntime to first token: {ttft_cold * 1000:.0f} ms cold, {ttft_warm * 1000:.0f} ms with the prefix cached")
    cold_work, warm_work = middle - start, decoded() - middle
    assert cold_work >= cold.prompt_tokens and warm_work < 0.05 * cold_work
    assert metric(server, "edgellm_cached_prompt_tokens_total") >= warm.prompt_tokens_details.cached_tokens


def test_a_long_prompt_delays_running_streams_by_one_chunk_per_step(server_factory, models):
    # n_batch 64: a 3000-token prompt needs ~47 steps of prefill, and a running stream
    # must get a token in each of them instead of waiting for the whole prompt.
    server = server_factory(models["scripted"], config="[engine]\nn_ctx = 8192\nn_batch = 64\nn_ubatch = 64\n")

    async def run():
        async with httpx.AsyncClient(timeout=60) as client:
            arrivals = []

            async def runner_stream():
                body = {"prompt": "tick", "max_tokens": 400, "temperature": 0, "stream": True}
                async with client.stream("POST", server.url + "/v1/completions", json=body) as r:
                    async for line in r.aiter_lines():
                        if line.startswith("data: {"):
                            arrivals.append(time.monotonic())

            task = asyncio.ensure_future(runner_stream())
            while len(arrivals) < 5:
                await asyncio.sleep(0.005)
            sent = time.monotonic()
            long = await client.post(server.url + "/v1/completions", json={
                "prompt": "the cat sat on the mat " * 500, "max_tokens": 1, "temperature": 0})
            answered = time.monotonic()
            await task
            return arrivals, sent, answered, long.json()["usage"]["prompt_tokens"]

    arrivals, sent, answered, prompt_tokens = asyncio.run(run())
    during = [t for t in arrivals if sent <= t <= answered]
    steps = prompt_tokens // 64
    assert len(during) >= steps - 2, (len(during), steps)


def test_a_full_kv_cache_pauses_sequences_instead_of_failing(server_factory, models):
    # 256 cells shared by four sequences that each need ~120: they cannot all fit at once.
    server = server_factory(models["scripted"], config="[engine]\nn_ctx = 256\nparallel = 4\nn_batch = 64\n")

    results = complete_concurrently(server, "scripted", ["tick"] * 4, 120)
    assert [(r.choices[0].text, r.choices[0].finish_reason) for r in results] == [(expected_ticks(120), "length")] * 4
    assert metric(server, "edgellm_preemptions_total") >= 1  # paused and recomputed, never failed
    assert metric(server, "edgellm_requests_total", 'outcome="failed"') == 0


def test_metrics_in_prometheus_text_format(busy_server):
    server = busy_server
    server.post("/v1/completions", {"prompt": "Hello", "temperature": 0})
    server.post("/v1/completions", {"prompt": "Hello", "max_tokens": -1})
    r = server.get("/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    for name in ("edgellm_requests_total", "edgellm_queue_depth", "edgellm_running_sequences",
                 "edgellm_prompt_tokens_total", "edgellm_generated_tokens_total", "edgellm_cached_prompt_tokens_total",
                 "edgellm_time_to_first_token_seconds_bucket", "edgellm_inter_token_latency_seconds_bucket",
                 "edgellm_decode_steps_total", "edgellm_batch_tokens_bucket", "edgellm_kv_cells_used"):
        assert f"\n{name}" in r.text, name
    assert metric(server, "edgellm_requests_total", 'outcome="completed"') >= 1
    assert metric(server, "edgellm_requests_total", 'outcome="invalid"') >= 1
    assert metric(server, "edgellm_time_to_first_token_seconds_count") >= 1
