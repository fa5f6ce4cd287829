"""The demo model (Gemma 3 270M, no chat template) and the README's examples, as written."""

from __future__ import annotations

import re
import subprocess
import sys

import openai
import pytest
from conftest import ROOT

README_URL = "http://127.0.0.1:8080"


@pytest.fixture(scope="module")
def server(server_factory, demo_model):
    return server_factory(demo_model)


@pytest.fixture
def client(server):
    with openai.OpenAI(base_url=server.base_url, api_key="unused", max_retries=0) as client:
        yield client


def readme_block(language: str, contains: str) -> str:
    blocks = re.findall(rf"```{language}\n(.*?)```", (ROOT / "README.md").read_text(), re.S)
    return next(b for b in blocks if contains in b)


def test_gemma_without_template_chats_through_the_builtin_gemma_format(server, client):
    [model] = server.get("/admin/models").json()["data"]
    assert model["chat_template_in_use"] == "built-in gemma"
    r = client.chat.completions.create(model="gemma-3-270m-q4_k_m", temperature=0, max_tokens=16,
                                       messages=[{"role": "user", "content": "Name three colours."}])
    assert r.choices[0].message.content.strip()
    assert r.usage.completion_tokens <= 16 and r.usage.prompt_tokens > 5


def test_gemma_text_completion_is_deterministic_at_temperature_zero(server, client):
    runs = [client.completions.create(model="gemma-3-270m-q4_k_m", prompt="The capital of France is",
                                      temperature=0, max_tokens=8).choices[0].text for _ in range(2)]
    assert runs[0] == runs[1] and runs[0].strip()


def test_readme_curl_example(server):
    command = readme_block("sh", "curl").replace(README_URL, server.url).replace("\\\n", " ")
    result = subprocess.run(["sh", "-c", command], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert '"object":"chat.completion"' in result.stdout.replace(" ", "")


def test_readme_python_example(server):
    code = readme_block("python", "OpenAI(").replace(README_URL, server.url)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert len(result.stdout.strip()) > 10


def test_readme_ollama_example(server):
    code = readme_block("python", "from ollama").replace(README_URL, server.url)
    code = "\n".join(line.removeprefix("  ") for line in code.splitlines())  # (indented in a list item)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert re.search(r"\S.*\((\d+) tokens in \d+\.\d\d s\)$", result.stdout.strip(), re.S), result.stdout


def test_readme_tools_example_prints_a_valid_call(server):
    code = readme_block("python", "tool_choice").replace(README_URL, server.url)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    [line] = result.stdout.strip().splitlines()  # parallel_tool_calls=False: one call
    name, arguments = line.split(" ", 1)
    assert name == "set_light"
    assert re.fullmatch(r"\{'room': '(kitchen|hall|bedroom)', 'on': (True|False)\}", arguments), arguments


def test_readme_quotes_the_make_targets_the_makefile_has():
    makefile = (ROOT / "Makefile").read_text()
    for target in ("run", "test"):
        assert re.search(rf"^{target}:", makefile, re.M)
        assert f"make {target}" in (ROOT / "README.md").read_text()


def test_prefix_reuse_on_a_sliding_window_model_keeps_the_output(server, client):
    # Gemma 3 attends through a 512-token sliding window in most layers: a reused prefix
    # longer than the window must give exactly what recomputing it gives.
    system = "You help on a farm. " + " ".join(f"Field {i} grows wheat and barley." for i in range(150))

    def ask(question: str):
        return client.chat.completions.create(
            model="gemma-3-270m-q4_k_m", temperature=0, max_tokens=12,
            messages=[{"role": "system", "content": system}, {"role": "user", "content": question}])

    first = ask("What grows in field 7?")
    ask("What grows in field 9?")
    again = ask("What grows in field 7?")
    assert again.usage.prompt_tokens_details.cached_tokens > 1000
    assert again.choices[0].message.content == first.choices[0].message.content
