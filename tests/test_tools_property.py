"""Property: whatever a random-weight model writes under a tool-call grammar, every call of a
finished reply names a tool it may call and has arguments that parse and validate.

Random tools (names, and parameter schemas from the grammar property's strategy) x every
family's syntax x tool_choice and parallel_tool_calls x sampling settings (top_k, top_p,
min_p, penalties: the ways a refused pick is replaced) x two random tiny models (one with
the families' markers as control tokens, one that spells them in bytes) x seeds. jsonschema is
the oracle. `EDGELLM_TOOLS_EXAMPLES` raises the count (default 150) for a longer run by hand.
"""

from __future__ import annotations

import asyncio
import json
import os

import jsonschema
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from test_grammar_property import NAMES, no_repeated_keys, schemas
from test_tools import calls_in
from tiny_models import write_model

from edgellm.config import EngineConfig
from edgellm.engine.calls import CallReader
from edgellm.engine.errors import SchemaError
from edgellm.engine.model import Model
from edgellm.engine.runner import Runner
from edgellm.engine.sampling import Sampler, SamplingParams
from edgellm.engine.scheduler import Prepared
from edgellm.engine.stream import Finish
from edgellm.engine.tools import FUNCTIONGEMMA, GENERIC, HERMES, LLAMA3, MISTRAL, PHI4, Tool, ToolUse, call_grammar

EXAMPLES = int(os.environ.get("EDGELLM_TOOLS_EXAMPLES", "150"))
SYNTAXES = (HERMES, LLAMA3, MISTRAL, PHI4, FUNCTIONGEMMA, GENERIC)
MARKERS = ("<tool_call>", "</tool_call>", "<|python_tag|>", "[TOOL_CALLS]", "<|tool_call|>", "<|/tool_call|>",
           "<start_function_call>", "<end_function_call>", "<escape>")


def tools() -> st.SearchStrategy[list[Tool]]:
    parameters = st.builds(
        lambda props, required: {"type": "object", "properties": props,
                                 "required": [r for r in required if r in props]},
        st.dictionaries(NAMES, schemas(), max_size=3), st.lists(NAMES, max_size=2))
    names = st.lists(st.text("abfgz_-09", min_size=1, max_size=6), min_size=1, max_size=3, unique=True)
    return names.flatmap(lambda ns: st.tuples(*(parameters for _ in ns)).map(
        lambda ps: [Tool(n, "", p) for n, p in zip(ns, ps, strict=True)]))


@pytest.fixture(scope="module")
def engines(tmp_path_factory):
    d = tmp_path_factory.mktemp("tool-models")
    out = []
    for i, special in enumerate((MARKERS, ())):
        model = Model(write_model(d / f"m{i}.gguf", seed=20 + i, special=special))
        out.append((model, Runner(model, EngineConfig(n_ctx=2048, parallel=1))))
    yield out
    for model, runner in out:
        runner.close()
        model.close()


def generate(runner: Runner, prepared: Prepared, reader: CallReader) -> tuple[list, str]:
    async def run() -> tuple[list, str]:
        stream = runner.submit(prepared)
        stream.when_finished(prepared.sampler.close)
        events = []
        async for item in stream:
            events += reader.feed(item)
        return events, events[-1].reason

    return asyncio.run(run())


KNOBS = st.fixed_dictionaries({}, optional={
    "temperature": st.sampled_from([0.0, 0.7, 1.5]), "top_k": st.sampled_from([0, 5, 40]),
    "top_p": st.sampled_from([0.8, 1.0]), "min_p": st.sampled_from([0.0, 0.05]),
    "frequency_penalty": st.sampled_from([0.0, 1.0])})


@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                          HealthCheck.too_slow])
@given(offered=tools(), syntax=st.sampled_from(SYNTAXES), choice=st.sampled_from(["required", "function", "auto"]),
       parallel=st.booleans(), which=st.integers(0, 1), seed=st.integers(0, 2**31 - 1), knobs=KNOBS,
       data=st.data())
def test_every_finished_call_validates(engines, offered, syntax, choice, parallel, which, seed, knobs, data):
    model, runner = engines[which]
    named = data.draw(st.sampled_from([t.name for t in offered])) if choice == "function" else None
    use = ToolUse(tuple(offered), choice, named, parallel)
    try:
        grammar = call_grammar(syntax, use)
        visible = frozenset(t for t in model.control_tokens if model.token_text(t) in syntax.markers)
        sampler = Sampler(model, SamplingParams(**{"temperature": 1.0, **knobs}, seed=seed), calls=grammar,
                          visible=visible)
    except SchemaError as e:
        event(f"refused: {str(e).split(': ')[-1][:40]}")
        return
    prompt = model.tokenize("call:")
    events, reason = generate(runner, Prepared(prompt, sampler, 400, visible=visible), CallReader(syntax, grammar))

    calls = calls_in(events)
    if reason == "length":
        event("cut by max_tokens")
        return
    assert isinstance(events[-1], Finish)
    if choice != "auto":
        assert reason == "tool_calls" and calls, f"a forced reply without a call: {events}"
    if not calls:
        event("auto: text only")
        return
    assert reason == "tool_calls"
    if not parallel or syntax.between is None:
        assert len(calls) == 1
    schemas_by_name = {t.name: t.parameters for t in use.callable}
    for name, arguments in calls:
        assert name in schemas_by_name, f"{name!r} may not be called ({choice}, {named})"
        value = json.loads(arguments, object_pairs_hook=no_repeated_keys)
        jsonschema.validate(value, schemas_by_name[name],
                            format_checker=jsonschema.Draft202012Validator.FORMAT_CHECKER)
    event(f"validated: {syntax.family}, {len(calls)} call(s)")
