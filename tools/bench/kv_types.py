#!/usr/bin/env python3
"""KV cache types: the memory each saves, and how often greedy output still agrees with f16.

    python tools/bench/kv_types.py [--model M.gguf] [--ctx 4096] [--tokens 48]

Starts `edgellm serve` once per [engine] cache_type_k/cache_type_v pair (f16, q8_0, q4_0),
sends the same fixed prompts greedily (temperature 0, max_tokens --tokens) to each, and
compares every reply with f16's: the share of replies that are identical, and the mean share
of each reply that agrees with f16's before the first difference. Memory: llama.cpp's own
"llama_kv_cache: size = ..." lines (the server logs at debug level), edgellm's estimate
(/admin/models kv_cache.estimate_bytes), and the server's RSS once loaded. Not timing-
sensitive: it may run beside other work.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import tempfile
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(Path(__file__).resolve().parent))
from run import Server  # noqa: E402  (the benchmark's own server wrapper)

# f16 twice: the second run is the control (greedy output must agree with itself, or the rest means nothing).
TYPES = [("f16", "f16"), ("f16", "f16"), ("q8_0", "q8_0"), ("q8_0", "q4_0"), ("q4_0", "q4_0")]
PROMPTS = [
    "The history of the printing press begins in",
    "To make a good cup of tea, first",
    "The three largest cities in Europe are",
    "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n",
    "Photosynthesis is the process by which",
    "Dear neighbour, I am writing to let you know that",
    "The main differences between a violin and a viola are",
    "In 1969, the first humans to walk on the Moon",
    "A recipe for bread needs flour, water,",
    "The rules of chess say that a pawn",
    "Q: What is the boiling point of water at sea level?\nA:",
    "The Raspberry Pi is a small computer that",
    "Once upon a time, in a village by the sea,",
    "The French Revolution began in 1789 when",
    "SELECT name, age FROM users WHERE",
    "The kitchen light is on. The hallway light is off. Turn off every light that is",
]


def agreement(a: str, b: str) -> float:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n / max(len(a), len(b), 1)


def run(model: Path, type_k: str, type_v: str, args: argparse.Namespace, work: Path, index: int) -> dict:
    log = work / f"{index}-{type_k}-{type_v}.log"
    config = log.with_suffix(".toml")
    config.write_text(f'[engine]\nn_ctx = {args.ctx}\ncache_type_k = "{type_k}"\ncache_type_v = "{type_v}"\n'
                      '[log]\nlevel = "debug"\n')
    server = Server(f"edgellm {type_k}/{type_v}", [sys.executable, "-m", "edgellm", "serve", "--model", str(model),
                                                   "--port", str(args.port), "--config", str(config),
                                                   "--state-dir", str(work / "state")], args.port, log)
    try:
        replies = []
        with httpx.Client(base_url=server.url, timeout=300) as client:
            for prompt in PROMPTS:
                r = client.post("/v1/completions", json={"prompt": prompt, "max_tokens": args.tokens,
                                                         "temperature": 0})
                r.raise_for_status()
                replies.append(r.json()["choices"][0]["text"])
            (entry,) = client.get("/admin/models").json()["data"]
        rss = int(Path(f"/proc/{server.proc.pid}/status").read_text().split("VmRSS:")[1].split()[0]) * 1024
    finally:
        server.stop()
    sizes = [float(m) for m in re.findall(r"llama_kv_cache: size = +([0-9.]+) MiB", log.read_text())]
    return {"type_k": type_k, "type_v": type_v, "replies": replies, "kv_mib_llama": round(sum(sizes), 1),
            "kv_mib_estimate": round(entry["kv_cache"]["estimate_bytes"] / 2**20, 1), "rss_mib": round(rss / 2**20, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=ROOT / ".edgellm" / "demo" / "gemma-3-270m-q4_k_m.gguf")
    parser.add_argument("--ctx", type=int, default=4096)
    parser.add_argument("--tokens", type=int, default=48)
    parser.add_argument("--port", type=int, default=18431)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        results = [run(args.model.resolve(), k, v, args, Path(tmp), i) for i, (k, v) in enumerate(TYPES)]
    base = results[0]
    rows = ["| K / V | KV MiB (llama.cpp) | estimate MiB | saved vs f16 | RSS MiB | identical replies | "
            "mean agreement |", "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in results[1:]:
        same = sum(a == b for a, b in zip(r["replies"], base["replies"], strict=True))
        agree = sum(agreement(a, b) for a, b in zip(r["replies"], base["replies"], strict=True)) / len(PROMPTS)
        saved = base["kv_mib_llama"] - r["kv_mib_llama"]
        rows.append(f"| {r['type_k']} / {r['type_v']} | {r['kv_mib_llama']} | {r['kv_mib_estimate']} | "
                    f"{saved:.1f} MiB | {r['rss_mib']} | {same}/{len(PROMPTS)} | {agree:.0%} |")
    print(f"{args.model.name}, n_ctx {args.ctx}, {len(PROMPTS)} prompts x {args.tokens} tokens, greedy\n")
    print("\n".join(rows))
    print(json.dumps([{k: v for k, v in r.items() if k != "replies"} for r in results]))


if __name__ == "__main__":
    main()
