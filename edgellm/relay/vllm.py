"""Where vLLM's API differs from OpenAI's: its error bodies, and its removed guided_* fields."""

from __future__ import annotations

import json

# vLLM removed these in favour of "structured_outputs": {"json" | "regex" | "choice" | "grammar": ...}.
GUIDED = {"guided_json": "json", "guided_regex": "regex", "guided_choice": "choice", "guided_grammar": "grammar"}
# Options of the old guided decoding that have no counterpart edgellm can translate to.
UNTRANSLATABLE = ("guided_decoding_backend", "guided_whitespace_pattern", "guided_json_object")

_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
          404: "not_found_error", 409: "conflict_error", 413: "invalid_request_error", 422: "invalid_request_error",
          429: "rate_limit_error"}


def translate_guided(body: dict) -> tuple[dict, str | None]:
    """Move guided_* fields into structured_outputs; an error message for ones that cannot be."""
    bad = [k for k in UNTRANSLATABLE if k in body]
    if bad:
        return body, (f"{', '.join(bad)} cannot be relayed: vLLM removed guided decoding options; "
                      "use structured_outputs")
    found = {k: body[k] for k in GUIDED if k in body}
    if not found:
        return body, None
    if len(found) > 1:
        return body, f"only one of {', '.join(found)} may be given"
    key, value = next(iter(found.items()))
    translated = {k: v for k, v in body.items() if k not in GUIDED}
    structured = dict(translated.get("structured_outputs") or {})
    structured[GUIDED[key]] = value
    translated["structured_outputs"] = structured
    return translated, None


def openai_error(status: int, body: bytes) -> dict:
    """An upstream error body in OpenAI's shape, whatever shape it came in."""
    try:
        doc = json.loads(body)
    except ValueError:
        doc = None
    if isinstance(doc, dict) and isinstance(doc.get("error"), dict):
        error = doc["error"]
    elif isinstance(doc, dict):  # vLLM: {"object": "error", "message", "type": "BadRequestError", "code": 400}
        error = doc
    else:
        error = {"message": body[:500].decode(errors="replace").strip() or f"upstream answered {status}"}
    code = error.get("code")
    return {"error": {
        "message": f"upstream: {error.get('message') or f'status {status}'}",
        "type": _TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error"),
        "param": error.get("param"),
        "code": code if isinstance(code, str) else None,
    }}
