"""Requests for fuzzing edgellm's JSON routes, and the checks every answer must pass.

Bodies come from the OpenAPI document the server publishes (edgellm/protocol/openapi.py) and
from malformed variants of them: wrong types, huge numbers, NaN-like values, deep nesting, lone
surrogates, bytes that are not UTF-8, extra and missing fields, bad JSON, other content types.
The checks: no 5xx but the documented 503 model_not_ready; every error in the API's one shape
with the type its status implies; every success as the document describes it; and nothing the
document calls invalid is accepted. Shared by tests/test_fuzz.py (short, derandomized) and
tools/fuzz/run.py (long).
"""

from __future__ import annotations

import json
import math
import re
import sys
import urllib.parse
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

import httpx
import jsonschema
import referencing
import referencing.jsonschema
from hypothesis import strategies as st

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from edgellm.errors import error_type  # noqa: E402  (this checkout's, not an installed copy)

Strategy = st.SearchStrategy[Any]
JSON_TYPES = ("application/json",)
# 5xx a correct server may answer: a model still (re)loading after an admin unload.
ALLOWED_5XX = {503: {"model_not_ready"}}
# Chunk schemas of streamed replies (the document can only name them in prose).
CHUNKS = {"/v1/chat/completions": "ChatCompletionChunk", "/v1/completions": "Completion"}
CAPS = ("max_tokens", "max_completion_tokens")
# The JSON routes: their request schemas in the document, and a plain request each answers with 200.
ROUTES = {"chat": ("/v1/chat/completions", "ChatCompletionRequest"),
          "completions": ("/v1/completions", "CompletionRequest"),
          "embeddings": ("/v1/embeddings", "EmbeddingRequest"),
          "ollama_chat": ("/api/chat", "OllamaChatRequest"),
          "ollama_generate": ("/api/generate", "OllamaGenerateRequest"),
          "ollama_embed": ("/api/embed", "OllamaEmbedRequest"),
          "ollama_show": ("/api/show", "OllamaModelRequest")}
PROBES = {"chat": ("/v1/chat/completions", {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}),
          "completions": ("/v1/completions", {"prompt": "Hello", "max_tokens": 2}),
          "embeddings": ("/v1/embeddings", {"input": "the cat"})}
JSON_ROUTES = {path for path, _ in ROUTES.values()}
SCHEMA_URI = "urn:edgellm:openapi"


@dataclass(frozen=True)
class Case:
    """One request, with what the document says of it (`valid`: None when it does not say)."""

    method: str
    path: str  # already percent-encoded
    content: bytes | None = None
    headers: tuple[tuple[str, str], ...] = ()
    kind: str = "valid"
    valid: bool | None = None

    def repro(self) -> str:
        headers = " ".join(f"-H '{k}: {v}'" for k, v in self.headers)
        body = "" if self.content is None else f" --data-binary {self.content[:600]!r}" + (
            f" (+{len(self.content) - 600} bytes)" if len(self.content) > 600 else "")
        return f"{self.kind}: {self.method} {self.path} {headers}{body}"


# --- JSON Schema -> strategies -----------------------------------------------------------------

def json_values(max_leaves: int = 6) -> Strategy:
    """Any JSON value (finite numbers; text without surrogates), small."""
    scalars = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | \
        st.text(max_size=12)
    return st.recursive(scalars, lambda inner: st.lists(inner, max_size=3) |
                        st.dictionaries(st.text(max_size=6), inner, max_size=3), max_leaves=max_leaves)


class Schemas:
    """The document's schemas as strategies, and as validators of requests and replies."""

    def __init__(self, document: dict[str, Any], overrides: dict[str, Strategy] | None = None) -> None:
        self.document = document
        self.overrides = overrides or {}
        resource = referencing.jsonschema.DRAFT202012.create_resource(document)
        self._registry: referencing.Registry[Any] = referencing.Registry().with_resource(SCHEMA_URI, resource)
        self._validators: dict[str, jsonschema.Draft202012Validator] = {}

    def resolve(self, schema: dict[str, Any]) -> dict[str, Any]:
        while "$ref" in schema:
            node: Any = self.document
            for part in schema["$ref"].removeprefix("#/").split("/"):
                node = node[part]
            schema = node
        return schema

    def named(self, name: str) -> dict[str, Any]:
        return self.document["components"]["schemas"][name]

    @staticmethod
    def pointer(name: str) -> str:
        return f"/components/schemas/{name}"

    def errors(self, value: object, pointer: str) -> list[str]:
        """Where `value` breaks the schema at `pointer` in the document ("/components/schemas/Error")."""
        validator = self._validators.get(pointer)
        if validator is None:
            ref = f"{SCHEMA_URI}#{urllib.parse.quote(pointer, safe='/~')}"
            validator = jsonschema.Draft202012Validator({"$ref": ref}, registry=self._registry)
            self._validators[pointer] = validator
        return [f"{'/'.join(map(str, e.absolute_path)) or '(the body)'}: {e.message}"[:300]
                for e in validator.iter_errors(value)]

    def strategy(self, schema: dict[str, Any], name: str | None = None) -> Strategy:
        """Values `schema` accepts (the subset of JSON Schema the document uses)."""
        if name in self.overrides:
            return self.overrides[name]
        schema = self.resolve(schema)
        if "const" in schema:
            return st.just(schema["const"])
        if "enum" in schema:
            return st.sampled_from(schema["enum"])
        for key in ("anyOf", "oneOf"):
            if key in schema:
                return st.one_of([self.strategy(s, name) for s in schema[key]])
        kind = schema.get("type")
        if isinstance(kind, list):
            return st.one_of([self.strategy({**schema, "type": k}, name) for k in kind])
        if kind is None:
            return json_values()
        return _TYPES[kind](self, schema)

    def _object(self, schema: dict[str, Any]) -> Strategy:
        properties = schema.get("properties")
        if properties is None:
            if isinstance(schema.get("additionalProperties"), dict):
                keys = st.from_regex(schema.get("propertyNames", {}).get("pattern", ".*"), fullmatch=True)
                return st.dictionaries(keys, self.strategy(schema["additionalProperties"]),
                                       max_size=min(schema.get("maxProperties", 4), 4))
            return st.dictionaries(st.text(max_size=8), json_values(), max_size=3)
        required = set(schema.get("required", ()))
        return st.fixed_dictionaries(
            {k: self.strategy(s, k) for k, s in properties.items() if k in required},
            optional={k: self.strategy(s, k) for k, s in properties.items() if k not in required})


def _integer(schemas: Schemas, schema: dict[str, Any]) -> Strategy:
    low, high = schema.get("minimum"), schema.get("maximum")
    near = st.integers(low, (low or 0) + 400 if high is None else min(high, (low or 0) + 400))
    return near | st.integers(low, high)  # small values (token ids in the vocabulary) and the whole range


def _number(schemas: Schemas, schema: dict[str, Any]) -> Strategy:
    low, high = schema.get("minimum"), schema.get("maximum")
    floats = st.floats(low, high, allow_nan=False, allow_infinity=False)
    if low is None or high is None:
        return floats | st.integers(low and math.ceil(low), high and math.floor(high))
    return floats | st.integers(math.ceil(low), math.floor(high))


def _string(schemas: Schemas, schema: dict[str, Any]) -> Strategy:
    if "pattern" in schema:
        return st.from_regex(schema["pattern"], fullmatch=True)
    return st.text(min_size=schema.get("minLength", 0), max_size=min(schema.get("maxLength", 24), 24))


def _array(schemas: Schemas, schema: dict[str, Any]) -> Strategy:
    items = schemas.strategy(schema.get("items", {}))
    low = schema.get("minItems", 0)
    return st.lists(items, min_size=low, max_size=max(low, min(schema.get("maxItems", 4), 4)))


_TYPES: dict[str, Callable[[Schemas, dict[str, Any]], Strategy]] = {
    "null": lambda s, schema: st.none(),
    "boolean": lambda s, schema: st.booleans(),
    "integer": _integer,
    "number": _number,
    "string": _string,
    "array": _array,
    "object": Schemas._object,
}


# --- malformed variants --------------------------------------------------------------------------

HUGE = (10**30, -(10**30), 2**31, 2**32 + 5, 2**63, 2**64, -(2**63) - 1, 10**400, 1e308, -1e308, 5e-324, -0.0)
# Tokens that are not JSON, or JSON Python reads as inf or 0: spliced into the text as they are.
RAW_NUMBERS = ["NaN", "Infinity", "-Infinity", "1e999", "-1e999", "1E400", "1e-400", "-0", "0e0", "1.0e+2"]
NAN_LIKE = ["NaN", "nan", "Infinity", "-inf", "1e999", "0x10", "\uff11", "1_000", " 5", "", "null", "true"]
SURROGATES = ['"\\ud800"', '"x\\udfff"', '"\\udc00\\ud800"', '"\\ud83d\\ude00"', '"a\\u0000b"', '{"\\ud800": 1}']
BAD_UTF8 = (b'"\xff"', b'"\xc3"', b'"\xf4\x90\x80\x80"', b'"\xc0\xaf"', b'"a\x80b"')
# Surrogates written as UTF-8 bytes (CESU-8), not as escapes: Python's json module reads them.
ENCODED_SURROGATES = (b'"\xed\xa0\x80"', b'"x\xed\xbf\xbf"', b'"\xed\xb0\x80\xed\xa0\x80"')
DEPTHS = [20, 200, 900, 5000, 100_000]
CONTENT_TYPES = ["text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x", "",
                 "application/json-seq", "application/jsonx", "application/json; charset=utf-8", "Application/JSON"]
MARK = "\u0000edgellm-raw\u0000"
MALFORMED = ("wrong_type", "huge", "raw_number", "nan_like", "deep", "surrogate", "bad_utf8", "extra", "missing",
             "bad_json", "not_object", "content_type", "too_large", "duplicate_key", "deep_schema")


def _locations(value: object, path: tuple[Any, ...] = ()) -> Iterator[tuple[Any, ...]]:
    """Every place in a JSON value (the root is ())."""
    yield path
    if isinstance(value, dict):
        for k, v in value.items():
            yield from _locations(v, (*path, k))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            yield from _locations(v, (*path, i))


def _replaced(value: object, path: tuple[Any, ...], new: object) -> object:
    if not path:
        return new
    head, rest = path[0], path[1:]
    if isinstance(value, dict):
        return {**value, head: _replaced(value.get(head), rest, new)}
    assert isinstance(value, list)
    return [_replaced(v, rest, new) if i == head else v for i, v in enumerate(value)]


def _removed(value: object, path: tuple[Any, ...]) -> object:
    head, rest = path[0], path[1:]
    if isinstance(value, dict):
        if not rest:
            return {k: v for k, v in value.items() if k != head}
        return {**value, head: _removed(value[head], rest)}
    assert isinstance(value, list)
    if not rest:
        return [v for i, v in enumerate(value) if i != head]
    return [_removed(v, rest) if i == head else v for i, v in enumerate(value)]


def _deep(depth: int, kind: str) -> str:
    if kind == "array":
        return "[" * depth + "]" * depth
    return '{"a":' * depth + "0" + "}" * depth


def deep_schema(depth: int, kind: str) -> dict[str, Any]:
    """A JSON Schema nested `depth` levels (for response_format): built bottom-up, no recursion."""
    schema: dict[str, Any] = {"type": "string"}
    for _ in range(depth):
        if kind == "array":
            schema = {"type": "array", "items": schema}
        elif kind == "anyOf":
            schema = {"anyOf": [schema, {"type": "null"}]}
        else:
            schema = {"type": "object", "properties": {"a": schema}, "required": ["a"]}
    return schema


def strict_json(content: bytes) -> tuple[bool, Any]:
    """What the server's body reader makes of `content`: (True, value), or (False, None) for bytes
    it refuses (not UTF-8, not JSON, NaN and Infinity, lone surrogates)."""
    def refuse(name: str) -> None:
        raise ValueError(name)

    try:
        value = json.loads(content, parse_constant=refuse)
        json.dumps(value, ensure_ascii=False).encode()
        return True, value
    except (ValueError, UnicodeError, RecursionError):
        return False, None


@dataclass
class JsonRoute:
    """A POST route with a JSON body: its request schema and the strategy of its valid bodies."""

    path: str
    schema: str
    schemas: Schemas
    max_body: int = 65536
    max_tokens: int | None = 8  # added to bodies without a reply length, so that every reply is short
    bad_utf8: tuple[bytes, ...] = BAD_UTF8 + ENCODED_SURROGATES
    huge: tuple[object, ...] = HUGE

    def bodies(self) -> Strategy:
        return self.schemas.strategy(self.schemas.named(self.schema)).map(self._capped)

    def _capped(self, body: dict[str, Any]) -> dict[str, Any]:
        if self.max_tokens is None or self.path not in CHUNKS or any(isinstance(body.get(k), int) for k in CAPS):
            return body
        return {**body, "max_tokens": self.max_tokens}

    def case(self, content: bytes, kind: str, content_type: str | None = "application/json") -> Case:
        headers = (("content-type", content_type),) if content_type is not None else ()
        valid: bool | None = None
        media = (content_type or "").split(";")[0].strip().lower()
        # Ollama's routes read JSON without a Content-Type or as a form too (curl -d), from a
        # request no web page made (serving/policy.py).
        read_as_json = JSON_TYPES + (("", "application/x-www-form-urlencoded") if self.path.startswith("/api/") else ())
        if media not in read_as_json:
            valid = False
        elif len(content) > self.max_body:
            valid = False
        else:
            parsed, value = strict_json(content)
            valid = parsed and not self.schemas.errors(value, self.schemas.pointer(self.schema))
        return Case("POST", self.path, content, headers, kind, valid)

    def cases(self, kind: str) -> Strategy:
        """Requests of one kind: "valid" (bodies the schema accepts) or one of MALFORMED."""
        if kind == "valid":
            return self.bodies().map(lambda b: self.case(json.dumps(b).encode(), "valid"))
        return st.composite(self._malformed)(kind)

    def _malformed(self, draw: Callable[[Strategy], Any], kind: str) -> Case:
        body = draw(self.bodies())
        places = [p for p in _locations(body) if p and p[0] not in CAPS] or [()]
        known = list(self.schemas.named(self.schema)["properties"])
        place = draw(st.sampled_from(places + [(k,) for k in known if k not in body]))
        raw: str | bytes | None = None
        if kind == "wrong_type":
            body = _replaced(body, place, draw(json_values()))
        elif kind == "huge":
            body = _replaced(body, place, draw(st.sampled_from(self.huge)))
        elif kind == "nan_like":
            body = _replaced(body, place, draw(st.sampled_from(NAN_LIKE)))
        elif kind == "raw_number":
            raw = draw(st.sampled_from(RAW_NUMBERS))
        elif kind == "deep":
            raw = _deep(draw(st.sampled_from(DEPTHS)), draw(st.sampled_from(["array", "object"])))
        elif kind == "surrogate":
            raw = draw(st.sampled_from(SURROGATES))
        elif kind == "bad_utf8":
            raw = draw(st.sampled_from(self.bad_utf8))
        elif kind == "extra":
            where = draw(st.sampled_from([p for p in _locations(body) if isinstance(_at(body, p), dict)]))
            extra = draw(st.dictionaries(st.text(max_size=10), json_values(), min_size=1, max_size=3))
            body = _replaced(body, where, {**_at(body, where), **extra})
        elif kind == "missing":
            body = _removed(body, place) if place and _has(body, place) else {}
        elif kind == "bad_json":
            text = json.dumps(body).encode()
            how = draw(st.sampled_from(["truncate", "garbage", "single_quotes", "trailing_comma", "empty"]))
            content = {"truncate": text[:draw(st.integers(0, max(0, len(text) - 1)))],
                       "garbage": text + draw(st.sampled_from([b"x", b"}", b"\x00", b" {}"])),
                       "single_quotes": text.replace(b'"', b"'"),
                       "trailing_comma": text[:-1] + b",}",
                       "empty": draw(st.sampled_from([b"", b" ", b"\n\t"]))}[how]
            return self.case(content, f"bad_json/{how}")
        elif kind == "not_object":
            body = draw(st.one_of(st.lists(json_values(), max_size=3), st.text(max_size=8), st.integers(),
                                  st.none(), st.booleans()))
        elif kind == "content_type":
            return self.case(json.dumps(body).encode(), kind,
                             draw(st.sampled_from([None, *CONTENT_TYPES])))
        elif kind == "too_large":
            return self.case(json.dumps({**body, "padding": "x" * (self.max_body + 1)}).encode(), kind)
        elif kind == "duplicate_key":
            first = draw(st.sampled_from(known))
            text = json.dumps(body).encode()
            return self.case(b'{"%s": %s, ' % (first.encode(), json.dumps(draw(json_values())).encode()) + text[1:]
                             if len(text) > 2 else text, kind)
        elif kind == "deep_schema":
            schema = deep_schema(draw(st.sampled_from(DEPTHS[:3] + [400])), draw(st.sampled_from(
                ["object", "array", "anyOf"])))
            body = {**body, "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": schema}}}
        if raw is not None:
            body = _replaced(body, place, MARK)
            text = json.dumps(body).encode()
            spliced = raw if isinstance(raw, bytes) else raw.encode()
            return self.case(text.replace(json.dumps(MARK).encode(), spliced), kind)
        return self.case(json.dumps(body).encode(), kind)


def _at(value: Any, path: tuple[Any, ...]) -> Any:
    for part in path:
        value = value[part]
    return value


def _has(value: Any, path: tuple[Any, ...]) -> bool:
    try:
        _at(value, path)
        return True
    except (KeyError, IndexError, TypeError):
        return False


# --- other routes -------------------------------------------------------------------------------

WEIRD_IDS = ["", ".", "..", "../../etc/passwd", "a/b", "%00", "%ff", "%2e%2e", "x" * 3000, "\u00e9", "\U0001f600",
             "con", "models", "load", "a%2Fb", "%", "?x=1", "#"]


def _undotted(path: str) -> str:
    """`path` with its "." and ".." segments escaped, so that the client sends them as they are
    (httpx, as RFC 3986 says, would remove them)."""
    return "/".join(p.replace(".", "%2E") if p in (".", "..") else p for p in path.split("/"))


def model_ids(known: list[str]) -> Strategy:
    """Percent-encoded path segments: ids the server has, random text, and odd ones."""
    text = st.text(min_size=1, max_size=30).map(lambda s: urllib.parse.quote(s, safe="/"))
    ids = st.sampled_from([urllib.parse.quote(k, safe="/") for k in known]) | text | st.sampled_from(WEIRD_IDS)
    return ids.map(_undotted)


def other_cases(known: list[str], *, hardware: bool = True) -> Strategy:
    """GETs, the admin model actions, wrong methods and unknown paths; DELETE never of a known id
    (it uninstalls)."""
    ids = model_ids(known)
    gets = ["/v1/models", "/health", "/admin/models", "/openapi.json", "/metrics", "/v1/models/", "/admin",
            "/v1", "/", "/v1/chat/completions/x", "/admin/models/"] + (["/admin/hardware"] if hardware else [])
    deletable = ids.filter(lambda i: urllib.parse.unquote(i) not in known)
    return st.one_of(
        st.sampled_from(gets).map(lambda p: Case("GET", p, kind="get")),
        ids.map(lambda i: Case("GET", f"/v1/models/{i}", kind="get_model")),
        st.tuples(ids, st.sampled_from(["load", "unload"])).map(
            lambda t: Case("POST", f"/admin/models/{t[0]}/{t[1]}", kind=f"admin_{t[1]}")),
        deletable.map(lambda i: Case("DELETE", f"/admin/models/{i}", kind="admin_delete")),
        st.tuples(st.sampled_from(["PUT", "PATCH", "DELETE", "GET", "POST", "OPTIONS"]),
                  st.sampled_from(["/v1/chat/completions", "/v1/completions", "/v1/embeddings", "/v1/models",
                                   "/health", "/admin/models", "/openapi.json", "/admin/bundles", "/metrics"])
                  ).filter(lambda t: t not in _ROUTES).map(lambda t: Case(t[0], t[1], b"{}", kind="method")),
        st.text(max_size=20).map(lambda s: Case("GET", _undotted("/" + urllib.parse.quote(s)), kind="unknown_path")),
    )


_ROUTES = {("POST", "/v1/chat/completions"), ("POST", "/v1/completions"), ("POST", "/v1/embeddings"),
           ("GET", "/v1/models"), ("GET", "/health"), ("GET", "/admin/models"), ("GET", "/openapi.json"),
           ("POST", "/admin/bundles"), ("GET", "/metrics")}


def bundle_cases() -> Strategy:
    """Uploads that are no bundle (of models, or a software update): random bytes, a tar header's
    worth of junk, an empty body."""
    def tar_junk(name: bytes) -> bytes:
        header = name.ljust(100, b"\0") + b"0000644\0" * 3 + b"00000000010\0" + b"0" * 12 + b" " * 8 + b"0"
        return header.ljust(512, b"\0") + b"x" * 8 + b"\0" * 504 + b"\0" * 1024

    contents = st.one_of(st.binary(max_size=2048), st.just(b""),
                         st.sampled_from([b"manifest.json", b"../x", b"/abs", b"a" * 99]).map(tar_junk))
    paths = st.sampled_from([f"{route}{query}" for route in ("/admin/bundles", "/admin/update")
                             for query in ("", *(f"?allow_downgrade={v}" for v in ("true", "0", "TRUE", "maybe", "%ff",
                                                                                      "")))])
    return st.tuples(paths, contents).map(
        lambda t: Case("POST", t[0], t[1], (("content-type", "application/x-tar"),), kind="bundle"))


# --- the checks ----------------------------------------------------------------------------------

class Finding(AssertionError):
    """An answer the API's contract forbids, with the request that got it."""


def send(client: httpx.Client, case: Case, headers: dict[str, str] | None = None) -> httpx.Response:
    """One request on a connection of its own: after an unhandled exception uvicorn closes the
    connection it answered a 500 on, and a request reusing it would read as the server gone."""
    return client.request(case.method, case.path, content=case.content,
                          headers={"connection": "close", **dict(case.headers), **(headers or {})})


def check(schemas: Schemas, case: Case, response: httpx.Response) -> None:
    """Raise a Finding when the answer breaks the contract (see the module's docstring)."""
    status = response.status_code
    media = response.headers.get("content-type", "").split(";")[0].strip()

    def fail(why: str) -> NoReturn:
        raise Finding(f"{why}\n  request:  {case.repro()}\n  response: {status} {media} {response.text[:800]!r}")

    is_json, body = strict_json(response.content) if media == "application/json" else (False, None)
    if status >= 500 and _error_code(body) not in ALLOWED_5XX.get(status, set()):
        fail(f"a {status}")
    if status >= 400:
        if not is_json:
            fail("an error that is not JSON")
        if case.path.startswith("/api/") and status not in (408, 414, 431):  # Ollama's shape there
            if schemas.errors(body, schemas.pointer("OllamaError")) or set(body) != {"error"} or not body["error"]:
                fail("an error not in Ollama's shape")
            return
        problems = schemas.errors(body, schemas.pointer("Error"))
        if problems or set(body) != {"error"} or set(body["error"]) != {"message", "type", "param", "code"}:
            fail(f"an error not in the API's shape: {problems}")
        if body["error"]["type"] != error_type(status) or not body["error"]["message"]:
            fail(f"error type {body['error']['type']!r} for a {status}, or an empty message")
        if status in (429, 503) and "retry-after" not in response.headers and case.path != "/health":
            fail("a 429 or 503 without Retry-After")
        return
    if case.valid is False and case.path in JSON_ROUTES:
        fail("accepted a body the document calls invalid")
    template = _template(schemas.document, case.method, case.path)
    if template is None:
        fail("a success on a route the document does not describe")
    responses = schemas.document["paths"][template][case.method.lower()]["responses"]
    content = responses.get(str(status), {}).get("content")
    if content is None and str(status) in responses and not response.content:
        return  # a documented reply without a body
    if content is None:
        fail(f"a {status}, which the document does not list for this route")
    if media not in content:
        fail(f"a {media!r} reply where the document says {sorted(content)}")
    if media == "application/json":
        if not is_json:
            fail("a reply that is not JSON")
        escaped = template.replace("~", "~0").replace("/", "~1")
        problems = schemas.errors(body, f"/paths/{escaped}/{case.method.lower()}/responses/{status}/content/"
                                        "application~1json/schema")
        if problems:
            fail(f"a reply the document does not describe: {problems}")
    elif media == "text/event-stream":
        _check_events(schemas, case, response.text, fail)
    elif media == "application/x-ndjson":
        lines = [strict_json(line.encode()) for line in response.text.splitlines()]
        if not lines or not all(ok and isinstance(value, dict) for ok, value in lines):
            fail("NDJSON lines that are not JSON objects")
        if not (lines[-1][1].get("done") is True or lines[-1][1].get("status") == "success" or "error" in lines[-1][1]):
            fail("an NDJSON stream that does not end with done, success or an error")


def _check_events(schemas: Schemas, case: Case, text: str, fail: Callable[[str], NoReturn]) -> None:
    events = [(line.split(":", 1)[0], line.split(":", 1)[1].strip()) for line in text.splitlines() if ":" in line
              and not line.startswith(":")]
    data = [value for name, value in events if name == "data"]
    if case.path.startswith(("/admin/bundles", "/admin/update")):  # uploads: progress, then done or error
        names = [value for name, value in events if name == "event"]
        if not names or names[-1] not in ("done", "error"):
            fail("an upload's events do not end with done or error")
        last = json.loads(data[-1])
        if names[-1] == "error" and schemas.errors(last, schemas.pointer("Error")):
            fail("an upload's error event not in the API's shape")
        return
    if not data or data[-1] != "[DONE]":
        fail("a stream that does not end with [DONE]")
    for value in data[:-1]:
        problems = schemas.errors(json.loads(value), schemas.pointer(CHUNKS[case.path]))
        if problems:
            fail(f"a streamed chunk the document does not describe: {problems}")


def _error_code(body: object) -> object:
    error = body.get("error") if isinstance(body, dict) else None
    return error.get("code") if isinstance(error, dict) else None


def _template(document: dict[str, Any], method: str, path: str) -> str | None:
    """The documented path template that `path` (percent-encoded) is served by."""
    decoded = urllib.parse.unquote(path.split("?")[0])
    matches = [t for t in document["paths"] if method.lower() in document["paths"][t]
               and re.fullmatch(re.sub(r"\\\{\w+\\\}", ".+", re.escape(t)), decoded)]
    return max(matches, key=lambda t: len(re.sub(r"\{\w+\}", "", t)), default=None)


