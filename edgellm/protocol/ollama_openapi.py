"""The OpenAPI description of Ollama's API as served here (/api and `/`), merged into openapi.py's
document: the fields protocol/ollama.py reads, with its bounds, and the replies serving/ollama.py
writes. Errors under /api are Ollama's `{"error": "..."}` (OllamaError)."""

from __future__ import annotations

from typing import Any

from edgellm import limits
from edgellm.protocol.ollama import _KNOBS, ROLES
from edgellm.protocol.openapi import DURATION_PATTERN, Schema, bound, obj, or_null, ref

_STR: Schema = {"type": "string"}
_INT: Schema = {"type": "integer"}
_BOOL: Schema = {"type": "boolean"}
_OBJECT: Schema = {"type": "object"}
_NAME: Schema = {"type": "string", "minLength": 1, "description": "name:tag; a name without a tag is name:latest"}


_OPTIONS: Schema = {"type": "object", "description": "other options are ignored, as Ollama ignores those it does "
                                                     "not know", "properties": {
    "num_predict": or_null({"type": "integer", "maximum": limits.MAX_TOKENS,
                          "description": "at least 1; -1 or -2: until the context is full"}),
    "num_ctx": or_null({"type": "integer", "minimum": 1, "maximum": 1 << 24,
                      "description": "the request's window, within the model's n_ctx"}),
    **{option: bound(knob) for option, knob in _KNOBS.items()},
    "stop": or_null({"anyOf": [{"type": "string", "maxLength": limits.MAX_STOP_LENGTH},
                             {"type": "array", "maxItems": limits.MAX_STOPS,
                              "items": {"type": "string", "maxLength": limits.MAX_STOP_LENGTH}}]}),
}}
_COMMON: dict[str, Schema] = {
    "stream": or_null(_BOOL),
    "options": or_null(_OPTIONS),
    "format": or_null({"anyOf": [{"type": "string", "enum": ["", "json"]}, _OBJECT],
                     "description": "\"json\", or a JSON Schema the reply follows (refused with tools)"}),
    "keep_alive": or_null({"anyOf": [{"type": "string", "pattern": DURATION_PATTERN}, {"type": "number"}],
                         "description": "'5m', seconds, 0 (unload after), negative (until evicted)"}),
    "think": or_null({"anyOf": [_BOOL, {"type": "string", "enum": ["high", "medium", "low"]}]}),
}
_CALL: Schema = obj({"function": obj({"name": _STR}, {"arguments": or_null({"anyOf": [_OBJECT, _STR]}),
                                                        "index": _INT})})
_MESSAGE: Schema = obj({"role": {"type": "string", "enum": list(ROLES)}}, {
    "content": or_null(_STR),
    "tool_calls": or_null({"type": "array", "items": _CALL}),
    "tool_name": or_null(_STR),
    "images": or_null({"type": "array", "maxItems": 0, "description": "refused: no vision models here yet"}),
    "thinking": or_null(_STR),
})
_DETAILS: Schema = obj({"format": {"const": "gguf"}, "family": _STR, "parameter_size": _STR,
                         "quantization_level": _STR}, {"parent_model": _STR, "families": {"type": "array",
                                                                                           "items": _STR}})
_LISTED: dict[str, Schema] = {"name": _STR, "model": _STR, "size": _INT, "digest": _STR,
                              "details": ref("OllamaDetails")}
_FINAL: dict[str, Schema] = {"done_reason": {"type": "string", "enum": ["stop", "length", "load", "unload"]},
                             "total_duration": _INT, "load_duration": _INT, "prompt_eval_count": _INT,
                             "prompt_eval_duration": _INT, "eval_count": _INT, "eval_duration": _INT}
_REPLY_MESSAGE: Schema = obj({"role": {"const": "assistant"}, "content": _STR},
                              {"tool_calls": {"type": "array", "items": _CALL}})

SCHEMAS: dict[str, Schema] = {
    "OllamaError": obj({"error": _STR}),
    "OllamaMessage": _MESSAGE,
    "OllamaDetails": _DETAILS,
    "OllamaChatRequest": obj({"model": _NAME}, {
        "messages": or_null({"type": "array", "items": ref("OllamaMessage"),
                           "description": "empty: load the model (keep_alive 0: unload it)"}),
        "tools": or_null({"type": "array", "maxItems": limits.MAX_TOOLS, "items": ref("Tool")}),
        **_COMMON}),
    "OllamaGenerateRequest": obj({"model": _NAME}, {
        "prompt": or_null({**_STR, "description": "empty: load the model (keep_alive 0: unload it)"}),
        "system": or_null(_STR), "raw": or_null(_BOOL),
        "suffix": or_null({**_STR, "description": "fill in the middle (models with FIM tokens; not with raw)"}),
        "template": or_null({"type": "string", "maxLength": 0}),
        "images": or_null({"type": "array", "maxItems": 0}), **_COMMON}),
    "OllamaChatResponse": obj({"model": _STR, "created_at": _STR, "done": _BOOL, "message": _REPLY_MESSAGE},
                               _FINAL),
    "OllamaGenerateResponse": obj({"model": _STR, "created_at": _STR, "done": _BOOL, "response": _STR}, _FINAL),
    "OllamaEmbedRequest": obj({"model": _NAME, "input": {"anyOf": [
        {"type": "string", "minLength": 1},
        {"type": "array", "minItems": 1, "maxItems": limits.MAX_EMBEDDING_INPUTS,
         "items": {"type": "string", "minLength": 1}}]}},
        {"keep_alive": _COMMON["keep_alive"], "truncate": or_null(_BOOL), "dimensions": {"type": "null"}}),
    "OllamaEmbeddingsRequest": obj({"model": _NAME, "prompt": {"type": "string", "minLength": 1}},
                                    {"keep_alive": _COMMON["keep_alive"]}),
    "OllamaModelRequest": obj({"model": _NAME}),
    "OllamaCopyRequest": obj({"source": _NAME, "destination": _NAME}),
    "OllamaCreateRequest": obj({"model": _NAME}, {
        "files": or_null({"type": "object", "maxProperties": 1, "additionalProperties": {
            "type": "string", "pattern": "^sha256[:-][0-9a-f]{64}$"}, "description": "one GGUF file -> its blob"}),
        "from": or_null(_STR), "stream": or_null(_BOOL)}),
}


def _json(schema: Schema, description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def _errors(*statuses: str) -> dict[str, Any]:
    error = ref("OllamaError")
    return {**{status: _json(error, "{\"error\": the message}") for status in statuses},
            "default": _json(error, "any other error (those of the connection limits keep OpenAI's shape)")}


_REQUEST_ERRORS = _errors("400", "401", "404", "413", "415", "429", "503")
_EMPTY = {"description": "done (no body, as Ollama's)"}


def _post(name: str, summary: str, request: str, ok: dict[str, Any], security: list[dict[str, list[str]]],
          errors: dict[str, Any] = _REQUEST_ERRORS) -> dict[str, Any]:
    return {"operationId": name, "summary": summary, "security": security,
            "requestBody": {"required": True, "content": {"application/json": {"schema": ref(request)}}},
            "responses": {**ok, **errors}}


def _streamed(reply: str) -> dict[str, Any]:
    return {"200": {"description": f"with `stream: false`, one {reply}; else NDJSON: one {reply} per line, the "
                                   "last with `done: true` (or a last line {\"error\": ...})",
                    "content": {"application/json": {"schema": ref(reply)},
                                "application/x-ndjson": {"schema": ref(reply)}}}}


def paths(api_key: list[dict[str, list[str]]], admin_key: list[dict[str, list[str]]]) -> dict[str, Any]:
    listed = {"type": "array", "items": obj(_LISTED, {"modified_at": _STR, "expires_at": _STR, "size_vram": _INT,
                                                      "context_length": _INT})}
    status_stream = {"description": "Ollama's status objects ({status, digest, total, completed}), one per line "
                                    "(NDJSON) unless `stream: false`",
                     "content": {"application/json": {"schema": _OBJECT},
                                 "application/x-ndjson": {"schema": _OBJECT}}}
    management = _errors("400", "401", "403", "404", "409")
    return {
        "/": {"get": {"operationId": "root", "security": [],
                      "summary": "Public: the console to a browser (Accept: text/html), else 'Ollama is running'",
                      "responses": {"200": {"description": "the page, or the text Ollama's clients look for",
                                            "content": {"text/html": {"schema": _STR},
                                                        "text/plain": {"schema": _STR}}},
                                    "default": _errors()["default"]}}},
        "/api/version": {"get": {"operationId": "ollamaVersion", "security": [],
                                 "summary": "Public: the Ollama release whose API this follows",
                                 "responses": {"200": _json(obj({"version": _STR}), "x.y.z"), **_errors()}}},
        "/api/tags": {"get": {"operationId": "ollamaTags", "summary": "Installed models, under each of their names",
                              "security": api_key,
                              "responses": {"200": _json(obj({"models": listed}), "the models"),
                                            **_errors("401")}}},
        "/api/ps": {"get": {"operationId": "ollamaPs", "summary": "The loaded models", "security": api_key,
                            "responses": {"200": _json(obj({"models": listed}), "the loaded models"),
                                          **_errors("401")}}},
        "/api/show": {"post": _post("ollamaShow", "A model's details, template and capabilities",
                                    "OllamaModelRequest", {"200": _json(obj({
                                        "details": ref("OllamaDetails"), "model_info": _OBJECT,
                                        "capabilities": {"type": "array", "items": _STR}, "template": _STR,
                                        "parameters": _STR, "license": _STR, "modelfile": _STR}), "the model")},
                                    api_key)},
        "/api/chat": {"post": _post("ollamaChat", "Chat through the model's template", "OllamaChatRequest",
                                    _streamed("OllamaChatResponse"), api_key)},
        "/api/generate": {"post": _post("ollamaGenerate", "A prompt: templated, raw, or filled in the middle",
                                        "OllamaGenerateRequest", _streamed("OllamaGenerateResponse"), api_key)},
        "/api/embed": {"post": _post("ollamaEmbed", "Embeddings (L2-normalised)", "OllamaEmbedRequest",
                                     {"200": _json(obj({"model": _STR, "embeddings": {"type": "array", "items": {
                                         "type": "array", "items": {"type": "number"}}}},
                                         {"total_duration": _INT, "load_duration": _INT,
                                          "prompt_eval_count": _INT}), "one vector per input")}, api_key)},
        "/api/embeddings": {"post": _post("ollamaEmbeddings", "One embedding (the older form)",
                                          "OllamaEmbeddingsRequest",
                                          {"200": _json(obj({"embedding": {"type": "array",
                                                                            "items": {"type": "number"}}}),
                                                        "the vector")}, api_key)},
        "/api/pull": {"post": _post("ollamaPull", "Install from the bundles in [ollama] pull_dir (never downloads)",
                                    "OllamaModelRequest", {"200": status_stream}, api_key,
                                    _errors("400", "401", "404", "503"))},
        "/api/delete": {"delete": _post("ollamaDelete", "Uninstall a model", "OllamaModelRequest", {"200": _EMPTY},
                                        admin_key, management)},
        "/api/copy": {"post": _post("ollamaCopy", "Another name for a model", "OllamaCopyRequest", {"200": _EMPTY},
                                    admin_key, management)},
        "/api/create": {"post": _post("ollamaCreate", "A model from an uploaded GGUF blob, or another name for one",
                                      "OllamaCreateRequest", {"200": status_stream}, admin_key, management)},
        "/api/blobs/{digest}": {"post": {
            "operationId": "ollamaBlob", "summary": "Upload a file, checked against its digest as it arrives",
            "security": admin_key,
            "parameters": [{"name": "digest", "in": "path", "required": True,
                            "schema": {"type": "string", "pattern": "^sha256[:-][0-9a-f]{64}$"}}],
            "requestBody": {"required": True, "content": {"application/octet-stream": {"schema": _STR}}},
            "responses": {"200": _EMPTY, "201": _EMPTY, **management}}},
    }

