"""Ollama's native API (/api): request bodies parsed into plain values, and the objects of replies.

Pure, as protocol/openai.py: a dict goes in, a dataclass or an InvalidRequest comes out. The
field names and units are Ollama's (docs/api.md of ollama/ollama, and its Python client's
types): durations in nanoseconds, sizes in bytes, times in RFC 3339. Unknown fields and
unknown `options` are ignored, as Ollama ignores them; a known one of the wrong type is a 400.
Models are named `name:tag`; a name without a tag is `name:latest`.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from edgellm import limits
from edgellm.errors import EdgeError, InvalidRequest, Unsupported
from edgellm.protocol.fields import get, knob, stops
from edgellm.protocol.openai import ToolOptions, parse_keep_alive, parse_tools

# The Ollama release whose API this one follows: clients gate features on it (tools, structured
# outputs, think), so it is Ollama's version, not edgellm's.
VERSION = "0.12.0"
LATEST = ":latest"
ROLES = ("system", "user", "assistant", "tool")
# `options` -> the sampling knob it sets (llama.cpp's names, as the engine's).
_KNOBS = {"temperature": "temperature", "top_k": "top_k", "top_p": "top_p", "min_p": "min_p", "seed": "seed",
          "presence_penalty": "presence_penalty", "frequency_penalty": "frequency_penalty",
          "repeat_penalty": "repeat_penalty", "repeat_last_n": "penalty_last_n"}


@dataclass(frozen=True)
class Options:
    """What chat and generate share."""

    model: str
    stream: bool
    max_tokens: int | None  # num_predict; None: until the context is full
    num_ctx: int | None  # the request's context window, within the model's
    stops: tuple[str, ...]
    sampling: dict[str, object]  # only the knobs the request sets
    keep_alive: float | None | bool  # seconds, None (forever), False (not given)
    chat_template_kwargs: dict[str, object]  # `think`, for templates that read it


@dataclass(frozen=True)
class ChatRequest:
    messages: list[dict[str, Any]]
    options: Options
    tools: ToolOptions | None


@dataclass(frozen=True)
class GenerateRequest:
    prompt: str
    system: str | None
    raw: bool  # the prompt as it is, no template
    suffix: str | None  # fill in the middle: the text after the gap
    options: Options


@dataclass(frozen=True)
class EmbedRequest:
    model: str
    inputs: list[str]
    keep_alive: float | None | bool
    truncate: bool  # an input longer than the model embeds at once is cut (Ollama's default)


def model_name(body: dict[str, Any], field: str = "model") -> str:
    name = get(body, field, "string")
    if not name:
        raise InvalidRequest(f"{field} is required", param=field)
    return name


def tagged(name: str) -> str:
    """A name as Ollama lists it: with its tag, `:latest` if it has none."""
    return name if ":" in name else name + LATEST


def candidates(name: str) -> list[str]:
    """The names a request's model may be known by here: as given, and with or without `:latest`."""
    if name.endswith(LATEST):
        return [name, name.removesuffix(LATEST)]
    return [name] if ":" in name else [name, name + LATEST]


def _options(body: dict[str, Any], *, think: bool) -> Options:
    options = get(body, "options", "object", {})
    num_predict = get(options, "num_predict", "integer", param="options.num_predict", maximum=limits.MAX_TOKENS)
    if num_predict is not None and num_predict < 1 and num_predict not in (-1, -2):
        raise InvalidRequest("'options.num_predict' must be at least 1, or -1 (no limit)",
                             param="options.num_predict")
    sampling: dict[str, object] = {}
    for name, knob_name in _KNOBS.items():
        value = knob(options, name, param=f"options.{name}", key=knob_name)
        if value is not None:
            sampling[knob_name] = value
    schema = _format(body)
    if schema is not None:
        sampling["json_schema"] = schema
    kwargs: dict[str, object] = {}
    if think:
        value = body.get("think")
        if value is not None:
            if not isinstance(value, bool | str):
                raise InvalidRequest("'think' must be a boolean or 'high', 'medium' or 'low'", param="think")
            kwargs["enable_thinking"] = value is not False  # Qwen3's and others' variable
            if isinstance(value, str):
                kwargs["reasoning_effort"] = value  # gpt-oss's
    return Options(
        model=model_name(body),
        stream=get(body, "stream", "boolean", True),
        max_tokens=num_predict if num_predict is not None and num_predict > 0 else None,
        num_ctx=get(options, "num_ctx", "integer", param="options.num_ctx", minimum=1, maximum=1 << 24),
        stops=stops(options, "options.stop"),
        sampling=sampling,
        keep_alive=parse_keep_alive(body),
        chat_template_kwargs=kwargs,
    )


def _format(body: dict[str, Any]) -> dict[str, Any] | None:
    """`format`: "json" (any JSON object), a JSON schema, or nothing."""
    value = body.get("format")
    if value is None or value == "":
        return None
    if value == "json":
        return {}
    if isinstance(value, dict):
        return value
    raise InvalidRequest(f"'format' must be \"json\" or a JSON schema, got {json.dumps(value)[:40]}", param="format")


def _no_images(message: dict[str, Any], where: str) -> None:
    images = get(message, "images", "array", [], param=f"{where}.images")
    if images:
        raise Unsupported("images are not supported: this box has no vision models yet", param=f"{where}.images")


def _message(message: object, i: int) -> dict[str, Any]:
    where = f"messages[{i}]"
    if not isinstance(message, dict):
        raise InvalidRequest(f"'{where}' must be an object", param=where)
    role = message.get("role")
    if role not in ROLES:
        raise InvalidRequest(f"'{where}.role' must be one of {', '.join(ROLES)}, got {role!r}", param=f"{where}.role")
    _no_images(message, where)
    entry: dict[str, Any] = {"role": role, "content": get(message, "content", "string", "", param=f"{where}.content")}
    calls = get(message, "tool_calls", "array", [], param=f"{where}.tool_calls")
    checked = [_history_call(call, f"{where}.tool_calls[{j}]") for j, call in enumerate(calls)]  # any role's
    if checked and role == "assistant":
        entry["tool_calls"] = checked
    name = get(message, "tool_name", "string", param=f"{where}.tool_name")
    if role == "tool" and name:
        entry["name"] = name
    return entry


def _history_call(call: object, where: str) -> dict[str, Any]:
    """A call in the history: arguments as an object (Ollama's), or a JSON string of one (OpenAI's habit)."""
    function = call.get("function") if isinstance(call, dict) else None
    if not isinstance(function, dict):
        raise InvalidRequest(f"'{where}.function' must be an object", param=f"{where}.function")
    name = get(function, "name", "string", param=f"{where}.function.name")
    if not name:
        raise InvalidRequest(f"'{where}.function.name' is required", param=f"{where}.function.name")
    arguments = function.get("arguments") or {}
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments)
        except ValueError:
            raise InvalidRequest(f"'{where}.function.arguments' is not valid JSON",
                                 param=f"{where}.function.arguments") from None
    if not isinstance(arguments, dict):
        raise InvalidRequest(f"'{where}.function.arguments' must be an object", param=f"{where}.function.arguments")
    call_id = call.get("id") if isinstance(call, dict) and isinstance(call.get("id"), str) else ""
    return {"id": call_id, "type": "function", "function": {"name": name, "arguments": arguments}}


def parse_chat(body: dict[str, Any]) -> ChatRequest:
    options = _options(body, think=True)
    messages = get(body, "messages", "array", [])
    tools = parse_tools({"tools": body.get("tools")})
    if tools is not None and "json_schema" in options.sampling:
        raise Unsupported("'format' together with 'tools' is not supported; set one of them", param="format")
    return ChatRequest(_with_call_ids([_message(m, i) for i, m in enumerate(messages)]), options, tools)


def _with_call_ids(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Ollama's history calls have no ids; templates that pair results with calls (Mistral's, with
    9-character ids) need them: each call gets one, and the results after it take them in order."""
    pending: list[str] = []
    count = 0
    for message in messages:
        if message.get("tool_calls"):
            pending = []
            for call in message["tool_calls"]:
                count += 1
                call["id"] = call["id"] or f"call{count:05d}"
                pending.append(call["id"])
        elif message["role"] == "tool":
            message["tool_call_id"] = pending.pop(0) if pending else ""
    return messages


def parse_generate(body: dict[str, Any]) -> GenerateRequest:
    options = _options(body, think=True)
    _no_images(body, "request")
    if get(body, "template", "string"):
        raise Unsupported("'template' is not supported: the model's own chat template is used", param="template")
    raw = get(body, "raw", "boolean", False)
    suffix = get(body, "suffix", "string") or None
    if raw and suffix:
        raise InvalidRequest("'suffix' cannot be used with 'raw'", param="suffix")
    return GenerateRequest(prompt=get(body, "prompt", "string", ""), system=get(body, "system", "string"), raw=raw,
                           suffix=suffix, options=options)


def parse_embed(body: dict[str, Any], *, legacy: bool = False) -> EmbedRequest:
    """/api/embed (`input`: a string or strings) or the older /api/embeddings (`prompt`: one string)."""
    field = "prompt" if legacy else "input"
    raw = body.get(field)
    inputs = [raw] if isinstance(raw, str) else raw
    if not isinstance(inputs, list) or not inputs or not all(isinstance(x, str) and x for x in inputs):
        raise InvalidRequest(f"'{field}' must be a non-empty string" + ("" if legacy else " or array of them"),
                             param=field)
    if len(inputs) > limits.MAX_EMBEDDING_INPUTS:
        raise InvalidRequest(f"'{field}' may hold at most {limits.MAX_EMBEDDING_INPUTS} items", param=field)
    if get(body, "dimensions", "integer") is not None:
        raise Unsupported("'dimensions' is not supported", param="dimensions")
    return EmbedRequest(model_name(body), inputs, parse_keep_alive(body), get(body, "truncate", "boolean", True))


# --- replies ------------------------------------------------------------------------------

def error_body(error: EdgeError) -> dict[str, object]:
    """The one shape of an error under /api: the Ollama client raises ResponseError with it."""
    return {"error": error.message}


def timestamp(seconds: float | None = None) -> str:
    """RFC 3339 in UTC with nanoseconds, as Ollama writes its times."""
    seconds = time.time() if seconds is None else seconds
    whole = int(seconds)
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(whole)) + f".{int((seconds - whole) * 1e9):09d}Z"


FOREVER = "9999-12-31T23:59:59Z"  # expires_at of a model kept until it is evicted (keep_alive < 0)


def parameter_size(parameters: int) -> str:
    """268098176 -> "268.10M", as Ollama's details say it."""
    for scale, unit in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "K")):
        if parameters >= scale:
            return f"{parameters / scale:.2f}{unit}"
    return str(parameters)


def details(architecture: str, parameters: int, quantization: str) -> dict[str, object]:
    return {"parent_model": "", "format": "gguf", "family": architecture, "families": [architecture],
            "parameter_size": parameter_size(parameters), "quantization_level": quantization}


def done_reason(finish_reason: str) -> str:
    """The engine's finish -> Ollama's: a reply that called tools ended as any other ("stop")."""
    return "length" if finish_reason == "length" else "stop"


def tool_call(name: str, arguments: str, index: int) -> dict[str, object] | None:
    """A finished call, its arguments as an object (the grammar made them valid JSON); None for
    one that num_predict cut off (done_reason "length" says so): Ollama's arguments are an object."""
    try:
        parsed = json.loads(arguments or "{}")
    except ValueError:
        return None
    return {"function": {"index": index, "name": name, "arguments": parsed}}


def parameters_text(defaults: Mapping[str, object]) -> str:
    """A model's recommended settings as a Modelfile's PARAMETER lines ("temperature 0.7")."""
    names = {knob: option for option, knob in _KNOBS.items()}  # the engine's names -> Ollama's
    return "\n".join(f"{names.get(k, k)} {v:.6g}" if isinstance(v, float) else f"{names.get(k, k)} {v}"
                     for k, v in sorted(defaults.items()))  # a header's f32 0.7 is 0.699999988


@dataclass(frozen=True)
class Timing:
    """Seconds: the whole request, its load (lease, template, tokens), prompt, generation."""

    total: float = 0.0
    load: float = 0.0
    prompt: float = 0.0
    generation: float = 0.0


@dataclass(frozen=True)
class Reply:
    """The objects of one /api/chat (`chat`) or /api/generate response, for the model as the client named it."""

    model: str
    chat: bool

    def _base(self, done: bool) -> dict[str, Any]:
        return {"model": self.model, "created_at": timestamp(), "done": done}

    def _text(self, body: dict[str, Any], text: str, calls: list[dict[str, object]] | None = None) -> dict[str, Any]:
        if self.chat:
            message: dict[str, object] = {"role": "assistant", "content": text}
            if calls:
                message["tool_calls"] = calls
            body["message"] = message
        else:
            body["response"] = text
        return body

    def piece(self, text: str, calls: list[dict[str, object]] | None = None) -> dict[str, Any]:
        """A streamed object: text, or tool calls made whole."""
        return self._text(self._base(False), text, calls)

    def final(self, reason: str, timing: Timing, *, prompt_tokens: int = 0, completion_tokens: int = 0,
              text: str = "", calls: list[dict[str, object]] | None = None) -> dict[str, Any]:
        """The last object (done: true); unstreamed, it holds the whole text and calls."""
        body = self._text(self._base(True), text, calls)
        body["done_reason"] = reason
        body.update(total_duration=int(timing.total * 1e9), load_duration=int(timing.load * 1e9),
                    prompt_eval_count=prompt_tokens, prompt_eval_duration=int(timing.prompt * 1e9),
                    eval_count=completion_tokens, eval_duration=int(timing.generation * 1e9))
        return body


def listed(name: str, *, modified: float, size: int, sha256: str, details: dict[str, object]) -> dict[str, object]:
    """A model in /api/tags."""
    return {"name": tagged(name), "model": tagged(name), "modified_at": timestamp(modified), "size": size,
            "digest": sha256, "details": details}


def model_info(metadata: dict[str, object], parameters: int) -> dict[str, object]:
    """/api/show's model_info: the GGUF header's values; long arrays (the vocabulary) as null, as
    Ollama shows them unless asked to be verbose."""
    info = {k: None if isinstance(v, list) and len(v) > 64 or isinstance(v, float) and not math.isfinite(v) else v
            for k, v in metadata.items()}  # (JSON has no NaN: a damaged header's is null)
    info.setdefault("general.parameter_count", parameters)
    return info
