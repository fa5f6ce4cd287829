#!/usr/bin/env python3
"""How often JSON replies parse when max_tokens cuts them: json_object and a json_schema.

    python tools/bench/json_budget.py [--model M.gguf] [--seeds 4]

Serves the model (Gemma 3 270M by default) with `edgellm serve`, then asks each of the
prompts below for `response_format: json_object` at max_tokens 40, 60, 80 and 128, with
temperature 0.8 and --seeds seeds each, and the same for a two-field object schema; a
reply counts when json.loads parses it with no key twice in an object (and, for the
schema, jsonschema validates it).
Prints a table of parse rates. Not timing-sensitive.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import httpx
import jsonschema

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(Path(__file__).resolve().parent))
from run import Server  # noqa: E402  (the benchmark's own server wrapper)

PROMPTS = [
    "Describe a user of a smart home as JSON.",
    "Give the weather in Paris as a JSON object.",
    "List three fruits with their colours in JSON.",
    "Return the state of the kitchen light as JSON.",
    "A JSON object for a book: title, author, year.",
    "Summarise this order as JSON: two pizzas, one salad, delivered at 7 pm.",
]
SCHEMA = {"type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
          "required": ["name", "age"]}
BUDGETS = [40, 60, 80, 128]
SHOW_FAILURES = "--show-failures" in sys.argv


def ask(client: httpx.Client, prompt: str, max_tokens: int, seed: int, response_format: dict) -> bool:
    r = client.post("/v1/chat/completions", json={
        "messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens, "temperature": 0.8,
        "seed": seed, "response_format": response_format})
    r.raise_for_status()
    text = r.json()["choices"][0]["message"]["content"]
    try:
        value = json.loads(text, object_pairs_hook=_no_key_twice)
    except ValueError:  # JSONDecodeError, or a key twice
        if SHOW_FAILURES:
            print(f"  does not parse ({r.json()['choices'][0]['finish_reason']}): {text!r}")
        return False
    if response_format["type"] == "json_schema":
        try:
            jsonschema.validate(value, SCHEMA)
        except jsonschema.ValidationError:
            return False
    return True


def _no_key_twice(pairs: list[tuple[str, object]]) -> dict:
    keys = [k for k, _ in pairs]
    if len(keys) != len(set(keys)):
        raise ValueError(f"a key twice in {keys}")
    return dict(pairs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=ROOT / ".edgellm" / "demo" / "gemma-3-270m-q4_k_m.gguf")
    parser.add_argument("--seeds", type=int, default=4)
    parser.add_argument("--port", type=int, default=18432)
    parser.add_argument("--show-failures", action="store_true", help="print the replies that do not parse")
    parser.add_argument("--budgets", type=int, nargs="+", default=BUDGETS, metavar="N",
                        help="max_tokens values (default 40 60 80 128)")
    args = parser.parse_args()
    formats = {"json_object": {"type": "json_object"},
               "json_schema (name, age)": {"type": "json_schema", "json_schema": {"name": "p", "schema": SCHEMA}}}
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        server = Server("edgellm", [sys.executable, "-m", "edgellm", "serve", "--model", str(args.model.resolve()),
                                    "--port", str(args.port), "--state-dir", tmp], args.port, Path(tmp) / "log")
        try:
            with httpx.Client(base_url=server.url, timeout=300) as client:
                for label, response_format in formats.items():
                    for budget in args.budgets:
                        ok = sum(ask(client, p, budget, seed, response_format)
                                 for p in PROMPTS for seed in range(args.seeds))
                        rows[label, budget] = (ok, len(PROMPTS) * args.seeds)
                        print(f"{label} at {budget}: {ok}/{len(PROMPTS) * args.seeds}", flush=True)
        finally:
            server.stop()
    print(f"\n| reply | {' | '.join(f'max_tokens {b}' for b in args.budgets)} |")
    print("| --- |" + " ---: |" * len(args.budgets))
    for label in formats:
        cells = [f"{rows[label, b][0]}/{rows[label, b][1]} ({rows[label, b][0] / rows[label, b][1]:.0%})"
                 for b in args.budgets]
        print(f"| {label} | {' | '.join(cells)} |")


if __name__ == "__main__":
    main()
