"""Soak: a real server on loopback under mixed load for a while, then proof that it let go of
everything it took.

    python tools/soak/run.py                  # 600 s, 16 streaming clients, tiny models
    python tools/soak/run.py --seconds 120 --model MODEL.gguf --json summary.json

The load: --clients streaming clients (chat and text completions, some not streamed, some
cancelled mid-stream or before the first token, some with a long shared system prompt, some
JSON-constrained), embeddings clients, admin unloads and loads of the models, and signed bundle
uploads that install a model, use it and uninstall it again. A warm-up phase of the same load
comes first; its end is the baseline.

The bounds, checked when the load has stopped and the models are loaded again: no errors (any
5xx, connection failure, timeout, error event in a stream, unexpected admin or upload answer),
the /metrics gauges edgellm_kv_cells_used, edgellm_running_sequences and edgellm_queue_depth
back to 0, RSS growth since the baseline under --rss-growth-mib, and open descriptors within
--fd-slack of the baseline. Prints a summary (and writes it as JSON with --json); exit status 1
when a bound failed. Every loop is bounded in time and count.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import psutil
from prometheus_client.parser import text_string_to_metric_families

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
import loopback  # noqa: E402

REQUEST_TIMEOUT = 120.0  # seconds one request may take, queueing and a model load included
# Idle connections are not reused after this: below the server's keep_alive_timeout (5 s), so that
# no request races the server closing the connection it was sent on (a client's problem, not the server's).
KEEPALIVE = httpx.Limits(keepalive_expiry=1.0)
GAUGES = ("edgellm_kv_cells_used", "edgellm_kv_cells_untracked", "edgellm_running_sequences", "edgellm_queue_depth")
WORDS = ("the cat sat on the mat once upon a time hello world tick tock yes no true false name age user "
         "assistant euro").split()
SYSTEM = " ".join(WORDS * 12)  # a shared prefix of a few hundred tokens: the prompt cache keeps it
BUNDLE_MODEL = "soak-bundle"


@dataclass
class Tally:
    """Requests by outcome, and errors by kind (any error fails the soak)."""

    outcomes: Counter[str] = field(default_factory=Counter)
    errors: Counter[str] = field(default_factory=Counter)
    examples: dict[str, str] = field(default_factory=dict)  # one example of each kind of error
    requests: int = 0

    def ok(self, outcome: str) -> None:
        self.requests += 1
        self.outcomes[outcome] += 1

    def error(self, kind: str, detail: str = "") -> None:
        self.requests += 1
        self.outcomes["error"] += 1
        self.errors[kind] += 1
        self.examples.setdefault(kind, detail[:500])


@dataclass
class Sample:
    rss: int
    fds: int

    @classmethod
    def of(cls, pid: int) -> Sample:
        process = psutil.Process(pid)
        return cls(process.memory_info().rss, process.num_fds())

    def record(self) -> dict[str, float]:
        return {"rss_mib": round(self.rss / 2**20, 1), "fds": self.fds}


def status_outcome(tally: Tally, what: str, response_status: int, body: bytes) -> None:
    """A refused request: 429 is back-pressure working (not an error); any other status is one."""
    code = _code(body)
    if response_status == 429 and code == "queue_full":
        tally.ok(f"{what}:rejected")
    else:
        tally.error(f"{what}:{response_status}:{code}", body.decode(errors="replace"))


def _code(body: bytes) -> str:
    try:
        return str(json.loads(body)["error"]["code"])
    except (ValueError, KeyError, TypeError):
        return "?"


class Soak:
    def __init__(self, server: loopback.LocalServer, args: argparse.Namespace, models: dict[str, str],
                 bundle: Path | None) -> None:
        self.server = server
        self.args = args
        self.models = models  # role (chat, embed) -> model id
        self.bundle = bundle
        self.tally = Tally()
        self.rng = random.Random(args.seed)
        self.peak = Sample.of(server.pid)
        self.baseline: Sample | None = None  # after the warm-up
        self.started = time.monotonic()
        self.timeline: list[tuple[float, float, int]] = []  # seconds, RSS MiB, fds: every 10 s
        self.count = 0  # requests started, against --max-requests

    def _client(self, timeout: float) -> httpx.AsyncClient:
        return httpx.AsyncClient(base_url=self.server.url, timeout=timeout, limits=KEEPALIVE)

    @staticmethod
    async def pause(seconds: float, deadline: float) -> None:
        """Pacing between admin actions (never past the deadline); nothing waits on it for a state."""
        await asyncio.sleep(max(0.0, min(seconds, deadline - time.monotonic())))

    def _more(self, deadline: float) -> bool:
        self.count += 1
        return time.monotonic() < deadline and self.count <= self.args.max_requests

    # --- the clients ----------------------------------------------------------------------------

    def _generation(self) -> tuple[str, dict[str, Any], bool]:
        rng = self.rng
        chat = rng.random() < 0.7
        words = " ".join(rng.choices(WORDS, k=rng.randint(1, 40)))
        body: dict[str, Any] = {"model": self.models["chat"], "max_tokens": rng.randint(4, 64),
                                "temperature": rng.choice([0, 0.7, 1.0])}
        if chat:
            messages = [{"role": "user", "content": words}]
            if rng.random() < 0.3:
                messages.insert(0, {"role": "system", "content": SYSTEM})
            body["messages"] = messages
        else:
            body["prompt"] = words
        if rng.random() < 0.1:
            body["response_format"] = {"type": "json_object"}
        if rng.random() < 0.2:
            body["stop"] = rng.sample(WORDS, 2)
        stream = rng.random() < 0.85
        body["stream"] = stream
        if stream and rng.random() < 0.3:
            body["stream_options"] = {"include_usage": True}
        return ("/v1/chat/completions" if chat else "/v1/completions"), body, stream

    async def generation_client(self, deadline: float) -> None:
        async with self._client(REQUEST_TIMEOUT) as client:
            while self._more(deadline):
                path, body, stream = self._generation()
                roll = self.rng.random()
                cancel_after = self.rng.randint(1, 6) if roll < self.args.cancel_rate else None
                early = self.rng.uniform(0.001, 0.05) if roll < self.args.cancel_rate / 4 else None
                try:
                    work = self._stream(client, path, body, cancel_after) if stream else self._plain(client, path,
                                                                                                    body)
                    await asyncio.wait_for(work, early or REQUEST_TIMEOUT)
                except TimeoutError:
                    if early:
                        self.tally.ok("generation:cancelled_early")
                    else:
                        self.tally.error("generation:timeout", json.dumps(body)[:300])
                except httpx.HTTPError as e:
                    self.tally.error(f"generation:connection:{type(e).__name__}", str(e))

    async def _plain(self, client: httpx.AsyncClient, path: str, body: dict[str, Any]) -> None:
        response = await client.post(path, json=body)
        if response.status_code != 200:
            status_outcome(self.tally, "generation", response.status_code, response.content)
        elif response.json()["choices"][0]["finish_reason"] not in ("stop", "length"):
            self.tally.error("generation:finish_reason", response.text)
        else:
            self.tally.ok("generation:completed")

    async def _stream(self, client: httpx.AsyncClient, path: str, body: dict[str, Any],
                      cancel_after: int | None) -> None:
        async with client.stream("POST", path, json=body) as response:
            if response.status_code != 200:
                status_outcome(self.tally, "stream", response.status_code, await response.aread())
                return
            events = 0
            async for line in response.aiter_lines():
                if not line.startswith("data: "):
                    continue
                data = line[6:]
                if data == "[DONE]":
                    self.tally.ok("stream:completed")
                    return
                if "error" in json.loads(data):
                    self.tally.error(f"stream:error_event:{_code(data.encode())}", data)
                    return
                events += 1
                if cancel_after is not None and events >= cancel_after:
                    self.tally.ok("stream:cancelled")
                    return  # leaving the block drops the connection mid-stream
            self.tally.error("stream:ended_without_done", json.dumps(body)[:300])

    async def embedding_client(self, deadline: float) -> None:
        async with self._client(REQUEST_TIMEOUT) as client:
            while self._more(deadline):
                inputs = [" ".join(self.rng.choices(WORDS, k=self.rng.randint(1, 30)))
                          for _ in range(self.rng.randint(1, 8))]
                body = {"model": self.models["embed"], "input": inputs,
                        "encoding_format": self.rng.choice(["float", "base64"])}
                try:
                    response = await client.post("/v1/embeddings", json=body)
                except httpx.HTTPError as e:
                    self.tally.error(f"embeddings:connection:{type(e).__name__}", str(e))
                    continue
                if response.status_code != 200:
                    status_outcome(self.tally, "embeddings", response.status_code, response.content)
                elif len(response.json()["data"]) != len(inputs):
                    self.tally.error("embeddings:count", response.text)
                else:
                    self.tally.ok("embeddings:completed")

    # --- admin and bundles ----------------------------------------------------------------------

    async def _admin(self, client: httpx.AsyncClient, method: str, path: str, ok: tuple[int, ...]) -> bool:
        try:
            async with asyncio.timeout(REQUEST_TIMEOUT):  # in all: httpx's timeout is per read
                response = await client.request(method, path)
        except (httpx.HTTPError, TimeoutError) as e:
            self.tally.error(f"admin:connection:{type(e).__name__}", f"{method} {path}: {e}")
            return False
        action = path.rsplit("/", 1)[-1] if method == "POST" else method.lower()
        if response.status_code in ok:
            self.tally.ok(f"admin:{action}:{response.status_code}")
            return True
        self.tally.error(f"admin:{action}:{response.status_code}:{_code(response.content)}",
                         f"{method} {path}: {response.text}")
        return False

    async def admin_cycles(self, deadline: float) -> None:
        """Unload a model (202 while requests run on it), and load it again, now and then."""
        async with self._client(REQUEST_TIMEOUT) as client:
            while self._more(deadline):
                await self.pause(self.rng.uniform(0.5, 2) * self.args.admin_every, deadline)
                if time.monotonic() >= deadline:
                    break
                model = self.models[self.rng.choice(["chat", "embed"])]
                await self._admin(client, "POST", f"/admin/models/{model}/unload", (200, 202))
                await self.pause(self.rng.uniform(0.1, 1.0), deadline)
                await self._admin(client, "POST", f"/admin/models/{model}/load", (200,))
                await self._admin(client, "GET", "/admin/models", (200,))

    async def bundle_cycles(self, deadline: float) -> None:
        """Upload the signed bundle, use its model, uninstall it; again until the deadline."""
        assert self.bundle is not None
        async with self._client(REQUEST_TIMEOUT) as client:
            while self._more(deadline):
                await self.pause(self.rng.uniform(0.5, 1.5) * self.args.bundle_every, deadline)
                if time.monotonic() >= deadline:
                    break
                if not await self._upload(client):
                    continue
                try:
                    async with asyncio.timeout(REQUEST_TIMEOUT):
                        response = await client.post("/v1/completions", json={"model": BUNDLE_MODEL,
                                                                               "prompt": "Hello", "max_tokens": 8})
                    if response.status_code == 200:
                        self.tally.ok("bundle:used")
                    else:
                        status_outcome(self.tally, "bundle:use", response.status_code, response.content)
                except (httpx.HTTPError, TimeoutError) as e:
                    self.tally.error(f"bundle:connection:{type(e).__name__}", str(e))
                await self._admin(client, "DELETE", f"/admin/models/{BUNDLE_MODEL}", (200,))

    async def _upload(self, client: httpx.AsyncClient) -> bool:
        assert self.bundle is not None
        data = self.bundle.read_bytes()

        async def chunks() -> Any:
            for i in range(0, len(data), 1 << 16):
                yield data[i:i + (1 << 16)]

        last: tuple[str, str] = ("", "")
        try:
            async with asyncio.timeout(REQUEST_TIMEOUT), \
                    client.stream("POST", "/admin/bundles", content=chunks(),
                                  headers={"content-type": "application/x-tar"}) as response:
                if response.status_code != 200:
                    self.tally.error(f"bundle:upload:{response.status_code}", (await response.aread()).decode())
                    return False
                name = ""
                async for line in response.aiter_lines():
                    if line.startswith("event: "):
                        name = line[7:]
                    elif line.startswith("data: "):
                        last = (name, line[6:])
        except (httpx.HTTPError, TimeoutError) as e:
            self.tally.error(f"bundle:connection:{type(e).__name__}", str(e))
            return False
        if last[0] == "done" and json.loads(last[1])["models"][0]["id"] == BUNDLE_MODEL:
            self.tally.ok(f"bundle:upload:{json.loads(last[1])['models'][0]['status']}")
            return True
        self.tally.error(f"bundle:upload:{last[0] or 'no_events'}", last[1])
        return False

    async def watch(self, deadline: float) -> None:
        """Health stays 200 throughout; the peak RSS and descriptors are noted."""
        async with self._client(30) as client:
            while self._more(deadline):
                try:
                    health = await client.get("/health")
                    if health.status_code != 200:
                        self.tally.error(f"health:{health.status_code}", health.text)
                except httpx.HTTPError as e:
                    self.tally.error(f"health:connection:{type(e).__name__}", str(e))
                now = Sample.of(self.server.pid)
                self.peak = Sample(max(self.peak.rss, now.rss), max(self.peak.fds, now.fds))
                elapsed = time.monotonic() - self.started
                if not self.timeline or elapsed - self.timeline[-1][0] >= 10:
                    self.timeline.append((round(elapsed), round(now.rss / 2**20, 1), now.fds))
                await self.pause(1, deadline)

    async def phase(self, seconds: float) -> None:
        deadline = time.monotonic() + seconds
        work = [self.generation_client(deadline) for _ in range(self.args.clients)]
        work += [self.embedding_client(deadline) for _ in range(self.args.embedding_clients)]
        work += [self.admin_cycles(deadline), self.watch(deadline)]
        if self.bundle is not None:
            work.append(self.bundle_cycles(deadline))
        await asyncio.gather(*work)

    # --- the end --------------------------------------------------------------------------------

    def settle(self) -> tuple[Sample, dict[str, float]]:
        """With the load stopped: both models loaded, the bundle's model gone, the gauges back to 0
        (polled with a deadline), the descriptors settled. What the process holds then."""
        with httpx.Client(base_url=self.server.url, timeout=REQUEST_TIMEOUT) as client:
            if any(m["id"] == BUNDLE_MODEL for m in client.get("/v1/models").json()["data"]):
                client.delete(f"/admin/models/{BUNDLE_MODEL}")
            for model in self.models.values():
                client.post(f"/admin/models/{model}/load").raise_for_status()
            gauges: dict[str, float] = {}

            def idle() -> bool:
                nonlocal gauges
                gauges = read_gauges(client.get("/metrics").text)
                return all(v == 0 for v in gauges.values())

            try:
                loopback.wait_for(idle, 30, "the gauges to return to 0", interval=0.2)
            except TimeoutError:
                pass  # reported as a failed bound
        fds_wanted = self.baseline.fds + self.args.fd_slack if self.baseline else None
        try:  # closed connections take a moment to be closed on the server's side too
            loopback.wait_for(lambda: fds_wanted is None or Sample.of(self.server.pid).fds <= fds_wanted, 10,
                              "the descriptors to settle", interval=0.2)
        except TimeoutError:
            pass
        return Sample.of(self.server.pid), gauges


def read_gauges(text: str, names: tuple[str, ...] = GAUGES) -> dict[str, float]:
    """Gauges summed over their labels (models, tiers)."""
    totals = dict.fromkeys(names, 0.0)
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name in totals:
                totals[sample.name] += sample.value
    return totals


def make_bundle(work: Path, state: Path, model: Path) -> Path:
    """A signed tar bundle of `model` (installed as BUNDLE_MODEL) and the state dir trusting its key,
    made with the CLI as an operator would."""
    env = loopback.server_env()
    cli = [sys.executable, "-m", "edgellm"]
    subprocess.run([*cli, "keygen", "-o", str(work / "soak")], env=env, check=True, capture_output=True, timeout=60)
    (state / "trusted-keys").mkdir(parents=True, exist_ok=True)
    shutil.copy(work / "soak.pub", state / "trusted-keys" / "soak.pub")
    source = work / f"{BUNDLE_MODEL}.gguf"
    shutil.copy(model, source)
    tar = work / "soak-bundle.tar"
    subprocess.run([*cli, "bundle", "create", str(source), "-o", str(tar), "--key", str(work / "soak.key"),
                    "--state-dir", str(state)], env=env, check=True, capture_output=True, timeout=120)
    return tar


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=600, help="the whole soak, warm-up included (600)")
    parser.add_argument("--warmup", type=float, help="seconds of load before the baseline (10%% of --seconds, "
                                                     "at least 5, at most 60)")
    parser.add_argument("--clients", type=int, default=16, help="streaming clients (16)")
    parser.add_argument("--embedding-clients", type=int, default=2)
    parser.add_argument("--cancel-rate", type=float, default=0.25, help="share of requests cancelled (0.25)")
    parser.add_argument("--admin-every", type=float, default=8, help="mean seconds between unload/load cycles")
    parser.add_argument("--bundle-every", type=float, default=10, help="mean seconds between bundle uploads")
    parser.add_argument("--no-bundles", action="store_true", help="no bundle uploads")
    parser.add_argument("--model", type=Path, help="the chat model (default: a tiny random one)")
    parser.add_argument("--embedding-model", type=Path, help="the embedding model (default: a tiny one)")
    parser.add_argument("--threads", type=int, default=0, help="[engine] n_threads (0: the plan's)")
    parser.add_argument("--prompt-cache-memory", default="16MiB",
                        help="[engine] prompt_cache_memory: small, so that the warm-up fills it (16MiB)")
    parser.add_argument("--max-requests", type=int, default=1_000_000, help="a bound on requests started")
    parser.add_argument("--rss-growth-mib", type=float, default=64)
    parser.add_argument("--fd-slack", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, help="write the summary here too")
    parser.add_argument("--keep", action="store_true", help="keep the work directory (logs, state)")
    args = parser.parse_args(argv)
    warmup = args.warmup if args.warmup is not None else min(60.0, max(5.0, args.seconds / 10))

    work = Path(tempfile.mkdtemp(prefix="edgellm-soak-"))
    try:
        tiny = loopback.tiny_models(work / "models")
        chat, embed = args.model or tiny["chat"], args.embedding_model or tiny["embed"]
        state = work / "server" / "state"
        bundle = None if args.no_bundles else make_bundle(work, state, tiny["other"])
        config = (f'[engine]\nn_threads = {args.threads}\nprompt_cache_memory = "{args.prompt_cache_memory}"\n'
                  "[models]\nmax_loaded = 3\n")
        with loopback.LocalServer(work / "server", install=(chat, embed), config=config) as server:
            models = {"chat": chat.name.removesuffix(".gguf"), "embed": embed.name.removesuffix(".gguf")}
            summary = run(server, args, models, bundle, warmup)
        print(render(summary))
        if args.json:
            args.json.write_text(json.dumps(summary, indent=1))
        return 0 if summary["passed"] else 1
    finally:
        if args.keep:
            print(f"work directory: {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


def run(server: loopback.LocalServer, args: argparse.Namespace, models: dict[str, str], bundle: Path | None,
        warmup: float) -> dict[str, Any]:
    soak = Soak(server, args, models, bundle)
    started = time.monotonic()
    at_start = Sample.of(server.pid)
    asyncio.run(soak.phase(warmup))
    soak.baseline, _ = soak.settle()
    asyncio.run(soak.phase(max(0.0, args.seconds - warmup)))
    end, gauges = soak.settle()
    base = soak.baseline
    assert base is not None
    failures = []
    if soak.tally.errors:
        failures.append(f"{sum(soak.tally.errors.values())} errors")
    if any(v != 0 for v in gauges.values()):
        failures.append(f"not idle at the end: {gauges}")
    if (end.rss - base.rss) / 2**20 >= args.rss_growth_mib:
        failures.append(f"RSS grew {(end.rss - base.rss) / 2**20:.1f} MiB after the warm-up "
                        f"(bound {args.rss_growth_mib:g})")
    if end.fds > base.fds + args.fd_slack:
        failures.append(f"{end.fds - base.fds} more descriptors than after the warm-up (bound {args.fd_slack})")
    if not soak.tally.outcomes.get("stream:completed"):
        failures.append("no stream completed: the soak tested nothing")
    return {
        "seconds": round(time.monotonic() - started, 1), "warmup_seconds": warmup, "clients": args.clients,
        "requests": soak.tally.requests, "outcomes": dict(sorted(soak.tally.outcomes.items())),
        "errors": dict(soak.tally.errors), "error_examples": soak.tally.examples,
        "start": at_start.record(), "baseline": base.record(), "end": end.record(), "peak": soak.peak.record(),
        "rss_growth_mib": round((end.rss - base.rss) / 2**20, 1), "fd_growth": end.fds - base.fds,
        "gauges_at_end": gauges, "timeline": soak.timeline, "failures": failures, "passed": not failures,
    }


def render(summary: dict[str, Any]) -> str:
    lines = [f"soak: {summary['seconds']} s ({summary['warmup_seconds']:g} s warm-up), {summary['clients']} "
             f"streaming clients, {summary['requests']} requests"]
    lines += [f"  {name:32} {count}" for name, count in summary["outcomes"].items()]
    lines.append(f"errors: {sum(summary['errors'].values())}")
    lines += [f"  {name:32} {count}  e.g. {summary['error_examples'][name][:160]}"
              for name, count in summary["errors"].items()]
    for when in ("start", "baseline", "peak", "end"):
        lines.append(f"{when:>8}: RSS {summary[when]['rss_mib']:7.1f} MiB, {summary[when]['fds']} fds")
    lines.append("RSS MiB every 10 s: " + " ".join(f"{rss:g}" for _, rss, _ in summary["timeline"]))
    lines.append(f"RSS growth after warm-up {summary['rss_growth_mib']} MiB, descriptors {summary['fd_growth']:+d}; "
                 f"gauges at the end {summary['gauges_at_end']}")
    lines.append("PASSED" if summary["passed"] else "FAILED: " + "; ".join(summary["failures"]))
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
