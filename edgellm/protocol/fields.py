"""Typed fields of a JSON request body, shared by the APIs' parsers: a wrong type or a value out of
range is a 400 that names the field."""

from __future__ import annotations

from typing import Any

from edgellm import limits
from edgellm.errors import InvalidRequest

_MISSING = object()
_KINDS = {
    "number": ((int, float), "a number"),
    "integer": ((int,), "an integer"),
    "string": ((str,), "a string"),
    "boolean": ((bool,), "a boolean"),
    "object": ((dict,), "an object"),
    "array": ((list,), "an array"),
}


def get(body: dict[str, Any], name: str, kind: str, default: object = None, *, minimum: float | None = None,
         maximum: float | None = None, param: str | None = None) -> Any:
    """One field, type- and range-checked (its type is `kind`'s, or default's); null counts as absent,
    as in OpenAI's API."""
    value = body.get(name, _MISSING)
    if value is _MISSING or value is None:
        return default
    types, described = _KINDS[kind]
    if not isinstance(value, types) or (isinstance(value, bool) and kind != "boolean"):
        raise InvalidRequest(f"'{param or name}' must be {described}, got {json_type(value)}", param=param or name)
    if minimum is not None and isinstance(value, int | float) and value < minimum:
        raise InvalidRequest(f"'{param or name}' must be at least {minimum}, got {value}", param=param or name)
    if maximum is not None and isinstance(value, int | float) and value > maximum:
        raise InvalidRequest(f"'{param or name}' must be at most {maximum}, got {value}", param=param or name)
    return value


def json_type(value: object) -> str:
    return {bool: "a boolean", int: "an integer", float: "a number", str: "a string",
            list: "an array", dict: "an object"}.get(type(value), type(value).__name__)




def knob(body: dict[str, Any], name: str, param: str | None = None, key: str | None = None) -> int | float | None:
    """A sampling knob, within limits.SAMPLING's bounds for `key` (default: `name`)."""
    value = body.get(name)
    if value is None:
        return None
    problem = limits.SAMPLING[key or name].check(value)
    if problem:
        where = param or name
        raise InvalidRequest(f"'{where}' {problem}" + ("" if "got" in problem else f", got {json_type(value)}"),
                             param=where)
    assert isinstance(value, int | float)
    return value


def stops(body: dict[str, Any], param: str = "stop") -> tuple[str, ...]:
    """Stop strings: a string or an array of them, bounded in count and length; empty ones dropped."""
    stop = body.get("stop")
    if stop is None:
        return ()
    if isinstance(stop, str):
        stop = [stop]
    if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop):
        raise InvalidRequest(f"'{param}' must be a string or an array of strings", param=param)
    if len(stop) > limits.MAX_STOPS:
        raise InvalidRequest(f"'{param}' may hold at most {limits.MAX_STOPS} strings, got {len(stop)}", param=param)
    if any(len(s) > limits.MAX_STOP_LENGTH for s in stop):
        raise InvalidRequest(f"a '{param}' string may be at most {limits.MAX_STOP_LENGTH} characters long",
                             param=param)
    return tuple(s for s in stop if s)
