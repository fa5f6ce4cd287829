#!/usr/bin/env python3
"""edgellm against llama.cpp's own llama-server, built from the same vendored llama.cpp.

Method (../../shared/BENCHMARKS.md in the project's notes; summarised in README.md here):
same model, context, threads, prompts and forced reply length (ignore_eos),
temperature 0; servers run one at a time, alternating A B A B for --rounds
rounds; medians per server and the edgellm/llama-server ratio per round.
Also llama-bench's tg figure for the same model and threads.

Run on a quiet machine: OpenMP threads spin, and any other busy process on a
two-core board cuts llama.cpp's speed several times over.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import platform
import signal
import socket
import statistics
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import httpx
import psutil

SDIST = "llama_cpp_python-0.3.36.tar.gz"
SDIST_SHA256 = "832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e"
CACHE = Path(os.environ.get("EDGELLM_BENCH_CACHE", Path.home() / ".cache" / "edgellm-bench"))
ROOT = Path(__file__).resolve().parents[2]
PROMPT = ("Request {i}. The history of the printing press begins in the fifteenth century, when a goldsmith "
          "in Mainz combined movable metal type, an oil-based ink and a wooden screw press. Within fifty years")


# --- the anchor: llama-server and llama-bench from the vendored llama.cpp -------------------

def build_llama_cpp(jobs: int) -> Path:
    """Build llama-server and llama-bench once into the cache; return the bin directory."""
    source = CACHE / "llama_cpp_python-0.3.36" / "vendor" / "llama.cpp"
    build = CACHE / "build"
    bin_dir = build / "bin"
    if (bin_dir / "llama-server").exists() and (bin_dir / "llama-bench").exists():
        return bin_dir
    CACHE.mkdir(parents=True, exist_ok=True)
    sdist = CACHE / SDIST
    if not sdist.exists():
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
                        "-d", str(CACHE), "llama-cpp-python==0.3.36"], check=True)
    digest = hashlib.sha256(sdist.read_bytes()).hexdigest()
    if digest != SDIST_SHA256:
        raise SystemExit(f"{sdist}: SHA-256 {digest} is not the pinned sdist's {SDIST_SHA256}")
    if not source.exists():
        with tarfile.open(sdist) as tar:
            tar.extractall(CACHE, filter="data")
    subprocess.run(["cmake", "-S", str(source), "-B", str(build), "-DCMAKE_BUILD_TYPE=Release",
                    "-DLLAMA_CURL=OFF", "-DLLAMA_BUILD_SERVER=ON", "-DLLAMA_BUILD_TESTS=OFF"], check=True)
    subprocess.run(["cmake", "--build", str(build), "-j", str(jobs), "--target", "llama-server", "llama-bench"],
                   check=True)
    return bin_dir


def llama_bench(bin_dir: Path, model: Path, threads: int, n_gen: int) -> dict:
    out = subprocess.run([str(bin_dir / "llama-bench"), "-m", str(model), "-t", str(threads), "-p", "64",
                          "-n", str(n_gen), "-r", "3", "-o", "json"], capture_output=True, text=True, check=True)
    results = {}
    for row in json.loads(out.stdout):
        kind = f"pp{row['n_prompt']}" if row["n_prompt"] else f"tg{row['n_gen']}"
        results[kind] = round(row["avg_ts"], 1)
    return results


# --- servers ---------------------------------------------------------------------------------

class Server:
    def __init__(self, name: str, cmd: list[str], port: int, log: Path) -> None:
        self.name, self.port = name, port
        self.url = f"http://127.0.0.1:{port}"
        with socket.socket() as probe:  # a leftover server on the port would answer in our place
            if probe.connect_ex(("127.0.0.1", port)) == 0:
                raise SystemExit(f"port {port} is already in use; stop whatever listens there first")
        self._log = open(log, "wb")
        # Its own session, so stop() can end a wrapper (BENCH_WRAP) and what it started together.
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=self._log, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise SystemExit(f"{name} exited early; see {log}")
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise SystemExit(f"{name} did not become ready; see {log}")

    def peak_rss_mib(self) -> float:
        """Peak RSS of the server (the largest process in its tree, in case BENCH_WRAP wraps it)."""
        peaks = [0.0]
        root = psutil.Process(self.proc.pid)
        for proc in [root, *root.children(recursive=True)]:
            for line in Path(f"/proc/{proc.pid}/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    peaks.append(int(line.split()[1]) / 1024)
        return round(max(peaks), 1)

    def stop(self) -> None:
        os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        self._log.close()


def start(name: str, model: Path, port: int, args: argparse.Namespace, bin_dir: Path, out: Path,
          rnd: int) -> Server:
    log = out / f"{name}-round{rnd + 1}.log"
    if name == "edgellm":
        config = out / "edgellm.toml"
        config.write_text(f"[engine]\nn_ctx = {args.ctx}\nn_threads = {args.threads}\n")
        cmd = [sys.executable, "-m", "edgellm", "serve", "--model", str(model), "--port", str(port),
               "--config", str(config), "--state-dir", str(out / "state")]
    else:
        cmd = [*os.environ.get("BENCH_WRAP", "").split(), str(bin_dir / "llama-server"), "-m", str(model), "--port", str(port), "-c", str(args.ctx),
               "-t", str(args.threads), "-tb", str(args.threads), "-np", str(args.slots), "--no-webui"]
    return Server(name, cmd, port, log)


# --- load ------------------------------------------------------------------------------------

async def stream_once(client: httpx.AsyncClient, url: str, i: int, n_tokens: int) -> dict:
    body = {"prompt": PROMPT.format(i=i), "max_tokens": n_tokens, "temperature": 0, "stream": True,
            "ignore_eos": True, "cache_prompt": False}
    times = []
    sent = time.perf_counter()
    async with client.stream("POST", url + "/v1/completions", json=body) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            if line.startswith("data: {"):
                chunk = json.loads(line[6:])
                if chunk.get("choices") and chunk["choices"][0].get("text"):
                    times.append(time.perf_counter())
    return {"sent": sent, "first": times[0], "last": times[-1], "chunks": len(times)}


async def measure(server: Server, n_tokens: int, concurrency: int, repeats: int, start_index: int) -> dict:
    # A fresh connection per request: llama-server's HTTP library closes kept-alive
    # connections after a few requests, and reusing one it just closed fails the request.
    async with httpx.AsyncClient(timeout=300, limits=httpx.Limits(max_keepalive_connections=0)) as client:
        await stream_once(client, server.url, -1, 16)  # warm-up
        if concurrency == 1:
            runs = [await stream_once(client, server.url, start_index + k, n_tokens) for k in range(repeats)]
            return {
                "decode_tps": statistics.median((n_tokens - 1) / (r["last"] - r["first"]) for r in runs),
                "ttft_ms": statistics.median((r["first"] - r["sent"]) * 1000 for r in runs),
            }
        t0 = time.perf_counter()
        runs = await asyncio.gather(*(stream_once(client, server.url, start_index + k, n_tokens)
                                      for k in range(concurrency)))
        wall = max(r["last"] for r in runs) - t0
        return {"aggregate_tps": concurrency * n_tokens / wall,
                "ttft_ms": statistics.median((r["first"] - r["sent"]) * 1000 for r in runs)}


def run_round(name: str, model: Path, args: argparse.Namespace, bin_dir: Path, out: Path, rnd: int) -> dict:
    server = start(name, model, args.port + (rnd % 2), args, bin_dir, out, rnd)
    try:
        result = {"single": asyncio.run(measure(server, args.tokens, 1, args.repeats, rnd * 100))}
        for c in args.concurrency:
            result[f"c{c}"] = asyncio.run(measure(server, args.tokens, c, 1, rnd * 100 + 50))
        result["peak_rss_mib"] = server.peak_rss_mib()
        return result
    finally:
        server.stop()


# --- report ----------------------------------------------------------------------------------

def summarise(rounds: list[dict], concurrency: list[int]) -> list[tuple[str, float, float, float]]:
    """(metric, edgellm median, llama-server median, median of per-round ratios)."""
    metrics = [("single-stream decode tok/s", lambda r: r["single"]["decode_tps"]),
               ("single-stream TTFT ms", lambda r: r["single"]["ttft_ms"])]
    metrics += [(f"{c} streams aggregate tok/s", lambda r, c=c: r[f"c{c}"]["aggregate_tps"]) for c in concurrency]
    metrics += [("peak RSS MiB", lambda r: r["peak_rss_mib"])]
    rows = []
    for label, get in metrics:
        ours = [get(r["edgellm"]) for r in rounds]
        theirs = [get(r["llama-server"]) for r in rounds]
        ratios = [a / b for a, b in zip(ours, theirs)]
        rows.append((label, statistics.median(ours), statistics.median(theirs), statistics.median(ratios)))
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=3, help="single-stream requests per round")
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--ctx", type=int, default=4096)
    parser.add_argument("--threads", type=int, default=psutil.cpu_count(logical=False) or 1)
    parser.add_argument("--slots", type=int, default=4, help="llama-server -np")
    parser.add_argument("--concurrency", type=int, nargs="*", default=[4, 8])
    parser.add_argument("--port", type=int, default=18480)
    parser.add_argument("--out", type=Path, default=ROOT / "tools" / "bench" / "results")
    args = parser.parse_args()

    load1 = os.getloadavg()[0]
    print(f"load average before: {load1:.2f}" + ("  (NOT QUIET: results will be unreliable)" if load1 > 0.5 else ""))
    bin_dir = build_llama_cpp(os.cpu_count() or 1)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    out = args.out / stamp
    out.mkdir(parents=True)

    bench = llama_bench(bin_dir, args.model, args.threads, args.tokens)
    print(f"llama-bench: {bench}")
    rounds = []
    for rnd in range(args.rounds):
        order = ["edgellm", "llama-server"] if rnd % 2 == 0 else ["llama-server", "edgellm"]
        rounds.append({name: run_round(name, args.model, args, bin_dir, out, rnd) for name in order})
        print(f"round {rnd + 1}: " + json.dumps(rounds[-1]))

    rows = summarise(rounds, args.concurrency)
    result = {
        "when": stamp, "machine": platform.machine(), "cpus": os.cpu_count(), "load_average_before": load1,
        "model": args.model.name, "threads": args.threads, "ctx": args.ctx, "tokens": args.tokens,
        "llama_server_slots": args.slots, "llama_bench": bench, "rounds": rounds,
        "summary": [{"metric": m, "edgellm": a, "llama_server": b, "ratio": r} for m, a, b, r in rows],
    }
    (out / "results.json").write_text(json.dumps(result, indent=2))
    table = ["| metric | edgellm | llama-server | edgellm / llama-server |", "| --- | ---: | ---: | ---: |"]
    table += [f"| {m} | {a:.1f} | {b:.1f} | {r:.2f} |" for m, a, b, r in rows]
    table += ["", f"llama-bench ({args.threads} threads): " + ", ".join(f"{k} {v} t/s" for k, v in bench.items()),
              f"load average before: {load1:.2f}; {args.rounds} rounds, A/B alternating; model {args.model.name}"]
    (out / "results.md").write_text("\n".join(table) + "\n")
    print("\n".join(table))
    print(f"\nwritten to {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
