"""Start-up times and the idle footprint of the `edgellm` command.

    python tools/bench/startup.py [--runs N] [--model MODEL.gguf]

Prints the median of N runs (default 10) of:

- `edgellm --version`, and two CLI errors (`serve --config /nonexistent`, `bogus`): wall
  time of the whole process;
- serve with `--model`: from the process's start to its port accepting a TCP connection,
  to its first HTTP answer (/health, 503 while the model loads), and to /health 200;
- the RSS (VmRSS) of serve with a model installed in the store but none loaded: once its
  first HTTP answer came, and again after /health, /v1/models and /metrics were asked.

Without --model a tiny random model is written (tests/tiny_models.py). Each run is a fresh
`python -m edgellm` from the repository root, so it measures this tree, not an installed copy.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[2]
EDGELLM = [sys.executable, "-m", "edgellm"]
DEADLINE = 60.0  # seconds any one server may take to get where a measurement waits for


def command_ms(args: list[str], expect: int) -> float:
    """Wall time of one `edgellm ARGS` process, in ms; it must exit with `expect`."""
    start = time.perf_counter()
    done = subprocess.run([*EDGELLM, *args], cwd=ROOT, capture_output=True)
    elapsed = (time.perf_counter() - start) * 1000
    if done.returncode != expect:
        raise SystemExit(f"edgellm {' '.join(args)}: exit {done.returncode}, expected {expect}:\n"
                         f"{done.stderr.decode(errors='replace')}")
    return elapsed


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def poll(predicate: Callable[[], bool], proc: subprocess.Popen, what: str, interval: float) -> float:
    """Poll until `predicate` holds; the perf_counter time it first did."""
    deadline = time.monotonic() + DEADLINE
    while not predicate():
        if proc.poll() is not None:
            raise SystemExit(f"the server exited (status {proc.returncode}) before {what}")
        if time.monotonic() > deadline:
            raise SystemExit(f"timed out waiting for {what}")
        time.sleep(interval)
    return time.perf_counter()


def accepts(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
        return True
    except OSError:
        return False


class Serve:
    """One `edgellm serve` on a free loopback port, stopped on exit. Its /health is asked on one
    kept-alive connection every 10 ms: a poll that costs the server little while its model loads."""

    def __init__(self, state_dir: Path, *args: str) -> None:
        self.port = free_port()
        self.client = httpx.Client(base_url=f"http://127.0.0.1:{self.port}", timeout=DEADLINE)
        self.started = time.perf_counter()
        self.proc = subprocess.Popen([*EDGELLM, "serve", "--port", str(self.port), "--state-dir", str(state_dir),
                                      *args], cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def ms_until_listening(self) -> float:
        return (poll(lambda: accepts(self.port), self.proc, "listening", 0.001) - self.started) * 1000

    def ms_until_health(self, ok: bool) -> float:
        """Until /health answers at all (503 while the model loads), or (ok) answers 200."""
        def answered() -> bool:
            try:
                return self.client.get("/health").status_code == 200 or not ok
            except httpx.TransportError:
                return False

        return (poll(answered, self.proc, "/health", 0.01) - self.started) * 1000

    def rss_mib(self) -> float:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        raise SystemExit("no VmRSS in /proc/PID/status")

    def __enter__(self) -> Serve:
        return self

    def __exit__(self, *exc: object) -> None:
        self.client.close()
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def tiny_model(path: Path) -> Path:
    sys.path.insert(0, str(ROOT / "tests"))
    from tiny_models import write_model

    return write_model(path, seed=1)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--model", type=Path, help="GGUF file to serve (default: a tiny random model)")
    args = parser.parse_args()
    os.environ.setdefault("NO_PROXY", "127.0.0.1,localhost")
    print(f"load average {' / '.join(f'{x:.2f}' for x in os.getloadavg())}; {args.runs} runs each")
    results: dict[str, list[float]] = {}

    def record(name: str, value: float) -> None:
        results.setdefault(name, []).append(value)

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        model = args.model or tiny_model(work / "tiny-random.gguf")
        store = work / "store"
        subprocess.run([*EDGELLM, "models", "add", str(model), "--state-dir", str(store)], cwd=ROOT, check=True,
                       capture_output=True)
        for i in range(args.runs):
            record("--version ms", command_ms(["--version"], 0))
            record("serve --config /nonexistent ms", command_ms(["serve", "--config", "/nonexistent"], 2))
            record("bogus ms", command_ms(["bogus"], 2))
            with Serve(work / f"state-{i}", "--model", str(model)) as serve:
                record("serve --model: listening ms", serve.ms_until_listening())
                record("serve --model: first HTTP answer ms", serve.ms_until_health(ok=False))
                record("serve --model: loaded ms", serve.ms_until_health(ok=True))
            with Serve(store) as serve:
                serve.ms_until_health(ok=False)
                record("serve, no model loaded: RSS MiB", serve.rss_mib())
                for path in ("/v1/models", "/metrics"):
                    serve.client.get(path).raise_for_status()
                record("serve, after /health, /v1/models, /metrics: RSS MiB", serve.rss_mib())
    width = max(map(len, results))
    for name, values in results.items():
        print(f"{name:{width}}  median {statistics.median(values):7.1f}  (min {min(values):.1f}, "
              f"max {max(values):.1f})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
