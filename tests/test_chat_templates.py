"""Chat templates: the GGUF's own (in transformers' environment), a config override, or one of
llama.cpp's built-ins chosen by vocabulary and architecture."""

from __future__ import annotations

import pytest
from test_errors import assert_error

from edgellm.engine.chat import BuiltinTemplate, ChatTemplate, JinjaTemplate, TemplateError, builtin_for, builtin_names
from edgellm.engine.model import Model

CONVERSATION = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Hi"},
    {"role": "assistant", "content": "Hello!"},
    {"role": "user", "content": "Bye"},
]

# What each built-in edgellm picks must show of the conversation: its turn markers and the texts.
MARKERS = {
    "chatml": ["<|im_start|>system\nBe brief.<|im_end|>", "<|im_start|>assistant\nHello!<|im_end|>",
               "<|im_start|>assistant\n"],
    "llama3": ["<|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|>", "Hello!<|eot_id|>"],
    "llama2": ["[INST]", "Be brief.", "Hi", "Hello!", "[/INST]"],
    "mistral-v3": ["[INST]", "Be brief.", "Hi", "Hello!", "[/INST]"],
    "mistral-v7": ["[SYSTEM_PROMPT] Be brief.[/SYSTEM_PROMPT]", "[INST] Hi[/INST] Hello!</s>"],
    "gemma": ["<start_of_turn>user\nBe brief.\n\nHi<end_of_turn>", "<start_of_turn>model\nHello!<end_of_turn>",
              "<start_of_turn>model\n"],
    "phi3": ["<|system|>\nBe brief.<|end|>", "<|assistant|>\nHello!<|end|>", "<|assistant|>\n"],
}


@pytest.mark.parametrize("name", sorted(MARKERS))
def test_llama_cpps_builtin_templates_render_the_conversation(name):
    assert name in builtin_names()
    text = BuiltinTemplate(name).render(CONVERSATION)
    for marker in MARKERS[name]:
        assert marker in text
    assert text.endswith(BuiltinTemplate(name).render(CONVERSATION[-1:])[-8:])  # ends with the generation prompt


def test_a_builtin_template_has_no_place_for_tools():
    with pytest.raises(TemplateError, match="no place for tools"):
        BuiltinTemplate("chatml").render(CONVERSATION, tools=[{"type": "function", "function": {"name": "f"}}])


def test_transformers_template_extensions_compile_and_render():
    source = ("{% for m in messages %}{% if m.role == 'system' %}{% continue %}{% endif %}"
              "{% generation %}{{ m.content }}{% endgeneration %}{% if loop.index > 2 %}{% break %}{% endif %}"
              "{% endfor %}{{ {'a': '<b>'} | tojson }}{{ enable_thinking }}")
    text = JinjaTemplate(source, "t").render(CONVERSATION, kwargs={"enable_thinking": True})
    assert text == 'HiHello!{"a": "<b>"}True'


@pytest.fixture(scope="module")
def plain_model(models):
    m = Model(models["scripted"])
    yield m
    m.close()


def test_a_file_without_template_gets_one_by_architecture(plain_model):
    assert plain_model.chat_template is None
    assert builtin_for(plain_model) == "llama2"  # llama architecture, no special chat tokens
    assert ChatTemplate.for_model(plain_model).name == "built-in llama2"
    assert ChatTemplate.for_model(plain_model, "mistral").name == "built-in mistral-v3"  # an old name still works


def test_special_tokens_in_the_vocabulary_pick_the_format(models):
    m = Model(models["scripted-chatml"])
    try:
        assert builtin_for(m) == "chatml"  # the vocabulary has <|im_start|>
        assert ChatTemplate.for_model(m).name == "from the GGUF file"
        assert ChatTemplate.for_model(m, "phi3").name == "built-in phi3"
    finally:
        m.close()


def test_templates_from_files_are_sandboxed():
    evil = JinjaTemplate("{{ ''.__class__.__mro__[1].__subclasses__() }}", "evil")
    with pytest.raises(TemplateError):
        evil.render(CONVERSATION)


def test_raise_exception_in_a_template_is_a_template_error():
    strict = JinjaTemplate("{% if messages[0].role == 'system' %}{{ raise_exception('no system role') }}{% endif %}",
                           "strict")
    with pytest.raises(TemplateError, match="no system role"):
        strict.render(CONVERSATION)


def test_a_template_that_refuses_the_messages_is_a_400(server_factory, models):
    server = server_factory(models["scripted"], config=(
        "[model]\nchat_template = \"{% for m in messages %}{% if m.role == 'system' %}"
        "{{ raise_exception('system messages are not supported') }}{% endif %}{{ m.content }}{% endfor %}\"\n"))
    r = server.post("/v1/chat/completions", {"messages": CONVERSATION})
    assert_error(r, 400, param="messages", code="chat_template_error", says="system messages are not supported")
    ok = server.post("/v1/chat/completions", {"messages": CONVERSATION[1:2], "max_tokens": 3})
    assert ok.status_code == 200


def in_use(server) -> str:
    [model] = server.get("/admin/models").json()["data"]
    return model["chat_template_in_use"]


def test_the_admin_api_says_which_template_is_used(server_factory, models):
    server = server_factory(models["scripted"])
    assert in_use(server) == "built-in llama2"  # a llama file without a template
    r = server.post("/v1/chat/completions", {"messages": [{"role": "user", "content": "Hi"}], "temperature": 0})
    assert r.json()["choices"][0]["message"]["content"] == " yes"  # the script answers "]" with " yes"


def test_a_template_that_does_not_compile_falls_back_to_a_builtin(server_factory, tmp_path):
    from conftest import SCRIPT
    from tiny_models import write_model

    broken = write_model(tmp_path / "broken-template.gguf", script=SCRIPT, chat_template="{% for m in %}")
    server = server_factory(broken)
    assert in_use(server) == "built-in chatml"  # its own does not compile; its tokens say chatml
    # Said at load, with the error, never a silent change of format.
    warning = next(line for line in server.log().splitlines() if "WARNING" in line and "template" in line)
    assert "does not compile: Expected an expression" in warning and "built-in 'chatml' template instead" in warning
    r = server.post("/v1/chat/completions", {"messages": [{"role": "user", "content": "Hi"}], "temperature": 0})
    assert r.status_code == 200


def test_chat_template_kwargs_reach_the_template(server_factory, models):
    server = server_factory(models["scripted"], config=(
        "[model]\nchat_template = \"{% if enable_thinking %}think: {% endif %}{{ messages[-1].content }} ]\"\n"))
    r = server.post("/v1/chat/completions", {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2,
                                             "temperature": 0, "chat_template_kwargs": {"enable_thinking": True}})
    assert r.status_code == 200 and r.json()["usage"]["prompt_tokens"] > 3
    thinking = r.json()["usage"]["prompt_tokens"]
    r = server.post("/v1/chat/completions", {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2,
                                             "temperature": 0})
    assert r.json()["usage"]["prompt_tokens"] < thinking  # without it, the template leaves "think: " out
    r = server.post("/v1/chat/completions", {"messages": [{"role": "user", "content": "Hi"}],
                                             "chat_template_kwargs": {"messages": []}})
    assert_error(r, 400, param="chat_template_kwargs", says="cannot set messages")
    r = server.post("/v1/chat/completions", {"messages": [{"role": "user", "content": "Hi"}],
                                             "chat_template_kwargs": [1]})
    assert_error(r, 400, param="chat_template_kwargs")
