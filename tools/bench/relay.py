"""The relay's cost: the same requests straight to an upstream and through an edgellm relay.

    python tools/bench/relay.py [--model M.gguf] [--requests 200] [--streams 16]

The upstream is an edgellm serving the model with 16 parallel sequences; the
relay is an edgellm with no models and [relay] url pointing at it. Both run
here, in the same run, on loopback. Reports medians for non-streamed requests
(1 token) and time to first token of streams, and the aggregate token rate of
16 concurrent streams, direct and relayed. Targets: <= 1 ms added at the
median, <= 2 ms added to TTFT, >= 95% of the direct streaming throughput.
Run it on a quiet machine: two cores are shared by client, relay and upstream.

With --litellm BIN (the `litellm` command of a separate virtual environment with
litellm[proxy]), LiteLLM's proxy is measured in the same run, configured to
forward the model to the same upstream.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[2]


def serve(tmp: Path, name: str, config: str, model: Path | None) -> tuple[subprocess.Popen, str]:
    (tmp / f"{name}.toml").write_text(config)
    log = open(tmp / f"{name}.log", "wb")
    cmd = [sys.executable, "-m", "edgellm", "serve", "--port", "0", "--config", str(tmp / f"{name}.toml"),
           "--state-dir", str(tmp / name), *(["--model", str(model)] if model else [])]
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        text = (tmp / f"{name}.log").read_text(errors="replace")
        match = re.search(r"listening on (http://\S+)", text)
        if match:
            url = match[1]
            while time.monotonic() < deadline:
                try:
                    if httpx.get(url + "/health").status_code == 200:
                        return proc, url
                except httpx.HTTPError:
                    pass
                time.sleep(0.05)
        time.sleep(0.05)
    raise SystemExit(f"{name} did not start:\n{(tmp / f'{name}.log').read_text()}")


def one_latency(client: httpx.Client, url: str) -> float:
    started = time.perf_counter()
    r = client.post(url + "/v1/completions", json={"model": "up", "prompt": "Hello", "max_tokens": 1})
    r.raise_for_status()
    return time.perf_counter() - started


def one_ttft(client: httpx.Client, url: str) -> float:
    started = time.perf_counter()
    first = None
    with client.stream("POST", url + "/v1/completions", json={
            "model": "up", "prompt": "Hello", "max_tokens": 4, "stream": True, "ignore_eos": True}) as r:
        for line in r.iter_lines():
            if first is None and line.startswith("data: {"):
                first = time.perf_counter() - started
    return first


def interleaved(measure, clients: dict[str, httpx.Client], targets: dict[str, str], n: int) -> dict[str, float]:
    """Medians in ms, the targets taking turns request by request: drift and noise hit all alike."""
    times: dict[str, list[float]] = {name: [] for name in targets}
    for i in range(n):
        order = list(targets) if i % 2 == 0 else list(reversed(targets))
        for name in order:
            times[name].append(measure(clients[name], targets[name]))
    return {name: statistics.median(values) * 1000 for name, values in times.items()}


def throughput(url: str, streams: int, tokens: int) -> float:
    def one(_: int) -> int:
        count = 0
        with httpx.Client(timeout=120) as c, c.stream("POST", url + "/v1/completions", json={
                "model": "up", "prompt": "Hello", "max_tokens": tokens, "stream": True, "ignore_eos": True}) as r:
            for line in r.iter_lines():
                if line.startswith("data: {"):
                    count += 1
        return count

    started = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(streams) as pool:
        total = sum(pool.map(one, range(streams)))
    return total / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=ROOT / ".edgellm/demo/gemma-3-270m-q4_k_m.gguf",
                        help="GGUF for the upstream (default: the demo model); --tiny for a tiny random one")
    parser.add_argument("--tiny", action="store_true")
    parser.add_argument("--echo", action="store_true",
                        help="an upstream that answers at once without a model: the relay's own cost, "
                             "with no inference competing for the cores")
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--streams", type=int, default=16)
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3, help="rounds of the concurrent-streams test")
    parser.add_argument("--litellm", type=Path, help="the litellm proxy command, to measure it too")
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp())
    model = args.model
    if args.tiny:
        sys.path.insert(0, str(ROOT / "tests"))
        from tiny_models import write_model
        model = write_model(tmp / "tiny.gguf", seed=1)
    # One thread for the upstream's llama.cpp: its spinning OpenMP threads would otherwise take
    # both cores from the relay and the client, and a datacenter upstream runs elsewhere anyway.
    if args.echo:
        upstream, up_url = echo_upstream(tmp)
    else:
        upstream, up_url = _model_upstream(tmp, args, model)
    relay, relay_url = serve(tmp, "relay", f'[relay]\nurl = "{up_url}/v1"\n', None)
    run(args, tmp, model if not args.echo else Path("echo"), upstream, up_url, relay, relay_url)


def _model_upstream(tmp: Path, args, model: Path):
    return serve(tmp, "upstream", f'[model]\nid = "up"\n[engine]\nparallel = {args.streams}\n'
                 f'max_queue = 64\nn_ctx = {args.streams * 256}\nn_threads = 1\n', model)


ECHO = """
import asyncio, json, sys
DONE = json.dumps({"id": "x", "object": "text_completion", "model": "up", "choices": [
    {"index": 0, "text": "ok", "finish_reason": "length"}]}).encode()
CHUNK = b'data: {"id": "x", "object": "text_completion", "choices": [{"index": 0, "text": "ok"}]}\\n\\n'
JSON = b"HTTP/1.1 200 OK\\r\\nContent-Type: application/json\\r\\nContent-Length: %d\\r\\n\\r\\n%s"
SSE = b"HTTP/1.1 200 OK\\r\\nContent-Type: text/event-stream\\r\\nTransfer-Encoding: chunked\\r\\n\\r\\n"
async def serve(reader, writer):
    try:
        while True:
            head = await reader.readuntil(b"\\r\\n\\r\\n")
            lines = head.split(b"\\r\\n")
            length = next((int(l.split(b":")[1]) for l in lines if l.lower().startswith(b"content-length")), 0)
            body = json.loads(await reader.readexactly(length)) if length else {}
            if b"/health" in head.split(b"\\r\\n")[0] or b"/models" in head.split(b"\\r\\n")[0]:
                data = json.dumps({"status": "ok", "data": [{"id": "up"}]}).encode()
                writer.write(JSON % (len(data), data))
            elif body.get("stream"):
                writer.write(SSE)
                for _ in range(body.get("max_tokens", 1)):
                    writer.write(b"%x\\r\\n%s\\r\\n" % (len(CHUNK), CHUNK))
                    await writer.drain()
                end = b"data: [DONE]\\n\\n"
                writer.write(b"%x\\r\\n%s\\r\\n0\\r\\n\\r\\n" % (len(end), end))
            else:
                writer.write(JSON % (len(DONE), DONE))
            await writer.drain()
    except (asyncio.IncompleteReadError, ConnectionError):
        writer.close()
async def main():
    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    print("listening on http://127.0.0.1:%d" % server.sockets[0].getsockname()[1], flush=True)
    await server.serve_forever()
asyncio.run(main())
"""


def echo_upstream(tmp: Path) -> tuple[subprocess.Popen, str]:
    proc = subprocess.Popen([sys.executable, "-c", ECHO], stdout=subprocess.PIPE, text=True)
    url = proc.stdout.readline().split("listening on ")[1].strip()
    return proc, url


def run(args, tmp: Path, model: Path, upstream: subprocess.Popen, up_url: str, relay: subprocess.Popen,
        relay_url: str) -> None:
    procs = [relay, upstream]
    targets = {"direct": up_url, "edgellm relay": relay_url}
    try:
        if args.litellm:
            proc, url = litellm(args.litellm, tmp, up_url)
            procs.insert(0, proc)
            targets["LiteLLM proxy"] = url
        clients = {name: httpx.Client(timeout=60) for name in targets}
        interleaved(one_latency, clients, targets, 10)  # warm everything up
        interleaved(one_ttft, clients, targets, 5)
        lat = interleaved(one_latency, clients, targets, args.requests)
        first = interleaved(one_ttft, clients, targets, args.requests // 2)
        for client in clients.values():
            client.close()
        rates: dict[str, list[float]] = {name: [] for name in targets}
        for i in range(args.rounds):  # whole rounds in turn, the order alternating
            for name in (list(targets) if i % 2 == 0 else list(reversed(targets))):
                rates[name].append(throughput(targets[name], args.streams, args.tokens))
        rate = {name: statistics.median(values) for name, values in rates.items()}
        upstream_name = "an echo server" if args.echo else f"edgellm with {model.name}"
        print(f"upstream: {upstream_name}; {args.requests} requests each, taking turns; "
              f"{args.rounds} rounds of {args.streams} streams; load average "
              f"{' '.join(f'{x:.2f}' for x in os.getloadavg())}")
        print(f"{'':16}{'median ms':>10}{'added':>9}{'TTFT ms':>9}{'added':>9}{'streams tok/s':>15}{'vs direct':>11}")
        for name in targets:
            print(f"{name:16}{lat[name]:10.2f}{lat[name] - lat['direct']:+9.2f}{first[name]:9.2f}"
                  f"{first[name] - first['direct']:+9.2f}{rate[name]:15.1f}{100 * rate[name] / rate['direct']:10.1f}%")
    finally:
        for proc in procs:
            proc.terminate()
            proc.wait(15)


def litellm(command: Path, tmp: Path, upstream: str) -> tuple[subprocess.Popen, str]:
    """LiteLLM's proxy forwarding model 'up' to the same upstream, offline."""
    (tmp / "litellm.yaml").write_text(
        "model_list:\n  - model_name: up\n    litellm_params:\n      model: openai/up\n"
        f"      api_base: {upstream}/v1\n      api_key: none\n")
    port = 4000 + os.getpid() % 1000
    env = {**os.environ, "LITELLM_LOCAL_MODEL_COST_MAP": "True", "LITELLM_TELEMETRY": "False",
           "LITELLM_DANGEROUSLY_PERMIT_WEAK_OR_UNSET_MASTER_KEY": "true"}  # loopback only, a benchmark
    log = open(tmp / "litellm.log", "wb")
    proc = subprocess.Popen([str(command), "--config", str(tmp / "litellm.yaml"), "--port", str(port),
                             "--num_workers", "1"], stdout=log, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            if httpx.post(url + "/v1/completions", json={"model": "up", "prompt": "Hi", "max_tokens": 1},
                          timeout=10).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        if proc.poll() is not None:
            break
        time.sleep(0.5)
    raise SystemExit(f"LiteLLM did not start:\n{(tmp / 'litellm.log').read_text()[-3000:]}")


if __name__ == "__main__":
    main()
