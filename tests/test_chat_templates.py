"""Chat templates: the GGUF's own, a config override, or a built-in chosen by vocabulary and architecture."""

from __future__ import annotations

import pytest
from test_errors import assert_error

from edgellm.engine.chat import BUILTIN, ChatTemplate, TemplateError, builtin_for
from edgellm.engine.model import Model

CONVERSATION = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Hi"},
    {"role": "assistant", "content": "Hello!"},
    {"role": "user", "content": "Bye"},
]

EXPECTED = {
    "chatml": "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
              "<|im_start|>assistant\nHello!<|im_end|>\n<|im_start|>user\nBye<|im_end|>\n<|im_start|>assistant\n",
    "llama3": "<s><|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|>"
              "<|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>"
              "<|start_header_id|>assistant<|end_header_id|>\n\nHello!<|eot_id|>"
              "<|start_header_id|>user<|end_header_id|>\n\nBye<|eot_id|>"
              "<|start_header_id|>assistant<|end_header_id|>\n\n",
    "llama2": "<s>[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\nHi [/INST] Hello! </s><s>[INST] Bye [/INST]",
    "mistral": "<s>[INST] Be brief.\n\nHi[/INST] Hello!</s>[INST] Bye[/INST]",
    "gemma": "<s><start_of_turn>user\nBe brief.\n\nHi<end_of_turn>\n<start_of_turn>model\nHello!<end_of_turn>\n"
             "<start_of_turn>user\nBye<end_of_turn>\n<start_of_turn>model\n",
    "phi3": "<|system|>\nBe brief.<|end|>\n<|user|>\nHi<|end|>\n<|assistant|>\nHello!<|end|>\n<|user|>\nBye<|end|>\n"
            "<|assistant|>\n",
}


@pytest.mark.parametrize("name", sorted(BUILTIN))
def test_builtin_templates_render_the_conversation(name):
    template = ChatTemplate(BUILTIN[name], name, bos_token="<s>", eos_token="</s>")
    assert template.render(CONVERSATION) == EXPECTED[name]


@pytest.fixture(scope="module")
def plain_model(models):
    m = Model(models["scripted"])
    yield m
    m.close()


def test_a_file_without_template_gets_one_by_architecture(plain_model):
    assert plain_model.chat_template is None
    assert builtin_for(plain_model) == "llama2"  # llama architecture, no special chat tokens
    assert ChatTemplate.for_model(plain_model).name == "built-in llama2"


def test_special_tokens_in_the_vocabulary_pick_the_format(models):
    m = Model(models["scripted-chatml"])
    try:
        assert builtin_for(m) == "chatml"  # the vocabulary has <|im_start|>
        assert ChatTemplate.for_model(m).name == "from the GGUF file"
        assert ChatTemplate.for_model(m, "phi3").name == "phi3"
    finally:
        m.close()


def test_templates_from_files_are_sandboxed():
    evil = ChatTemplate("{{ ''.__class__.__mro__[1].__subclasses__() }}", "evil")
    with pytest.raises(TemplateError):
        evil.render(CONVERSATION)


def test_raise_exception_in_a_template_is_a_template_error():
    strict = ChatTemplate("{% if messages[0].role == 'system' %}{{ raise_exception('no system role') }}{% endif %}",
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
    r = server.post("/v1/chat/completions", {"messages": [{"role": "user", "content": "Hi"}], "temperature": 0})
    assert r.status_code == 200
