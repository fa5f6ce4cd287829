"""JSON Schema -> GBNF, so llama.cpp's grammar sampler can only write matching JSON.

The promise is strict: whatever the model's weights, the output parses and
validates against the schema (unless max_tokens cuts it short). So every
keyword is either enforced by the grammar or refused with a SchemaError that
names it; nothing is silently ignored. Annotations (title, description, ...)
and keywords this module has never heard of are skipped, as JSON Schema
validators do.

Whitespace is at most one space between tokens, and free numbers and strings
are length-bounded where JSON allows it, so a weak model cannot run away.
"""

from __future__ import annotations

import json
import math
import re

from edgellm.engine.errors import SchemaError

MAX_INT_DIGITS = 15
MAX_DEPTH = 100  # path segments: keeps deep schemas from exhausting the Python stack


# Keywords that constrain values but have no grammar here: refused, never ignored.
_UNSUPPORTED = (
    "not", "if", "then", "else", "patternProperties", "dependentRequired", "dependentSchemas",
    "dependencies", "uniqueItems", "multipleOf", "minProperties", "maxProperties", "contains",
    "minContains", "maxContains", "propertyNames", "unevaluatedProperties", "unevaluatedItems", "pattern",
)

_PRIMITIVES = {
    "ws": '| " "',
    "char": r'[^"\\\x7F\x00-\x1F] | "\\" (["\\/bfnrt] | "u" [0-9a-fA-F]{4})',
    "string": r'"\"" char* "\"" ws',
    "integer": f'"-"? ("0" | [1-9] [0-9]{{0,{MAX_INT_DIGITS - 1}}}) ws',
    "number": f'"-"? ("0" | [1-9] [0-9]{{0,{MAX_INT_DIGITS - 1}}}) ("." [0-9]{{1,15}})? ([eE] [-+]? [0-9]{{1,3}})? ws',
    "nonneg-number": f'("0" | [1-9] [0-9]{{0,{MAX_INT_DIGITS - 1}}}) ("." [0-9]{{1,15}})? '
                     '([eE] [-+]? [0-9]{1,3})? ws',
    "boolean": '("true" | "false") ws',
    "null": '"null" ws',
    "value": "object | array | string | number | boolean | null",
    "object": '"{" ws (string ":" ws value ("," ws string ":" ws value)*)? "}" ws',
    "array": '"[" ws (value ("," ws value)*)? "]" ws',
    # Calendar dates: 30- and 31-day months, and 29 February only in leap years.
    "date": 'year "-" (("0" [13578] | "1" [02]) "-" day31 | ("0" [469] | "11") "-" day30 | "02-" day28) '
            '| leap-year "-02-29"',
    "year": '"000" [1-9] | "00" [1-9] [0-9] | "0" [1-9] [0-9]{2} | [1-9] [0-9]{3}',  # year 0 trips validators
    "leap-year": '[0-9]{2} ("0" [48] | [2468] [048] | [13579] [26]) | ("0" [48] | [2468] [048] | [13579] [26]) "00"',
    "day28": '"0" [1-9] | "1" [0-9] | "2" [0-8]',
    "day30": 'day28 | "29" | "30"',
    "day31": 'day30 | "31"',
    "time": '([01] [0-9] | "2" [0-3]) ":" [0-5] [0-9] ":" [0-5] [0-9] ("." [0-9]{1,6})? '
            '("Z" | [+-] ([01] [0-9] | "2" [0-3]) ":" [0-5] [0-9])',
    "date-time": 'date "T" time',
    "uuid": "hex{8} \"-\" hex{4} \"-\" hex{4} \"-\" hex{4} \"-\" hex{12}",
    "hex": "[0-9a-fA-F]",
    "email": '[A-Za-z0-9._%+-]{1,64} "@" [A-Za-z0-9-]{1,63} ("." [A-Za-z0-9-]{1,63}){1,4}',
}
_USES = {"value": ("object", "array", "string", "number", "boolean", "null"), "object": ("string", "value", "ws"),
         "array": ("value", "ws"), "string": ("char", "ws"), "integer": ("ws",), "number": ("ws",),
         "nonneg-number": ("ws",), "boolean": ("ws",), "null": ("ws",), "date-time": ("date", "time"),
         "date": ("year", "leap-year", "day28", "day30", "day31"), "day30": ("day28",), "day31": ("day30",),
         "uuid": ("hex",)}
_FORMATS = ("date", "time", "date-time", "uuid", "email")


def literal(text: str) -> str:
    """A GBNF string literal for `text`."""
    escaped = text.replace("\\", "\\\\").replace('"', '\\"')
    escaped = re.sub(r"[\x00-\x1f\x7f]", lambda m: f"\\x{ord(m.group()):02X}", escaped)
    return f'"{escaped}"'


def _json_literal(value: object) -> str:
    return literal(json.dumps(value, ensure_ascii=False, separators=(",", ":"))) + " ws"


def to_gbnf(schema: dict) -> str:
    """GBNF whose root accepts exactly the JSON documents `schema` allows (within the bounds above)."""
    converter = _Converter(schema)
    root = converter.visit(schema, "#")
    rules = {"root": root, **converter.rules}
    pending = [name for body in rules.values() for name in _PRIMITIVES
               if re.search(rf"(?<![\w-]){name}(?![\w-])", body)]
    while pending:
        name = pending.pop()
        if name not in rules:
            rules[name] = _PRIMITIVES[name]
            pending.extend(_USES.get(name, ()))
    return "\n".join(f"{name} ::= {body}" for name, body in rules.items()) + "\n"


class _Converter:
    def __init__(self, document: dict) -> None:
        self.document = document
        self.rules: dict[str, str] = {}
        self._refs: dict[str, str] = {}

    def _rule(self, hint: str, body: str) -> str:
        """Name `body` as a rule and return the name."""
        base = re.sub(r"[^a-z0-9]+", "-", hint.lower()).strip("-")
        name, n = base, 1
        while name in self.rules or name in _PRIMITIVES or name == "root":
            n += 1
            name = f"{base}-{n}"
        self.rules[name] = body
        return name

    def visit(self, schema: object, where: str) -> str:
        """A GBNF expression for values matching `schema` at JSON pointer `where`."""
        if where.count("/") > MAX_DEPTH:
            raise SchemaError(f"{where[:80]}...: the schema is nested too deeply")
        if schema is True or schema == {}:
            return "value"
        if not isinstance(schema, dict):
            raise SchemaError(f"{where}: a schema must be an object or true")
        for keyword in _UNSUPPORTED:
            if keyword in schema:
                raise SchemaError(f"{where}: '{keyword}' is not supported in JSON schemas here")
        if "$ref" in schema:
            return self._ref(schema["$ref"], where)
        if "const" in schema:
            return _json_literal(schema["const"])
        if "enum" in schema:
            values = schema["enum"]
            if not isinstance(values, list) or not values:
                raise SchemaError(f"{where}: 'enum' must be a non-empty array")
            return "(" + " | ".join(_json_literal(v) for v in values) + ")"
        for keyword in ("anyOf", "oneOf"):
            if keyword in schema:
                options = schema[keyword]
                if not isinstance(options, list) or not options:
                    raise SchemaError(f"{where}: '{keyword}' must be a non-empty array")
                alternatives = [self.visit(s, f"{where}/{keyword}/{i}") for i, s in enumerate(options)]
                return "(" + " | ".join(alternatives) + ")"
        if "allOf" in schema:
            return self.visit(self._merge_all_of(schema, where), where)

        kind = schema.get("type")
        if isinstance(kind, list):
            if not kind:
                raise SchemaError(f"{where}: 'type' must not be an empty array")
            return "(" + " | ".join(self._typed(schema, k, where) for k in kind) + ")"
        if kind is None:
            if "properties" in schema or "additionalProperties" in schema or "required" in schema:
                kind = "object"
            elif "items" in schema or "prefixItems" in schema:
                kind = "array"
            else:
                return "value"
        return self._typed(schema, kind, where)

    def _ref(self, ref: object, where: str) -> str:
        target = self._resolve(ref, where)
        assert isinstance(ref, str)  # _resolve refuses anything else
        if ref not in self._refs:
            # Name the rule before visiting its target: a schema may refer to itself.
            name = self._rule(ref.rsplit("/", 1)[-1] or "root-ref", "")
            self._refs[ref] = name
            self.rules[name] = self.visit(target, ref)
        return self._refs[ref]

    def _merge_all_of(self, schema: dict, where: str) -> dict:
        parts = schema["allOf"]
        if not isinstance(parts, list) or not parts:
            raise SchemaError(f"{where}: 'allOf' must be a non-empty array")
        merged: dict = {k: v for k, v in schema.items() if k != "allOf"}
        # Merging is only faithful for plain property lists: additionalProperties in any
        # part would judge the other parts' keys as extra, which a merge cannot express.
        if merged.get("additionalProperties", True) is not True:
            raise SchemaError(f"{where}: 'allOf' together with 'additionalProperties' is not supported")
        for i, part in enumerate(parts):
            if isinstance(part, dict) and "$ref" in part:
                part = self._resolve(part["$ref"], f"{where}/allOf/{i}")
            if not isinstance(part, dict) or not set(part) <= {"type", "properties", "required", "title",
                                                                "description"}:
                raise SchemaError(f"{where}/allOf/{i}: 'allOf' is supported only for merging object properties")
            if not isinstance(part.get("properties", {}), dict) or not isinstance(part.get("required", []), list):
                raise SchemaError(f"{where}/allOf/{i}: 'properties' must be an object and 'required' an array")
            merged.setdefault("properties", {}).update(part.get("properties", {}))
            merged["required"] = list(dict.fromkeys([*merged.get("required", []), *part.get("required", [])]))
            merged.setdefault("type", "object")
        return merged

    def _resolve(self, ref: object, where: str) -> object:
        if not isinstance(ref, str) or not ref.startswith("#"):
            raise SchemaError(f"{where}: only local $ref ('#/$defs/...') are supported, got {ref!r}")
        target: object = self.document
        for part in filter(None, ref[1:].split("/")):
            part = part.replace("~1", "/").replace("~0", "~")
            if not isinstance(target, dict) or part not in target:
                raise SchemaError(f"{where}: $ref {ref!r} points nowhere")
            target = target[part]
        return target

    def _typed(self, schema: dict, kind: object, where: str) -> str:
        if kind == "string":
            return self._string(schema, where)
        if kind == "integer":
            return self._integer(schema, where)
        if kind == "number":
            return self._number(schema, where)
        if kind == "boolean":
            return "boolean"
        if kind == "null":
            return "null"
        if kind == "array":
            return self._array(schema, where)
        if kind == "object":
            return self._object(schema, where)
        raise SchemaError(f"{where}: unknown type {kind!r}")

    def _string(self, schema: dict, where: str) -> str:
        fmt = schema.get("format")
        if fmt is not None:
            if fmt not in _FORMATS:
                raise SchemaError(f"{where}: string format {fmt!r} is not supported (supported: {', '.join(_FORMATS)})")
            return f'"\\"" {fmt} "\\"" ws'
        low = _count(schema, "minLength", where) or 0
        high = _count(schema, "maxLength", where)
        if low == 0 and high is None:
            return "string"
        if high is not None and high < low:
            raise SchemaError(f"{where}: maxLength is less than minLength")
        return f'"\\"" char{{{low},{"" if high is None else high}}} "\\"" ws'

    def _integer(self, schema: dict, where: str) -> str:
        low, high = _int_bounds(schema, where)
        if low is None and high is None:
            return "integer"
        return self._rule(_hint(where, 'int'), "(" + int_range(low, high) + ") ws")

    def _number(self, schema: dict, where: str) -> str:
        bounds = {k: schema[k] for k in ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum") if k in schema}
        if not bounds:
            return "number"
        if bounds == {"minimum": 0} or bounds == {"minimum": 0.0}:
            return "nonneg-number"
        raise SchemaError(f"{where}: bounds on 'number' other than minimum 0 are not supported; "
                          "use an 'integer' range or an 'enum'")

    def _array(self, schema: dict, where: str) -> str:
        low = _count(schema, "minItems", where) or 0
        high = _count(schema, "maxItems", where)
        if high is not None and high < low:
            raise SchemaError(f"{where}: maxItems is less than minItems")
        if "prefixItems" in schema:
            prefix = schema["prefixItems"]
            if not isinstance(prefix, list) or not prefix:
                raise SchemaError(f"{where}: 'prefixItems' must be a non-empty array")
            if (schema.get("items", False) is not False or low not in (0, len(prefix))
                    or high not in (None, len(prefix))):
                raise SchemaError(f"{where}: 'prefixItems' is supported only as a fixed-length tuple (items: false)")
            parts = [self.visit(s, f"{where}/prefixItems/{i}") for i, s in enumerate(prefix)]
            body = '"[" ws ' + ' "," ws '.join(parts) + ' "]" ws'
            return self._rule(_hint(where, 'tuple'), body)
        item = self.visit(schema.get("items", True), f"{where}/items")
        if high == 0:
            return '"[" ws "]" ws'
        more = f'("," ws {item}){{{max(low - 1, 0)},{"" if high is None else high - 1}}}'
        inner = f"{item} {more}"
        body = f'"[" ws {inner if low > 0 else "(" + inner + ")?"} "]" ws'
        return self._rule(_hint(where, 'array'), body)

    def _object(self, schema: dict, where: str) -> str:
        properties = schema.get("properties", {})
        if not isinstance(properties, dict):
            raise SchemaError(f"{where}: 'properties' must be an object")
        required = schema.get("required", [])
        if not isinstance(required, list) or not all(isinstance(r, str) for r in required):
            raise SchemaError(f"{where}: 'required' must be an array of strings")
        missing = [r for r in required if r not in properties]
        extra_schema = schema.get("additionalProperties", None if properties or required else True)
        if missing and extra_schema in (None, False):
            raise SchemaError(f"{where}: required properties {missing} are not in 'properties'")
        if not properties and not required and extra_schema in (True, {}):
            return "object"

        def pair(key: str, value_schema: object) -> str:
            value = self.visit(value_schema, f"{where}/properties/{key}")
            return f"{_json_literal(key)} \":\" ws {value}"

        required_pairs = [pair(k, properties.get(k, extra_schema)) for k in required]
        optional_pairs = [pair(k, v) for k, v in properties.items() if k not in required]
        if extra_schema not in (None, False):
            value = self.visit(extra_schema, f"{where}/additionalProperties")
            optional_pairs.append(f'(string ":" ws {value} ("," ws string ":" ws {value})*)')

        if required_pairs:
            body = ' "," ws '.join(required_pairs) + "".join(f' ("," ws {p})?' for p in optional_pairs)
        elif optional_pairs:
            # No required key: any subset of the optional ones, in order, comma-separated.
            tails = []
            for i in range(len(optional_pairs)):
                tails.append(optional_pairs[i] + "".join(f' ("," ws {p})?' for p in optional_pairs[i + 1:]))
            body = "(" + " | ".join(tails) + ")?"
        else:
            body = ""
        return self._rule(_hint(where, 'object'), f'"{{" ws {body} "}}" ws'.replace("  ", " "))


def _hint(where: str, kind: str) -> str:
    """A readable rule name from the schema's location: properties/age + int -> age-int."""
    last = where.rsplit("/", 1)[-1]
    return f"{last if last != '#' else 'root'}-{kind}"


def _count(schema: dict, key: str, where: str) -> int | None:
    """A non-negative integer keyword; None when it is absent (or null)."""
    value = schema.get(key)
    if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 0):
        raise SchemaError(f"{where}: '{key}' must be a non-negative integer")
    return value


def _int_bounds(schema: dict, where: str) -> tuple[int | None, int | None]:
    def number(key: str) -> float | None:
        value = schema.get(key)
        if value is None:
            return None
        if not isinstance(value, int | float) or isinstance(value, bool) or not math.isfinite(value):
            raise SchemaError(f"{where}: '{key}' must be a finite number")
        return value

    low, high = number("minimum"), number("maximum")
    ex_low, ex_high = number("exclusiveMinimum"), number("exclusiveMaximum")
    lo = None if low is None else math.ceil(low)
    if ex_low is not None:
        lo = math.floor(ex_low) + 1 if lo is None else max(lo, math.floor(ex_low) + 1)
    hi = None if high is None else math.floor(high)
    if ex_high is not None:
        hi = math.ceil(ex_high) - 1 if hi is None else min(hi, math.ceil(ex_high) - 1)
    if lo is not None and hi is not None and lo > hi:
        raise SchemaError(f"{where}: no integer lies between the minimum and the maximum")
    return lo, hi


# --- integer ranges ------------------------------------------------------------------------
#
# A range of integers becomes alternatives of digit sequences: [17, 243] is
# 1[7-9] | [2-9][0-9] | 1[0-9][0-9] | 2[0-3][0-9] | 24[0-3]. Each alternative
# is a list of atoms: a digit, or a class like [0-9] with an optional {m,n}.

def int_range(low: int | None, high: int | None) -> str:
    """GBNF alternatives for the decimal integers in [low, high]; None is unbounded."""
    alternatives = [_gbnf(a) for a in int_range_atoms(low, high)]
    return " | ".join(alternatives)


def int_range_atoms(low: int | None, high: int | None) -> list[list[str]]:
    alternatives: list[list[str]] = []
    if low is None or low < 0:
        # Negative part: "-" then the magnitudes from max(1, -high) to -low.
        neg_high = None if low is None else -low
        neg_low = 1 if high is None or high >= 0 else -high
        alternatives += [["-", *a] for a in _uint_range(neg_low, neg_high)]
    if high is None or high >= 0:
        alternatives += _uint_range(max(low or 0, 0), high)
    return alternatives


def _uint_range(low: int, high: int | None) -> list[list[str]]:
    """Non-negative integers without leading zeros, low <= n <= high (None: up to MAX_INT_DIGITS digits)."""
    top_digits = MAX_INT_DIGITS if high is None else len(str(high))
    out = []
    for digits in range(len(str(low)), top_digits + 1):
        start = max(low, 10 ** (digits - 1) if digits > 1 else 0)
        end = 10 ** digits - 1 if high is None else min(high, 10 ** digits - 1)
        if start > end:
            continue
        if high is None and start == 10 ** (digits - 1) and digits > 1:
            # Every longer number qualifies too: one alternative covers them all.
            out.append(["[1-9]", f"[0-9]{{{digits - 1},{MAX_INT_DIGITS - 1}}}"])
            break
        out += _same_length(str(start), str(end))
    return out


def _same_length(a: str, b: str) -> list[list[str]]:
    """Digit strings of equal length from a to b inclusive."""
    if not a:
        return [[]]
    if a == b:
        return [list(a)]
    if a[1:] == "0" * (len(a) - 1) and b[1:] == "9" * (len(b) - 1):
        return [[_digit_class(a[0], b[0]), *_any_digits(len(a) - 1)]]
    if a[0] == b[0]:
        return [[a[0], *rest] for rest in _same_length(a[1:], b[1:])]
    out = [[a[0], *rest] for rest in _same_length(a[1:], "9" * (len(a) - 1))]
    if int(a[0]) + 1 <= int(b[0]) - 1:
        out.append([_digit_class(str(int(a[0]) + 1), str(int(b[0]) - 1)), *_any_digits(len(a) - 1)])
    out += [[b[0], *rest] for rest in _same_length("0" * (len(b) - 1), b[1:])]
    return out


def _any_digits(n: int) -> list[str]:
    return [] if n == 0 else ["[0-9]"] if n == 1 else [f"[0-9]{{{n}}}"]


def _digit_class(a: str, b: str) -> str:
    return a if a == b else f"[{a}-{b}]"


def _gbnf(atoms: list[str]) -> str:
    return " ".join(atom if atom.startswith("[") else literal(atom) for atom in atoms)


def atoms_regex(atoms: list[str]) -> str:
    """The same alternative as a Python regex (for tests of the range logic)."""
    return "".join(re.escape(atom) if not atom.startswith("[") else atom for atom in atoms)
