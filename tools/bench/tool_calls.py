#!/usr/bin/env python3
"""What tool calls cost, and how often a forced one validates.

    python tools/bench/tool_calls.py --model MODEL.gguf [--requests 40] [--tiny]

A home-automation workload: six tools (lights by entity, a thermostat range, weather by
city, a timer, music, a scene), and short requests to the box. For each request, in turn:

- a forced call (tool_choice required, streamed): is every call valid (jsonschema, the
  oracle)? Its time to the first tool-call byte (the chunk with the call's name), its time to
  the first token and its time per token (the server's own histograms, read around each
  request: edgellm_time_to_first_token_seconds, edgellm_inter_token_latency_seconds);
- a plain completion of the same prompt (the tools described in the same system message the
  template gets, no tools field, so no grammar) for as many tokens (ignore_eos; 32 when it
  goes first): the same. Each goes first every other request, as the second one finds the
  whole prompt cached.

The ratios (forced / plain) are the grammar's cost; same server, same run, alternating, so
the machine's state is the same for both. The server's histogram gives the mean time per
token, HTTP and all; the same pairs are then run in this process straight on a runner, for the
engine's own median time between tokens, without the front end. `--tiny` also counts the share of valid forced
calls from tiny random models carrying each family's real template. Run on a quiet machine.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import httpx
import jsonschema

sys.path.insert(0, str(Path(__file__).resolve().parent))
import run  # noqa: E402
from run import ROOT  # noqa: E402

from edgellm.engine.chat import ChatTemplate  # noqa: E402
from edgellm.engine.model import Model  # noqa: E402
from edgellm.engine.tools import Tool, ToolUse, with_tools  # noqa: E402

ENTITIES = [f"light.{room}" for room in ("kitchen", "hall", "bedroom", "bathroom", "desk", "porch", "garage")]
TOOLS = [
    {"type": "function", "function": {"name": "turn_on", "description": "Turn a device on.", "parameters": {
        "type": "object", "properties": {"entity": {"enum": ENTITIES},
                                         "brightness": {"type": "integer", "minimum": 0, "maximum": 100}},
        "required": ["entity"]}}},
    {"type": "function", "function": {"name": "turn_off", "description": "Turn a device off.", "parameters": {
        "type": "object", "properties": {"entity": {"enum": ENTITIES}}, "required": ["entity"]}}},
    {"type": "function", "function": {"name": "set_temperature", "description": "Set the thermostat.",
                                      "parameters": {"type": "object", "properties": {
                                          "celsius": {"type": "integer", "minimum": 10, "maximum": 30}},
                                          "required": ["celsius"]}}},
    {"type": "function", "function": {"name": "get_weather", "description": "The weather in a city.",
                                      "parameters": {"type": "object", "properties": {
                                          "city": {"type": "string", "minLength": 1, "maxLength": 40},
                                          "days": {"type": "integer", "minimum": 1, "maximum": 7}},
                                          "required": ["city"]}}},
    {"type": "function", "function": {"name": "set_timer", "description": "Start a timer.", "parameters": {
        "type": "object", "properties": {"minutes": {"type": "integer", "minimum": 1, "maximum": 600},
                                         "label": {"type": "string", "maxLength": 40}},
        "required": ["minutes"]}}},
    {"type": "function", "function": {"name": "play_music", "description": "Play music.", "parameters": {
        "type": "object", "properties": {"query": {"type": "string", "maxLength": 80},
                                         "shuffle": {"type": "boolean"}}, "required": ["query"]}}},
]
SCHEMAS = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}
ASKS = ["Turn on the kitchen light.", "It's cold, set the heating to 22.", "Will it rain in Lyon tomorrow?",
        "Start a 10 minute timer for the pasta.", "Play some jazz.", "Switch off the porch light.",
        "Dim the bedroom light to 30 percent.", "Weather in Oslo this week?", "Turn off the garage light.",
        "Play the Beatles, shuffled."]


def histogram(client: httpx.Client, url: str, name: str) -> tuple[float, float]:
    """A histogram's sum and count, over all its labels."""
    total = count = 0.0
    for line in client.get(url + "/metrics").text.splitlines():
        if line.startswith(name + "_sum"):
            total += float(line.split()[-1])
        elif line.startswith(name + "_count"):
            count += float(line.split()[-1])
    return total, count


def stream(client: httpx.Client, url: str, body: dict) -> dict:
    """One streamed chat request: time to the first content or call byte, the calls reassembled,
    the usage, and the server's mean time to first token and between tokens for it."""
    before = [histogram(client, url, n) for n in ("edgellm_time_to_first_token_seconds",
                                                  "edgellm_inter_token_latency_seconds")]
    sent = time.perf_counter()
    first = None
    calls: dict[int, list[str]] = {}
    usage = finish = None
    with client.stream("POST", url + "/v1/chat/completions", json={**body, "stream": True,
                                                                   "stream_options": {"include_usage": True}}) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if not line.startswith("data: {"):
                continue
            chunk = json.loads(line[6:])
            usage = chunk.get("usage") or usage
            if not chunk.get("choices"):
                continue
            choice = chunk["choices"][0]
            finish = choice.get("finish_reason") or finish
            delta = choice.get("delta", {})
            pieces = delta.get("tool_calls") or []
            if delta.get("content") or pieces:
                first = first or time.perf_counter()
            for piece in pieces:
                entry = calls.setdefault(piece["index"], ["", ""])
                entry[0] = piece.get("function", {}).get("name") or entry[0]
                entry[1] += piece.get("function", {}).get("arguments") or ""
    assert first is not None and usage is not None
    after = [histogram(client, url, n) for n in ("edgellm_time_to_first_token_seconds",
                                                 "edgellm_inter_token_latency_seconds")]
    (ttft, _), (itl, gaps) = [(a[0] - b[0], a[1] - b[1]) for a, b in zip(after, before, strict=True)]
    return {"first_byte_ms": (first - sent) * 1000, "ttft_ms": ttft * 1000,
            "ms_per_token": itl * 1000 / gaps if gaps else None, "finish": finish,
            "calls": list(calls.values()), "tokens": usage["completion_tokens"]}


def valid(result: dict) -> bool:
    if result["finish"] != "tool_calls" or not result["calls"]:
        return False
    try:
        for name, arguments in result["calls"]:
            jsonschema.validate(json.loads(arguments), SCHEMAS[name])
    except (ValueError, KeyError, jsonschema.ValidationError):
        return False
    return True


def measure(model_path: Path, args: argparse.Namespace, out: Path) -> dict:
    vocab = Model(model_path, vocab_only=True)
    template = ChatTemplate.for_model(vocab)
    syntax, where = template.tool_syntax, template.tool_rendering
    vocab.close()
    if where != "text":  # else the plain request could not have the same prompt
        raise SystemExit(f"{model_path.name}: its template renders tools itself; the timing needs one that does not")
    use = ToolUse(tuple(Tool(t["function"]["name"], t["function"]["description"], t["function"]["parameters"])
                        for t in TOOLS), "required")
    server = run.start("edgellm", model_path, args.port, args, Path(), out / "edgellm.log")
    rows = []
    try:
        with httpx.Client(timeout=600) as client:
            for i in range(args.requests):
                messages = [{"role": "user", "content": ASKS[i % len(ASKS)] + f" (request {i})"}]
                common = {"temperature": args.temperature, "seed": i, "max_tokens": 256}
                forced_body = {**common, "messages": messages, "tools": TOOLS, "tool_choice": "required",
                               "parallel_tool_calls": False}
                # The same prompt without the grammar: the tools as the template gets them, no tools field.
                described, _ = with_tools(syntax, where, use, messages)
                plain_body = {**common, "messages": described, "ignore_eos": True}
                # Whichever goes second finds the whole prompt cached: each goes first every other time.
                if i % 2 == 0:
                    forced = stream(client, server.url, forced_body)
                    plain = stream(client, server.url, {**plain_body, "max_tokens": forced["tokens"]})
                else:
                    plain = stream(client, server.url, {**plain_body, "max_tokens": 32})
                    forced = stream(client, server.url, forced_body)
                rows.append({"valid": valid(forced), "tokens": forced["tokens"],
                             **{f"{kind}_{key}": result[key] for kind, result in (("forced", forced), ("plain", plain))
                                for key in ("first_byte_ms", "ttft_ms", "ms_per_token")}})
                print(json.dumps(rows[-1]), flush=True)
    finally:
        server.stop()

    def median(key: str) -> float:
        return statistics.median(r[key] for r in rows if r[key] is not None)

    return {
        "model": model_path.name, "family": syntax.family, "tools rendered": where, "requests": len(rows),
        "valid share": sum(r["valid"] for r in rows) / len(rows),
        "median call tokens": median("tokens"),
        **{f"{key} (forced / plain)": [round(median(f"forced_{key}"), 2), round(median(f"plain_{key}"), 2)]
           for key in ("first_byte_ms", "ttft_ms", "ms_per_token")},
        **{f"{key} ratio": round(median(f"forced_{key}") / median(f"plain_{key}"), 3)
           for key in ("first_byte_ms", "ttft_ms", "ms_per_token")},
    }


def engine_per_token(model_path: Path, args: argparse.Namespace) -> dict:
    """The median time between tokens of forced calls and of plain completions, on a runner here."""
    import asyncio

    from edgellm.config import EngineConfig
    from edgellm.engine.runner import Runner
    from edgellm.engine.sampling import Sampler, SamplingParams
    from edgellm.engine.scheduler import Prepared
    from edgellm.engine.tools import call_grammar

    model = Model(model_path)
    template = ChatTemplate.for_model(model)
    runner = Runner(model, EngineConfig(n_ctx=args.ctx, n_threads=args.threads, parallel=args.slots))
    use = ToolUse(tuple(Tool(t["function"]["name"], t["function"]["description"], t["function"]["parameters"])
                        for t in TOOLS), "required", parallel=False)

    async def gaps(prompt: list[int], sampler: Sampler, n: int, visible: frozenset[int]) -> float:
        stream = runner.submit(Prepared(prompt, sampler, n, visible=visible))
        stream.when_finished(sampler.close)
        times = [time.perf_counter() async for _ in stream]
        return statistics.median(b - a for a, b in zip(times[1:-2], times[2:-1], strict=True)) * 1000

    medians: dict[str, list[float]] = {"forced": [], "plain": []}
    try:
        for i in range(args.requests):
            asked = [{"role": "user", "content": ASKS[i % len(ASKS)] + f" (request {i})"}]
            messages, _ = with_tools(template.tool_syntax, template.tool_rendering, use, asked)
            prompt = template.tokens(model, messages)
            for kind in (("forced", "plain") if i % 2 == 0 else ("plain", "forced")):
                if kind == "forced":
                    sampler = Sampler(model, SamplingParams(temperature=args.temperature, seed=i),
                                      calls=call_grammar(template.tool_syntax, use), visible=template.tool_markers)
                    medians[kind].append(asyncio.run(gaps(prompt, sampler, 256, template.tool_markers)))
                else:
                    sampler = Sampler(model, SamplingParams(temperature=args.temperature, seed=i, ignore_eos=True))
                    medians[kind].append(asyncio.run(gaps(prompt, sampler, 32, frozenset())))
    finally:
        runner.close()
        model.close()
    forced, plain = (statistics.median(medians[k]) for k in ("forced", "plain"))
    return {"engine ms between tokens (forced / plain)": [round(forced, 2), round(plain, 2)],
            "engine ms between tokens ratio": round(forced / plain, 3)}


def tiny_valid_shares(out: Path, requests: int) -> dict:
    """Forced calls from tiny random models with each family's real template: the share that validate."""
    sys.path.insert(0, str(ROOT / "tests"))
    from test_tools import FAMILIES, TEMPLATES
    from tiny_models import write_model

    from edgellm.store.registry import Registry

    state = out / "tiny-state"
    registry = Registry(state).open()
    for i, (family, (name, special)) in enumerate(FAMILIES.items()):
        registry.add(write_model(out / f"{family}.gguf", seed=40 + i, chat_template=(TEMPLATES / name).read_text(),
                                 special=special), alias=family)
    cmd = [sys.executable, "-m", "edgellm", "serve", "--port", "18495", "--state-dir", str(state)]
    server = run.Server("edgellm", cmd, 18495, out / "tiny.log")
    shares = {}
    try:
        with httpx.Client(timeout=600) as client:
            for family in FAMILIES:
                ok = 0
                for i in range(requests):
                    body = {"model": family, "messages": [{"role": "user", "content": ASKS[i % len(ASKS)]}],
                            "tools": TOOLS, "tool_choice": "required", "seed": i, "temperature": 1.0,
                            "max_tokens": 2000}
                    ok += valid(stream(client, server.url, body))
                shares[family] = f"{ok}/{requests}"
    finally:
        server.stop()
    return shares


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--requests", type=int, default=40)
    parser.add_argument("--temperature", type=float, default=0.7)
    parser.add_argument("--tiny", action="store_true")
    run.server_arguments(parser, 18494)
    args = parser.parse_args()

    load = run.print_load_average()
    out = run.results_dir(args.out) / "tool-calls"
    out.mkdir(parents=True)
    result = {"load average before": load, **measure(args.model, args, out), **engine_per_token(args.model, args)}
    if args.tiny:
        result["tiny models: valid forced calls"] = tiny_valid_shares(out, 20)
    (out / "results.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
