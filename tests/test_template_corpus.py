"""Real chat templates rendered by edgellm and by Hugging Face transformers: byte-identical.

transformers (test-only, without torch) is the oracle: its render_jinja_template is what the
models' authors tested their templates with. Each template is written into a tiny GGUF, so the
model's own template is what edgellm uses, with the file's BOS and EOS tokens.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from tiny_models import write_model

from edgellm.engine.chat import ChatTemplate, JinjaTemplate, TemplateError
from edgellm.engine.model import Model

render_jinja_template = pytest.importorskip("transformers.utils.chat_template_utils").render_jinja_template

TEMPLATES = sorted((Path(__file__).parent / "fixtures" / "templates").glob("*.jinja"))
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city now.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "description": "e.g. Paris"}},
                   "required": ["city"]}}}
LIGHT = {"type": "function", "function": {
    "name": "turn_on", "description": "Turn a light on.",
    "parameters": {"type": "object", "properties": {"entity": {"type": "string"},
                                                    "brightness": {"type": "integer", "minimum": 0}}}}}
CONVERSATIONS = {
    "one turn": ([{"role": "user", "content": "Hi"}], None),
    "system and turns": ([
        {"role": "system", "content": "You are terse. <Use> \"quotes\" & unicode: é ✓"},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "What is 2 + 2?\nThink first."},
    ], None),
    "tools": ([
        {"role": "system", "content": "You control a home."},
        {"role": "user", "content": "Weather in Paris, and the hall light on?"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call00001", "type": "function",
             "function": {"name": "get_weather", "arguments": {"city": "Paris"}}},
        ]},
        {"role": "tool", "tool_call_id": "call00001", "name": "get_weather", "content": "{\"temp_c\": 21}"},
        {"role": "assistant", "content": "21 °C."},
        {"role": "user", "content": "Thanks"},
    ], [WEATHER, LIGHT]),
}
# The same with the tool-calling turn's content "" instead of null (some templates need the key).
CONVERSATIONS["tools, empty content"] = (
    [{**m, "content": ""} if m.get("tool_calls") else m for m in CONVERSATIONS["tools"][0]], [WEATHER, LIGHT])


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> dict[str, Model]:
    d = tmp_path_factory.mktemp("templates")
    models = {path.stem: Model(write_model(d / f"{path.stem}.gguf", chat_template=path.read_text()), vocab_only=True)
              for path in TEMPLATES}
    yield models
    for model in models.values():
        model.close()


def oracle(source: str, messages, tools, add_generation_prompt: bool, bos: str, eos: str) -> str:
    # apply_chat_template leaves out a message's keys whose value is None before rendering; so does edgellm.
    messages = [{k: v for k, v in m.items() if v is not None} for m in messages]
    rendered, _ = render_jinja_template(conversations=[messages], tools=tools, chat_template=source,
                                        add_generation_prompt=add_generation_prompt, bos_token=bos, eos_token=eos)
    return rendered[0]


def test_the_corpus_has_the_widely_used_small_models():
    names = " ".join(p.stem for p in TEMPLATES)
    for family in ("Qwen2.5", "Qwen3", "Llama-3.2", "gemma-3", "Phi-3.5", "Phi-4-mini", "SmolLM2", "SmolLM3",
                   "Mistral"):
        assert family in names


@pytest.mark.parametrize("add_generation_prompt", [True, False])
@pytest.mark.parametrize("conversation", sorted(CONVERSATIONS))
@pytest.mark.parametrize("name", [p.stem for p in TEMPLATES])
def test_edgellm_renders_as_transformers_does(corpus, name, conversation, add_generation_prompt):
    model = corpus[name]
    template = ChatTemplate.for_model(model)
    assert isinstance(template, JinjaTemplate) and template.name == "from the GGUF file"
    messages, tools = CONVERSATIONS[conversation]
    try:
        expected = oracle(model.chat_template, messages, tools, add_generation_prompt, model.bos_text,
                          model.token_text(model.eos))
    except Exception as refused:  # the template itself refuses this conversation: so must edgellm
        with pytest.raises(TemplateError):
            template.render(messages, tools=tools, add_generation_prompt=add_generation_prompt)
        pytest.skip(f"{name} refuses the '{conversation}' conversation: {refused}")
    assert template.render(messages, tools=tools, add_generation_prompt=add_generation_prompt) == expected
