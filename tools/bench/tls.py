#!/usr/bin/env python3
"""What TLS costs: the same streamed completions from edgellm over HTTPS (its own certificate,
pinned) and over plain HTTP, on loopback.

    python tools/bench/tls.py [--model MODEL.gguf] [--rounds 3] [--requests 10] [--tokens 128]

Per round, one server at a time: edgellm with [server] tls = {cert}, edgellm plain, and the
anchor, llama.cpp's llama-server (plain: it has no TLS in this build) from the same vendored
source. Each request opens its own connection, as the other benchmarks do, so its time to
first text includes the TCP and TLS handshakes; the handshake alone is timed too (connect,
handshake, close, 50 times). Measured at the client: time to the first text, and the mean
time between text pieces (1000 / that = streaming tokens/s). Run on a quiet machine.
"""

from __future__ import annotations

import json
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
import run  # noqa: E402
from ollama import timed  # noqa: E402  (one streamed request, timed at the client)
from run import PROMPT  # noqa: E402

from edgellm import tls  # noqa: E402


def handshakes(port: int, context: object, n: int = 50) -> float:
    """Median milliseconds of a TCP connect and a TLS handshake (None: TCP alone)."""
    times = []
    for _ in range(n):
        started = time.perf_counter()
        with socket.create_connection(("127.0.0.1", port)) as raw:
            if context is not None:
                with context.wrap_socket(raw):  # type: ignore[attr-defined]
                    pass
        times.append((time.perf_counter() - started) * 1000)
    return statistics.median(times)


def main() -> int:
    args, load, bin_dir, out = run.streaming_setup(__doc__, 18497, rounds=3)
    certificate = tls.Directory(Path(tempfile.mkdtemp()) / "tls")
    fingerprint = certificate.make(["localhost"])
    rows: dict[str, list[dict]] = {"https": [], "http": [], "llama-server": []}
    shakes: dict[str, list[float]] = {"https": [], "http": []}
    body = {"max_tokens": args.tokens, "temperature": 0, "stream": True}

    for rnd in range(args.rounds):
        for name in ("https", "http", "llama-server"):
            log = out / f"{name}-{rnd}.log"
            if name == "llama-server":
                server = run.start("llama-server", args.model, args.port, args, bin_dir, log)
            elif name == "https":
                server = run.start("edgellm", args.model, args.port, args, bin_dir, log,
                                   extra_toml=f'[server]\ntls = {{cert = "{certificate.file("device.pem")}"}}\n',
                                   verify=False)  # readiness only: the requests below pin it
            else:
                server = run.start("edgellm", args.model, args.port, args, bin_dir, log)
            try:
                context = tls.pinned_context("127.0.0.1", args.port, fingerprint) if name == "https" else None
                if name in shakes:
                    shakes[name].append(handshakes(args.port, context))
                with httpx.Client(timeout=600, verify=context or True) as client:
                    timed(client, server.url, "/v1/completions", {**body, "prompt": "warm up"}, "choices")
                    for i in range(args.requests):
                        rows[name].append(timed(client, server.url, "/v1/completions",
                                                {**body, "prompt": PROMPT.format(i=i)}, "choices"))
            finally:
                server.stop()

    def median(name: str, key: str) -> float:
        return statistics.median(r[key] for r in rows[name] if r[key] is not None)

    summary: dict[str, object] = {
        name: {"ttft_ms": round(median(name, "ttft_ms"), 2), "ms_per_piece": round(median(name, "ms_per_piece"), 3),
               "tokens_per_s": round(1000 / median(name, "ms_per_piece"), 1)} for name in rows}
    summary["connect_ms"] = {name: round(statistics.median(v), 3) for name, v in shakes.items()}
    for key in ("ttft_ms", "ms_per_piece"):
        summary[f"{key} https over http"] = round(median("https", key) / median("http", key), 3)
        summary[f"{key} https over llama-server"] = round(median("https", key) / median("llama-server", key), 3)
    print(json.dumps(summary, indent=2))
    run.write_summary(out, load, args, [summary], tokens=args.tokens)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
