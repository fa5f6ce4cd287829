"""The OpenAI API as the official SDK sees it, against real llama.cpp over loopback HTTP."""

from __future__ import annotations

import asyncio
import json

import jsonschema
import openai
import psutil
import pytest
from tiny_models import SPACE, vocabulary

# Token ids are vocabulary indices, so tests can name them.
CHATML_VOCAB = vocabulary(["<|im_start|>", "<|im_end|>"])


@pytest.fixture(scope="module")
def server(server_factory, models):
    return server_factory(models["scripted-chatml"])


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.base_url, api_key="unused", max_retries=0)


@pytest.fixture(scope="module")
def random_server(server_factory, models):
    return server_factory(models["random"])


def test_models_list_and_get(client):
    ids = [m.id for m in client.models.list()]
    assert ids == ["scripted-chatml"]
    assert client.models.retrieve("scripted-chatml").owned_by == "edgellm"


def test_chat_completion_with_usage(client, server):
    r = client.chat.completions.create(model="scripted-chatml", messages=[{"role": "user", "content": "Hi"}],
                                       temperature=0)
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].message.content == "Once upon a time"
    assert r.choices[0].finish_reason == "stop"
    # chatml: <s> <|im_start|> user \n Hi <|im_end|> \n <|im_start|> assistant \n
    prompt = server.post("/v1/completions", {
        "prompt": "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n", "max_tokens": 1}).json()
    assert r.usage.prompt_tokens == prompt["usage"]["prompt_tokens"]
    assert r.usage.completion_tokens == 4  # Once, ▁upon, ▁a, ▁time (the end token is not counted)
    assert r.usage.total_tokens == r.usage.prompt_tokens + 4


def test_chat_streamed(client):
    stream = client.chat.completions.create(model="scripted-chatml", messages=[{"role": "user", "content": "Hi"}],
                                            temperature=0, stream=True)
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == "Once upon a time"
    assert chunks[-1].choices[0].finish_reason == "stop"
    assert all(c.usage is None for c in chunks)


def test_include_usage_adds_a_final_usage_chunk(client):
    stream = client.chat.completions.create(model="scripted-chatml", messages=[{"role": "user", "content": "Hi"}],
                                            temperature=0, stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    assert chunks[-1].choices == []
    assert chunks[-1].usage.completion_tokens == 4
    assert chunks[-1].usage.total_tokens == chunks[-1].usage.prompt_tokens + 4
    assert chunks[-2].choices[0].finish_reason == "stop"


def test_text_completion(client):
    r = client.completions.create(model="scripted-chatml", prompt="Hello", temperature=0)
    assert r.choices[0].text == " world!"
    assert r.choices[0].finish_reason == "stop"
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (2, 3)  # <s> ▁Hello | ▁wor ld !


def test_text_completion_streamed_with_usage(client):
    chunks = list(client.completions.create(model="scripted-chatml", prompt="Hello", temperature=0, stream=True,
                                            stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == " world!"
    assert chunks[-1].usage.completion_tokens == 3


def test_token_array_prompt(client):
    hello = CHATML_VOCAB.index(SPACE + "Hello")
    r = client.completions.create(model="scripted-chatml", prompt=[1, hello], temperature=0)
    assert r.choices[0].text == " world!"
    assert r.usage.prompt_tokens == 2


def test_async_client_streamed_and_not(server):
    async def run():
        client = openai.AsyncOpenAI(base_url=server.base_url, api_key="unused", max_retries=0)
        whole = await client.chat.completions.create(
            model="scripted-chatml", messages=[{"role": "user", "content": "Hi"}], temperature=0)
        stream = await client.completions.create(model="scripted-chatml", prompt="Hello", temperature=0,
                                                 stream=True)
        text = "".join([c.choices[0].text async for c in stream])
        await client.close()
        return whole.choices[0].message.content, text

    assert asyncio.run(run()) == ("Once upon a time", " world!")


def test_stop_string_spanning_two_tokens(client):
    # " world!" is generated as "▁wor" + "ld" + "!": "orld" starts in one token and ends in the next.
    r = client.completions.create(model="scripted-chatml", prompt="Hello", temperature=0, stop=["orld"])
    assert r.choices[0].text == " w"
    assert r.choices[0].finish_reason == "stop"
    chunks = list(client.completions.create(model="scripted-chatml", prompt="Hello", temperature=0,
                                            stop="orld", stream=True))
    assert "".join(c.choices[0].text for c in chunks) == " w"


def test_partial_stop_match_is_released(client):
    # "ld?" begins like the text but never completes: the held-back "ld" must still be sent.
    r = client.completions.create(model="scripted-chatml", prompt="Hello", temperature=0, stop=["ld?"])
    assert r.choices[0].text == " world!"


def test_multibyte_character_split_across_byte_tokens(client):
    # "€" is not in the vocabulary: it comes as <0xE2> <0x82> <0xAC>, one token at a time.
    chunks = list(client.completions.create(model="scripted-chatml", prompt="euro", temperature=0, stream=True))
    texts = [c.choices[0].text for c in chunks]
    assert "".join(texts) == "€"
    assert all("\ufffd" not in t for t in texts)
    r = client.completions.create(model="scripted-chatml", prompt="euro", temperature=0)
    assert r.choices[0].text == "€" and r.usage.completion_tokens == 3


def test_max_tokens_ends_with_length(client):
    r = client.completions.create(model="scripted-chatml", prompt="tick", temperature=0, max_tokens=5)
    assert r.choices[0].text == " tock tick tock tick tock"
    assert r.choices[0].finish_reason == "length"
    assert r.usage.completion_tokens == 5
    r = client.chat.completions.create(model="scripted-chatml", messages=[{"role": "user", "content": "Hi"}],
                                       temperature=0, max_completion_tokens=2)
    assert r.choices[0].message.content == "Once upon" and r.choices[0].finish_reason == "length"


def test_logit_bias_steers_the_choice(client):
    tock = CHATML_VOCAB.index(SPACE + "tock")

    def first(prompt: str, bias: dict) -> str:
        return client.completions.create(model="scripted-chatml", prompt=prompt, temperature=0, max_tokens=1,
                                         logit_bias=bias).choices[0].text

    assert first("tick", {}) == " tock"
    assert first("tick", {str(tock): -100}) != " tock"
    assert first("Hello", {str(tock): 100}) == " tock"


def test_seeded_sampling_is_repeatable(random_server):
    client = openai.OpenAI(base_url=random_server.base_url, api_key="unused", max_retries=0)
    runs = [client.completions.create(model="random", prompt="the cat", max_tokens=12, temperature=1.0,
                                      seed=42).choices[0].text for _ in range(2)]
    assert runs[0] == runs[1]
    other = client.completions.create(model="random", prompt="the cat", max_tokens=12, temperature=1.0, seed=7)
    assert other.choices[0].text != runs[0]


SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 8},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "ok": {"type": "boolean"},
        "kind": {"enum": ["cat", "mat"]},
    },
    "required": ["name", "age", "ok", "kind"],
    "additionalProperties": False,
}


@pytest.mark.parametrize("temperature", [0, 1.0])
def test_json_schema_output_validates(random_server, temperature):
    client = openai.OpenAI(base_url=random_server.base_url, api_key="unused", max_retries=0)
    r = client.chat.completions.create(
        model="random", messages=[{"role": "user", "content": "a person"}], temperature=temperature, seed=3,
        max_tokens=200,
        response_format={"type": "json_schema", "json_schema": {"name": "person", "schema": SCHEMA}})
    assert r.choices[0].finish_reason == "stop"
    jsonschema.validate(json.loads(r.choices[0].message.content), SCHEMA)


def test_json_object_output_parses(random_server):
    client = openai.OpenAI(base_url=random_server.base_url, api_key="unused", max_retries=0)
    r = client.chat.completions.create(model="random", messages=[{"role": "user", "content": "json"}],
                                       temperature=0, max_tokens=300, response_format={"type": "json_object"})
    assert isinstance(json.loads(r.choices[0].message.content), dict)


def test_penalties_are_accepted(client):
    r = client.completions.create(model="scripted-chatml", prompt="tick", temperature=0, max_tokens=4,
                                  presence_penalty=0.5, frequency_penalty=0.5, top_p=0.9,
                                  extra_body={"top_k": 10, "min_p": 0.1, "repeat_penalty": 1.1})
    assert r.usage.completion_tokens == 4


def test_ignore_eos_generates_exactly_max_tokens(client):
    r = client.completions.create(model="scripted-chatml", prompt="Hello", temperature=0, max_tokens=6,
                                  extra_body={"ignore_eos": True})
    assert r.choices[0].text.startswith(" world!")
    assert r.usage.completion_tokens == 6 and r.choices[0].finish_reason == "length"


def test_context_is_set_up_explicitly(server):
    # The real probe's plan runs it: the CPU here, threads = physical cores (llama-cpp-python's
    # high-level default would halve them), flash attention auto.
    physical = psutil.cpu_count(logical=False)
    assert f"backend cpu, {physical} threads: no GPU found" in server.log()
    assert (f"on cpu (0 GPU layers; context 4096 tokens, batch 512, 4 parallel, {physical} threads, "
            "flash attention auto;") in server.log()


@pytest.mark.parametrize("bias", [{}, {"5": 3.5, "300": -100}])
def test_greedy_fast_path_picks_what_llama_cpp_picks(random_server, bias):
    # Temperature 0 takes an argmax over the logits; temperature 1 with top_k 1 runs
    # llama.cpp's sampler chain. On the same logits they must choose the same tokens.
    client = openai.OpenAI(base_url=random_server.base_url, api_key="unused", max_retries=0)

    def complete(**sampling) -> str:
        return client.completions.create(model="random", prompt="the cat sat", max_tokens=40, logit_bias=bias,
                                         **sampling).choices[0].text

    assert complete(temperature=0) == complete(temperature=1.0, extra_body={"top_k": 1}, seed=1)


@pytest.mark.parametrize("bias", [
    {"tock": -100},                 # the favourite itself is biased away
    {"tock": -100, "Hello": 100},   # a biased token beats everything
    {"cat": 0.5},                   # a small bias that does not change the favourite
])
def test_greedy_fast_path_handles_every_kind_of_bias(client, bias):
    ids = {str(CHATML_VOCAB.index(SPACE + word)): value for word, value in bias.items()}

    def complete(**sampling) -> str:
        return client.completions.create(model="scripted-chatml", prompt="tick", max_tokens=6, logit_bias=ids,
                                         **sampling).choices[0].text

    assert complete(temperature=0) == complete(temperature=1.0, extra_body={"top_k": 1}, seed=1)
