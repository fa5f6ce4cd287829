#!/usr/bin/env python3
"""What Ollama's API costs over /v1: the same generation rendered as NDJSON instead of SSE.

    python tools/bench/ollama.py [--model MODEL.gguf] [--rounds 2] [--requests 10] [--tokens 128]

An edgellm server; for each request, in turn (each goes first every other time), the same
prompt streamed through POST /api/generate (raw, NDJSON, the official `ollama` client's wire
format) and POST /v1/completions (SSE), greedy, so both generate the same tokens. Measured
at the client: time to the first text, and the mean time between text pieces. The anchor,
llama.cpp's own llama-server from the same vendored source, streams the same /v1 request in
the same run, after edgellm in each round. Ratios: /api over /v1 (the front end's cost), and each over llama-server.
Run on a quiet machine.
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
import run  # noqa: E402
from run import PROMPT  # noqa: E402


def timed(client: httpx.Client, url: str, path: str, body: dict, text: str) -> dict:
    """Stream one request; `text`: where a line's text is (response for NDJSON, choices for SSE)."""
    sent = time.perf_counter()
    stamps: list[float] = []
    # A connection per request: llama-server's HTTP library drops a kept-alive one now and then.
    with client.stream("POST", url + path, json=body, headers={"connection": "close"}) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if text == "response":
                piece = json.loads(line).get("response") if line else ""
            elif line.startswith("data: {"):
                piece = json.loads(line[6:])["choices"][0].get("text")
            else:
                piece = ""
            if piece:
                stamps.append(time.perf_counter())
    gaps = [b - a for a, b in zip(stamps, stamps[1:], strict=False)]
    return {"ttft_ms": (stamps[0] - sent) * 1000, "ms_per_piece": statistics.mean(gaps) * 1000 if gaps else None,
            "pieces": len(stamps)}


def main() -> int:
    args, load, bin_dir, out = run.streaming_setup(__doc__, 18496, rounds=2)
    rows: dict[str, list[dict]] = {"api": [], "v1": [], "llama-server": []}

    def ask(i: int) -> tuple[dict, dict]:
        prompt = PROMPT.format(i=i)
        ollama_body = {"model": args.model.stem, "prompt": prompt, "raw": True, "stream": True,
                       "options": {"num_predict": args.tokens, "temperature": 0}}
        openai_body = {"prompt": prompt, "max_tokens": args.tokens, "temperature": 0, "stream": True}
        return ollama_body, openai_body

    for rnd in range(args.rounds):  # the servers one at a time, edgellm then llama-server, each round
        server = run.start("edgellm", args.model, args.port, args, bin_dir, out / f"edgellm-{rnd}.log")
        try:
            with httpx.Client(timeout=600) as client:
                for i in range(args.requests):
                    ollama_body, openai_body = ask(i)
                    pair = [("api", "/api/generate", ollama_body, "response"),
                            ("v1", "/v1/completions", openai_body, "choices")]
                    for name, path, body, text in pair if i % 2 == 0 else pair[::-1]:
                        rows[name].append(timed(client, server.url, path, body, text))
        finally:
            server.stop()
        anchor = run.start("llama-server", args.model, args.port, args, bin_dir, out / f"llama-server-{rnd}.log")
        try:
            with httpx.Client(timeout=600) as client:
                for i in range(args.requests):
                    rows["llama-server"].append(timed(client, anchor.url, "/v1/completions", ask(i)[1], "choices"))
        finally:
            anchor.stop()

    def median(name: str, key: str) -> float:
        return statistics.median(r[key] for r in rows[name] if r[key] is not None)

    summary = {name: {key: round(median(name, key), 3) for key in ("ttft_ms", "ms_per_piece", "pieces")}
               for name in rows}
    for key in ("ttft_ms", "ms_per_piece"):
        summary[f"{key} ratio /api over /v1"] = round(median("api", key) / median("v1", key), 3)
        summary[f"{key} ratio /api over llama-server"] = round(median("api", key) / median("llama-server", key), 3)
    print(json.dumps(summary, indent=2))
    run.write_summary(out, load, args, [summary], tokens=args.tokens)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
