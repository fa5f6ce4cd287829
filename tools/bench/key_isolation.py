#!/usr/bin/env python3
"""What per-key prompt caches cost a box whose keys all belong to one user.

    python tools/bench/key_isolation.py --model MODEL.gguf [--rounds 3] [--system-tokens 2000]

Cached prompts serve only the API key that sent them ([engine] prompt_cache_shared = false,
the default), so one key cannot learn another's prompts from cached_tokens or TTFT. The
price: a second key sending the same long prompt (one user's phone after their laptop, two
hubs with the same devices) pays the whole prefill once more. This measures it: the hub
workload of prefix.py (a ~2,000-token system prompt, a short user turn) from key A twice,
then from key B twice, with the partitions per key and with them shared, one server at a
time, alternating over --rounds; TTFT medians in ms. Run on a quiet machine.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import prefix  # noqa: E402  (the hub workload and the streamed request)
import run  # noqa: E402
from run import Model  # noqa: E402

KEYS = ("bench-key-a-0123456789abcdef", "bench-key-b-0123456789abcdef")
STEPS = ("A first", "A again", "B first", "B again")


def run_round(shared: bool, model: Path, args: argparse.Namespace, out: Path, rnd: int, work: prefix.Workload,
              ban: dict) -> dict:
    name = "shared" if shared else "per-key"
    log = out / f"edgellm-{name}-{rnd}.log"
    server = run.start("edgellm", model, args.port, args, Path(), log, state_dir=out / f"state-{name}-{rnd}",
                       engine_lines=[f"prompt_cache_shared = {'true' if shared else 'false'}"],
                       extra_toml=f"[server]\napi_keys = {json.dumps(KEYS)}\n")
    try:
        keys = [KEYS[0], KEYS[0], KEYS[1], KEYS[1]]
        return {step: prefix.one(server, work.hub(i), args, ban, {"Authorization": f"Bearer {key}"})
                for i, (step, key) in enumerate(zip(STEPS, keys, strict=True))}
    finally:
        server.stop()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--system-tokens", type=int, default=2000)
    parser.add_argument("--first-tokens", type=int, default=300)
    parser.add_argument("--turns", type=int, default=1)
    parser.add_argument("--max-tokens", type=int, default=8)
    run.server_arguments(parser, 18490)
    args = parser.parse_args()
    load = run.print_load_average()
    out = run.results_dir(args.out) / "key-isolation"
    out.mkdir(parents=True)
    vocab = Model(args.model, vocab_only=True)
    ban = {str(t): -100 for t in vocab.eog_tokens}
    work = prefix.Workload(vocab, args)
    vocab.close()
    rounds = []
    for rnd in range(args.rounds):
        order = [False, True] if rnd % 2 == 0 else [True, False]
        rounds.append({("shared" if s else "per-key"): run_round(s, args.model, args, out, rnd, work, ban)
                       for s in order})
    table = [f"{args.model.name}: {work.system_tokens}-token system prompt, {args.rounds} round(s), "
             f"load average {load[0]:.2f} at start", "",
             "| step | per-key TTFT ms (cached) | shared TTFT ms (cached) |", "| --- | --- | --- |"]
    for step in STEPS:
        cells = []
        for mode in ("per-key", "shared"):
            ttfts = [r[mode][step]["ttft_ms"] for r in rounds]
            cached = [r[mode][step]["cached_tokens"] for r in rounds]
            cells.append(f"{statistics.median(ttfts):.1f} ({statistics.median(cached):.0f})")
        table.append(f"| {step} | {cells[0]} | {cells[1]} |")
    text = "\n".join(table) + "\n"
    run.write_results(out, {"model": args.model.name, "rounds": rounds}, text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
