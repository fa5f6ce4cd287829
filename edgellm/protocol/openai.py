"""OpenAI's API: request bodies parsed into plain values, and the bodies and events of replies.

Everything here is pure: a dict goes in, a dataclass or an InvalidRequest comes out; values
come in, JSON-ready dicts and SSE bytes go out. Fields edgellm does not know are ignored, as
SDKs add new ones often; fields it knows but cannot honour (n > 1, logprobs, tools) are
refused, never silently dropped. Every number is bounded (limits.py, docs/api.md).
"""

from __future__ import annotations

import base64
import json
import re
import struct
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeGuard

from edgellm import limits
from edgellm.errors import EdgeError, InvalidRequest, Unsupported
from edgellm.protocol.fields import get as _get
from edgellm.protocol.fields import knob, stops
from edgellm.protocol.sse import event
from edgellm.units import parse_duration

ROLES = ("system", "developer", "user", "assistant", "tool")


@dataclass(frozen=True)
class GenerationOptions:
    """What chat and text completions share."""

    model: str | None
    max_tokens: int | None
    stops: tuple[str, ...]
    stream: bool
    include_usage: bool
    sampling: dict[str, object]  # only the fields the request sets
    keep_alive: float | None | bool  # seconds, None (forever), or False (not given)


@dataclass(frozen=True)
class FunctionTool:
    name: str
    description: str
    parameters: dict[str, Any]  # a JSON schema for the arguments object


@dataclass(frozen=True)
class ToolOptions:
    tools: tuple[FunctionTool, ...]
    choice: str  # "none", "auto", "required", or "function" (the one `name` says)
    name: str | None
    parallel: bool


@dataclass(frozen=True)
class ChatRequest:
    messages: list[dict]
    options: GenerationOptions
    chat_template_kwargs: dict[str, Any]  # more variables for the chat template (vLLM's and llama-server's field)
    tools: ToolOptions | None = None  # None: the request offers no tools


@dataclass(frozen=True)
class CompletionRequest:
    prompt: str | list[int]
    options: GenerationOptions


@dataclass(frozen=True)
class EmbeddingRequest:
    model: str | None
    inputs: list[str | list[int]]
    encoding_format: str
    keep_alive: float | None | bool


def _invalid(message: str, param: str | None = None, code: str | None = None) -> InvalidRequest:
    return InvalidRequest(message, param=param, code=code)


def _refuse_unless(condition: bool, param: str, message: str) -> None:
    if not condition:
        raise Unsupported(message, param=param)


def _options(body: dict, *, chat: bool) -> GenerationOptions:
    n = _get(body, "n", "integer", 1)
    _refuse_unless(n == 1, "n", "n must be 1: edgellm generates one choice per request")
    if chat:
        _refuse_unless(not _get(body, "logprobs", "boolean", False), "logprobs", "logprobs are not supported")
        _refuse_unless(_get(body, "top_logprobs", "integer") is None, "top_logprobs", "logprobs are not supported")
    else:
        _refuse_unless(_get(body, "logprobs", "integer") is None, "logprobs", "logprobs are not supported")
        _refuse_unless(not _get(body, "echo", "boolean", False), "echo", "echo is not supported")
        _refuse_unless(not _get(body, "suffix", "string"), "suffix", "suffix (fill-in-the-middle) is not supported")
        _refuse_unless(_get(body, "best_of", "integer", 1) == 1, "best_of", "best_of must be 1")

    max_tokens = _get(body, "max_tokens", "integer", minimum=1, maximum=limits.MAX_TOKENS)
    max_completion = _get(body, "max_completion_tokens", "integer", minimum=1, maximum=limits.MAX_TOKENS)
    stream = _get(body, "stream", "boolean", False)
    stream_options = _get(body, "stream_options", "object", {})
    include_usage = _get(stream_options, "include_usage", "boolean", False, param="stream_options.include_usage")
    return GenerationOptions(
        model=_get(body, "model", "string"),
        max_tokens=max_completion if max_completion is not None else max_tokens,
        stops=stops(body),
        stream=stream,
        include_usage=include_usage,
        sampling=_sampling(body),
        keep_alive=parse_keep_alive(body),
    )


def _sampling(body: dict) -> dict[str, object]:
    """The sampling fields the request sets; the model's and the server's defaults fill the rest."""
    fields: dict[str, object] = {name: knob(body, name) for name in _KNOBS}
    fields.update({
        "logit_bias": _logit_bias(body) or None,
        "ignore_eos": _get(body, "ignore_eos", "boolean"),
        "json_schema": _response_format(body),
    })
    return {name: value for name, value in fields.items() if value is not None}


# The sampling knobs a request may set (llama-server's names beyond OpenAI's).
_KNOBS = ("temperature", "top_p", "top_k", "min_p", "seed", "presence_penalty", "frequency_penalty", "repeat_penalty")


def parse_keep_alive(body: dict) -> float | None | bool:
    """Ollama's keep_alive: how long the model stays loaded after this request; False when not given."""
    value = body.get("keep_alive")
    if value is None:
        return False
    if isinstance(value, bool) or not isinstance(value, str | int | float):
        raise _invalid("'keep_alive' must be a duration such as \"5m\", or seconds", "keep_alive")
    try:
        return parse_duration(value)
    except ValueError as e:
        raise _invalid(f"'keep_alive': {e}", "keep_alive") from None


def _logit_bias(body: dict) -> dict[int, float]:
    raw = _get(body, "logit_bias", "object", {})
    if len(raw) > limits.MAX_LOGIT_BIAS:
        raise _invalid(f"'logit_bias' may hold at most {limits.MAX_LOGIT_BIAS} entries, got {len(raw)}", "logit_bias")
    biases = {}
    for key, value in raw.items():
        try:
            token = int(key)
        except ValueError:
            raise _invalid(f"'logit_bias' keys must be token ids, got {key!r}", "logit_bias") from None
        if token < 0:
            raise _invalid(f"'logit_bias' token id {token} is negative", "logit_bias")
        if not isinstance(value, int | float) or isinstance(value, bool) or not -100 <= value <= 100:
            raise _invalid(f"'logit_bias' values must be numbers from -100 to 100, got {value!r} for {key}",
                          "logit_bias")
        biases[token] = float(value)
    return biases


def _response_format(body: dict) -> dict | None:
    """None for free text, {} for any JSON object, else the JSON schema to follow."""
    fmt = _get(body, "response_format", "object")
    if fmt is None:
        return None
    kind = _get(fmt, "type", "string", param="response_format.type")
    if kind == "text":
        return None
    if kind == "json_object":
        return {}
    if kind == "json_schema":
        spec = _get(fmt, "json_schema", "object", param="response_format.json_schema")
        if spec is None:
            raise _invalid("response_format json_schema needs a 'json_schema' object", "response_format.json_schema")
        _get(spec, "name", "string", param="response_format.json_schema.name")  # checked, not used
        _get(spec, "strict", "boolean", param="response_format.json_schema.strict")  # always strict here
        schema = _get(spec, "schema", "object", {}, param="response_format.json_schema.schema")
        return schema or {}
    raise _invalid(f"response_format type must be 'text', 'json_object' or 'json_schema', got {kind!r}",
                  "response_format.type")


def _content(message: dict, where: str) -> str:
    """A message's content as text: a string, or the text parts of an array."""
    content = message.get("content")
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise _invalid(f"'{where}.content' must be a string or an array of content parts", f"{where}.content")
    texts = []
    for i, part in enumerate(content):
        if not isinstance(part, dict) or not isinstance(part.get("type"), str):
            raise _invalid(f"'{where}.content[{i}]' must be an object with a 'type'", f"{where}.content[{i}]")
        if part["type"] != "text":
            raise _invalid(f"content parts of type '{part['type']}' are not supported; only 'text' is",
                          f"{where}.content[{i}].type", code="unsupported_content")
        if not isinstance(part.get("text"), str):
            raise _invalid(f"'{where}.content[{i}].text' must be a string", f"{where}.content[{i}].text")
        texts.append(part["text"])
    return "".join(texts)


_TOOL_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")
# What a tool's `parameters` may hold without saying `type: object` (then it is an object's schema).
_OBJECT_KEYWORDS = frozenset({"properties", "required", "additionalProperties", "title", "description",
                              "$schema", "$defs", "definitions", "$id", "$comment", "examples", "default"})


def parse_tools(body: dict) -> ToolOptions | None:
    """`tools`, `tool_choice` and `parallel_tool_calls`: None when the request offers no tools."""
    raw = _get(body, "tools", "array", [])
    if len(raw) > limits.MAX_TOOLS:
        raise _invalid(f"'tools' may hold at most {limits.MAX_TOOLS} tools, got {len(raw)}", "tools")
    tools: list[FunctionTool] = []
    for i, tool in enumerate(raw):
        where = f"tools[{i}]"
        if not isinstance(tool, dict):
            raise _invalid(f"'{where}' must be an object", where)
        if _get(tool, "type", "string", "function", param=f"{where}.type") != "function":
            raise _invalid(f"'{where}.type' must be 'function'", f"{where}.type")
        function = _get(tool, "function", "object", param=f"{where}.function")
        if function is None:
            raise _invalid(f"'{where}.function' is required", f"{where}.function")
        name = _get(function, "name", "string", param=f"{where}.function.name")
        if name is None or not _TOOL_NAME.fullmatch(name):
            raise _invalid(f"'{where}.function.name' must be 1 to 64 letters, digits, '_' or '-', got {name!r}",
                           f"{where}.function.name")
        if any(t.name == name for t in tools):
            raise _invalid(f"'{where}.function.name': two tools are named {name!r}", f"{where}.function.name")
        description = _get(function, "description", "string", "", param=f"{where}.function.description")
        parameters = _get(function, "parameters", "object", None, param=f"{where}.function.parameters")
        if parameters is None or parameters == {}:
            parameters = {"type": "object", "properties": {}}
        elif parameters.get("type") != "object" and ("type" in parameters or not set(parameters) <= _OBJECT_KEYWORDS):
            raise _invalid(f"'{where}.function.parameters' must be the JSON schema of an object (type 'object')",
                           f"{where}.function.parameters")
        else:
            parameters = {"type": "object", **parameters}  # arguments are an object, whatever else it says
        _get(function, "strict", "boolean", param=f"{where}.function.strict")  # always strict here
        tools.append(FunctionTool(name, description, parameters))
    choice, named = _tool_choice(body, tools)
    parallel = _get(body, "parallel_tool_calls", "boolean", True)
    if not tools:
        return None
    return ToolOptions(tuple(tools), choice, named, parallel)


def _tool_choice(body: dict, tools: list[FunctionTool]) -> tuple[str, str | None]:
    raw = body.get("tool_choice")
    if raw is None:
        return "auto", None
    if isinstance(raw, str):
        if raw not in ("none", "auto", "required"):
            raise _invalid(f"'tool_choice' must be 'none', 'auto', 'required' or a function, got {raw!r}",
                           "tool_choice")
        if raw == "required" and not tools:
            raise _invalid("'tool_choice' is 'required' but the request has no 'tools'", "tool_choice")
        return raw, None
    if not isinstance(raw, dict) or raw.get("type") != "function":
        raise _invalid("'tool_choice' must be 'none', 'auto', 'required' or "
                       "{\"type\": \"function\", \"function\": {\"name\": ...}}", "tool_choice")
    function = _get(raw, "function", "object", {}, param="tool_choice.function")
    name = _get(function, "name", "string", param="tool_choice.function.name")
    if name is None or not any(t.name == name for t in tools):
        raise _invalid(f"'tool_choice.function.name' {name!r} is not among the request's tools",
                       "tool_choice.function.name")
    return "function", name


def _tool_calls(message: dict, where: str) -> list[dict]:
    """An assistant message's calls, with the arguments as an object (what chat templates expect)."""
    calls = _get(message, "tool_calls", "array", [], param=f"{where}.tool_calls")
    out = []
    for j, call in enumerate(calls):
        at = f"{where}.tool_calls[{j}]"
        if not isinstance(call, dict):
            raise _invalid(f"'{at}' must be an object", at)
        function = _get(call, "function", "object", param=f"{at}.function")
        if function is None:
            raise _invalid(f"'{at}.function' is required", f"{at}.function")
        name = _get(function, "name", "string", param=f"{at}.function.name")
        if name is None:
            raise _invalid(f"'{at}.function.name' is required", f"{at}.function.name")
        arguments = function.get("arguments", "{}")
        if isinstance(arguments, str):
            try:
                arguments = json.loads(arguments or "{}")
            except ValueError:
                raise _invalid(f"'{at}.function.arguments' is not valid JSON", f"{at}.function.arguments") from None
        if not isinstance(arguments, dict):
            raise _invalid(f"'{at}.function.arguments' must be a JSON object", f"{at}.function.arguments")
        call_id = _get(call, "id", "string", "", param=f"{at}.id")
        out.append({"id": call_id, "type": "function", "function": {"name": name, "arguments": arguments}})
    return out


def parse_chat(body: dict) -> ChatRequest:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise _invalid("'messages' must be a non-empty array of messages", "messages")
    parsed: list[dict] = []
    names: dict[str, str] = {}  # call id -> the tool it called, for results that do not say
    for i, message in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(message, dict):
            raise _invalid(f"'{where}' must be an object", where)
        role = message.get("role")
        if role not in ROLES:
            raise _invalid(f"'{where}.role' must be one of {', '.join(ROLES)}, got {role!r}", f"{where}.role")
        entry: dict[str, Any] = {"role": "system" if role == "developer" else role,
                                 "content": _content(message, where)}
        name = _get(message, "name", "string", param=f"{where}.name")
        # Both are checked in every message (as the document says), and used only where they belong.
        calls = _get(message, "tool_calls", "array", [], param=f"{where}.tool_calls")
        call_id = _get(message, "tool_call_id", "string", param=f"{where}.tool_call_id")
        if role == "assistant" and calls:
            entry["tool_calls"] = _tool_calls(message, where)  # content stays "" if null: templates read it
            names.update((c["id"], c["function"]["name"]) for c in entry["tool_calls"] if c["id"])
        if role == "tool":
            if call_id is None:
                raise _invalid(f"'{where}.tool_call_id' is required in a tool message", f"{where}.tool_call_id")
            entry["tool_call_id"] = call_id
            name = name or names.get(call_id)
        if name is not None:
            entry["name"] = name
        parsed.append(entry)
    kwargs = _get(body, "chat_template_kwargs", "object", {})
    options = _options(body, chat=True)
    tools = parse_tools(body)
    if tools is not None and tools.choice != "none" and "json_schema" in options.sampling:
        raise Unsupported("'response_format' together with 'tools' is not supported; set one of them",
                          param="response_format")
    return ChatRequest(messages=parsed, options=options, chat_template_kwargs=kwargs, tools=tools)


def parse_completion(body: dict) -> CompletionRequest:
    prompt = body.get("prompt")
    # A one-element array is the same prompt; several prompts would need several choices.
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str | list):
        prompt = prompt[0]
    if isinstance(prompt, str):
        pass
    elif _is_token_list(prompt) and prompt:
        pass
    elif isinstance(prompt, list) and prompt and all(isinstance(p, str) or _is_token_list(p) for p in prompt):
        raise Unsupported("only one prompt per request is supported", param="prompt")
    else:
        raise _invalid("'prompt' must be a string or an array of token ids", "prompt")
    return CompletionRequest(prompt=prompt, options=_options(body, chat=False))


def parse_embeddings(body: dict) -> EmbeddingRequest:
    raw = body.get("input")
    inputs: list[str | list[int]]
    if isinstance(raw, str) or _is_token_list(raw):
        inputs = [raw]
    elif isinstance(raw, list) and all(isinstance(x, str) or _is_token_list(x) for x in raw):
        inputs = list(raw)
    else:
        raise _invalid("'input' must be a string, an array of strings, or token ids", "input")
    if not inputs or any(len(x) == 0 for x in inputs):
        raise _invalid("'input' must not be empty", "input")
    if len(inputs) > limits.MAX_EMBEDDING_INPUTS:
        raise _invalid(f"'input' may hold at most {limits.MAX_EMBEDDING_INPUTS} items, got {len(inputs)}", "input")
    encoding = _get(body, "encoding_format", "string", "float")
    if encoding not in ("float", "base64"):
        raise _invalid(f"'encoding_format' must be 'float' or 'base64', got {encoding!r}", "encoding_format")
    _refuse_unless(_get(body, "dimensions", "integer") is None, "dimensions", "'dimensions' is not supported")
    return EmbeddingRequest(model=_get(body, "model", "string"), inputs=inputs, encoding_format=encoding,
                            keep_alive=parse_keep_alive(body))


def _is_token_list(value: object) -> TypeGuard[list[int]]:
    return isinstance(value, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in value)


# --- replies ------------------------------------------------------------------------------

class TokenCounts(Protocol):
    @property
    def prompt_tokens(self) -> int: ...
    @property
    def completion_tokens(self) -> int: ...
    @property
    def cached_tokens(self) -> int: ...


def error_body(error: EdgeError) -> dict[str, object]:
    """The one shape of an error under /v1; OpenAI SDKs raise typed exceptions from it and show
    `message`, so it says what is wrong and `param` names the field at fault."""
    return {"error": {"message": error.message, "type": error.type, "param": error.param, "code": error.code}}


def usage_body(usage: TokenCounts) -> dict[str, object]:
    return {
        "prompt_tokens": usage.prompt_tokens,
        "completion_tokens": usage.completion_tokens,
        "total_tokens": usage.prompt_tokens + usage.completion_tokens,
        "prompt_tokens_details": {"cached_tokens": usage.cached_tokens},
    }


@dataclass
class Reply:
    """The identity every body and chunk of one response shares."""

    model: str
    chat: bool
    id: str = ""
    created: int = field(default_factory=lambda: int(time.time()))

    def __post_init__(self) -> None:
        self.id = self.id or ("chatcmpl-" if self.chat else "cmpl-") + uuid.uuid4().hex[:24]
        # Every text chunk is the same JSON but for the text: render that part per token only.
        marker = "\u0000text\u0000"
        head, tail = event(self.chunk(marker)).split(json.dumps(marker).encode())
        self._text_head, self._text_tail = head, tail

    def text_event(self, text: str) -> bytes:
        """event(self.chunk(text)), without building and encoding the whole chunk each token."""
        return self._text_head + json.dumps(text, ensure_ascii=False).encode() + self._text_tail

    def _base(self, obj: str) -> dict:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model}

    def body(self, text: str, finish_reason: str, usage: TokenCounts,
             calls: list[tuple[str, str, str]] | None = None) -> dict:
        """The whole response of a non-streamed request; `calls`: (id, name, arguments) of its tool calls."""
        if self.chat:
            message: dict[str, object] = {"role": "assistant", "content": text}
            if calls:
                message["content"] = text or None
                message["tool_calls"] = [{"id": id, "type": "function", "function": {"name": name, "arguments": args}}
                                         for id, name, args in calls]
            choice = {"index": 0, "message": message, "logprobs": None, "finish_reason": finish_reason}
            body = self._base("chat.completion")
        else:
            choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}
            body = self._base("text_completion")
        body["choices"] = [choice]
        body["usage"] = usage_body(usage)
        return body

    def chunk(self, text: str | None, finish_reason: str | None = None, *, first: bool = False) -> dict:
        """One streamed chunk; `first` adds the assistant role to a chat delta."""
        if self.chat:
            delta: dict = {"role": "assistant"} if first else {}
            if text is not None:
                delta["content"] = text
            choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
            body = self._base("chat.completion.chunk")
        else:
            choice = {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish_reason}
            body = self._base("text_completion")
        body["choices"] = [choice]
        return body

    def call_chunk(self, index: int, call: Mapping[str, object]) -> dict:
        """A streamed piece of tool call `index`: its id, type and name first, then its arguments."""
        body = self._base("chat.completion.chunk")
        body["choices"] = [{"index": 0, "delta": {"tool_calls": [{"index": index, **call}]}, "logprobs": None,
                            "finish_reason": None}]
        return body

    def usage_chunk(self, usage: TokenCounts) -> dict:
        """The extra last chunk stream_options.include_usage asks for: no choices, just usage."""
        body = self._base("chat.completion.chunk" if self.chat else "text_completion")
        body["choices"] = []
        body["usage"] = usage_body(usage)
        return body


def model_object(model_id: str, created: int) -> dict:
    return {"id": model_id, "object": "model", "created": created, "owned_by": "edgellm"}


def embeddings_body(model: str, vectors: list[list[float]], encoding_format: str, prompt_tokens: int) -> dict:
    def encode(vector: list[float]) -> str | list[float]:
        if encoding_format == "base64":
            return base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode()
        return vector

    return {
        "object": "list",
        "data": [{"object": "embedding", "index": i, "embedding": encode(v)} for i, v in enumerate(vectors)],
        "model": model,
        "usage": {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens},
    }
