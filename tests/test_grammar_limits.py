"""Grammar bombs: schemas a request can send that once took minutes or gigabytes to compile, or made
llama.cpp refuse the grammar (and print it whole to stderr). Each is now refused by name or compiled
quickly into a grammar llama.cpp accepts, and the grammar grows linearly with the schema."""

from __future__ import annotations

import ctypes
import json
import math
import re
import subprocess
import sys
import time
from pathlib import Path

import llama_cpp.llama_cpp as C
import pytest

from edgellm.engine.grammar import BLOCK, MAX_COUNT, MAX_GRAMMAR_BYTES, MAX_RULES, SchemaError, to_gbnf
from edgellm.engine.model import Model
from edgellm.engine.sampling import Sampler, SamplingParams


def nested_type_lists(depth: int) -> dict:
    """Each level lists 'array' four times: compiled per type, the items were compiled 4**depth times."""
    schema: dict = {"type": "integer"}
    for _ in range(depth):
        schema = {"type": ["array"] * 4, "items": schema}
    return schema


def merge_chain(depth: int) -> dict:
    """Each definition has two properties that merge the next one (allOf of a $ref): 2**depth paths."""
    defs = {f"d{k}": {"properties": {"a": {"allOf": [{"$ref": f"#/$defs/d{k + 1}"}]},
                                     "b": {"allOf": [{"$ref": f"#/$defs/d{k + 1}"}]}}} for k in range(depth)}
    defs[f"d{depth}"] = {"properties": {"x": {"type": "integer"}}}
    return {"$defs": defs, "$ref": "#/$defs/d0"}


def kinds_fan_out(depth: int, width: int) -> dict:
    """A oneOf branch whose kinds are asked through anyOf of $refs: width**depth paths."""
    defs = {f"d{k}": {"anyOf": [{"$ref": f"#/$defs/d{k + 1}"}] * width} for k in range(depth)}
    defs[f"d{depth}"] = {"type": "integer"}
    return {"$defs": defs, "oneOf": [{"$ref": "#/$defs/d0"}, {"type": "string"}]}


# name -> (schema, None if it compiles, else a part of the refusal's message)
BOMBS: dict[str, tuple[dict, str | None]] = {
    "1500 optional properties": ({"type": "object", "properties": {f"p{i}": {} for i in range(1500)}}, None),
    "allOf of 2000 parts": ({"allOf": [{"properties": {f"p{i}": {}}} for i in range(2000)]}, None),
    "allOf of 4000 parts": ({"allOf": [{"properties": {f"p{i}": {}}} for i in range(4000)]},
                            f"larger than {MAX_GRAMMAR_BYTES // 1024} KiB"),
    "a type listed 8000 times": ({"type": ["array"] * 8000}, None),
    "type lists 6 deep": (nested_type_lists(6), None),
    "type lists 40 deep": (nested_type_lists(40), None),
    "minimum 10**400": ({"type": "integer", "minimum": 10 ** 400}, "'minimum' leaves no integer"),
    "minimum 1e308": ({"type": "integer", "minimum": 1e308}, "'minimum' leaves no integer"),
    "exclusiveMaximum -10**400": ({"type": "integer", "exclusiveMaximum": -10 ** 400},
                                  "'exclusiveMaximum' leaves no integer"),
    "maximum 1e308": ({"type": "integer", "maximum": 1e308}, None),
    "$ref to the root": ({"$ref": "#"}, "$ref '#' refers back to itself"),
    "$ref to itself in anyOf": ({"$defs": {"a": {"anyOf": [{"$ref": "#/$defs/a"}, {"type": "null"}]}},
                                 "$ref": "#/$defs/a"}, "refers back to itself"),
    "maxItems 5000": ({"type": "array", "items": {"type": "integer"}, "maxItems": 5000}, None),
    "minItems 5000": ({"type": "array", "minItems": 5000}, f"'minItems' above {MAX_COUNT}"),
    "maxLength 5000": ({"type": "string", "maxLength": 5000}, None),
    "minLength 5000": ({"type": "string", "minLength": 5000}, f"'minLength' above {MAX_COUNT}"),
    # llama.cpp refused to repeat a group that expands to more than 2000 rules: 99 x char{0,30}.
    "100 strings of 30": ({"type": "array", "items": {"type": "string", "maxLength": 30}, "maxItems": 100}, None),
    "allOf through $refs 20 deep": (merge_chain(20), None),
    "oneOf kinds through $refs 8 wide": (kinds_fan_out(8, 8), None),
    "300 long names beside extra keys": ({"type": "object", "properties": {f"{'n' * 20}{i}": {} for i in range(300)},
                                          "additionalProperties": True}, None),
    "300 string lengths": ({"type": "object", "properties": {f"p{i}": {"type": "string", "maxLength": 1000 + i}
                                                            for i in range(300)}}, f"more than {MAX_RULES} rules"),
    "enum of 200000": ({"enum": list(range(200_000))}, f"larger than {MAX_GRAMMAR_BYTES // 1024} KiB"),
    # About the largest that fits: llama.cpp's set-up is quadratic in the alternatives it starts from.
    "enum of 20000": ({"enum": list(range(20_000))}, None),
    "anyOf of 3000 enums in an array": ({"type": "array", "items": {"anyOf": [{"enum": [i, -i]}
                                                                             for i in range(1, 3000)]}}, None),
}


@pytest.fixture(scope="module")
def model(models):
    m = Model(models["random"])
    yield m
    m.close()


@pytest.mark.parametrize("name", BOMBS)
def test_a_bomb_is_refused_by_name_or_compiled_quickly(model, name):
    schema, refusal = BOMBS[name]
    start = time.process_time()
    try:
        Sampler(model, SamplingParams(json_schema=schema)).close()  # to_gbnf, then llama.cpp's parser
        outcome = None
    except SchemaError as e:
        outcome = str(e)
    assert time.process_time() - start < 2.0
    if refusal is None:
        assert outcome is None
    else:
        assert outcome is not None and refusal in outcome


def test_optional_properties_grow_the_grammar_linearly():
    def size(n: int) -> int:
        return len(to_gbnf({"type": "object", "properties": {f"p{i}": {"type": "boolean"} for i in range(n)}}))

    small, large = size(750), size(1500)
    assert large < 150 * 1500  # about 110 bytes a property: 1500 took 42 MB when every tail was written out
    assert large < 2.2 * small


def test_each_subschema_is_compiled_once():
    """Type lists, $refs and allOf merges reuse what was compiled: the grammar does not grow with the paths."""
    assert len(to_gbnf(nested_type_lists(40))) < 5 * len(to_gbnf(nested_type_lists(10)))  # 4**40 paths
    assert to_gbnf({"type": ["array"] * 8000}) == to_gbnf({"type": ["array"]})
    assert len(to_gbnf(merge_chain(20))) < 3 * len(to_gbnf(merge_chain(10)))


def test_integer_bounds_of_any_size_are_exact():
    assert to_gbnf({"type": "integer", "maximum": 1e308}) == to_gbnf({"type": "integer"})
    assert to_gbnf({"type": "integer", "minimum": -10 ** 400, "maximum": 7}) == to_gbnf({"type": "integer",
                                                                                         "maximum": 7})
    with pytest.raises(SchemaError, match="no integer lies between"):
        to_gbnf({"type": "integer", "minimum": 10 ** 12, "maximum": 10 ** 11})


def test_counts_llama_cpp_cannot_reach_are_lowered():
    assert "char{0,1999}" in to_gbnf({"type": "string", "maxLength": 10 ** 9})
    assert f"{{0,{MAX_COUNT - 1}}}" in to_gbnf({"type": "array", "maxItems": 10 ** 9})


def test_rule_names_are_never_empty(model):
    """A $ref to the root once made a rule without a name."""
    schema = {"$defs": {"!!": {"type": "integer", "minimum": 1}}, "type": "object",
              "properties": {"child": {"$ref": "#"}, "x": {"$ref": "#/$defs/!!"},
                             "": {"type": "integer", "maximum": 1}}}
    grammar = to_gbnf(schema)
    names = [line.split(" ::= ")[0] for line in grammar.splitlines()]
    assert all(re.fullmatch(r"[a-z0-9-]+", n) for n in names) and len(names) == len(set(names))
    assert accepts(model, grammar, '{"child":{"x":3,"":-2},"x":1}')
    assert not accepts(model, grammar, '{"x":0}')


def test_the_limits_are_named():
    wide = {"type": "object", "properties": {f"p{i}": {"type": "integer", "minimum": i} for i in range(3000)}}
    with pytest.raises(SchemaError, match=f"larger than {MAX_GRAMMAR_BYTES // 1024} KiB"):
        to_gbnf(wide)
    lengths = {"type": "object", "properties": {f"p{i}": {"type": "string", "maxLength": 1999 - i} for i in range(30)}}
    with pytest.raises(SchemaError, match=f"more than {MAX_RULES} rules"):
        to_gbnf(lengths)


def test_check_is_called_at_every_schema_and_rule_and_may_give_up(model):
    calls = 0

    def count() -> None:
        nonlocal calls
        calls += 1

    schema = {"type": "object", "properties": {f"p{i}": {"type": "integer", "minimum": i} for i in range(50)}}
    grammar = to_gbnf(schema, count)
    assert calls >= 51 + grammar.count("\n")  # 51 schema objects, a rule a line

    class Deadline(Exception):
        pass

    def give_up_soon() -> None:
        nonlocal calls
        calls += 1
        if calls > 10:
            raise Deadline

    calls = 0
    with pytest.raises(Deadline):
        to_gbnf(schema, give_up_soon)
    calls = 0
    with pytest.raises(Deadline):
        Sampler(model, SamplingParams(json_schema=schema), check=give_up_soon)


def accepts(model: Model, grammar: str, text: str) -> bool:
    """Whether llama.cpp's grammar sampler lets the tokens of `text` through, then the end."""
    sampler = C.llama_sampler_init_grammar(model.vocab, grammar.encode(), b"root")
    assert sampler
    try:
        tokens = model.tokenize(text, add_special=False)
        if model.piece(tokens[0]) == b" ":
            tokens = tokens[1:]  # SentencePiece's leading space
        for token in [*tokens, model.eos]:
            data = (C.llama_token_data * 1)(C.llama_token_data(token, 0.0, 0.0))
            candidates = C.llama_token_data_array(data, 1, -1, False)
            C.llama_sampler_apply(sampler, ctypes.byref(candidates))
            if data[0].logit == -math.inf:
                return False
            if token != model.eos:
                C.llama_sampler_accept(sampler, token)
        return True
    finally:
        C.llama_sampler_free(sampler)


def test_optional_properties_across_blocks_keep_order_and_never_repeat(model):
    n = 2 * BLOCK + 20
    grammar = to_gbnf({"type": "object", "properties": {f"p{i}": {"type": "boolean"} for i in range(n)}})

    def obj(*indices: int) -> str:
        return json.dumps({f"p{i}": True for i in indices}, separators=(",", ":"))

    for keys in [(), (0,), (n - 1,), (0, n - 1), (BLOCK - 1, BLOCK), (3, BLOCK + 5, 2 * BLOCK + 1), tuple(range(n))]:
        assert accepts(model, grammar, obj(*keys)), keys
    assert not accepts(model, grammar, obj(BLOCK, BLOCK - 1))  # out of order
    assert not accepts(model, grammar, '{"p5":true,"p5":true}')
    assert not accepts(model, grammar, '{"p1":true,"p2":true,"p1":true}')
    assert not accepts(model, grammar, '{,"p1":true}')


def test_no_schema_makes_llama_cpp_print_to_stderr(models):
    """llama.cpp prints a grammar it refuses, whole, to stderr (not through the log callback)."""
    script = (
        "import sys, json\n"
        "from test_grammar_limits import BOMBS\n"
        "from edgellm.engine.model import Model\n"
        "from edgellm.engine.sampling import Sampler, SamplingParams\n"
        "from edgellm.engine.errors import SchemaError\n"
        f"model = Model({str(models['random'])!r})\n"
        "for schema, _ in BOMBS.values():\n"
        "    try:\n"
        "        Sampler(model, SamplingParams(json_schema=schema)).close()\n"
        "    except SchemaError:\n"
        "        pass\n"
    )
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, cwd=Path(__file__).parent, timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
    assert len(run.stderr) < 1000, run.stderr[:1000]


def test_a_schema_that_is_not_utf_8_is_refused_briefly(model):
    """A lone surrogate cannot be encoded: the refusal once quoted the whole grammar."""
    schema = {"type": "object", "properties": {f"p{i}": {"const": "x" * 100} for i in range(500)} | {
        "bad": {"const": "\ud800"}}}
    with pytest.raises(SchemaError) as refused:
        Sampler(model, SamplingParams(json_schema=schema))
    assert len(str(refused.value)) <= 200
