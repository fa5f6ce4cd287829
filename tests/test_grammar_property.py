"""Property: for generated schemas, whatever a random-weight model writes under the grammar validates.

Schemas come from a hypothesis strategy over the keywords the grammar supports (types, bounds,
lengths, enum/const, formats, arrays and tuples, objects with required, optional and extra keys,
anyOf, oneOf by type); each is compiled, llama.cpp writes with it at temperature 1 from the tiny
random model, and every finished reply must parse, have no repeated declared key, and validate
with jsonschema, the oracle. `EDGELLM_GRAMMAR_EXAMPLES` raises the count (default 300) for a
longer run by hand.
"""

from __future__ import annotations

import json
import os

import jsonschema
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from test_grammar import write_json

from edgellm.config import EngineConfig
from edgellm.engine.grammar import SchemaError
from edgellm.engine.model import Model
from edgellm.engine.runner import Runner
from edgellm.engine.sampling import Sampler, SamplingParams

EXAMPLES = int(os.environ.get("EDGELLM_GRAMMAR_EXAMPLES", "300"))
NAMES = st.text("abcxyz_", min_size=1, max_size=4)
SCALARS = st.one_of(st.none(), st.booleans(), st.integers(-50, 50), st.text("abc \"\\é", max_size=4))


def integer() -> st.SearchStrategy[dict]:
    return st.builds(lambda lo, span: {"type": "integer", **({} if lo is None else {"minimum": lo}),
                                       **({} if lo is None or span is None else {"maximum": lo + span})},
                     st.none() | st.integers(-1000, 1000), st.none() | st.integers(0, 500))


def string() -> st.SearchStrategy[dict]:
    return st.one_of(
        st.builds(lambda lo, extra: {"type": "string", "minLength": lo, "maxLength": lo + extra},
                  st.integers(0, 4), st.integers(0, 6)),
        st.sampled_from([{"type": "string", "format": f} for f in ("date", "time", "date-time", "uuid", "email")]),
        st.just({"type": "string", "maxLength": 8}),
    )


def scalar() -> st.SearchStrategy[dict]:
    return st.one_of(
        integer(), string(),
        st.just({"type": "boolean"}), st.just({"type": "null"}), st.just({"type": "number", "minimum": 0}),
        st.builds(lambda v: {"const": v}, SCALARS),
        st.builds(lambda vs: {"enum": vs}, st.lists(SCALARS, min_size=1, max_size=4, unique_by=json.dumps)),
        st.builds(lambda vs: {"enum": vs, "type": "string"},
                  st.lists(st.text("xyz", max_size=3), min_size=1, max_size=3, unique=True)),
    )


def schemas() -> st.SearchStrategy[dict]:
    def extend(children: st.SearchStrategy[dict]) -> st.SearchStrategy[dict]:
        def obj(props: dict, required: list, extra: object) -> dict:
            schema: dict = {"type": "object", "properties": props, "required": [r for r in required if r in props]}
            if extra is not None:
                schema["additionalProperties"] = extra
            return schema

        return st.one_of(
            st.builds(lambda item, lo, extra: {"type": "array", "items": item, "minItems": lo, "maxItems": lo + extra},
                      children, st.integers(0, 2), st.integers(0, 3)),
            st.builds(lambda items: {"type": "array", "prefixItems": items, "items": False},
                      st.lists(children, min_size=1, max_size=3)),
            st.builds(obj, st.dictionaries(NAMES, children, max_size=4), st.lists(NAMES, max_size=3),
                      st.none() | st.just(False) | integer()),
            st.builds(lambda opts: {"anyOf": opts}, st.lists(children, min_size=1, max_size=3)),
            st.builds(lambda a, b: {"oneOf": [a, b]}, integer(), string()),
            # Keywords of one type without a 'type', and annotations beside anyOf (found by review).
            st.builds(lambda lo, extra: {"minLength": lo, "maxLength": lo + extra}, st.integers(0, 3),
                      st.integers(0, 3)),
            st.builds(lambda opts: {"anyOf": opts, "title": "T", "description": "d"},
                      st.lists(children, min_size=1, max_size=2)),
        )

    return st.recursive(scalar(), extend, max_leaves=8)


def no_repeated_keys(pairs: list[tuple[str, object]]) -> dict:
    keys = [k for k, _ in pairs]
    assert len(keys) == len(set(keys)), f"a key repeats: {keys}"
    return dict(pairs)


@pytest.fixture(scope="module")
def engine(models):
    model = Model(models["random"])
    runner = Runner(model, EngineConfig(n_ctx=2048, parallel=1))
    yield model, runner
    runner.close()
    model.close()


@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                          HealthCheck.too_slow])
@given(schema=schemas(), seed=st.integers(0, 2**31 - 1))
def test_every_finished_reply_validates(engine, schema, seed):
    model, runner = engine
    try:
        sampler = Sampler(model, SamplingParams(temperature=1.0, seed=seed, json_schema=schema))
    except SchemaError as e:
        event(f"refused: {str(e).split(': ', 1)[-1][:40]}")
        return  # refused by name: allowed (test_grammar.py checks which refusals are expected)

    text, finish = write_json(runner, model, sampler, 96)
    try:
        value = json.loads(text, object_pairs_hook=no_repeated_keys)
    except json.JSONDecodeError:
        assert finish == "length", f"a finished reply does not parse: {text!r}"
        event("cut by max_tokens")
        return
    event("validated")
    jsonschema.validate(value, schema, format_checker=jsonschema.Draft202012Validator.FORMAT_CHECKER)
    VALIDATED.append(schema)


VALIDATED: list[dict] = []


def test_enough_replies_were_checked():
    """Refusals and replies cut by max_tokens pass the test above without checking anything: at
    least a third of the examples must have been validated (run with the test above)."""
    if not VALIDATED:
        pytest.skip("run with test_every_finished_reply_validates")
    assert len(VALIDATED) >= EXAMPLES // 3, f"only {len(VALIDATED)} of {EXAMPLES} replies were validated"
