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

Rendering is bounded: every call, loop step and string the template builds checks the
request's Deadline and the output's size, and numbers handed to the template's functions
and operators are capped, so a hostile template (or messages that make one explode) costs
at most the request's time limit. tokens() keeps the messages' own text from becoming
control tokens: a message that says `<|im_end|>` gets the characters, not the turn marker.
"""

from __future__ import annotations

import ctypes
import functools
import json
import logging
import re
import secrets
import threading
from collections.abc import Callable, Iterable, Iterator
from datetime import datetime
from typing import Any, NoReturn

import jinja2
import jinja2.ext
import llama_cpp.llama_cpp as C
from jinja2 import nodes
from jinja2.compiler import CodeGenerator, Frame
from jinja2.runtime import Context
from jinja2.sandbox import ImmutableSandboxedEnvironment

from edgellm.engine.deadline import Abandoned, Deadline, TooComplex
from edgellm.engine.errors import TemplateError
from edgellm.engine.model import Model
from edgellm.engine.tools import GENERIC, Syntax, Written, rendering, syntax_for

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

MAX_NUMBER = 100_000  # the largest count, width or repeat a template may pass (Jinja's own range limit)
MAX_INDENT = 16  # tojson's: templates use 2 or 4; a huge one multiplies the output by itself
CHARS_PER_TOKEN = 64  # output beyond n_ctx * this cannot fit the context: rendering stops there


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
    source: str | None = None  # a Jinja template's text
    tool_syntax: Syntax = GENERIC  # how this model writes tool calls (tools.py)
    tool_markers: frozenset[int] = frozenset()  # the control tokens of that syntax

    @property
    def tool_rendering(self) -> str:
        """Where the template puts tools: "tools", "system" or "text" (tools.rendering)."""
        return rendering(self.source)

    def render(self, messages: list[dict[str, Any]], *, add_generation_prompt: bool = True,
               tools: list[dict[str, Any]] | None = None, kwargs: dict[str, Any] | None = None,
               deadline: Deadline | None = None, max_chars: int | None = None) -> str:
        raise NotImplementedError

    def tokens(self, model: Model, messages: list[dict[str, Any]], *, tools: list[dict[str, Any]] | None = None,
               kwargs: dict[str, Any] | None = None, deadline: Deadline | None = None,
               n_ctx: int | None = None) -> list[int]:
        """The prompt's tokens, where only the template's own text may be control tokens.

        Text from the request (messages, tools, chat_template_kwargs) is tokenized
        with special-token parsing off. When none of it spells a control token (nearly always)
        that is the same as tokenizing the whole prompt at once, and that is what is done. Else
        the messages are rendered a second time with a placeholder for each such text, which
        shows where the template put it; a template that changed the text (other than trimming
        it) cannot be split so, and the request is refused rather than let through. Text edgellm
        wrote around the client's (tools.Written: a history call in its family's syntax) is judged
        by the client's part alone, so that its own markers stay control tokens.
        """
        max_chars = n_ctx * CHARS_PER_TOKEN if n_ctx else None
        text = self.render(messages, tools=tools, kwargs=kwargs, deadline=deadline, max_chars=max_chars)
        tainted = {s: token for s in _client_strings([messages, tools or [], kwargs or {}])
                   if (token := model.control_in(s.client if isinstance(s, Written) else s))}
        if not tainted:
            return model.tokenize(text)
        nonce = secrets.token_hex(8)
        marks = {s: f"\ue000{nonce}:{i}\ue001" for i, s in enumerate(tainted)}
        marked = self.render(_replace_strings(messages, marks), tools=_replace_strings(tools, marks),
                             kwargs=_replace_strings(kwargs or {}, marks), deadline=deadline, max_chars=max_chars)
        by_mark = {mark: s for s, mark in marks.items()}
        parts = re.split(f"(\ue000{nonce}:\\d+\ue001)", marked)
        pieces: list[tuple[str, bool]] = []  # (text, may hold control tokens)
        at = 0
        for i, part in enumerate(parts):
            if i % 2 == 1:  # the template may have trimmed it: take what the real rendering has here
                original = by_mark[part]
                part = original if text.startswith(original, at) else original.strip()
            pieces.append((part, i % 2 == 0))
            at += len(part)
        if "".join(p for p, _ in pieces) != text:
            raise TemplateError("a message holds text that is a control token of this model "
                                f"({next(iter(tainted.values()))!r}) and the chat template transforms "
                                "it, so it cannot be kept as plain text; remove it from the message")
        tokens: list[int] = []
        for piece, special in pieces:
            if piece:
                tokens += model.tokenize(piece, add_special=not tokens, parse_special=special)
        return tokens

    @classmethod
    def for_model(cls, model: Model, override: str = "") -> ChatTemplate:
        """`override` (a built-in name or Jinja source) when set, else the model's own, else a built-in;
        with the syntax the model writes tool calls in."""
        template = cls._chosen(model, override)
        syntax = template.tool_syntax = syntax_for(template.source, model.has_token)
        template.tool_markers = frozenset(t for t in model.control_tokens if model.token_text(t)
                                          and model.token_text(t) in syntax.markers)
        log.info("tool calls: %s syntax; tools %s", syntax.family, {
            "tools": "rendered by the template", "system": "in the system message's 'tools'",
            "text": "described in a system message (the template has no place for them)"}[template.tool_rendering])
        return template

    @classmethod
    def _chosen(cls, model: Model, override: str) -> ChatTemplate:
        bos, eos = model.bos_text, model.token_text(model.eos)
        if override:
            name = _ALIASES.get(override, override)
            template: ChatTemplate = BuiltinTemplate(name) if name in builtin_names() else \
                JinjaTemplate(override, "configured", bos_token=bos, eos_token=eos)
            log.info("chat template: %s (from the config)", template.name)
            return template
        if model.chat_template:
            try:
                template = JinjaTemplate(model.chat_template, "from the GGUF file", bos_token=bos, eos_token=eos)
                log.info("chat template: %s", template.name)
                return template
            except TemplateError as e:
                name = builtin_for(model)
                log.warning("%s; using llama.cpp's built-in '%s' template instead", e, name)
                return BuiltinTemplate(name)
        name = builtin_for(model)
        log.info("chat template: the model file has none; using llama.cpp's built-in '%s' template for %s",
                 name, model.architecture)
        return BuiltinTemplate(name)


def _client_strings(value: Any) -> Iterator[str]:
    """The request's own text that a template may write into the prompt (all but the roles): keys
    too, as a tool's property names and a call's argument names are written out."""
    if isinstance(value, str):
        yield value
    elif isinstance(value, list):
        for v in value:
            yield from _client_strings(v)
    elif isinstance(value, dict):
        for k, v in value.items():
            yield k
            if k != "role":
                yield from _client_strings(v)


def _replace_strings(value: Any, marks: dict[str, str]) -> Any:
    if isinstance(value, list):
        return [_replace_strings(v, marks) for v in value]
    if isinstance(value, dict):
        return {marks.get(k, k): v if k == "role" else _replace_strings(v, marks) for k, v in value.items()}
    return marks.get(value, value) if isinstance(value, str) else value


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
    if indent is not None and len(str(indent) if isinstance(indent, str) else " " * indent) > MAX_INDENT:
        raise TooComplex(f"the chat template asked tojson for an indent above {MAX_INDENT}")
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _raise(message: str) -> NoReturn:
    raise TemplateError(message)


class _Limits(threading.local):
    """The bounds of the rendering running on this thread (the environment is shared)."""

    deadline: Deadline | None = None
    max_chars: int = 1 << 22


_limits = _Limits()


def _tick() -> None:
    if _limits.deadline is not None:
        _limits.deadline.check()


def _too_big() -> TooComplex:
    return TooComplex(f"the chat template built more than {_limits.max_chars} characters, more than the "
                      "context can hold")


def _sized(value: Any) -> Any:
    if isinstance(value, str | list | tuple) and len(value) > _limits.max_chars:
        raise _too_big()
    return value


def _small(*values: Any) -> None:
    """Numbers a template hands to a function: counts, widths, repeats, indents."""
    for v in values:
        if isinstance(v, int) and not isinstance(v, bool) and abs(v) > MAX_NUMBER:
            raise TooComplex(f"the chat template used the number {v}; at most {MAX_NUMBER} is allowed")


def _narrow(fmt: str) -> None:
    """A format string's widths and precisions ('%9999999s', '{:>9999999}')."""
    if any(int(d) > MAX_NUMBER for d in re.findall(r"\d{6,}", fmt)):
        raise TooComplex(f"the chat template used a format width above {MAX_NUMBER}")


def _checked_iter(items: Iterable[Any]) -> Iterator[Any]:
    """What a template's for loop walks: the time checked as it goes."""
    for i, item in enumerate(items):
        if i % 64 == 0:
            _tick()
        yield item


def _join(parts: Iterable[Any]) -> str:
    """The output, {% set %} blocks and `~`, checked as they grow."""
    out: list[str] = []
    size = 0
    for part in parts:
        text = str(part)
        size += len(text)
        if size > _limits.max_chars:
            _tick()  # a client that has left gets no error, just the end
            raise _too_big()
        out.append(text)
    return "".join(out)


class _Generator(CodeGenerator):
    """Compiles loops to walk through _checked_iter and `a ~ b` to the checked join: Jinja's own
    code for them calls nothing a sandbox sees."""

    def visit_For(self, node: nodes.For, frame: Frame) -> None:
        node.iter = nodes.Call(nodes.EnvironmentAttribute("checked_iter"), [node.iter], [], None, None)
        super().visit_For(node, frame)

    def visit_Concat(self, node: nodes.Concat, frame: Frame) -> None:
        self.write("environment.concat((")
        for arg in node.nodes:
            self.visit(arg, frame)
            self.write(", ")
        self.write("))")


class _Sandbox(ImmutableSandboxedEnvironment):
    code_generator_class = _Generator
    intercepted_binops = frozenset({"+", "*", "**", "%"})
    concat = staticmethod(_join)
    checked_iter = staticmethod(_checked_iter)

    def call(__self, __context: Context, __obj: Any, *args: Any, **kwargs: Any) -> Any:  # noqa: N805
        _tick()
        _small(*args, *kwargs.values())
        bound_to = getattr(getattr(__obj, "__wrapped__", __obj), "__self__", None)
        if isinstance(bound_to, str) and getattr(__obj, "__name__", "") in ("format", "format_map"):
            _narrow(bound_to)
        return _sized(super().call(__context, __obj, *args, **kwargs))

    def call_binop(self, context: Context, operator: str, left: Any, right: Any) -> Any:
        _tick()
        sizes = [len(v) for v in (left, right) if isinstance(v, str | list | tuple)]
        counts = [v for v in (left, right) if isinstance(v, int) and not isinstance(v, bool)]
        if operator == "+" and sum(sizes) > _limits.max_chars:
            raise _too_big()
        if operator == "*" and len(sizes) == 1 and counts and sizes[0] * counts[0] > _limits.max_chars:
            raise _too_big()
        if operator == "**" and len(counts) == 2 and abs(right) > 64 and abs(left) > 1:
            raise TooComplex(f"the chat template raised a number to the power {right}; at most 64 is allowed")
        if operator == "%" and isinstance(left, str):
            _narrow(left)
            if "*" in left:
                _small(*(right if isinstance(right, tuple) else (right,)))
        return _sized(super().call_binop(context, operator, left, right))


def _bounded_filter(f: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(f)
    def bounded(*args: Any, **kwargs: Any) -> Any:
        _tick()
        _small(*args[1:], *kwargs.values())  # the value filtered may be long; the filter's arguments not big
        return _sized(f(*args, **kwargs))
    return bounded


def _environment() -> ImmutableSandboxedEnvironment:
    env = _Sandbox(trim_blocks=True, lstrip_blocks=True, extensions=[_Generation, jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.filters = {name: _bounded_filter(f) for name, f in env.filters.items()}
    env.globals["raise_exception"] = _raise
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env


_ENV = _environment()


class JinjaTemplate(ChatTemplate):
    """A Jinja chat template, compiled once per model."""

    def __init__(self, source: str, name: str, *, bos_token: str = "", eos_token: str = "") -> None:
        self.name = name
        self.source = source
        self.bos_token = bos_token
        self.eos_token = eos_token
        try:
            self._template = _ENV.from_string(source)
        except jinja2.TemplateSyntaxError as e:
            raise TemplateError(f"chat template '{name}' does not compile: {e}") from None

    def render(self, messages: list[dict[str, Any]], *, add_generation_prompt: bool = True,
               tools: list[dict[str, Any]] | None = None, kwargs: dict[str, Any] | None = None,
               deadline: Deadline | None = None, max_chars: int | None = None) -> str:
        clash = sorted(RESERVED.intersection(kwargs or {}))
        if clash:
            raise TemplateError(f"chat_template_kwargs cannot set {', '.join(clash)}: the request does",
                                param="chat_template_kwargs")
        # As transformers does: a key whose value is null is left out (templates test for presence).
        messages = [{k: v for k, v in m.items() if v is not None} for m in messages]
        _limits.deadline, _limits.max_chars = deadline, max_chars or _Limits.max_chars
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
        except (TemplateError, TooComplex, Abandoned):
            raise
        except Exception as e:  # templates are code from the model file: report, do not crash
            raise TemplateError(f"chat template ({self.name}) failed: {e}") from None
        finally:
            _limits.deadline = None


class BuiltinTemplate(ChatTemplate):
    """One of llama.cpp's built-in templates, by name (llama_chat_apply_template)."""

    def __init__(self, name: str) -> None:
        self.name = f"built-in {name}"
        self._key = name.encode()

    def render(self, messages: list[dict[str, Any]], *, add_generation_prompt: bool = True,
               tools: list[dict[str, Any]] | None = None, kwargs: dict[str, Any] | None = None,
               deadline: Deadline | None = None, max_chars: int | None = None) -> str:
        # llama.cpp's formats are fixed code, linear in the messages: no bounds to check.
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
