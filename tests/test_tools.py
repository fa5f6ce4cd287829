"""Tool calls over real HTTP with the official openai SDK, against tiny models that carry each
family's real chat template: every tool_choice mode, streamed deltas, the tool-result round
trip, parallel calls on and off, and every 400. Arguments are checked with jsonschema, the
oracle; the prompts a round trip builds are checked against transformers' rendering."""

from __future__ import annotations

import asyncio
import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import jsonschema
import openai
import pytest
from conftest import ROOT
from tiny_models import write_model

from edgellm.engine.calls import CallArguments, CallReader, CallStart
from edgellm.engine.chat import ChatTemplate
from edgellm.engine.model import Model
from edgellm.engine.stream import Finish, Text, Usage
from edgellm.engine.tools import (
    FUNCTIONGEMMA,
    GENERIC,
    HERMES,
    LLAMA3,
    MISTRAL,
    PHI4,
    Tool,
    ToolUse,
    call_grammar,
    syntax_for,
)
from edgellm.store.registry import Registry

TEMPLATES = ROOT / "tests" / "fixtures" / "templates"
# Each family: its real template and the markers its vocabulary has as control tokens.
FAMILIES = {
    "hermes": ("Qwen-Qwen2.5-7B-Instruct.jinja", ("<tool_call>", "</tool_call>")),
    "llama3": ("meta-llama-Llama-3.2-3B-Instruct.jinja", ("<|python_tag|>", "<|eot_id|>", "<|start_header_id|>",
                                                          "<|end_header_id|>")),
    "mistral": ("mistralai-Mistral-Nemo-Instruct-2407.jinja", ("[TOOL_CALLS]", "[AVAILABLE_TOOLS]",
                                                               "[/AVAILABLE_TOOLS]", "[TOOL_RESULTS]",
                                                               "[/TOOL_RESULTS]", "[INST]", "[/INST]")),
    "phi4": ("microsoft-Phi-4-mini-instruct.jinja", ("<|tool_call|>", "<|/tool_call|>", "<|tool|>", "<|/tool|>",
                                                     "<|system|>", "<|user|>", "<|assistant|>", "<|end|>")),
    "functiongemma": ("google-functiongemma-270m-it.jinja", (
        "<start_function_call>", "<end_function_call>", "<escape>", "<start_function_declaration>",
        "<end_function_declaration>", "<start_function_response>", "<end_function_response>",
        "<start_of_turn>", "<end_of_turn>")),
    "generic": ("google-gemma-3-it.jinja", ("<start_of_turn>", "<end_of_turn>")),
}
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city.",
    "parameters": {"type": "object", "properties": {
        "city": {"type": "string", "minLength": 1, "maxLength": 16},
        "days": {"type": "integer", "minimum": 1, "maximum": 7},
        "unit": {"enum": ["celsius", "fahrenheit"]}}, "required": ["city"]}}}
LIGHT = {"type": "function", "function": {
    "name": "turn_on", "description": "Turn a light on.",
    "parameters": {"type": "object", "properties": {
        "entity": {"enum": ["light.hall", "light.desk"]},
        "brightness": {"type": "integer", "minimum": 0, "maximum": 255},
        "colors": {"type": "array", "items": {"type": "string", "maxLength": 6}, "maxItems": 3},
        "fade": {"type": "boolean"}}, "required": ["entity"]}}}
TOOLS = [WEATHER, LIGHT]
SCHEMAS = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}
ASK = [{"role": "user", "content": "Weather in Paris? And the hall light on."}]


@pytest.fixture(scope="module")
def family_models(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("families")
    out = {family: write_model(d / f"{family}.gguf", seed=7 + i, chat_template=(TEMPLATES / name).read_text(),
                               special=special)
           for i, (family, (name, special)) in enumerate(FAMILIES.items())}
    out["builtin"] = write_model(d / "builtin.gguf", seed=3)  # no template: llama.cpp's built-in one
    return out


@pytest.fixture(scope="module")
def server(server_factory, family_models, tmp_path_factory):
    state = tmp_path_factory.mktemp("state")
    registry = Registry(state).open()
    for family, path in family_models.items():
        registry.add(path, alias=family)
    return server_factory(None, state_dir=state, config="[engine]\nn_ctx = 4096\n")


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)


def valid_calls(message, names=frozenset(SCHEMAS)) -> list[tuple[str, dict]]:
    """The calls of a reply, each checked against its tool's schema."""
    assert message.tool_calls, f"no tool calls in {message}"
    calls = []
    for call in message.tool_calls:
        assert call.type == "function" and call.id and call.function.name in names
        arguments = json.loads(call.function.arguments)
        jsonschema.validate(arguments, SCHEMAS[call.function.name])
        calls.append((call.function.name, arguments))
    return calls


# --- family detection ---------------------------------------------------------------------

def test_each_family_is_recognised_from_its_template_and_admin_models_says_which(server, family_models):
    expected = {"hermes": HERMES, "llama3": LLAMA3, "mistral": MISTRAL, "phi4": PHI4,
                "functiongemma": FUNCTIONGEMMA, "generic": GENERIC}
    for family, syntax in expected.items():
        assert syntax_for((TEMPLATES / FAMILIES[family][0]).read_text(), lambda _: False) is syntax
    assert syntax_for((TEMPLATES / "Qwen-Qwen3-0.6B.jinja").read_text(), lambda _: False) is HERMES
    assert syntax_for((TEMPLATES / "meta-llama-Llama-3.1-8B-Instruct.jinja").read_text(), lambda _: False) is LLAMA3
    # A file without a template: its vocabulary says.
    assert syntax_for(None, lambda token: token == "[TOOL_CALLS]") is MISTRAL
    assert syntax_for(None, lambda token: False) is GENERIC

    for family in [*expected, "builtin"]:
        loaded = server.post(f"/admin/models/{family}/load").json()
        assert loaded["tool_call_format"] == ("generic" if family == "builtin" else family)
    assert "tool calls: mistral syntax" in server.log()


# --- every mode, every family ---------------------------------------------------------------

@pytest.mark.parametrize("family", [*FAMILIES, "builtin"])
def test_a_required_call_is_valid_from_every_family(client, family):
    for seed in range(3):
        reply = client.chat.completions.create(model=family, messages=ASK, tools=TOOLS, tool_choice="required",
                                               seed=seed, temperature=1.0, max_tokens=2000,
                                               parallel_tool_calls=seed == 2)
        choice = reply.choices[0]
        assert choice.finish_reason == "tool_calls", choice
        assert choice.message.content is None
        valid_calls(choice.message)
        assert reply.usage.completion_tokens > 0


@pytest.mark.parametrize("family", ["hermes", "mistral", "functiongemma", "llama3"])
def test_a_named_tool_is_the_one_called(client, family):
    for seed in range(3):
        reply = client.chat.completions.create(
            model=family, messages=ASK, tools=TOOLS, seed=seed, max_tokens=2000,
            tool_choice={"type": "function", "function": {"name": "get_weather"}})
        assert {name for name, _ in valid_calls(reply.choices[0].message, {"get_weather"})} == {"get_weather"}


@pytest.mark.parametrize("family", ["hermes", "mistral", "phi4", "functiongemma", "generic"])
def test_parallel_calls_on_and_off(client, family):
    for seed in range(3):
        off = client.chat.completions.create(model=family, messages=ASK, tools=TOOLS, tool_choice="required",
                                             parallel_tool_calls=False, seed=seed, max_tokens=2000)
        assert len(valid_calls(off.choices[0].message)) == 1
    counts = []
    for seed in range(10):
        on = client.chat.completions.create(model=family, messages=ASK, tools=TOOLS, tool_choice="required",
                                            seed=seed, max_tokens=2000)
        counts.append(len(valid_calls(on.choices[0].message)))
        if counts[-1] > 1:
            break
    assert max(counts) > 1, f"a random model never wrote two calls in 10 tries: {counts}"


def test_llama3_writes_one_call_per_reply_as_its_format_has_no_list(client):
    for seed in range(4):
        reply = client.chat.completions.create(model="llama3", messages=ASK, tools=TOOLS, tool_choice="required",
                                               seed=seed, max_tokens=2000)
        assert len(valid_calls(reply.choices[0].message)) == 1


@pytest.mark.parametrize("family", ["hermes", "generic"])
def test_none_writes_text_and_auto_writes_text_or_valid_calls(client, family):
    reply = client.chat.completions.create(model=family, messages=ASK, tools=TOOLS, tool_choice="none",
                                           seed=1, max_tokens=20)
    assert reply.choices[0].message.tool_calls is None and reply.choices[0].finish_reason != "tool_calls"
    for seed in range(6):
        reply = client.chat.completions.create(model=family, messages=ASK, tools=TOOLS, seed=seed, max_tokens=60)
        choice = reply.choices[0]
        if choice.message.tool_calls:
            valid_calls(choice.message)
            assert choice.finish_reason in ("tool_calls", "length")
        else:
            assert choice.finish_reason in ("stop", "length")


def test_auto_text_then_a_call_when_the_model_writes_the_trigger(server_factory, tmp_path):
    """A scripted model writes "Hello", then <tool_call>: the grammar takes over from there."""
    template = (TEMPLATES / FAMILIES["hermes"][0]).read_text()
    path = write_model(tmp_path / "scripted.gguf", chat_template=template, special=FAMILIES["hermes"][1],
                       script={"\n": "Hello", "Hello": "<tool_call>"})
    server = server_factory(path)
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
    reply = client.chat.completions.create(model="scripted", messages=ASK, tools=TOOLS, temperature=0,
                                           max_tokens=2000)
    choice = reply.choices[0]
    assert choice.message.content == "Hello"
    assert choice.finish_reason == "tool_calls"
    valid_calls(choice.message)
    streamed = client.chat.completions.create(model="scripted", messages=ASK, tools=TOOLS, temperature=0,
                                              max_tokens=2000, stream=True)
    content, calls, finish = reassemble(streamed)
    assert content == "Hello" and finish == "tool_calls"
    assert calls == [(c.function.name, c.function.arguments) for c in choice.message.tool_calls]


# --- streaming -------------------------------------------------------------------------------

def reassemble(stream, fragmented: bool = True) -> tuple[str, list[tuple[str, str]], str | None]:
    """Content, calls (name, arguments) and finish_reason from OpenAI chunks, as SDK users do.
    `fragmented`: the arguments come as they are written (FunctionGemma's: whole, once converted)."""
    content, calls, finish, ids = "", {}, None, {}
    pieces = 0
    for chunk in stream:
        if not chunk.choices:
            continue
        delta = chunk.choices[0].delta
        content += delta.content or ""
        for call in delta.tool_calls or []:
            if call.id:
                assert call.index not in ids and call.type == "function" and call.function.name
                ids[call.index] = call.id
                calls[call.index] = [call.function.name, call.function.arguments or ""]
            else:
                calls[call.index][1] += call.function.arguments
                pieces += 1
        finish = chunk.choices[0].finish_reason or finish
    assert not calls or not fragmented or pieces > len(calls), "arguments should arrive in fragments"
    return content, [tuple(calls[i]) for i in sorted(calls)], finish


@pytest.mark.parametrize("family", ["hermes", "llama3", "mistral", "phi4", "functiongemma", "generic"])
def test_streamed_deltas_reassemble_to_the_same_calls(client, family):
    # One call: greedy decoding of a random model may part ways after hundreds of tokens, as prefix
    # reuse changes the arithmetic, and that is not what this test is about.
    kwargs = dict(model=family, messages=ASK, tools=TOOLS, tool_choice="required", temperature=0, max_tokens=2000,
                  parallel_tool_calls=False)
    whole = client.chat.completions.create(**kwargs).choices[0]
    content, calls, finish = reassemble(client.chat.completions.create(**kwargs, stream=True,
                                                                       stream_options={"include_usage": True}),
                                        fragmented=family != "functiongemma")
    assert finish == whole.finish_reason == "tool_calls"
    assert content == ""
    assert calls == [(c.function.name, c.function.arguments) for c in whole.message.tool_calls]


def test_the_async_client_streams_calls(server):
    async def main() -> list:
        client = openai.AsyncOpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
        async with client:
            results = []
            for seed in range(3):
                stream = await client.chat.completions.create(model="hermes", messages=ASK, tools=TOOLS,
                                                              tool_choice="required", seed=seed, stream=True,
                                                              max_tokens=2000)
                chunks = [chunk async for chunk in stream]
                results.append(reassemble(iter(chunks)))
            return results

    for content, calls, finish in asyncio.run(main()):
        assert content == "" and finish == "tool_calls" and calls
        for name, arguments in calls:
            jsonschema.validate(json.loads(arguments), SCHEMAS[name])


# --- the round trip ------------------------------------------------------------------------

@pytest.mark.parametrize("family", ["hermes", "llama3", "mistral", "functiongemma"])
def test_the_tool_result_round_trip_renders_as_transformers_renders_it(client, family, family_models):
    first = client.chat.completions.create(model=family, messages=ASK, tools=TOOLS, temperature=0, max_tokens=2000,
                                           tool_choice={"type": "function", "function": {"name": "get_weather"}},
                                           parallel_tool_calls=False)
    call = first.choices[0].message.tool_calls[0]
    history = [*ASK, first.choices[0].message.model_dump(exclude_none=True),
               {"role": "tool", "tool_call_id": call.id, "content": "21 C and sunny"}]
    second = client.chat.completions.create(model=family, messages=history, tools=TOOLS, tool_choice="none",
                                            max_tokens=4)
    assert second.choices[0].finish_reason in ("stop", "length")

    # The oracle: transformers renders the same conversation, arguments as an object, the result named.
    render = pytest.importorskip("transformers.utils.chat_template_utils").render_jinja_template
    hf_history = [*ASK, {"role": "assistant", "tool_calls": [{"id": call.id, "type": "function", "function": {
        "name": call.function.name, "arguments": json.loads(call.function.arguments)}}]},
        {"role": "tool", "tool_call_id": call.id, "name": call.function.name, "content": "21 C and sunny"}]
    model = Model(family_models[family], vocab_only=True)
    try:
        template = ChatTemplate.for_model(model)
        rendered, _ = render(conversations=[hf_history], chat_template=template.source, add_generation_prompt=True,
                             bos_token=model.bos_text, eos_token=model.token_text(model.eos))
        assert second.usage.prompt_tokens == len(model.tokenize(rendered[0]))
    finally:
        model.close()


def test_history_calls_become_text_for_a_template_without_tools(client):
    history = [*ASK, {"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "21 C"}]
    reply = client.chat.completions.create(model="generic", messages=history, tools=TOOLS, max_tokens=4)
    assert reply.choices[0].finish_reason in ("stop", "length", "tool_calls")


# --- batching --------------------------------------------------------------------------------

def test_concurrent_requests_each_follow_their_own_grammar(client):
    def one(seed: int) -> list:
        tools = [TOOLS[seed % 2]]
        reply = client.chat.completions.create(model="hermes", messages=ASK, tools=tools, tool_choice="required",
                                               seed=seed, max_tokens=2000)
        return [name for name, _ in valid_calls(reply.choices[0].message, {tools[0]["function"]["name"]})]

    with ThreadPoolExecutor(8) as pool:
        names = list(pool.map(one, range(16)))
    assert all(set(n) == {TOOLS[i % 2]["function"]["name"]} for i, n in enumerate(names))


def test_a_repeated_tool_prompt_reuses_its_cached_prefix(client):
    """A hub sends the same tools with every request: their prefill is paid once."""
    kwargs = dict(model="hermes", messages=ASK, tools=TOOLS, tool_choice="required", parallel_tool_calls=False,
                  max_tokens=2000)
    client.chat.completions.create(**kwargs, seed=1)
    again = client.chat.completions.create(**kwargs, seed=2)
    assert again.usage.prompt_tokens_details.cached_tokens >= again.usage.prompt_tokens - 1
    valid_calls(again.choices[0].message)


def test_sampling_settings_that_filter_the_whole_vocabulary_keep_calls_valid(client):
    """top_k 0 with min_p, top_p, and penalties: refused picks are replaced from the whole vocabulary
    (the shortlist cannot be proven to hold the answer), again and again in one reply."""
    for seed, knobs in enumerate([{"top_k": 0, "min_p": 0.05}, {"top_k": 0, "min_p": 0.05, "top_p": 0.8},
                                  {"frequency_penalty": 1.0, "presence_penalty": 0.5}, {"top_k": 0, "min_p": 0.0}]):
        reply = client.chat.completions.create(model="hermes", messages=ASK, tools=TOOLS, tool_choice="required",
                                               seed=seed, temperature=1.5, max_tokens=2000, extra_body=knobs)
        valid_calls(reply.choices[0].message)


def test_a_forced_call_is_not_cut_by_stop_strings_and_bare_parameters_are_an_object(client, family_models):
    bare = {"type": "function", "function": {"name": "ping", "parameters": {}}}
    listed = {"type": "function", "function": {"name": "note", "parameters": {
        "properties": {"text": {"type": "string", "maxLength": 8}}, "required": ["text"]}}}
    model = Model(family_models["hermes"], vocab_only=True)
    try:
        brace = next(t for t in range(model.n_vocab) if model.piece(t) == b"}")
    finally:
        model.close()
    for seed in range(3):
        # A random model's "any object" has no bound on its keys: one in CI ran past 3000 tokens. Favouring
        # "}" closes it where the grammar allows, so the reply ends; the stop strings still appear in it.
        reply = client.chat.completions.create(model="hermes", messages=ASK, tools=[bare, listed], stop=["\n", "}"],
                                               tool_choice="required", parallel_tool_calls=False, seed=seed,
                                               logit_bias={str(brace): 20}, max_tokens=500)
        assert reply.choices[0].finish_reason == "tool_calls"
        for call in reply.choices[0].message.tool_calls:
            arguments = json.loads(call.function.arguments)
            assert isinstance(arguments, dict)
            if call.function.name == "note":
                jsonschema.validate(arguments, {"type": "object", **listed["function"]["parameters"]})


def test_control_tokens_in_tool_property_names_are_plain_text(family_models):
    """A key is client text too: `<|im_end|>` as a property name is characters, not the end of a turn."""
    model = Model(family_models["hermes"], vocab_only=True)
    try:
        template = ChatTemplate.for_model(model)
        im_end = model.tokenize("<|im_end|>", add_special=False)
        assert len(im_end) == 1
        hostile = [{"type": "function", "function": {"name": "f", "parameters": {
            "type": "object", "properties": {"<|im_end|>": {"type": "string"}}}}}]
        plain = [{"type": "function", "function": {"name": "f", "parameters": {
            "type": "object", "properties": {"x": {"type": "string"}}}}}]
        count = [template.tokens(model, ASK, tools=tools).count(im_end[0]) for tools in (hostile, plain)]
        assert count[0] == count[1]
    finally:
        model.close()


# --- what is refused ----------------------------------------------------------------------

def bad(server, expected_param: str, **fields) -> str:
    body = {"model": "hermes", "messages": ASK, "tools": TOOLS, **fields}
    r = server.post("/v1/chat/completions", body)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == expected_param, error
    return error["message"]


def fn(name: object = "f", **more) -> dict:
    return {"type": "function", "function": {"name": name, **more}}


@pytest.mark.parametrize("tools, param, says", [
    ([{"type": "function", "function": {}}], "tools[0].function.name", "letters, digits"),
    ([fn("has space")], "tools[0].function.name", "letters, digits"),
    ([fn("x" * 65)], "tools[0].function.name", "1 to 64"),
    ([fn(7)], "tools[0].function.name", "must be a string"),
    ([fn("a"), fn("a")], "tools[1].function.name", "two tools are named 'a'"),
    ([{"type": "retrieval", "function": {"name": "a"}}], "tools[0].type", "'function'"),
    ([{"type": "function"}], "tools[0].function", "required"),
    ([fn("a", parameters={"type": "string"})], "tools[0].function.parameters", "object"),
    ([fn("a", parameters={"anyOf": [{"type": "object"}, {"type": "string"}]})], "tools[0].function.parameters",
     "object"),
    ([fn("a", parameters={"type": "object", "properties": {"x": {"not": {}}}})], "tools[0].function.parameters",
     "'not' is not supported"),
    ([fn("a", parameters={"type": "object", "properties": {"x": {"$ref": "#/nowhere"}}})],
     "tools[0].function.parameters", "points nowhere"),
    ([fn("a")] * 129, "tools", "at most 128"),
])
def test_invalid_tool_definitions_are_400s_naming_the_field(server, tools, param, says):
    assert says in bad(server, param, tools=tools, tool_choice="required")


def test_tool_choice_and_history_errors_are_400s(server):
    assert "not among" in bad(server, "tool_choice.function.name",
                              tool_choice={"type": "function", "function": {"name": "nope"}})
    assert "'none', 'auto', 'required'" in bad(server, "tool_choice", tool_choice="always")
    assert "no 'tools'" in bad(server, "tool_choice", tools=[], tool_choice="required")
    assert "not supported" in bad(server, "response_format", response_format={"type": "json_object"})
    assert "required in a tool message" in bad(server, "messages[1].tool_call_id",
                                               messages=[*ASK, {"role": "tool", "content": "x"}])
    broken = {"role": "assistant", "tool_calls": [{"id": "c", "type": "function",
                                                   "function": {"name": "f", "arguments": "{not json"}}]}
    assert "not valid JSON" in bad(server, "messages[1].tool_calls[0].function.arguments", messages=[*ASK, broken])
    assert "must be a boolean" in bad(server, "parallel_tool_calls", parallel_tool_calls="yes")


def test_a_schema_refused_only_for_functiongemma_says_so(server):
    tools = [fn("a", parameters={"type": "object", "properties": {"two words": {"type": "string"}}})]
    r = server.post("/v1/chat/completions", {"model": "functiongemma", "messages": ASK, "tools": tools,
                                             "tool_choice": "required"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "tools[0].function.parameters"
    assert "FunctionGemma" in r.json()["error"]["message"]


# --- the reader, on text ---------------------------------------------------------------------

def read(syntax, texts: list[str], forced: bool = False) -> tuple[str, list, str]:
    use = ToolUse((Tool("f", "", {"type": "object"}), Tool("get-x_1", "", {"type": "object"})),
                  "required" if forced else "auto")
    reader = CallReader(syntax, call_grammar(syntax, use))
    events = [e for text in texts for e in reader.feed(Text(text))]
    events += reader.feed(Finish("stop", Usage(1, 1)))
    content = "".join(e.text for e in events if isinstance(e, Text))
    return content, calls_in(events), events[-1].reason


def calls_in(events: list) -> list[tuple[str, str]]:
    """The calls (name, arguments) that a reader's events spell."""
    calls: dict[int, list] = {}
    for e in events:
        if isinstance(e, CallStart):
            calls[e.index] = [e.name, ""]
        elif isinstance(e, CallArguments):
            calls[e.index][1] += e.text
    return [tuple(c) for c in calls.values()]


def test_a_named_tool_is_the_only_one_callable_but_every_tool_is_shown():
    from edgellm.engine.tools import with_tools

    use = ToolUse((Tool("a", "", {"type": "object"}), Tool("b", "", {"type": "object"})), "function", "a")
    assert [t.name for t in use.callable] == ["a"]
    _, shown = with_tools(HERMES, "tools", use, ASK)
    assert [t["function"]["name"] for t in shown] == ["a", "b"]
    assert with_tools(HERMES, "tools", ToolUse(use.tools, "none"), ASK)[1] is None


def test_the_reader_holds_back_what_may_begin_a_trigger_and_splits_calls_anywhere():
    text = 'Sure <tool<tool_call>\n{"name": "get-x_1", "arguments": {"a": "}\\"{"}}\n</tool_call>'
    for cut in range(1, len(text)):
        assert read(HERMES, [text[:cut], text[cut:]]) == ("Sure <tool", [("get-x_1", '{"a": "}\\"{"}')],
                                                         "tool_calls")
    assert read(HERMES, ["a <tool", "box>"]) == ("a <toolbox>", [], "stop")
    two = '[TOOL_CALLS][{"name": "f", "arguments": {}}, {"name": "f", "arguments": {"b": [1]}}]'
    assert read(MISTRAL, list(two)) == ("", [("f", "{}"), ("f", '{"b": [1]}')], "tool_calls")
    gemma = "<start_function_call>call:f{a:<escape>x, y<escape>,b:[1,true,None],c:{d:2.5}}<end_function_call>"
    assert read(FUNCTIONGEMMA, list(gemma)) == ("", [("f", '{"a": "x, y", "b": [1, true, null], "c": {"d": 2.5}}')],
                                                "tool_calls")
    # Llama 3.x: after the tag anywhere; as plain JSON only at the start (else it is JSON in an answer).
    call = '{"name": "f", "parameters": {"a": 1}}'
    assert read(LLAMA3, ["Ok ", "<|python_tag|>" + call]) == ("Ok ", [("f", '{"a": 1}')], "tool_calls")
    assert read(LLAMA3, [" \n", call]) == (" \n", [("f", '{"a": 1}')], "tool_calls")
    assert read(LLAMA3, ["Ok ", call]) == ("Ok " + call, [], "stop")
    shown = 'The reply looks like {"tool_calls": [{"name": "f", "arguments": {}}]}'
    assert read(GENERIC, list(shown)) == (shown, [], "stop")
    deep = "<start_function_call>call:f" + "{a:" * 3000  # nested past what Python's recursion reads
    assert read(FUNCTIONGEMMA, [deep])[1] == [("f", "")]
    cut = read(HERMES, ['<tool_call>\n{"name": "f", "arguments": {"a": 1'])
    assert cut[1] == [("f", '{"a": 1')] and cut[2] == "stop"  # not whole: not "tool_calls"


def test_a_grammar_never_writes_tokens_the_reply_does_not_show(client):
    """<unk> and <s> read as their text to the grammar but show as nothing: in a string of at least
    one character they would leave it empty. Favoured as much as a client can, they are still never
    written, in tool calls and in JSON output alike."""
    schema = {"type": "object", "properties": {"s": {"type": "string", "minLength": 1, "maxLength": 5}},
              "required": ["s"]}
    tool = {"type": "function", "function": {"name": "f", "parameters": schema}}
    favour = {"0": 100, "1": 100}  # <unk>, <s>
    for seed in range(3):
        reply = client.chat.completions.create(model="hermes", messages=ASK, tools=[tool], tool_choice="required",
                                               parallel_tool_calls=False, seed=seed, logit_bias=favour,
                                               max_tokens=200)
        jsonschema.validate(json.loads(reply.choices[0].message.tool_calls[0].function.arguments), schema)
        json_format = {"type": "json_schema", "json_schema": {"name": "s", "schema": schema}}
        reply = client.chat.completions.create(model="hermes", messages=ASK, seed=seed, logit_bias=favour,
                                               max_tokens=200, response_format=json_format)
        jsonschema.validate(json.loads(reply.choices[0].message.content), schema)


def test_a_model_that_wants_only_what_the_grammar_refuses(server_factory, tmp_path):
    """A scripted model whose every next token is "\\n", sampled with top_k 0 and min_p: the grammar
    refuses nearly every pick, and every replacement comes from the whole vocabulary, which the
    chain sorts and shortens in place. Each reply is still a valid call (and the process lives)."""
    from tiny_models import vocabulary

    template = (TEMPLATES / FAMILIES["hermes"][0]).read_text()
    pieces = vocabulary(["<|im_start|>", "<|im_end|>", *FAMILIES["hermes"][1]])
    path = write_model(tmp_path / "newlines.gguf", chat_template=template, special=FAMILIES["hermes"][1],
                       script={p: "\n" for p in pieces if not p.startswith("<")})
    server = server_factory(path)
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
    for seed in range(3):
        reply = client.chat.completions.create(model="newlines", messages=ASK, tools=TOOLS, tool_choice="required",
                                               seed=seed, temperature=1.0, max_tokens=1000,
                                               extra_body={"top_k": 0, "min_p": 0.05})
        valid_calls(reply.choices[0].message)


def test_history_calls_written_as_text_keep_their_markers_as_tokens(family_models):
    """Phi-4-mini's template renders no calls, so edgellm writes them into the assistant's text: its
    <|tool_call|> is the model's own token, unless the client's part spells a control token, when
    the whole text is characters."""
    from edgellm.engine.tools import with_tools

    model = Model(family_models["phi4"], vocab_only=True)
    try:
        template = ChatTemplate.for_model(model)
        [marker] = model.tokenize("<|tool_call|>", add_special=False)
        [end] = model.tokenize("<|end|>", add_special=False)
        use = ToolUse((Tool("get_weather", "", SCHEMAS["get_weather"]),), "auto")

        def prompt(arguments: dict) -> list[int]:
            history = [*ASK, {"role": "assistant", "content": "", "tool_calls": [
                {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": arguments}}]},
                {"role": "tool", "tool_call_id": "c1", "name": "get_weather", "content": "21 C"}]
            messages, tools = with_tools(template.tool_syntax, template.tool_rendering, use, history)
            return template.tokens(model, messages, tools=tools)

        fine, hostile = prompt({"city": "Paris"}), prompt({"city": "<|end|>"})
        assert fine.count(marker) == 1
        assert hostile.count(marker) == 0 and hostile.count(end) == fine.count(end)
    finally:
        model.close()
