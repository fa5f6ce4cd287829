"""JSON Schema -> GBNF: llama.cpp accepts every grammar, and what it lets a random model write validates."""

from __future__ import annotations

import asyncio
import json
import re

import jsonschema
import pytest

from edgellm.config import EngineConfig
from edgellm.engine.grammar import SchemaError, atoms_regex, int_range_atoms, to_gbnf
from edgellm.engine.model import Model
from edgellm.engine.runner import Runner
from edgellm.engine.sampling import Sampler, SamplingParams
from edgellm.engine.scheduler import Prepared
from edgellm.engine.stream import Finish


def int_regex(low, high) -> re.Pattern:
    return re.compile("(?:" + "|".join(atoms_regex(a) for a in int_range_atoms(low, high)) + r")\Z")


@pytest.mark.parametrize("low,high", [
    (0, 0), (0, 9), (0, 120), (1, 1), (7, 7), (17, 243), (99, 1000), (5, 5000), (-5, 5), (-120, -3),
    (-1000, 0), (3, None), (0, None), (10, None), (None, 0), (None, 42), (None, -7), (-15, None), (None, None),
])
def test_integer_ranges_match_exactly_the_integers_in_range(low, high):
    pattern = int_regex(low, high)
    lo_probe = (low if low is not None else -2000) - 150
    hi_probe = (high if high is not None else 2000) + 150
    for n in range(lo_probe, hi_probe + 1):
        inside = (low is None or n >= low) and (high is None or n <= high)
        assert bool(pattern.match(str(n))) == inside, (n, low, high)
    for text in ("007", "-0", "00", "+5", ""):
        assert not pattern.match(text), text


def test_unbounded_integers_stay_within_fifteen_digits():
    pattern = int_regex(0, None)
    assert pattern.match("9" * 15) and not pattern.match("9" * 16)


@pytest.fixture(scope="module")
def model(models):
    m = Model(models["random"])
    yield m
    m.close()


@pytest.fixture(scope="module")
def runner(model):
    r = Runner(model, EngineConfig(n_ctx=1024))
    yield r
    r.close()


SCHEMAS = {
    "flat": {
        "type": "object",
        "properties": {"name": {"type": "string", "minLength": 1, "maxLength": 6},
                       "age": {"type": "integer", "minimum": 18, "maximum": 65},
                       "score": {"type": "number", "minimum": 0},
                       "admin": {"type": "boolean"}},
        "required": ["name", "age", "score", "admin"],
    },
    "optional-only": {
        "type": "object",
        "properties": {"a": {"type": "integer", "exclusiveMinimum": -3, "exclusiveMaximum": 3},
                       "b": {"enum": ["x", 2, None, True]}, "c": {"const": "fixed"}},
    },
    "arrays": {
        "type": "object",
        "properties": {"tags": {"type": "array", "items": {"enum": ["red", "green"]}, "minItems": 1, "maxItems": 3},
                       "pair": {"type": "array", "prefixItems": [{"type": "integer", "maximum": 9, "minimum": 0},
                                                                 {"type": "boolean"}], "items": False},
                       "empty": {"type": "array", "maxItems": 0}},
        "required": ["tags", "pair", "empty"],
    },
    "union-and-null": {
        "type": "object",
        "properties": {"v": {"anyOf": [{"type": "integer", "minimum": 100, "maximum": 200}, {"type": "null"}]},
                       "w": {"type": ["boolean", "null"]}, "d": {"type": "string", "format": "date"}},
        "required": ["v", "w", "d"],
        "additionalProperties": False,
    },
    "refs-and-recursion": {
        "$defs": {"node": {"type": "object",
                           "properties": {"id": {"type": "integer", "minimum": 0, "maximum": 99},
                                          "child": {"anyOf": [{"$ref": "#/$defs/node"}, {"type": "null"}]}},
                           "required": ["id", "child"]}},
        "$ref": "#/$defs/node",
    },
    "all-of": {
        "allOf": [{"type": "object", "properties": {"x": {"type": "boolean"}}, "required": ["x"]},
                  {"properties": {"y": {"type": "string", "format": "uuid"}}, "required": ["y"]}],
    },
    "typed-extras": {
        "type": "object",
        "properties": {"x": {"type": "boolean"}},
        "required": ["x"],
        "additionalProperties": {"type": "integer", "minimum": 0, "maximum": 3},
    },
    "array-root": {"type": "array", "items": {"type": "string", "maxLength": 3}, "maxItems": 4},
    "formats": {"type": "object", "properties": {"t": {"type": "string", "format": "date-time"},
                                                 "e": {"type": "string", "format": "email"}},
                "required": ["t", "e"]},
    "any-object": {},
    # oneOf where the branches cannot overlap: by type, and by a required const tag.
    "one-of-types": {"type": "object", "properties": {"v": {"oneOf": [{"type": "integer"}, {"type": "string"}]}},
                     "required": ["v"]},
    "one-of-tagged": {"oneOf": [
        {"type": "object", "properties": {"kind": {"const": "light"}, "on": {"type": "boolean"}},
         "required": ["kind", "on"]},
        {"type": "object", "properties": {"kind": {"const": "fan"}, "speed": {"type": "integer", "minimum": 0,
                                                                           "maximum": 3}},
         "required": ["kind", "speed"]}]},
    # Extra keys never repeat a declared one (a duplicate key passes a validator but is not one object).
    "extras-beside-declared": {"type": "object", "properties": {"a": {"type": "boolean"}, "ab": {"type": "null"}},
                               "additionalProperties": {"type": "integer", "minimum": 0, "maximum": 9}},
    "enum-with-type": {"type": "object", "properties": {"e": {"enum": [1, "one", None], "type": "string"}},
                       "required": ["e"]},
    "format-with-lengths": {"type": "string", "format": "date", "minLength": 10, "maxLength": 10},
    # Keywords of one type without 'type' write that type (found by review: they wrote any value).
    "typeless-string": {"minLength": 5, "maxLength": 7},
    "typeless-array": {"maxItems": 1, "minItems": 1},
    "typeless-format": {"format": "date"},
}


def no_duplicate_keys(pairs: list[tuple[str, object]]) -> dict:
    keys = [k for k, _ in pairs]
    assert len(keys) == len(set(keys)), f"duplicate key in {keys}"
    return dict(pairs)


@pytest.mark.parametrize("name", SCHEMAS)
def test_llama_cpp_accepts_the_grammar(model, name):
    sampler = Sampler(model, SamplingParams(json_schema=SCHEMAS[name]))
    assert sampler.ptr
    sampler.close()


def write_json(runner: Runner, model: Model, sampler: Sampler, max_tokens: int) -> tuple[str, str | None]:
    """What the model writes with `sampler` after "json:", and why it stopped."""
    async def generate() -> tuple[str, str | None]:
        stream = runner.submit(Prepared(model.tokenize("json:"), sampler, max_tokens))
        stream.when_finished(sampler.close)
        parts, finish = [], None
        async for item in stream:
            if isinstance(item, Finish):
                finish = item.reason
            else:
                parts.append(item.text)
        return "".join(parts), finish

    return asyncio.run(generate())


@pytest.mark.parametrize("name", SCHEMAS)
def test_random_model_output_validates(runner, model, name):
    schema = SCHEMAS[name] or {"type": "object"}
    completed = 0
    for seed in range(6):
        sampler = Sampler(model, SamplingParams(temperature=1.0, seed=seed, json_schema=SCHEMAS[name]))
        text, finish = write_json(runner, model, sampler, 400)
        if finish == "length":
            continue  # cut short by max_tokens: not the grammar's fault
        jsonschema.validate(json.loads(text, object_pairs_hook=no_duplicate_keys), schema,
                            format_checker=jsonschema.FormatChecker())
        completed += 1
    assert completed >= 3, "too few outputs finished to check the grammar"


NESTED: dict = {}
for _ in range(120):
    NESTED = {"type": "object", "properties": {"a": NESTED}}


@pytest.mark.parametrize("schema,keyword", [
    ({"type": "string", "pattern": "^a+$"}, "'pattern'"),
    ({"type": "array", "uniqueItems": True}, "'uniqueItems'"),
    ({"type": "integer", "multipleOf": 5}, "'multipleOf'"),
    ({"not": {"type": "null"}}, "'not'"),
    ({"type": "object", "properties": {"a": {"if": {}}}}, "#/properties/a: 'if'"),
    ({"type": "string", "format": "hostname"}, "format 'hostname'"),
    ({"type": "number", "maximum": 5}, "bounds on 'number'"),
    ({"$ref": "https://example.com/schema.json"}, "local $ref"),
    ({"$ref": "#/$defs/missing"}, "points nowhere"),
    ({"type": "object", "properties": {}, "required": ["a"], "additionalProperties": False}, "required"),
    ({"type": "integer", "minimum": 5, "maximum": 4}, "no integer"),
    ({"type": "string", "minLength": 3, "maxLength": 2}, "maxLength"),
    ({"type": "tuple"}, "unknown type"),
    ({"allOf": [{"properties": {"a": {}}}], "additionalProperties": False}, "'allOf' together"),
    ({"enum": []}, "'enum'"),
    ({"oneOf": [{"type": "integer"}, {"type": "number"}]}, "'oneOf' with branches that can match"),
    ({"oneOf": [{"type": "object", "properties": {"a": {}}}, {"type": "object"}]}, "'oneOf'"),
    ({"type": "string", "format": "date", "maxLength": 8}, "format 'date' writes 10 to 10"),
    ({"type": "string", "format": "email", "minLength": 20}, "minLength or maxLength"),
    ({"const": 5, "minimum": 10}, "'minimum' beside 'const'"),
    ({"enum": [1, 2], "type": "string"}, "no value of the 'const' or 'enum'"),
    ({"const": 1, "enum": [2, 3]}, "no value is both"),
    (NESTED, "nested too deeply"),
    # Constraints beside $ref, anyOf and oneOf would be dropped (their rule is written alone).
    ({"type": "string", "anyOf": [{"maxLength": 3}, {"minLength": 9}]}, "'type' beside 'anyOf'"),
    ({"type": "object", "required": ["a"], "properties": {"a": {}}, "anyOf": [{}]}, "beside 'anyOf'"),
    ({"allOf": [{"properties": {"a": {}}}], "anyOf": [{}]}, "'allOf' beside 'anyOf'"),
    ({"$ref": "#/$defs/x", "maximum": 3, "$defs": {"x": {"type": "integer"}}}, "'maximum' beside '$ref'"),
    ({"oneOf": [{"type": "null"}, {"type": "string"}], "minLength": 2}, "'minLength' beside 'oneOf'"),
    # Keywords of two types without a 'type'.
    ({"minLength": 1, "minimum": 2}, "'minLength' and 'minimum' constrain different types"),
    # Tags that JSON Schema holds equal: 1 and 1.0.
    ({"oneOf": [{"type": "object", "properties": {"k": {"const": 1}}, "required": ["k"]},
                {"type": "object", "properties": {"k": {"const": 1.0}}, "required": ["k"]}]}, "'oneOf'"),
])
def test_what_cannot_be_enforced_is_refused_by_name(schema, keyword):
    with pytest.raises(SchemaError, match=re.escape(keyword)):
        to_gbnf(schema)


def test_annotations_are_ignored():
    plain = to_gbnf({"type": "boolean"})
    annotated = to_gbnf({"type": "boolean", "title": "T", "description": "d", "examples": [True], "default": False})
    assert plain == annotated


def test_literals_escape_quotes_backslashes_and_control_characters(model):
    schema = {"const": 'say "hi"\\\n\t\x01'}
    grammar = to_gbnf(schema)
    assert '\\"' in grammar and "\\\\" in grammar
    sampler = Sampler(model, SamplingParams(json_schema=schema))
    sampler.close()


def rule_regex(grammar: str, name: str) -> str:
    """A Python regex for a regular rule of a GBNF (literals, classes, {m,n}, alternatives, rule names)."""
    rules = dict(line.split(" ::= ", 1) for line in grammar.strip().splitlines())

    def expand(body: str) -> str:
        out = []
        for token in re.findall(r'"(?:\\.|[^"\\])*"|\[(?:\\.|[^\]])*\]|\{\d*,?\d*\}|\||[\w-]+', body):
            if token.startswith('"'):
                out.append(re.escape(json.loads(token)))
            elif token.startswith("["):
                negated = token.startswith("[^")
                chars = token[2 if negated else 1:-1].encode().decode("unicode_escape")
                out.append("[" + "^" * negated + "".join(c if c == "-" else re.escape(c) for c in chars) + "]")
            elif token.startswith("{") or token == "|":
                out.append(token)
            else:
                out.append("(?:" + expand(rules[token]) + ")")
        return "".join(out)

    return expand(rules[name])


def test_extra_keys_exclude_exactly_the_declared_ones():
    schema = {"type": "object", "properties": {"a": {"type": "boolean"}, "ab": {"type": "null"}},
              "additionalProperties": {"type": "integer"}}
    grammar = to_gbnf(schema)
    extra = re.compile(rule_regex(grammar.replace(" ws", ""), "root-extra-key") + r"\Z")
    for key in ('"a"', '"ab"'):
        assert not extra.match(key), key
    for key in ('""', '"b"', '"aa"', '"abc"', '"ba"', '"a b"', '"é"'):
        assert extra.match(key), key
    assert not extra.match('"\\u0061"')  # an escape could spell a declared key: extra keys have none




def test_a_json_reply_cut_by_max_tokens_still_closes(runner, model):
    """A random model rarely ends an object by itself; with 30 tokens it must still close validly."""
    parsed = 0
    for seed in range(10):
        sampler = Sampler(model, SamplingParams(temperature=1.0, seed=seed, json_schema={}))
        text, _ = write_json(runner, model, sampler, 30)
        try:
            json.loads(text)
            parsed += 1
        except json.JSONDecodeError:
            pass
    assert parsed >= 9


def test_a_name_required_twice_is_refused():
    """Found by the property test: 'required': ['_', '_'] wrote the key twice (JSON Schema wants the
    names unique: jsonschema refuses such a schema)."""
    with pytest.raises(SchemaError, match="'required' lists '_' twice"):
        to_gbnf({"type": "object", "properties": {"_": {"type": "null"}}, "required": ["_", "_"]})


def test_no_object_gets_a_key_twice(runner, model):
    """A grammar cannot forbid a repeated key; the sampler does. Biased toward short keys and
    commas, the random model repeats a key in 12 of these 30 replies without it."""
    token = {model.piece(t): t for t in range(model.n_vocab)}
    bias = {token[b"a"]: 4.0, token[b'"']: 10.0, token[b","]: 9.0, token[b":"]: 6.0, token[b"1"]: 6.0}
    parsed = 0
    for seed in range(30):
        sampler = Sampler(model, SamplingParams(temperature=1.0, seed=seed, json_schema={}, logit_bias=bias))
        text, _ = write_json(runner, model, sampler, 60)
        try:
            json.loads(text, object_pairs_hook=no_duplicate_keys)
            parsed += 1
        except json.JSONDecodeError:
            pass
    assert parsed >= 20


def test_tokens_with_several_quotes_cannot_repeat_a_key():
    """Real vocabularies have tokens such as '","' and '":"': each is checked against the keys."""
    from edgellm.engine.json_keys import KeyIndex, KeyTracker

    vocabulary = [b"{", b'"', b"a", b'":', b"1", b',"', b'a":', b',"a":', b'"a":1,"a"', b"}", b'","', b"b", b"x"]
    quoted = {t: p for t, p in enumerate(vocabulary) if b'"' in p}
    index = KeyIndex.build(quoted, 128, lambda: vocabulary)
    tracker = KeyTracker(index)
    assert tracker.banned() == set()
    for piece in (b"{", b'"', b"a", b'":', b"1"):
        tracker.feed(piece)
    # After {"a":1 the object has "a": these tokens would write it again.
    assert tracker.banned() == {vocabulary.index(b',"a":'), vocabulary.index(b'"a":1,"a"')}
    tracker.feed(b',"')  # a key begins: closing it as "a" repeats it
    assert tracker.banned() == {vocabulary.index(b'a":')}
    tracker.feed(b"a")  # the key so far is "a": closing it now repeats it
    assert tracker.banned() == {vocabulary.index(p) for p in (b'"', b'":', b'"a":1,"a"', b'","')}
    tracker.feed(b"b")
    assert tracker.banned() == set()


def test_a_key_of_the_longest_length_cannot_be_reached_twice():
    """At the grammar's longest key only the closing quote may follow, so reaching an existing
    key of that length is banned before it is written out."""
    from edgellm.engine.json_keys import KeyIndex, KeyTracker

    vocabulary = [b"{", b'"', b"ab", b'":', b"1", b","]
    index = KeyIndex.build({t: p for t, p in enumerate(vocabulary) if b'"' in p}, 2, lambda: vocabulary)
    tracker = KeyTracker(index)
    for piece in (b"{", b'"', b"ab", b'":', b"1", b",", b'"'):
        tracker.feed(piece)
    assert tracker.banned() == {vocabulary.index(b"ab")}


@pytest.mark.parametrize("schema,root", [
    ({"minLength": 5}, "root ::= root-string"),
    ({"maxItems": 1}, "root ::= root-array"),
    ({"format": "date"}, 'root ::= "\\"" date "\\"" ws'),
    ({"minimum": 0}, "root ::= nonneg-number"),
])
def test_keywords_of_one_type_without_a_type_write_that_type(schema, root):
    """Found by review: they compiled to any value, so a string shorter than minLength could be written."""
    assert to_gbnf(schema).splitlines()[0] == root
