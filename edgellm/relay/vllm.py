"""Where vLLM's API differs from OpenAI's: its error bodies, and its removed guided_* fields."""

from __future__ import annotations

import json

from edgellm.relay.upstream import UpstreamError

# vLLM removed these in favour of "structured_outputs": {"json" | "regex" | "choice" | "grammar": ...}.
GUIDED = {"guided_json": "json", "guided_regex": "regex", "guided_choice": "choice", "guided_grammar": "grammar"}
# Options of the old guided decoding that have no counterpart edgellm can translate to.
UNTRANSLATABLE = ("guided_decoding_backend", "guided_whitespace_pattern", "guided_json_object")


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
    given = translated.get("structured_outputs") or {}
    if not isinstance(given, dict):
        return body, "'structured_outputs' must be an object"
    structured = dict(given)
    structured[GUIDED[key]] = value
    translated["structured_outputs"] = structured
    return translated, None


def upstream_error(status: int, body: bytes) -> UpstreamError:
    """An upstream's error answer, whatever shape it came in (OpenAI's, or vLLM's own
    {"object": "error", "message", "type": "BadRequestError", "code": 400}), as ours."""
    try:
        doc = json.loads(body)
    except ValueError:
        doc = None
    if isinstance(doc, dict) and isinstance(doc.get("error"), dict):
        error = doc["error"]
    elif isinstance(doc, dict):
        error = doc
    else:
        error = {"message": body[:500].decode(errors="replace").strip() or f"upstream answered {status}"}
    code, param = error.get("code"), error.get("param")
    return UpstreamError(f"upstream: {error.get('message') or f'status {status}'}", status=status,
                         code=code if isinstance(code, str) else "upstream_error",
                         param=param if isinstance(param, str) else None)
