"""JSON Schema -> GBNF, so llama.cpp's grammar sampler can only write matching JSON.

The promise is strict: whatever the model's weights, the output parses and
validates against the schema (unless max_tokens cuts it short). So every
keyword is either enforced by the grammar or refused with a SchemaError that
names it; nothing is silently ignored. Annotations (title, description, ...)
and keywords this module has never heard of are skipped, as JSON Schema
validators do.

Whitespace is at most one space between tokens, and numbers and strings are
length-bounded (integers to MAX_INT_DIGITS digits, strings without maxLength to
MAX_STRING characters, object keys to MAX_KEY), so a weak model cannot run away.
llama.cpp counts a repetition to MAX_COUNT at most: a larger maxLength or
maxItems is lowered to it (fewer still validate), a larger minLength or minItems
refused. An object's declared keys never repeat, and come in the schema's order:
extra keys (additionalProperties) exclude them, and are written without escapes
so that two spellings of one key cannot slip through. `oneOf` is enforced where
its branches cannot match the same value (different types, or objects told
apart by a const property) and refused where they can.

A schema comes from a request, so compiling one is bounded: each schema object is
compiled once however often it is reached ($ref, allOf, type lists), the grammar
grows linearly with the schema, and one that would need more than MAX_RULES rules
or MAX_GRAMMAR_BYTES is refused before llama.cpp sees it. llama.cpp is never
handed a grammar it rejects: it would print the whole grammar to stderr.
"""

from __future__ import annotations

import json
import math
import re
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager

from edgellm.engine.errors import SchemaError

MAX_INT_DIGITS = 15
_INT_MAX = 10 ** MAX_INT_DIGITS - 1  # the largest integer the grammar writes
MAX_STRING = 1024  # characters of a string without maxLength
MAX_KEY = 128  # characters of an object key that no schema names
MAX_DEPTH = 100  # nested schemas: keeps deep schemas from exhausting the Python stack
# llama.cpp refuses a repetition {m,n} of more than 2000 (and above it quietly drops the maximum).
MAX_COUNT = 1999
# Rules as llama.cpp counts them: it writes a rule for each count of a repetition, so char{0,500}
# is 500. It spends about 200 bytes on each: 50,000 are ~10 MiB, parsed in ~30 ms here. A schema
# of a few hundred properties needs a few thousand.
MAX_RULES = 50_000
# The text of a grammar. llama.cpp's set-up is quadratic in the alternatives it starts from
# (10,000 literals: 0.1 s, 100,000: 11 s here); 256 KiB holds ~20,000 of them at most (~0.5 s),
# and the grammar of 1,000 properties is a third of it.
MAX_GRAMMAR_BYTES = 256 * 1024
MAX_NAME = 40  # characters of a rule name taken from the schema (a long key makes no long names)
BLOCK = 64  # optional properties per chain of rules (see _some_in_order)


# Keywords that constrain values but have no grammar here: refused, never ignored.
_UNSUPPORTED = (
    "not", "if", "then", "else", "patternProperties", "dependentRequired", "dependentSchemas",
    "dependencies", "uniqueItems", "multipleOf", "minProperties", "maxProperties", "contains",
    "minContains", "maxContains", "propertyNames", "unevaluatedProperties", "unevaluatedItems", "pattern",
)

_PRIMITIVES = {
    "ws": '| " "',
    "char": r'[^"\\\x7F\x00-\x1F] | "\\" (["\\/bfnrt] | "u" [0-9a-fA-F]{4})',
    "string": '"\\"" char{0,' + str(MAX_STRING) + '} "\\"" ws',
    "key": '"\\"" keychar{0,' + str(MAX_KEY) + '} "\\"" ws',
    "keychar": r'[^"\\\x7F\x00-\x1F]',
    "integer": f'"-"? ("0" | [1-9] [0-9]{{0,{MAX_INT_DIGITS - 1}}}) ws',
    "number": f'"-"? ("0" | [1-9] [0-9]{{0,{MAX_INT_DIGITS - 1}}}) ("." [0-9]{{1,15}})? ([eE] [-+]? [0-9]{{1,3}})? ws',
    "nonneg-number": f'("0" | [1-9] [0-9]{{0,{MAX_INT_DIGITS - 1}}}) ("." [0-9]{{1,15}})? '
                     '([eE] [-+]? [0-9]{1,3})? ws',
    "boolean": '("true" | "false") ws',
    "null": '"null" ws',
    "value": "object | array | string | number | boolean | null",
    "object": '"{" ws (key ":" ws value ("," ws key ":" ws value)*)? "}" ws',
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
# Each format the grammar writes, and the shortest and longest strings it writes.
_FORMATS = {"date": (10, 10), "time": (9, 21), "date-time": (20, 32), "uuid": (36, 36), "email": (5, 384)}
# JSON kinds by schema type; a number is an integer or a fraction.
_KINDS = {"null": {"null"}, "boolean": {"boolean"}, "integer": {"integer"}, "number": {"integer", "fraction"},
          "string": {"string"}, "array": {"array"}, "object": {"object"}}
# Keywords of one type, which say what a schema without 'type' is.
_IMPLIES = {**dict.fromkeys(("properties", "additionalProperties", "required"), "object"),
            **dict.fromkeys(("items", "prefixItems", "minItems", "maxItems"), "array"),
            **dict.fromkeys(("minLength", "maxLength", "format"), "string"),
            **dict.fromkeys(("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum"), "number")}
# Keywords that say nothing about which values match.
_ANNOTATIONS = {"title", "description", "default", "examples", "$comment", "$schema", "$id", "deprecated",
                "readOnly", "writeOnly", "$defs", "definitions"}
# The pieces of a rule body that matter to llama.cpp's count of rules: literals and character classes
# (skipped), repetitions {m,n}, rule names, and groups and the operators ?, * and +.
_SYNTAX = re.compile(r'"(?:\\.|[^"\\])*"|\[(?:\\.|[^\]\\])*\]|\{(\d+),?(\d*)\}|([a-z0-9-]+)|[(?*+]')
_NAME = re.compile(r"[a-z0-9-]+")
_TOO_LARGE = f"the grammar for this schema would be larger than {MAX_GRAMMAR_BYTES // 1024} KiB"
_TOO_MANY = f"the grammar for this schema would need more than {MAX_RULES} rules"


def literal(text: str) -> str:
    """A GBNF string literal for `text`."""
    escaped = text.replace("\\", "\\\\").replace('"', '\\"')
    escaped = re.sub(r"[\x00-\x1f\x7f]", lambda m: f"\\x{ord(m.group()):02X}", escaped)
    return f'"{escaped}"'


def _json_literal(value: object) -> str:
    return literal(json.dumps(value, ensure_ascii=False, separators=(",", ":"))) + " ws"


def gemma_text(value: object) -> str:
    """A value as FunctionGemma writes it: strings between <escape> marks, keys bare and sorted,
    no spaces, null as None (its chat template's format_argument)."""
    if isinstance(value, str):
        return f"<escape>{value}<escape>"
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "None"
    if isinstance(value, dict):
        return "{" + ",".join(f"{k}:{gemma_text(v)}" for k, v in sorted(value.items())) + "}"
    if isinstance(value, list):
        return "[" + ",".join(map(gemma_text, value)) + "]"
    return json.dumps(value)


# FunctionGemma's way of writing values: where it differs from JSON's. Its strings cannot hold
# "<", which would begin the <escape> that ends them.
_GEMMA = {
    "ws": '""',
    "char": r'[^<\x00-\x1F]',
    "string": '"<escape>" char{0,' + str(MAX_STRING) + '} "<escape>"',
    "key": "[A-Za-z_] [A-Za-z0-9_]{0,63}",
    "null": '"None"',
}


def to_gbnf(schema: dict, check: Callable[[], None] | None = None) -> str:
    """GBNF whose root accepts exactly the JSON documents `schema` allows (within the bounds above).

    `check` is called at every schema object and every rule written; it may raise to give up
    (the request's deadline passed, its client left), and to_gbnf raises what it raises."""
    converter = _Converter(schema, check or (lambda: None))
    converter.write("root", converter.visit(schema, "#"))
    return converter.grammar()


class Grammar:
    """Several schemas in one grammar, with rules of the caller's around them: a tool call is the
    model's call syntax around one of the tools' argument schemas. No root is written; the caller
    adds one (see tools.CallGrammar)."""

    def __init__(self, check: Callable[[], None] | None = None, *, dialect: str = "json") -> None:
        """`dialect`: "json", or "gemma" for FunctionGemma's way of writing arguments (gemma_text)."""
        self._converter = _Converter({}, check or (lambda: None), gemma=dialect == "gemma")

    def schema(self, schema: dict, hint: str) -> str:
        """The name of a rule for the JSON values `schema` allows ($refs resolve within it)."""
        converter = self._converter
        converter.document = schema
        return converter._rule(hint, converter.visit(schema, "#"))

    def rule(self, hint: str, body: str) -> str:
        """The name of a rule for `body`."""
        return self._converter._rule(hint, body)

    def text(self) -> str:
        rules = self._converter
        rules.grammar()  # adds the primitives used
        return "\n".join(f"{name} ::= {body}" for name, body in rules.rules.items() if name != "root") + "\n"


class _Converter:
    def __init__(self, document: dict, check: Callable[[], None], *, gemma: bool = False) -> None:
        self.document = document
        self.check = check
        self.gemma = gemma
        self.quote = '"<escape>"' if gemma else '"\\""'  # what a string begins and ends with
        self.rules: dict[str, str] = {"root": ""}  # root first; a name is taken once it is in here
        self._named: dict[str, str] = {}  # rule body -> the rule that has it, so that equal rules are one
        self._suffix: dict[str, int] = {}  # name base -> the number its next rule tries first
        self._used: set[str] = set()  # names the rules refer to
        self._size = 0  # bytes of the grammar so far
        self._count = 0  # llama.cpp's rules so far
        self._done: dict[int, str] = {}  # id of a schema object of the document -> its expression
        self._kinds_of: dict[int, frozenset[str] | None] = {}
        self._refs: dict[tuple[int, str], str] = {}  # (document, $ref) -> its rule
        self._open: dict[tuple[int, str], int] = {}  # $refs being compiled -> self._brackets when entered
        self._brackets = 0  # objects and arrays open around the schema being compiled
        self._depth = 0

    def _name(self, hint: str) -> str:
        """A new rule name from `hint`, taken. A counter per base keeps this O(1) however many rules
        share a hint: each number is tried once."""
        base = re.sub(r"[^a-z0-9]+", "-", hint[:MAX_NAME].lower()).strip("-") or "rule"
        n = self._suffix.get(base, 1)
        name = base if n == 1 else f"{base}-{n}"
        while name in self.rules or name in _PRIMITIVES:
            n += 1
            name = f"{base}-{n}"
        self._suffix[base] = n + 1
        self.rules[name] = ""
        return name

    def _rule(self, hint: str, body: str) -> str:
        """A rule for `body` (the one already written, if any) and its name."""
        if body not in self._named:
            name = self._named[body] = self._name(hint)
            self.write(name, body)
        return self._named[body]

    def write(self, name: str, body: str) -> None:
        """Set rule `name`, within MAX_GRAMMAR_BYTES and MAX_RULES."""
        self.check()
        self._size += len(name) + 5 + (len(body) if body.isascii() else len(body.encode()))
        if self._size > MAX_GRAMMAR_BYTES:
            raise SchemaError(_TOO_LARGE)
        self._count += 1
        for match in _SYNTAX.finditer(body):
            low, high, ref = match.groups()
            if ref is not None:
                self._used.add(ref)
            elif low is not None:  # llama.cpp writes a rule for each count ({m} and {m,}: copies of one)
                self._count += int(high) if high else max(int(low), 1)
            elif match.group() in "(?*+":
                self._count += 1
        if self._count > MAX_RULES:
            raise SchemaError(_TOO_MANY)
        self.rules[name] = body

    def grammar(self) -> str:
        """The rules written, and the primitives they refer to."""
        while missing := {name for name in self._used if name not in self.rules}:
            for name in missing:
                self.write(name, _GEMMA.get(name, _PRIMITIVES[name]) if self.gemma else _PRIMITIVES[name])
        return "\n".join(f"{name} ::= {body}" for name, body in self.rules.items()) + "\n"

    def visit(self, schema: object, where: str) -> str:
        """A GBNF expression for values matching `schema` at JSON pointer `where`. A schema object is
        compiled once: reached again (a $ref, an allOf that merges it, a type list), its expression
        is reused, so work and grammar grow with the schema, not with the paths through it."""
        self.check()
        if not isinstance(schema, dict):
            return self._compile(schema, where)
        key = id(schema)  # objects of the document, which outlives the converter: ids stay unique
        if key not in self._done:
            if self._depth >= MAX_DEPTH:
                raise SchemaError(f"{where[:80]}...: the schema is nested too deeply")
            self._depth += 1
            try:
                self._done[key] = self._compile(schema, where)
            finally:
                self._depth -= 1
        return self._done[key]

    @contextmanager
    def _bracketed(self) -> Iterator[None]:
        """Around the parts of an object or an array: they follow its opening bracket."""
        self._brackets += 1
        try:
            yield
        finally:
            self._brackets -= 1

    def _compile(self, schema: object, where: str) -> str:
        if schema is True or schema == {}:
            return "value"
        if not isinstance(schema, dict):
            raise SchemaError(f"{where}: a schema must be an object or true")
        for keyword in _UNSUPPORTED:
            if keyword in schema:
                raise SchemaError(f"{where}: '{keyword}' is not supported in JSON schemas here")
        if "$ref" in schema:
            _alone(schema, "$ref", where)
            return self._ref(schema["$ref"], where)
        if "const" in schema or "enum" in schema:
            return _choice(self._literal(v) for v in _values(schema, where))
        for keyword in ("anyOf", "oneOf"):
            if keyword in schema:
                _alone(schema, keyword, where)
                options = schema[keyword]
                if not isinstance(options, list) or not options:
                    raise SchemaError(f"{where}: '{keyword}' must be a non-empty array")
                if keyword == "oneOf":
                    self._exclusive(options, where)
                return _choice(self.visit(s, f"{where}/{keyword}/{i}") for i, s in enumerate(options))
        if "allOf" in schema:
            return self._compile(self._merge_all_of(schema, where), where)

        kind = schema.get("type")
        if isinstance(kind, list):
            if not kind or not all(isinstance(k, str) for k in kind):
                raise SchemaError(f"{where}: 'type' must be a string or a non-empty array of strings")
            # Once each: every type compiles its own keywords (items for arrays, properties for
            # objects), so each subschema is compiled once, not once per repetition of a type.
            return _choice(self._typed(schema, k, where) for k in dict.fromkeys(kind))
        if kind is None:
            # Keywords of one type without a 'type': only that type is written (every value of it
            # they allow validates; other types would too, but need not be written).
            implied = {_IMPLIES[k]: k for k in schema if k in _IMPLIES}
            if len(implied) > 1:
                first, second = sorted(implied.values())[:2]
                raise SchemaError(f"{where}: '{first}' and '{second}' constrain different types: "
                                  "say which with 'type'")
            if not implied:
                return "value"
            kind = next(iter(implied))
        return self._typed(schema, kind, where)

    def _symbol(self, expression: str, where: str) -> str:
        """`expression` as one name: what llama.cpp repeats (?, *, {m,n}) must not be a group that
        makes many rules itself, or it refuses the grammar (2000 rules at most per repetition)."""
        return expression if _NAME.fullmatch(expression) else self._rule(_hint(where, "value"), expression)

    def _literal(self, value: object) -> str:
        return literal(gemma_text(value)) if self.gemma else _json_literal(value)

    def _key_except(self, names: set[str], where: str) -> str:
        """A rule for an extra key of an object: any key (unescaped, MAX_KEY characters at most) but
        `names`, the keys the schema declares. Built from the trie of the names: at each prefix,
        the key may end (unless the prefix is a name), go on with a name's next character, or
        leave every name behind with any other character."""
        if self.gemma:
            raise SchemaError(f"{where}: extra keys ('additionalProperties') beside declared ones are not "
                              "supported in FunctionGemma's calls")
        trie: dict = {}
        nodes = 0
        for name in names:
            if len(name) <= MAX_KEY and not re.search(r'["\\\x00-\x1f\x7f]', name):  # else no key can equal it
                node = trie
                for ch in name:
                    if ch not in node:
                        nodes += 1  # a rule each: refused here before the trie takes the memory
                        if nodes > MAX_RULES:
                            raise SchemaError(_TOO_MANY)
                    node = node.setdefault(ch, {})
                node[None] = True

        def rule(node: dict, depth: int) -> str:
            children = sorted(c for c in node if c is not None)
            options = [] if None in node else ['"\\""']
            options += [f"{literal(c)} {rule(node[c], depth + 1)}" for c in children if depth < MAX_KEY]
            if depth < MAX_KEY:
                excluded = "".join(f"\\U{ord(c):08X}" for c in children)
                rest = self._rule("key-rest", f"keychar{{0,{MAX_KEY - depth - 1}}}")  # one per length
                options.append(f'[^"\\\\\\x7F\\x00-\\x1F{excluded}] {rest} "\\""')
            return self._rule(_hint(where, "key"), " | ".join(options))

        return self._rule(_hint(where, "extra-key"), f'"\\"" {rule(trie, 0)} ws')

    def _exclusive(self, options: list, where: str) -> None:
        """Refuse a oneOf whose branches could match one value: the grammar allows any branch, and
        exactly one must match. Disjoint are branches of different JSON types, and objects that a
        required const (or enum) property tells apart."""
        kinds = [self._kinds(o, 0) for o in options]
        if all(k is not None for k in kinds) and sum(map(len, kinds)) == len(frozenset().union(*kinds)):  # type: ignore[arg-type]
            return
        if self._discriminated(options):
            return
        raise SchemaError(f"{where}: 'oneOf' with branches that can match the same value is not supported "
                          "(tell them apart by type or by a required 'const' property, or use 'anyOf')")

    def _kinds(self, schema: object, depth: int) -> frozenset[str] | None:
        """The JSON kinds a schema allows (integer and fraction for numbers); None: any, or unknown.
        Once per schema object, as visit: $refs to a shared anyOf would otherwise multiply."""
        if depth > 20 or not isinstance(schema, dict) or not schema:
            return None
        self.check()
        key = id(schema)
        if key not in self._kinds_of:
            self._kinds_of[key] = None  # a schema within itself: unknown
            self._kinds_of[key] = self._kinds_now(schema, depth)
        return self._kinds_of[key]

    def _kinds_now(self, schema: dict, depth: int) -> frozenset[str] | None:
        if "$ref" in schema:
            return self._kinds(self._resolve(schema["$ref"], "#"), depth + 1)
        if "const" in schema:
            return frozenset({_kind_of(schema["const"])})
        if isinstance(schema.get("enum"), list) and schema["enum"]:
            return frozenset(_kind_of(v) for v in schema["enum"])
        for keyword in ("anyOf", "oneOf"):
            if isinstance(schema.get(keyword), list) and schema[keyword]:
                parts = [self._kinds(s, depth + 1) for s in schema[keyword]]
                return None if any(p is None for p in parts) else frozenset().union(*parts)  # type: ignore[arg-type]
        kind = schema.get("type")
        if isinstance(kind, str):
            kind = [kind]
        if isinstance(kind, list) and kind and all(isinstance(k, str) and k in _KINDS for k in kind):
            return frozenset().union(*(_KINDS[k] for k in kind))
        if "properties" in schema or "required" in schema or "additionalProperties" in schema:
            return frozenset({"object"})
        if "items" in schema or "prefixItems" in schema:
            return frozenset({"array"})
        return None

    def _discriminated(self, options: list) -> bool:
        """Whether every branch is an object with one required property whose const or enum values
        differ from branch to branch."""
        branches: list[dict] = []
        for option in options:
            branch = self._resolve(option["$ref"], "#") if isinstance(option, dict) and "$ref" in option else option
            if not isinstance(branch, dict) or not isinstance(branch.get("properties"), dict):
                return False
            branches.append(branch)
        names = set.intersection(*(set(b.get("required", [])) for b in branches))
        for name in sorted(names):
            tags = [b["properties"].get(name) for b in branches]
            if not all(isinstance(t, dict) and ("const" in t or "enum" in t) for t in tags):
                continue
            values = [{json.dumps(_normal(v), sort_keys=True) for v in _values(t, "#")} for t in tags]
            if sum(map(len, values)) == len(set().union(*values)):  # no value in two branches
                return True
        return False

    def _ref(self, ref: object, where: str) -> str:
        target = self._resolve(ref, where)
        assert isinstance(ref, str)  # _resolve refuses anything else
        key = (id(self.document), ref)
        if self._open.get(key) == self._brackets:
            # Reached again with no bracket opened since: its rule would begin with itself, which
            # llama.cpp refuses (left recursion), and which no finite value matches.
            raise SchemaError(f"{where}: $ref {ref!r} refers back to itself before any value is written")
        if key not in self._refs:
            # Name the rule before compiling its target: a schema may refer to itself.
            name = self._refs[key] = self._name(ref.rsplit("/", 1)[-1] if "/" in ref else "root-ref")
            self._open[key] = self._brackets
            try:
                self.write(name, self.visit(target, ref))
            finally:
                del self._open[key]
        return self._refs[key]

    def _merge_all_of(self, schema: dict, where: str) -> dict:
        parts = schema["allOf"]
        if not isinstance(parts, list) or not parts:
            raise SchemaError(f"{where}: 'allOf' must be a non-empty array")
        # Merging is only faithful for plain property lists: additionalProperties in any
        # part would judge the other parts' keys as extra, which a merge cannot express.
        if schema.get("additionalProperties", True) is not True:
            raise SchemaError(f"{where}: 'allOf' together with 'additionalProperties' is not supported")
        properties: dict = {}  # new ones: the document's own are not to change
        required: dict[str, None] = {}
        merged: set[int] = set()
        for part, at in [(schema, where), *((p, f"{where}/allOf/{i}") for i, p in enumerate(parts))]:
            self.check()
            if part is not schema:
                if isinstance(part, dict) and "$ref" in part:
                    part = self._resolve(part["$ref"], at)
                if not isinstance(part, dict) or not set(part) <= {"type", "properties", "required", "title",
                                                                    "description"}:
                    raise SchemaError(f"{at}: 'allOf' is supported only for merging object properties")
            if id(part) in merged:
                continue  # the same part again (a $ref) adds nothing
            merged.add(id(part))
            names = part.get("required", [])
            if (not isinstance(part.get("properties", {}), dict) or not isinstance(names, list)
                    or not all(isinstance(r, str) for r in names)):
                raise SchemaError(f"{at}: 'properties' must be an object and 'required' an array of strings")
            properties.update(part.get("properties", {}))
            required.update(dict.fromkeys(names))
        rest = {k: v for k, v in schema.items() if k != "allOf"}
        return {**rest, "type": rest.get("type", "object"), "properties": properties, "required": [*required]}

    def _resolve(self, ref: object, where: str) -> object:
        if not isinstance(ref, str) or not (ref == "#" or ref.startswith("#/")):
            raise SchemaError(f"{where}: only local $ref ('#/$defs/...') are supported, got {ref!r}")
        target: object = self.document
        for part in ref[2:].split("/") if ref != "#" else ():
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
        low = _count(schema, "minLength", where) or 0
        high = _count(schema, "maxLength", where)
        if fmt is not None:
            if fmt not in _FORMATS:
                raise SchemaError(f"{where}: string format {fmt!r} is not supported (supported: {', '.join(_FORMATS)})")
            shortest, longest = _FORMATS[fmt]
            if low > shortest or (high is not None and high < longest):
                raise SchemaError(f"{where}: format {fmt!r} writes {shortest} to {longest} characters; "
                                  "minLength or maxLength inside that range is not supported")
            return f'{self.quote} {fmt} {self.quote} ws'

        if high is not None and high < low:
            raise SchemaError(f"{where}: maxLength is less than minLength")
        if low > MAX_COUNT:
            raise SchemaError(f"{where}: 'minLength' above {MAX_COUNT} is not supported")
        high = max(low, MAX_STRING) if high is None else min(high, MAX_COUNT)
        if (low, high) == (0, MAX_STRING):
            return "string"
        # A rule, so that strings of one length share one (llama.cpp writes a rule per character).
        return self._rule(_hint(where, "string"), f'{self.quote} char{{{low},{high}}} {self.quote} ws')

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
            with self._bracketed():
                parts = [self.visit(s, f"{where}/prefixItems/{i}") for i, s in enumerate(prefix)]
            body = '"[" ws ' + ' "," ws '.join(parts) + ' "]" ws'
            return self._rule(_hint(where, 'tuple'), body)
        with self._bracketed():
            item = self._symbol(self.visit(schema.get("items", True), f"{where}/items"), f"{where}/items")
        if high == 0:
            return '"[" ws "]" ws'
        if low > MAX_COUNT:
            raise SchemaError(f"{where}: 'minItems' above {MAX_COUNT} is not supported")
        more = self._rule(_hint(where, "more"), f'"," ws {item}')
        inner = f'{item} {more}{{{max(low - 1, 0)},{"" if high is None else min(high, MAX_COUNT) - 1}}}'
        body = f'"[" ws {inner if low > 0 else "(" + inner + ")?"} "]" ws'
        return self._rule(_hint(where, 'array'), body)

    def _object(self, schema: dict, where: str) -> str:
        properties = schema.get("properties", {})
        if not isinstance(properties, dict):
            raise SchemaError(f"{where}: 'properties' must be an object")
        required = schema.get("required", [])
        if not isinstance(required, list) or not all(isinstance(r, str) for r in required):
            raise SchemaError(f"{where}: 'required' must be an array of strings")
        twice = next((name for name, n in Counter(required).items() if n > 1), None)
        if twice is not None:  # JSON Schema wants them unique; the grammar would write the key twice
            raise SchemaError(f"{where}: 'required' lists {twice!r} twice")
        missing = [r for r in required if r not in properties]
        extra_schema = schema.get("additionalProperties", None if properties or required else True)
        if missing and extra_schema in (None, False):
            raise SchemaError(f"{where}: required properties {missing} are not in 'properties'")
        if not properties and not required and extra_schema in (True, {}):
            return "object"

        def pair(key: str, value_schema: object) -> str:
            value = self._symbol(self.visit(value_schema, f"{where}/properties/{key}"), f"{where}/properties/{key}")
            if self.gemma and not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]{0,63}", key):
                raise SchemaError(f"{where}: FunctionGemma's calls name arguments with letters, digits and '_' "
                                  f"only, not {key[:40]!r}")
            name = literal(key) if self.gemma else _json_literal(key)
            return f"{name} \":\" ws {value}"

        with self._bracketed():
            required_pairs = [pair(k, properties.get(k, extra_schema)) for k in required]
            optional = set(properties) - set(required)
            optional_pairs = [pair(k, v) for k, v in properties.items() if k in optional]
            if extra_schema not in (None, False):
                value = self._symbol(self.visit(extra_schema, f"{where}/additionalProperties"),
                                     f"{where}/additionalProperties")
                key = self._key_except({*properties, *required}, where) if properties or required else "key"
                optional_pairs.append(f'({key} ":" ws {value} ("," ws {key} ":" ws {value})*)')

        if required_pairs:
            body = ' "," ws '.join(required_pairs) + "".join(f' ("," ws {p})?' for p in optional_pairs)
        elif optional_pairs:
            body = f"({self._some_in_order(optional_pairs, where)})?"
        else:
            body = ""
        return self._rule(_hint(where, 'object'), f'"{{" ws {body} "}}" ws'.replace("  ", " "))

    def _some_in_order(self, pairs: list[str], where: str) -> str:
        """One or more of `pairs`, in their order, comma-separated: linear in the pairs.

        A rule per pair is "one of the pairs from this one on": this pair, then maybe a comma and
        one of the later ones, or else one of the later ones. Writing each tail out whole instead
        would be quadratic. Chains of such rules are BLOCK pairs long, with one more chain across
        the blocks: llama.cpp follows a chain by recursion, and 100,000 links overflow its stack."""
        later_blocks = ""  # a rule: one of the pairs of the blocks after this one
        for start in reversed(range(0, len(pairs), BLOCK)):
            later = ""  # a rule: one of the pairs after this one in its block
            for pair in reversed(pairs[start:start + BLOCK]):
                tail = f"({later} | {later_blocks})" if later and later_blocks else later or later_blocks
                this = f'{pair} ("," ws {tail})?' if tail else pair
                later = self._rule(_hint(where, "pairs"), f"{this} | {later}" if later else this)
            later_blocks = self._rule(_hint(where, "blocks"), f"{later} | {later_blocks}") if later_blocks else later
        return later_blocks


def _choice(expressions: Iterable[str]) -> str:
    """`(a | b | ...)` of the distinct expressions; refused as soon as it outgrows a grammar."""
    unique: dict[str, None] = {}
    size = 0
    for expression in expressions:
        if expression not in unique:
            unique[expression] = None
            size += len(expression) + 3
            if size > MAX_GRAMMAR_BYTES:
                raise SchemaError(_TOO_LARGE)
    return "(" + " | ".join(unique) + ")"


def _kind_of(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int):
        return "integer"
    if isinstance(value, float):
        return "integer" if value.is_integer() else "fraction"
    kinds: dict[type, str] = {str: "string", list: "array", dict: "object"}
    return kinds.get(type(value), "unknown")


def _alone(schema: dict, keyword: str, where: str) -> None:
    """Refuse constraints beside `keyword` ($ref, anyOf, oneOf): its rule is written alone."""
    others = sorted(set(schema) - _ANNOTATIONS - {keyword})
    if others:
        raise SchemaError(f"{where}: '{others[0]}' beside '{keyword}' is not supported "
                          f"(move it into the schema that '{keyword}' names)")


def _normal(value: object) -> object:
    """A value as JSON Schema compares values: 1.0 is 1."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, list):
        return [_normal(v) for v in value]
    if isinstance(value, dict):
        return {k: _normal(v) for k, v in value.items()}
    return value


def _values(schema: dict, where: str) -> list:
    """The values a const or enum schema allows, checked against its siblings: a 'type' beside it
    filters them; any other constraint beside it is refused (the grammar writes the values alone)."""
    if "enum" in schema:
        values = schema["enum"]
        if not isinstance(values, list) or not values:
            raise SchemaError(f"{where}: 'enum' must be a non-empty array")
    if "const" in schema:
        const = schema["const"]
        if "enum" in schema and not any(const == v and _kind_of(const) == _kind_of(v) for v in values):
            raise SchemaError(f"{where}: no value is both the 'const' and in the 'enum'")
        values = [const]
    others = sorted(set(schema) - _ANNOTATIONS - {"const", "enum", "type"})
    if others:
        raise SchemaError(f"{where}: '{others[0]}' beside 'const' or 'enum' is not supported")
    kind = schema.get("type")
    if kind is not None:
        kinds = set().union(*(_KINDS.get(k, set()) for k in ([kind] if isinstance(kind, str) else kind)))
        values = [v for v in values if _kind_of(v) in kinds]
        if not values:
            raise SchemaError(f"{where}: no value of the 'const' or 'enum' has the 'type' beside it")
    return values


def _hint(where: str, kind: str) -> str:
    """A readable rule name from the schema's location: properties/age + int -> age-int."""
    last = where.rsplit("/", 1)[-1][:MAX_NAME // 2]
    return f"{last if last != '#' else 'root'}-{kind}"


def _count(schema: dict, key: str, where: str) -> int | None:
    """A non-negative integer keyword; None when it is absent (or null)."""
    value = schema.get(key)
    if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 0):
        raise SchemaError(f"{where}: '{key}' must be a non-negative integer")
    return value


# Integer bounds: the least (minimums) or greatest (maximums) integer each allows. Exact for a
# float or an int of any size (JSON integers have any length): ceil and floor return ints.
_INT_ENDS: dict[str, Callable[[float], int]] = {
    "minimum": math.ceil, "exclusiveMinimum": lambda v: math.floor(v) + 1,
    "maximum": math.floor, "exclusiveMaximum": lambda v: math.ceil(v) - 1,
}
_BEYOND = f"leaves no integer of at most {MAX_INT_DIGITS} digits, the longest the grammar writes"


def _int_bounds(schema: dict, where: str) -> tuple[int | None, int | None]:
    """The least and greatest integer the schema allows; None: as far as MAX_INT_DIGITS digits go
    (a bound beyond them is dropped, or refused by name when no integer is left)."""
    ends: dict[str, int] = {}
    for key, end in _INT_ENDS.items():
        value = schema.get(key)
        if value is None:
            continue
        if (not isinstance(value, int | float) or isinstance(value, bool)
                or (isinstance(value, float) and not math.isfinite(value))):
            raise SchemaError(f"{where}: '{key}' must be a finite number")
        ends[key] = end(value)
    low = max(((ends[k], k) for k in ("minimum", "exclusiveMinimum") if k in ends), default=None)
    high = min(((ends[k], k) for k in ("maximum", "exclusiveMaximum") if k in ends), default=None)
    if low is not None and low[0] > _INT_MAX:
        raise SchemaError(f"{where}: '{low[1]}' {_BEYOND}")
    if high is not None and high[0] < -_INT_MAX:
        raise SchemaError(f"{where}: '{high[1]}' {_BEYOND}")
    if low is not None and high is not None and low[0] > high[0]:
        raise SchemaError(f"{where}: no integer lies between the minimum and the maximum")
    return (None if low is None or low[0] < -_INT_MAX else low[0],
            None if high is None or high[0] > _INT_MAX else high[0])


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
