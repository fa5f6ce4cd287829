"""Chat templates: messages -> the prompt text a model was trained on.

The template normally comes from the GGUF's `tokenizer.chat_template` (Jinja,
as written by the model's authors). Many GGUF files, base models especially,
carry none; then a built-in template is chosen from the special tokens the
vocabulary has and the architecture, and the choice is logged.
"""

from __future__ import annotations

import json
import logging
from datetime import datetime
from typing import NoReturn

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment

from edgellm.engine.errors import TemplateError
from edgellm.engine.model import Model

log = logging.getLogger("edgellm.engine")


# Our own minimal templates for the common chat formats. Each takes the system
# message where the format has a place for one, and folds it into the first
# user turn where it does not.
BUILTIN: dict[str, str] = {
    "chatml": (
        "{% for m in messages %}"
        "{{ '<|im_start|>' + m.role + '\\n' + m.content + '<|im_end|>\\n' }}"
        "{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
    ),
    "llama3": (
        "{{ bos_token }}"
        "{% for m in messages %}"
        "{{ '<|start_header_id|>' + m.role + '<|end_header_id|>\\n\\n' + m.content | trim + '<|eot_id|>' }}"
        "{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"
    ),
    "llama2": (
        "{% set ns = namespace(system='') %}"
        "{% for m in messages %}"
        "{% if m.role == 'system' %}{% set ns.system = '<<SYS>>\\n' + m.content + '\\n<</SYS>>\\n\\n' %}"
        "{% elif m.role == 'user' %}{{ bos_token + '[INST] ' + ns.system + m.content | trim + ' [/INST]' }}"
        "{% set ns.system = '' %}"
        "{% else %}{{ ' ' + m.content | trim + ' ' + eos_token }}{% endif %}"
        "{% endfor %}"
    ),
    "mistral": (
        "{{ bos_token }}{% set ns = namespace(system='') %}"
        "{% for m in messages %}"
        "{% if m.role == 'system' %}{% set ns.system = m.content + '\\n\\n' %}"
        "{% elif m.role == 'user' %}{{ '[INST] ' + ns.system + m.content | trim + '[/INST]' }}"
        "{% set ns.system = '' %}"
        "{% else %}{{ ' ' + m.content | trim + eos_token }}{% endif %}"
        "{% endfor %}"
    ),
    "gemma": (
        "{{ bos_token }}{% set ns = namespace(system='') %}"
        "{% for m in messages %}"
        "{% if m.role == 'system' %}{% set ns.system = m.content + '\\n\\n' %}"
        "{% else %}"
        "{{ '<start_of_turn>' + ('model' if m.role == 'assistant' else 'user') + '\\n'"
        " + ns.system + m.content | trim + '<end_of_turn>\\n' }}"
        "{% set ns.system = '' %}"
        "{% endif %}"
        "{% endfor %}"
        "{% if add_generation_prompt %}{{ '<start_of_turn>model\\n' }}{% endif %}"
    ),
    "phi3": (
        "{% for m in messages %}"
        "{{ '<|' + m.role + '|>\\n' + m.content + '<|end|>\\n' }}"
        "{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}"
    ),
}

# Architecture -> format, for files whose vocabulary does not give it away.
_BY_ARCHITECTURE = {
    "llama": "llama2",
    "mistral": "mistral",
    "mistral3": "mistral",
    "gemma": "gemma",
    "gemma2": "gemma",
    "gemma3": "gemma",
    "gemma3n": "gemma",
    "qwen": "chatml",
    "qwen2": "chatml",
    "qwen2moe": "chatml",
    "qwen3": "chatml",
    "qwen3moe": "chatml",
    "phi3": "phi3",
}

# Special tokens that identify a format whatever the architecture says.
_BY_TOKEN = (
    ("<|start_header_id|>", "llama3"),
    ("<|im_start|>", "chatml"),
    ("<start_of_turn>", "gemma"),
    ("<|assistant|>", "phi3"),
)


def builtin_for(model: Model) -> str:
    """The name of the built-in format that fits a model without a template."""
    for token, name in _BY_TOKEN:
        if model.has_token(token):
            return name
    return _BY_ARCHITECTURE.get(model.architecture, "chatml")


def _tojson(value: object, indent: int | None = None, ensure_ascii: bool = False,
            separators: tuple[str, str] | None = None, sort_keys: bool = False) -> str:
    # Jinja's own tojson escapes HTML; chat templates expect plain JSON.
    return json.dumps(value, indent=indent, ensure_ascii=ensure_ascii, separators=separators, sort_keys=sort_keys)


def _raise(message: str) -> NoReturn:
    raise TemplateError(message)


class ChatTemplate:
    """A compiled chat template for one model."""

    def __init__(self, source: str, name: str, *, bos_token: str = "", eos_token: str = "") -> None:
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, undefined=jinja2.ChainableUndefined)
        env.filters["tojson"] = _tojson
        env.globals["raise_exception"] = _raise
        env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
        self.name = name
        self.bos_token = bos_token
        self.eos_token = eos_token
        try:
            self._template = env.from_string(source)
        except jinja2.TemplateSyntaxError as e:
            raise TemplateError(f"chat template '{name}' does not compile: {e}") from None

    @classmethod
    def for_model(cls, model: Model, override: str = "") -> ChatTemplate:
        """`override` (a built-in name or Jinja source) when set, else the model's own, else a built-in."""
        bos, eos = model.bos_text, model.token_text(model.eos)
        if override:
            source = BUILTIN.get(override, override)
            name = override if override in BUILTIN else "configured"
            log.info("chat template: %s (from the config)", name)
            return cls(source, name, bos_token=bos, eos_token=eos)
        if model.chat_template:
            try:
                return cls(model.chat_template, "from the GGUF file", bos_token=bos, eos_token=eos)
            except TemplateError as e:
                log.warning("%s; falling back to a built-in format", e)
        name = builtin_for(model)
        log.info("chat template: the model file has none; using the built-in '%s' format for %s",
                 name, model.architecture)
        return cls(BUILTIN[name], f"built-in {name}", bos_token=bos, eos_token=eos)

    def render(self, messages: list[dict], *, add_generation_prompt: bool = True) -> str:
        try:
            return self._template.render(
                messages=messages,
                add_generation_prompt=add_generation_prompt,
                bos_token=self.bos_token,
                eos_token=self.eos_token,
            )
        except TemplateError:
            raise
        except Exception as e:  # templates are code from the model file: report, do not crash
            raise TemplateError(f"chat template ({self.name}) failed: {e}") from None
