"""The OpenAPI 3.1 description of the JSON API, as plain data (Ollama's part: ollama_openapi.py).

Written from what the parsers in openai.py accept, with the bounds taken from limits.py, so a
client generator (or a fuzzer) sees the same fields, types and ranges the server enforces.
`null` is accepted wherever the parser takes it as "not given", and unknown fields are
accepted (ignored) as the parser does. Pure: serving/openapi.py publishes it.
"""

from __future__ import annotations

from typing import Any

from edgellm import limits
from edgellm.protocol.openai import _KNOBS, ROLES

Schema = dict[str, Any]

# A keep_alive string, as units.parse_duration reads it; a query flag, as serving/bundles.py reads it.
DURATION_PATTERN = r"^\s*-?(([0-9]+(\.[0-9]+)?\s*(ns|us|µs|ms|s|m|h|d)\s*)+|[0-9]+(\.[0-9]+)?\s*)$"
FLAG_PATTERN = "^([Tt][Rr][Uu][Ee]|[Ff][Aa][Ll][Ss][Ee]|1|0)$"


def ref(name: str) -> Schema:
    return {"$ref": f"#/components/schemas/{name}"}


def or_null(schema: Schema) -> Schema:
    """`schema`, or null: what the parser treats as the field not being there."""
    if "const" in schema or not isinstance(schema.get("type"), str):
        return {"anyOf": [schema, {"type": "null"}]}
    widened = {**schema, "type": [schema["type"], "null"]}
    if "enum" in schema:
        widened["enum"] = [*schema["enum"], None]
    return widened


def bound(name: str) -> Schema:
    """A sampling knob's schema: limits.SAMPLING's bounds, or null."""
    limit = limits.SAMPLING[name]
    return or_null({"type": limit.kind, "minimum": limit.minimum, "maximum": limit.maximum})


_INT = {"type": "integer"}
_STR = {"type": "string"}
_NULL = {"type": "null"}
_OBJECT = {"type": "object"}
_TOKENS = {"type": "array", "items": {"type": "integer", "minimum": 0}, "minItems": 1,
           "description": "token ids, each in the model's vocabulary"}


def _generation_fields() -> dict[str, Schema]:
    """What chat and text completions share (openai._options)."""
    stop_string = {"type": "string", "maxLength": limits.MAX_STOP_LENGTH}
    max_tokens = or_null({"type": "integer", "minimum": 1, "maximum": limits.MAX_TOKENS})
    return {
        "model": or_null({**_STR, "description": "required when several models are installed"}),
        "max_tokens": max_tokens,
        "max_completion_tokens": max_tokens,
        **{name: bound(name) for name in _KNOBS},
        "stop": or_null({"anyOf": [stop_string, {"type": "array", "items": stop_string,
                                                 "maxItems": limits.MAX_STOPS}]}),
        "stream": or_null({"type": "boolean"}),
        "stream_options": or_null({"type": "object",
                                   "properties": {"include_usage": or_null({"type": "boolean"})}}),
        "logit_bias": or_null({"type": "object", "maxProperties": limits.MAX_LOGIT_BIAS,
                               "propertyNames": {"pattern": "^[0-9]+$"},
                               "additionalProperties": {"type": "number", "minimum": -100, "maximum": 100},
                               "description": "token id -> bias; each id in the model's vocabulary"}),
        "ignore_eos": or_null({"type": "boolean"}),
        "response_format": or_null(ref("ResponseFormat")),
        "keep_alive": or_null({"anyOf": [{"type": "string", "pattern": DURATION_PATTERN}, {"type": "number"}],
                               "description": "how long the model stays loaded after this request: "
                                              "'5m', or seconds; negative: until evicted"}),
        "n": or_null({"type": "integer", "enum": [1]}),
    }


_RESPONSE_FORMAT: Schema = {"oneOf": [
    {"type": "object", "required": ["type"], "properties": {"type": {"const": "text"}}},
    {"type": "object", "required": ["type"], "properties": {"type": {"const": "json_object"}}},
    {"type": "object", "required": ["type", "json_schema"], "properties": {
        "type": {"const": "json_schema"},
        "json_schema": {"type": "object", "properties": {
            "name": {**_STR, "description": "checked, not used"},
            "schema": or_null({**_OBJECT, "description": "a JSON Schema the reply follows, nested at most 100 "
                                                         "deep; keywords the grammar cannot enforce, and "
                                                         "grammars past its bounds, are refused (400)"}),
            "strict": {"type": "boolean", "description": "the schema is always enforced, whatever this says"},
        }},
    }},
]}

_TOOL_NAME = {"type": "string", "pattern": "^[A-Za-z0-9_-]{1,64}$"}
_CALL: Schema = {"type": "object", "required": ["function"], "properties": {
    "id": or_null(_STR), "type": or_null({"const": "function"}),
    "function": {"type": "object", "required": ["name"], "properties": {
        "name": _STR,
        "arguments": or_null({"anyOf": [{**_STR, "contentMediaType": "application/json",
                                         "description": "a JSON object"}, _OBJECT]}),
    }},
}}
_MESSAGE: Schema = {"type": "object", "required": ["role"], "properties": {
    "role": {"type": "string", "enum": list(ROLES)},
    "content": or_null({"anyOf": [_STR, {"type": "array", "items": ref("TextPart")}]}),
    "name": {**_STR, "description": "passed to the chat template"},
    "tool_calls": or_null({"type": "array", "items": _CALL, "description": "an assistant's calls"}),
    "tool_call_id": or_null({**_STR, "description": "required in a tool message"}),
}}
_TOOL: Schema = {"type": "object", "required": ["function"], "properties": {
    "type": or_null({"const": "function"}),
    "function": {"type": "object", "required": ["name"], "properties": {
        "name": {**_TOOL_NAME, "description": "unique among the request's tools"},
        "description": or_null(_STR),
        "parameters": or_null({**_OBJECT, "description": "the JSON Schema of an object (type 'object'); keywords "
                                                        "the grammar cannot enforce are refused (400)"}),
        "strict": or_null({"type": "boolean", "description": "always strict, whatever this says"}),
    }},
}}
_TOOL_CHOICE: Schema = {"anyOf": [
    {"type": "string", "enum": ["none", "auto", "required"]},
    {"type": "object", "required": ["type", "function"], "properties": {
        "type": {"const": "function"},
        "function": {"type": "object", "required": ["name"],
                     "properties": {"name": {**_STR, "description": "one of the request's tools"}}}}},
]}

_TEXT_PART: Schema = {"type": "object", "required": ["type", "text"],
                      "properties": {"type": {"const": "text"}, "text": _STR}}

_CHAT_REQUEST: Schema = {"type": "object", "required": ["messages"], "properties": {
    "messages": {"type": "array", "minItems": 1, "items": ref("Message")},
    **_generation_fields(),
    "chat_template_kwargs": or_null({**_OBJECT, "description": "more variables for the chat template"}),
    "logprobs": or_null({"type": "boolean", "enum": [False]}),
    "top_logprobs": _NULL,
    "tools": or_null({"type": "array", "maxItems": limits.MAX_TOOLS, "items": ref("Tool")}),
    "tool_choice": or_null({**_TOOL_CHOICE, "description": "'required' and a named tool need 'tools'"}),
    "parallel_tool_calls": or_null({"type": "boolean"}),
}}

_COMPLETION_REQUEST: Schema = {"type": "object", "required": ["prompt"], "properties": {
    "prompt": {"anyOf": [_STR, _TOKENS, {"type": "array", "minItems": 1, "maxItems": 1,
                                         "items": {"anyOf": [_STR, _TOKENS]}}]},
    **_generation_fields(),
    "logprobs": _NULL,
    "echo": or_null({"type": "boolean", "enum": [False]}),
    "suffix": or_null({"type": "string", "maxLength": 0}),
    "best_of": or_null({"type": "integer", "enum": [1]}),
}}

_EMBEDDING_INPUT: Schema = {"anyOf": [{"type": "string", "minLength": 1}, _TOKENS]}
_EMBEDDING_REQUEST: Schema = {"type": "object", "required": ["input"], "properties": {
    "input": {"anyOf": [*_EMBEDDING_INPUT["anyOf"], {"type": "array", "minItems": 1,
                                                     "maxItems": limits.MAX_EMBEDDING_INPUTS,
                                                     "items": _EMBEDDING_INPUT}],
              "description": "each input at most one batch (n_batch) of tokens"},
    "model": or_null(_STR),
    "encoding_format": or_null({"type": "string", "enum": ["float", "base64"]}),
    "dimensions": _NULL,
    "keep_alive": _generation_fields()["keep_alive"],
}}


def obj(required: dict[str, Schema], optional: dict[str, Schema] | None = None) -> Schema:
    return {"type": "object", "required": list(required), "properties": {**required, **(optional or {})}}


_USAGE = obj({"prompt_tokens": _INT, "completion_tokens": _INT, "total_tokens": _INT},
              {"prompt_tokens_details": obj({"cached_tokens": _INT})})
_FINISH = {"type": "string", "enum": ["stop", "length", "tool_calls"]}
_CALL_OUT = obj({"id": _STR, "type": {"const": "function"},
                  "function": obj({"name": _STR, "arguments": {**_STR, "contentMediaType": "application/json"}})})
_CALL_DELTA = obj({"index": _INT}, {"id": _STR, "type": {"const": "function"},
                                     "function": {"type": "object", "properties": {"name": _STR, "arguments": _STR}}})
_ID = {"id": _STR, "created": _INT, "model": _STR}

_ADMIN_MODEL = obj({
    "id": _STR,
    "state": {"type": "string", "enum": ["unloaded", "loading", "loaded", "unloading", "failed"]},
    "in_flight": _INT,
}, {
    "aliases": {"type": "array", "items": _STR},
    "files": {"type": "array", "items": obj({"name": _STR, "sha256": _STR, "size": _INT})},
    "size": _INT, "sha256": _STR, "architecture": _STR, "quantization": _STR, "parameters": _INT,
    "context_length": _INT, "has_chat_template": {"type": "boolean"}, "embedding": {"type": "boolean"},
    "defaults": {"type": "object", "additionalProperties": {"type": "number"}},
    "source": _STR, "installed": _STR, "license": _STR, "chat_template": _STR,
    "failure": or_null(_STR), "backend": or_null(_STR), "gpu_layers": or_null(_INT),
    "chat_template_in_use": or_null(_STR), "estimate_bytes": _INT,
    "tool_call_format": or_null({"type": "string", "enum": ["hermes", "llama3", "mistral", "phi4", "functiongemma",
                                                            "generic"]}),
    "kv_cache": obj({"type_k": _STR, "type_v": _STR, "estimate_bytes": _INT}),
    "rss_delta_bytes": or_null(_INT), "last_used": or_null(_STR), "expires_at": or_null(_STR),
    "pinned": {"type": "boolean"},
})

SCHEMAS: dict[str, Schema] = {
    "Error": obj({"error": obj({"message": _STR, "type": _STR, "param": or_null(_STR), "code": _STR})}),
    "Message": _MESSAGE,
    "TextPart": _TEXT_PART,
    "ResponseFormat": _RESPONSE_FORMAT,
    "Tool": _TOOL,
    "ChatCompletionRequest": _CHAT_REQUEST,
    "CompletionRequest": _COMPLETION_REQUEST,
    "EmbeddingRequest": _EMBEDDING_REQUEST,
    "Usage": _USAGE,
    "ChatCompletion": obj({**_ID, "object": {"const": "chat.completion"}, "usage": ref("Usage"), "choices": {
        "type": "array", "items": obj({"index": _INT, "finish_reason": _FINISH, "logprobs": _NULL,
                                        "message": obj({"role": {"const": "assistant"},
                                                         "content": or_null(_STR)},
                                                        {"tool_calls": {"type": "array", "items": _CALL_OUT}})})}}),
    "ChatCompletionChunk": obj({**_ID, "object": {"const": "chat.completion.chunk"}, "choices": {
        "type": "array", "items": obj({"index": _INT, "finish_reason": or_null(_FINISH), "logprobs": _NULL,
                                        "delta": {"type": "object", "properties": {
                                            "role": {"const": "assistant"}, "content": _STR,
                                            "tool_calls": {"type": "array", "items": _CALL_DELTA}}}})}},
        {"usage": ref("Usage")}),
    "Completion": obj({**_ID, "object": {"const": "text_completion"}, "choices": {
        "type": "array", "items": obj({"index": _INT, "text": _STR, "logprobs": _NULL,
                                        "finish_reason": or_null(_FINISH)})}}, {"usage": ref("Usage")}),
    "EmbeddingList": obj({"object": {"const": "list"}, "model": _STR,
                           "usage": obj({"prompt_tokens": _INT, "total_tokens": _INT}),
                           "data": {"type": "array", "items": obj({
                               "object": {"const": "embedding"}, "index": _INT,
                               "embedding": {"anyOf": [{"type": "array", "items": {"type": "number"}},
                                                       {"type": "string", "contentEncoding": "base64"}]}})}}),
    "Model": obj({"id": _STR, "object": {"const": "model"}, "created": _INT, "owned_by": _STR}),
    "ModelList": obj({"object": {"const": "list"}, "data": {"type": "array", "items": ref("Model")}}),
    "Health": obj({"status": {"const": "ok"}},
                   {"throttled": {"type": "boolean"}, "temperature_celsius": {"type": "number"},
                    "throttle_flags": {"type": "array", "items": _STR},
                    # The certificate presented (null: plain HTTP), and a rotation's next one: a client
                    # pinned to the old learns the new one here (README, "Pinning the box").
                    "tls": {"anyOf": [{"type": "null"}, obj({"fingerprint": _STR}, {
                        "next_fingerprint": {"type": ["string", "null"]},
                        "next_after": {"type": ["number", "null"]}})]},
                    # The last software update (docs/update-format.md), null when there was none.
                    "update": {"anyOf": [{"type": "null"}, obj({"state": {"type": "string", "enum": [
                        "installing", "trying", "updated", "rolled-back", "refused"]}, "from": _STR, "to": _STR,
                        "message": _STR, "at": _STR})]}}),
    "HealthBrief": obj({"status": {"type": "string", "enum": ["loading", "failed"]}}),
    "AdminModel": _ADMIN_MODEL,
    "AdminModelList": obj({"object": {"const": "list"}, "data": {"type": "array", "items": ref("AdminModel")}}),
    "DeletedModel": obj({"id": _STR, "object": {"const": "model"}, "deleted": {"const": True}}),
    "Hardware": obj({"hardware": _OBJECT, "plan": _OBJECT}),
}


def _json(schema: Schema, description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def _error(description: str) -> dict[str, Any]:
    return _json(ref("Error"), description)


_ERRORS = {
    "400": _error("invalid request: `param` names the field"),
    "401": _error("a key is missing or wrong"),
    "404": _error("no such model"),
    "413": _error("a body over [server] max_body_bytes"),
    "415": _error("a body not sent as application/json"),
    "429": _error("queue_full: `Retry-After` says when to try again"),
    "503": _error("model_not_ready, model_failed, runner_failed, shutting_down: `Retry-After` when retrying "
                  "helps"),
    "default": _error("any other error (408, 414, 431 from the connection limits; 5xx)"),
}
_ADMIN_ERRORS = {key: _ERRORS[key] for key in ("401", "404", "default")} | {
    "403": _error("admin_disabled: the admin API without admin keys on a network address"),
    "409": _error("model_busy, no_room"),
    "503": _ERRORS["503"],
}
_ADMIN_KEY: list[dict[str, list[str]]] = [{"adminKey": []}, {"adminKeyHeader": []}]
# An admin key opens the API too (and may keep a model loaded beyond [models] max_keep_alive).
_API_KEY: list[dict[str, list[str]]] = [{"apiKey": []}, {"apiKeyHeader": []}, *_ADMIN_KEY]
_MODEL_ID = [{"name": "model_id", "in": "path", "required": True, "schema": _STR,
              "description": "a model's id or alias; may contain '/'"}]
_EVENTS = {"text/event-stream": {"schema": _STR}}


def _generate(name: str, request: str, reply: str, chunk: str, summary: str) -> dict[str, Any]:
    return {"post": {
        "operationId": name, "summary": summary, "security": _API_KEY,
        "requestBody": {"required": True, "content": {"application/json": {"schema": ref(request)}}},
        "responses": {"200": {"description": f"a {reply}; with `stream`, server-sent events of {chunk} "
                                             "objects, then `data: [DONE]` (or a last `data: {\"error\": ...}`)",
                              "content": {"application/json": {"schema": ref(reply)}, **_EVENTS}},
                      **_ERRORS},
    }}


def _admin(name: str, method: str, summary: str, ok: dict[str, Any], *, model: bool = True) -> dict[str, Any]:
    return {method: {"operationId": name, "summary": summary, "security": _ADMIN_KEY,
                     **({"parameters": _MODEL_ID} if model else {}), "responses": {**ok, **_ADMIN_ERRORS}}}


def document(version: str) -> dict[str, Any]:
    """The whole document; `version` is edgellm's."""
    from edgellm.protocol import ollama_openapi  # (it builds on this module's helpers)

    bearer = "`Authorization: Bearer KEY`; with no keys configured the server listens on loopback and is open"
    return {
        "openapi": "3.1.0",
        "info": {"title": "edgellm", "version": version,
                 "description": "OpenAI-compatible LLM server on llama.cpp, with Ollama's API under /api. "
                                "Errors have one shape per API (Error; OllamaError under /api); every bound "
                                "is in docs/api.md."},
        "security": _API_KEY,
        "paths": {
            "/v1/chat/completions": _generate("createChatCompletion", "ChatCompletionRequest", "ChatCompletion",
                                              "ChatCompletionChunk", "Chat through the model's template"),
            "/v1/completions": _generate("createCompletion", "CompletionRequest", "Completion", "Completion",
                                         "Raw text or token-id prompts"),
            "/v1/embeddings": {"post": {
                "operationId": "createEmbedding", "summary": "For embedding models", "security": _API_KEY,
                "requestBody": {"required": True, "content": {"application/json": {"schema": ref("EmbeddingRequest")}}},
                "responses": {"200": _json(ref("EmbeddingList"), "one vector per input"), **_ERRORS}}},
            "/v1/models": {"get": {"operationId": "listModels", "summary": "The installed models, loaded or not",
                                   "security": _API_KEY,
                                   "responses": {"200": _json(ref("ModelList"), "the models"),
                                                 "401": _ERRORS["401"], "default": _ERRORS["default"]}}},
            "/v1/models/{model_id}": {"get": {
                "operationId": "retrieveModel", "summary": "One model", "security": _API_KEY,
                "parameters": _MODEL_ID,
                "responses": {"200": _json(ref("Model"), "the model"), "401": _ERRORS["401"],
                              "404": _ERRORS["404"], "default": _ERRORS["default"]}}},
            "/health": {"get": {
                "operationId": "health", "summary": "Public: whether the service can serve", "security": [],
                "responses": {
                    "200": _json(ref("Health"), "ready; the details to whoever could use the API"),
                    "503": _json({"anyOf": [ref("Error"), ref("HealthBrief")]},
                                 "loading or failed: an Error to whoever could use the API, else only the status"),
                    "default": _ERRORS["default"]}}},
            "/metrics": {"get": {
                "operationId": "metrics", "summary": "Prometheus text format", "security": _API_KEY,
                "responses": {"200": {"description": "the metrics",
                                      "content": {"text/plain": {"schema": _STR}}},
                              "401": _ERRORS["401"], "default": _ERRORS["default"]}}},
            "/openapi.json": {"get": {
                "operationId": "openapi", "summary": "This document", "security": _API_KEY,
                "responses": {"200": _json(_OBJECT, "OpenAPI 3.1"), "401": _ERRORS["401"],
                              "default": _ERRORS["default"]}}},
            "/admin/models": _admin("adminListModels", "get", "Each model with its state",
                                    {"200": _json(ref("AdminModelList"), "the models")}, model=False),
            "/admin/models/{model_id}/load": _admin("adminLoadModel", "post", "Load a model",
                                                    {"200": _json(ref("AdminModel"), "loaded")}),
            "/admin/models/{model_id}/unload": _admin(
                "adminUnloadModel", "post", "Unload a model",
                {"200": _json(ref("AdminModel"), "unloaded"),
                 "202": _json(ref("AdminModel"), "requests in flight: it unloads when they end")}),
            "/admin/models/{model_id}": _admin("adminDeleteModel", "delete", "Uninstall a model",
                                               {"200": _json(ref("DeletedModel"), "uninstalled")}),
            "/admin/hardware": _admin("adminHardware", "get", "The probe and the backend plan",
                                      {"200": _json(ref("Hardware"), "as `edgellm doctor --json`")}, model=False),
            "/admin/bundles": {"post": {
                "operationId": "adminUploadBundle", "summary": "Import a signed bundle", "security": _ADMIN_KEY,
                "parameters": [{"name": "allow_downgrade", "in": "query", "required": False,
                                "schema": {"type": "string", "pattern": FLAG_PATTERN},
                                "description": "true: the bundle may replace models installed from newer ones"}],
                "requestBody": {"required": True, "content": {"application/x-tar": {
                    "schema": {"type": "string", "contentMediaType": "application/x-tar"}}}},
                "responses": {"200": {"description": "server-sent events: `progress` {file, done, total}, then "
                                                     "`done` {models: [{id, status}], warnings: [...]} or `error` "
                                                     "(an Error)",
                                      "content": _EVENTS}, **_ADMIN_ERRORS}}},
            "/admin/update": {"post": {
                "operationId": "adminUploadUpdate", "summary": "Stage a signed software update", "security": _ADMIN_KEY,
                "parameters": [{"name": "allow_downgrade", "in": "query", "required": False,
                                "schema": {"type": "string", "pattern": FLAG_PATTERN},
                                "description": "true: an older version than the running one is accepted"}],
                "requestBody": {"required": True, "content": {"application/x-tar": {
                    "schema": {"type": "string", "contentMediaType": "application/x-tar"}}}},
                "responses": {"200": {"description": "server-sent events: `progress` {file, done, total}, then "
                                                     "`done` {version, staged, message} or `error` (an Error); "
                                                     "GET /health's `update` then tells the outcome",
                                      "content": _EVENTS}, **_ADMIN_ERRORS}}},
            "/admin/imports": _admin("adminImports", "get", "The last imports (sticks and uploads) and their outcomes",
                                     {"200": _json(obj({"object": {"const": "list"}, "data": {
                                         "type": "array", "items": obj({"time": _STR, "source": _STR,
                                                                        "outcome": _STR,
                                                                        "models": {"type": "array"}})}}),
                                         "newest first")}, model=False),
            "/console/{name}": {"get": {
                "operationId": "consoleFile", "summary": "Public: the console's files (no secrets in them)",
                "security": [], "parameters": [{"name": "name", "in": "path", "required": True, "schema": _STR}],
                "responses": {"200": {"description": "the file, with the console's Content-Security-Policy",
                                      "content": {media: {"schema": _STR} for media in (
                                          "text/html", "text/javascript", "text/css")}},
                              "404": _ERRORS["404"], "default": _ERRORS["default"]}}},
            **ollama_openapi.paths(_API_KEY, _ADMIN_KEY),
        },
        "components": {
            "schemas": {**SCHEMAS, **ollama_openapi.SCHEMAS},
            "securitySchemes": {
                "apiKey": {"type": "http", "scheme": "bearer", "description": f"an API key: {bearer}"},
                "apiKeyHeader": {"type": "apiKey", "in": "header", "name": "x-api-key"},
                "adminKey": {"type": "http", "scheme": "bearer",
                             "description": "an admin key; without admin keys, open only to loopback requests "
                                            "without an Origin header"},
                "adminKeyHeader": {"type": "apiKey", "in": "header", "name": "x-api-key",
                                   "description": "an admin key"},
            },
        },
    }
