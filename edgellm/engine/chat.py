"""Chat templates: messages -> the prompt text a model was trained on.

A GGUF's own template (`tokenizer.chat_template`, Jinja as the model's authors
wrote it) is rendered in the environment Hugging Face transformers renders it in,
the one the authors tested it with: sandboxed, trim_blocks and lstrip_blocks,
`{% break %}`/`{% continue %}`, the `{% generation %}` tag, raise_exception,
strftime_now and a tojson that does not escape HTML; with the same variables
(messages, tools, documents, add_generation_prompt, bos_token, eos_token and the
request's chat_template_kwargs). tests/test_template_corpus.py renders real
templates with transformers itself and compares byte for byte.

A file without a template (base models, many conversions) gets one of llama.cpp's
built-in templates (llama_chat_apply_template), chosen from the special tokens its
vocabulary has and its architecture; the log and /admin/models say which. A template
that does not compile is a warning at load naming the error, and the model gets the
built-in one instead.
"""

from __future__ import annotations

import ctypes
import functools
import json
import logging
from collections.abc import Callable
from datetime import datetime
from typing import Any, NoReturn

import jinja2
import jinja2.ext
import llama_cpp.llama_cpp as C
from jinja2 import nodes
from jinja2.sandbox import ImmutableSandboxedEnvironment

from edgellm.engine.errors import TemplateError
from edgellm.engine.model import Model

log = logging.getLogger("edgellm.engine")

# Names the template sees that a request's chat_template_kwargs may not replace.
RESERVED = frozenset({"messages", "tools", "documents", "add_generation_prompt", "bos_token", "eos_token"})

# Special tokens that identify a format whatever the architecture says, then the
# architecture: the llama.cpp built-in template for a file that has none.
_BY_TOKEN = (
    ("<|start_header_id|>", "llama3"),
    ("<|im_start|>", "chatml"),
    ("<start_of_turn>", "gemma"),
    ("<|assistant|>", "phi3"),
)
_BY_ARCHITECTURE = {
    "llama": "llama2", "mistral": "mistral-v3", "mistral3": "mistral-v7",
    "gemma": "gemma", "gemma2": "gemma", "gemma3": "gemma", "gemma3n": "gemma",
    "qwen": "chatml", "qwen2": "chatml", "qwen2moe": "chatml", "qwen3": "chatml", "qwen3moe": "chatml",
    "phi3": "phi3",
}
_ALIASES = {"mistral": "mistral-v3"}  # a name edgellm's own formats had, in [model] chat_template and bundles


@functools.cache
def builtin_names() -> frozenset[str]:
    """The names of llama.cpp's built-in templates."""
    n = C.llama_chat_builtin_templates(None, 0)
    names = (ctypes.c_char_p * n)()
    C.llama_chat_builtin_templates(names, n)
    return frozenset(name.decode() for name in names if name)


def builtin_for(model: Model) -> str:
    """The llama.cpp built-in template that fits a model without a template of its own."""
    for token, name in _BY_TOKEN:
        if model.has_token(token):
            return name
    return _BY_ARCHITECTURE.get(model.architecture, "chatml")


class ChatTemplate:
    """How one model's messages become its prompt."""

    name: str

    def render(self, messages: list[dict[str, Any]], *, add_generation_prompt: bool = True,
               tools: list[dict[str, Any]] | None = None, kwargs: dict[str, Any] | None = None) -> str:
        raise NotImplementedError

    @classmethod
    def for_model(cls, model: Model, override: str = "") -> ChatTemplate:
        """`override` (a built-in name or Jinja source) when set, else the model's own, else a built-in."""
        bos, eos = model.bos_text, model.token_text(model.eos)
        if override:
            name = _ALIASES.get(override, override)
            template: ChatTemplate = BuiltinTemplate(name) if name in builtin_names() else \
                JinjaTemplate(override, "configured", bos_token=bos, eos_token=eos)
            log.info("chat template: %s (from the config)", template.name)
            return template
        if model.chat_template:
            try:
                return JinjaTemplate(model.chat_template, "from the GGUF file", bos_token=bos, eos_token=eos)
            except TemplateError as e:
                name = builtin_for(model)
                log.warning("%s; using llama.cpp's built-in '%s' template instead", e, name)
                return BuiltinTemplate(name)
        name = builtin_for(model)
        log.info("chat template: the model file has none; using llama.cpp's built-in '%s' template for %s",
                 name, model.architecture)
        return BuiltinTemplate(name)


class _Generation(jinja2.ext.Extension):
    """`{% generation %}...{% endgeneration %}`: transformers marks the assistant's part of a
    rendered conversation with it (for training masks); rendering outputs what it encloses."""

    tags = {"generation"}

    def parse(self, parser: Any) -> nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return nodes.CallBlock(self.call_method("_enclosed"), [], [], body).set_lineno(lineno)

    @staticmethod
    def _enclosed(caller: Callable[[], str]) -> str:
        return caller()


def _tojson(value: object, ensure_ascii: bool = False, indent: int | None = None,
            separators: tuple[str, str] | None = None, sort_keys: bool = False) -> str:
    # Jinja's own tojson escapes HTML (< > & '): chat templates expect plain JSON, as transformers gives.
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _raise(message: str) -> NoReturn:
    raise TemplateError(message)


def _environment() -> ImmutableSandboxedEnvironment:
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[_Generation, jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env


_ENV = _environment()


class JinjaTemplate(ChatTemplate):
    """A Jinja chat template, compiled once per model."""

    def __init__(self, source: str, name: str, *, bos_token: str = "", eos_token: str = "") -> None:
        self.name = name
        self.bos_token = bos_token
        self.eos_token = eos_token
        try:
            self._template = _ENV.from_string(source)
        except jinja2.TemplateSyntaxError as e:
            raise TemplateError(f"chat template '{name}' does not compile: {e}") from None

    def render(self, messages: list[dict[str, Any]], *, add_generation_prompt: bool = True,
               tools: list[dict[str, Any]] | None = None, kwargs: dict[str, Any] | None = None) -> str:
        clash = sorted(RESERVED.intersection(kwargs or {}))
        if clash:
            raise TemplateError(f"chat_template_kwargs cannot set {', '.join(clash)}: the request does",
                                param="chat_template_kwargs")
        # As transformers does: a key whose value is null is left out (templates test for presence).
        messages = [{k: v for k, v in m.items() if v is not None} for m in messages]
        try:
            return self._template.render(
                **(kwargs or {}),
                messages=messages,
                tools=tools,
                documents=None,
                add_generation_prompt=add_generation_prompt,
                bos_token=self.bos_token,
                eos_token=self.eos_token,
            )
        except TemplateError:
            raise
        except Exception as e:  # templates are code from the model file: report, do not crash
            raise TemplateError(f"chat template ({self.name}) failed: {e}") from None


class BuiltinTemplate(ChatTemplate):
    """One of llama.cpp's built-in templates, by name (llama_chat_apply_template)."""

    def __init__(self, name: str) -> None:
        self.name = f"built-in {name}"
        self._key = name.encode()

    def render(self, messages: list[dict[str, Any]], *, add_generation_prompt: bool = True,
               tools: list[dict[str, Any]] | None = None, kwargs: dict[str, Any] | None = None) -> str:
        if tools:
            raise TemplateError(f"the {self.name} template has no place for tools", param="tools")
        chat = (C.llama_chat_message * len(messages))()
        keep = []  # the encoded strings must outlive the call
        for i, message in enumerate(messages):
            role, content = str(message.get("role", "")).encode(), str(message.get("content") or "").encode()
            keep += [role, content]
            chat[i].role, chat[i].content = role, content
        size = 256 + 2 * sum(len(s) for s in keep)
        while True:
            buf = ctypes.create_string_buffer(size)
            n = C.llama_chat_apply_template(self._key, chat, len(messages), add_generation_prompt, buf, size)
            if n < 0:
                raise TemplateError(f"llama.cpp's {self.name} template cannot render these messages")
            if n <= size:
                return buf.raw[:n].decode("utf-8", "replace")
            size = n
