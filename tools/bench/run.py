#!/usr/bin/env python3
"""edgellm against llama.cpp's own llama-server, built from the same vendored llama.cpp.

Method (README.md beside this file): the same model, context, threads, slots,
prompts and reply length (end-of-generation tokens banned with logit_bias),
temperature 0; servers run one at a time, alternating A B A B for --rounds
rounds; medians per server and the median of the per-round ratios
edgellm / llama-server. Also llama-bench's figures for the same model and
threads, and optionally (--tiny) the same comparison on a tiny random model,
where Python's per-token overhead is all there is to see.

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
from collections.abc import Sequence
from pathlib import Path

import httpx
import psutil

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
from edgellm.engine.model import Model  # noqa: E402  (the repository, not an installed copy)

SDIST = "llama_cpp_python-0.3.36.tar.gz"
SDIST_SHA256 = "832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e"
CACHE = Path(os.environ.get("EDGELLM_BENCH_CACHE", Path.home() / ".cache" / "edgellm-bench"))
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
    def __init__(self, name: str, cmd: list[str], port: int, log: Path, verify: object = None) -> None:
        """`verify`: for a server that speaks TLS, what httpx verifies it with (tls.py's bench)."""
        self.name, self.port = name, port
        self.verify = True if verify is None else verify
        self.url = f"{'http' if verify is None else 'https'}://127.0.0.1:{port}"
        with socket.socket() as probe:  # a leftover server on the port would answer in our place
            if probe.connect_ex(("127.0.0.1", port)) == 0:
                raise SystemExit(f"port {port} is already in use; stop whatever listens there first")
        self._log = open(log, "wb")
        # Its own session, so stop() ends a wrapper (BENCH_WRAP, e.g. perf) and what it started.
        # stdin stays open: llama-server's child mode watches it for EOF.
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=self._log, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise SystemExit(f"{name} exited early; see {log}")
            try:
                if httpx.get(self.url + "/health", timeout=2, verify=self.verify).status_code == 200:
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


def streaming_setup(doc: str, port: int, rounds: int) -> tuple[argparse.Namespace, tuple[float, float, float], Path,
                                                                 Path]:
    """What the streaming comparisons (ollama.py, tls.py) start with: their arguments (--model,
    --rounds, --requests, --tokens and the server's), the load average, llama-server, the results
    directory."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=ROOT / ".edgellm" / "demo" / "gemma-3-270m-q4_k_m.gguf")
    parser.add_argument("--rounds", type=int, default=rounds)
    parser.add_argument("--requests", type=int, default=10, help="per server and round")
    parser.add_argument("--tokens", type=int, default=128)
    server_arguments(parser, port)
    args = parser.parse_args()
    load = print_load_average()
    bin_dir = build_llama_cpp(os.cpu_count() or 1)
    out = results_dir(args.out)
    out.mkdir(parents=True, exist_ok=True)
    return args, load, bin_dir, out


def server_arguments(parser: argparse.ArgumentParser, port: int) -> None:
    """The settings start() reads (--ctx, --threads, --slots, --port), and --out for the results."""
    parser.add_argument("--ctx", type=int, default=4096)
    parser.add_argument("--threads", type=int, default=psutil.cpu_count(logical=False) or 1)
    parser.add_argument("--slots", type=int, default=4, help="parallel sequences on both sides")
    parser.add_argument("--port", type=int, default=port)
    parser.add_argument("--out", type=Path, default=ROOT / "tools" / "bench" / "results")


def start(name: str, model: Path, port: int, args: argparse.Namespace, bin_dir: Path, log: Path, *,
          state_dir: Path | None = None, engine_lines: Sequence[str] = (), extra_args: Sequence[str] = (),
          extra_toml: str = "", verify: object = None) -> Server:
    """Start one server with the shared settings and wait until it is ready.

    edgellm: `engine_lines` are more TOML lines for its [engine] section, `extra_toml` more
    sections, `state_dir` its state dir (default: state/ beside the log). llama-server:
    `extra_args` are more flags.
    """
    if name == "edgellm":
        config = log.with_suffix(".toml")
        config.write_text(f"[engine]\nn_ctx = {args.ctx}\nn_threads = {args.threads}\nparallel = {args.slots}\n"
                          f"max_queue = 64\n" + "".join(f"{line}\n" for line in engine_lines) + extra_toml)
        cmd = [sys.executable, "-m", "edgellm", "serve", "--model", str(model), "--port", str(port),
               "--config", str(config), "--state-dir", str(state_dir or log.parent / "state")]
    else:
        cmd = [*os.environ.get("BENCH_WRAP", "").split(), str(bin_dir / "llama-server"), "-m", str(model),
               "--port", str(port), "-c", str(args.ctx), "-t", str(args.threads), "-tb", str(args.threads),
               "-np", str(args.slots), "--kv-unified", "--no-webui", *extra_args]
    return Server(name, cmd, port, log, verify)


# --- load ------------------------------------------------------------------------------------

async def stream_once(client: httpx.AsyncClient, url: str, i: int, n_tokens: int, ban: dict) -> dict:
    body = {"prompt": PROMPT.format(i=i), "max_tokens": n_tokens, "temperature": 0, "stream": True,
            "logit_bias": ban}
    times = []
    sent = time.perf_counter()
    async with client.stream("POST", url + "/v1/completions", json=body) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            if line.startswith("data: {"):
                chunk = json.loads(line[6:])
                if chunk.get("choices") and chunk["choices"][0].get("text"):
                    times.append(time.perf_counter())
    return {"sent": sent, "first": times[0], "last": times[-1]}


async def measure(server: Server, n_tokens: int, concurrency: int, repeats: int, start_index: int,
                  ban: dict) -> dict:
    # A fresh connection per request: llama-server's HTTP library closes kept-alive
    # connections after a few requests, and reusing one it just closed fails the request.
    async with httpx.AsyncClient(timeout=300, limits=httpx.Limits(max_keepalive_connections=0)) as client:
        await stream_once(client, server.url, -1, 16, ban)  # warm-up
        if concurrency == 1:
            runs = [await stream_once(client, server.url, start_index + k, n_tokens, ban) for k in range(repeats)]
            return {
                "decode_tps": statistics.median((n_tokens - 1) / (r["last"] - r["first"]) for r in runs),
                "ttft_ms": statistics.median((r["first"] - r["sent"]) * 1000 for r in runs),
            }
        t0 = time.perf_counter()
        runs = await asyncio.gather(*(stream_once(client, server.url, start_index + k, n_tokens, ban)
                                      for k in range(concurrency)))
        wall = max(r["last"] for r in runs) - t0
        return {"aggregate_tps": concurrency * n_tokens / wall,
                "ttft_ms": statistics.median((r["first"] - r["sent"]) * 1000 for r in runs)}


def run_round(name: str, model: Path, args: argparse.Namespace, bin_dir: Path, out: Path, rnd: int,
              ban: dict) -> dict:
    server = start(name, model, args.port + (rnd % 2), args, bin_dir, out / f"{name}-round{rnd + 1}.log")
    try:
        result = {"single": asyncio.run(measure(server, args.tokens, 1, args.repeats, rnd * 100, ban))}
        for c in args.concurrency:
            result[f"c{c}"] = asyncio.run(measure(server, args.tokens, c, 1, rnd * 100 + 50, ban))
        result["peak_rss_mib"] = server.peak_rss_mib()
        return result
    finally:
        server.stop()


# --- report ----------------------------------------------------------------------------------

def metrics(concurrency: list[int]) -> list[tuple[str, callable]]:
    rows = [("single-stream decode tok/s", lambda r: r["single"]["decode_tps"]),
            ("single-stream TTFT ms", lambda r: r["single"]["ttft_ms"])]
    rows += [(f"{c} streams aggregate tok/s", lambda r, c=c: r[f"c{c}"]["aggregate_tps"]) for c in concurrency]
    rows += [("peak RSS MiB", lambda r: r["peak_rss_mib"])]
    return rows


def summarise(rounds: list[dict], concurrency: list[int]) -> list[dict]:
    """Per metric: both servers' medians, the median per-round ratio, and (TTFT) the difference."""
    rows = []
    for label, get in metrics(concurrency):
        ours = [get(r["edgellm"]) for r in rounds]
        theirs = [get(r["llama-server"]) for r in rounds]
        rows.append({"metric": label, "edgellm": statistics.median(ours), "llama_server": statistics.median(theirs),
                     "ratio": statistics.median(a / b for a, b in zip(ours, theirs, strict=True)),
                     "difference": statistics.median(a - b for a, b in zip(ours, theirs, strict=True)),
                     "edgellm_rounds": ours, "llama_server_rounds": theirs})
    return rows


def markdown(rows: list[dict]) -> str:
    lines = ["| metric | edgellm | llama-server | edgellm / llama-server | difference |",
             "| --- | ---: | ---: | ---: | ---: |"]
    for r in rows:
        lines.append(f"| {r['metric']} | {r['edgellm']:.1f} | {r['llama_server']:.1f} | {r['ratio']:.2f} | "
                     f"{r['difference']:+.1f} |")
    return "\n".join(lines)


def plot(rows: list[dict], title: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(rows), figsize=(3.2 * len(rows), 3.6))
    for ax, row in zip(axes, rows, strict=True):
        for x, (key, colour) in enumerate((("edgellm", "tab:blue"), ("llama_server", "tab:grey"))):
            ax.bar(x, row[key], color=colour, alpha=0.6)
            ax.plot([x] * len(row[f"{key}_rounds"]), row[f"{key}_rounds"], "o", color="black", markersize=3)
        ax.set_xticks([0, 1], ["edgellm", "llama-server"], fontsize=8)
        ax.set_title(f"{row['metric']}\nratio {row['ratio']:.2f}", fontsize=8)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def bench_model(model: Path, args: argparse.Namespace, bin_dir: Path, out: Path) -> dict:
    out.mkdir(parents=True)
    ban = {str(t): -100 for t in Model(model, vocab_only=True).eog_tokens}  # both generate exactly --tokens
    bench = llama_bench(bin_dir, model, args.threads, args.tokens)
    print(f"{model.name}: llama-bench {bench}")
    rounds = []
    for rnd in range(args.rounds):
        order = ["edgellm", "llama-server"] if rnd % 2 == 0 else ["llama-server", "edgellm"]
        rounds.append({name: run_round(name, model, args, bin_dir, out, rnd, ban) for name in order})
        print(f"  round {rnd + 1}: " + json.dumps(rounds[-1]))
    rows = summarise(rounds, args.concurrency)
    title = (f"{model.name}, {args.threads} threads, {args.slots} slots, ctx {args.ctx}, {args.tokens} tokens; "
             f"llama-bench " + ", ".join(f"{k} {v} t/s" for k, v in bench.items()))
    write_results(out, {"model": model.name, "llama_bench": bench, "rounds": rounds, "summary": rows},
                  f"{title}\n\n{markdown(rows)}\n")
    plot(rows, title, out / "results.png")
    print(markdown(rows))
    return {"model": model.name, "llama_bench": bench, "summary": rows}


def write_results(out: Path, data: dict, text: str) -> None:
    """One model's results.json and results.md."""
    (out / "results.json").write_text(json.dumps(data, indent=2))
    (out / "results.md").write_text(text)


def write_summary(out: Path, load: tuple[float, float, float], args: argparse.Namespace, results: list,
                  **settings: object) -> None:
    """The run's summary.json beside the models' folders: the machine, the shared settings, the results."""
    summary = {"when": out.name, "machine": platform.machine(), "cpus": os.cpu_count(), "load_average": load,
               "threads": args.threads, "slots": args.slots, "ctx": args.ctx, **settings, "rounds": args.rounds,
               "results": results}
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    print(f"\nwritten to {out}")


def results_dir(base: Path) -> Path:
    """Where this run's results go: a folder named for the time under `base` (not created here)."""
    return base / time.strftime("%Y%m%d-%H%M%S")


def print_load_average() -> tuple[float, float, float]:
    load = os.getloadavg()
    print(f"load average before: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}"
          + ("  (NOT QUIET: results will be unreliable)" if load[0] > 0.5 else ""))
    return load


def tiny_model(path: Path) -> Path:
    sys.path.insert(0, str(ROOT / "tests"))
    from tiny_models import write_model

    return write_model(path, seed=1)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--tiny", action="store_true", help="also compare on a tiny random model")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=3, help="single-stream requests per round")
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--concurrency", type=int, nargs="*", default=[4, 8])
    server_arguments(parser, 18480)
    args = parser.parse_args()

    load = print_load_average()
    bin_dir = build_llama_cpp(os.cpu_count() or 1)
    out = results_dir(args.out)
    results = [bench_model(args.model, args, bin_dir, out / args.model.stem)]
    if args.tiny:
        results.append(bench_model(tiny_model(out / "tiny-random.gguf"), args, bin_dir, out / "tiny-random"))
    write_summary(out, load, args, results, tokens=args.tokens)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
