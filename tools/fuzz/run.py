"""The long form of tests/test_fuzz.py: the same requests and checks (fuzzing.py), for as many
examples and as long as asked, against a running server (--url) or tiny-model servers it starts
itself on loopback.

    python tools/fuzz/run.py --examples 500 --seconds 900
    python tools/fuzz/run.py --url http://127.0.0.1:8080 --api-key KEY --admin-key KEY

Each (route, kind of request) runs in rounds of --chunk examples with a new seed each round
until it has had --examples or --seconds have passed; a kind that found something is not run
again (its shrunk example is printed). At the end the server must still answer /health and a
normal request, with nothing left running. Exit status 1 when anything was found.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path

import httpx
from hypothesis import HealthCheck, given, seed, settings
from hypothesis import strategies as st

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent)]
import fuzzing  # noqa: E402
import loopback  # noqa: E402

ROUTES = fuzzing.ROUTES
CONFIG = "[engine]\nn_ctx = {n_ctx}\nn_threads = {threads}\n[server]\nmax_body_bytes = {max_body}\n"


class Target:
    """One server under fuzz: its client (with the keys), model ids and the document it serves.
    `revive` starts a new server when this one died (servers this tool started only)."""

    def __init__(self, url: str, api_key: str | None, admin_key: str | None, timeout: float,
                 revive: Callable[[], str] | None = None) -> None:
        self.api_key, self.admin_key = api_key, admin_key
        self.timeout, self.revive = timeout, revive
        self.client = httpx.Client(base_url=url, timeout=timeout)
        self.document = self.get("/openapi.json")
        self.models = [m["id"] for m in self.get("/v1/models")["data"]]

    def alive(self) -> bool:
        """Whether the server still answers /health (on a new connection), within 10 s."""
        def answers() -> bool:
            try:
                return httpx.get(self.client.base_url.join("/health"), timeout=5).status_code < 500
            except httpx.HTTPError:
                return False

        try:
            return loopback.wait_for(answers, 10, "/health", interval=0.5)
        except TimeoutError:
            return False

    def rebind(self, url: str) -> None:
        self.client.close()
        self.client = httpx.Client(base_url=url, timeout=self.timeout)

    def get(self, path: str) -> dict:
        return self.client.get(path, headers=self.headers(path)).raise_for_status().json()

    def headers(self, path: str) -> dict[str, str]:
        key = self.admin_key if path.startswith("/admin") else self.api_key
        return {"Authorization": f"Bearer {key}"} if key else {}

    def schemas(self, max_tokens: int) -> fuzzing.Schemas:
        short = st.integers(1, max_tokens)
        return fuzzing.Schemas(self.document, {"max_tokens": short, "max_completion_tokens": short,
                                               "model": st.sampled_from([*self.models, None]) | st.text(max_size=8)})

    def send(self, case: fuzzing.Case) -> httpx.Response:
        return fuzzing.send(self.client, case, self.headers(case.path))


def run_kind(target: Target, schemas: fuzzing.Schemas, cases: st.SearchStrategy, examples: int,
             round_seed: int) -> str | None:
    """One round; what it found (the shrunk example), or None."""
    @seed(round_seed)
    @settings(database=None, deadline=None, max_examples=examples, suppress_health_check=list(HealthCheck),
              print_blob=False)
    @given(case=cases)
    def fuzz(case: fuzzing.Case) -> None:
        try:
            response = target.send(case)
        except httpx.HTTPError as e:
            raise fuzzing.Finding(f"no answer: {type(e).__name__}: {e}\n  request:  {case.repro()}") from None
        fuzzing.check(schemas, case, response)

    try:
        fuzz()
    except fuzzing.Finding as e:
        return str(e)
    except ExceptionGroup as e:  # hypothesis's FlakyFailure: the server died while the example was shrunk
        found = [str(x) for x in e.exceptions if isinstance(x, fuzzing.Finding)]
        return "\n".join(found) if found else "the fuzzer failed:\n" + traceback.format_exc()
    except Exception:  # a bug of the fuzzer itself: say so, and go on with the other kinds
        return "the fuzzer failed:\n" + traceback.format_exc()
    return None


def survived(target: Target, found: str) -> str:
    """After a finding: when the server died, say so (and start a new one where this tool can)."""
    if target.alive():
        return found
    if target.revive is None:
        raise SystemExit(f"the server died:\n{found}")
    target.rebind(target.revive())
    return f"THE SERVER DIED (a new one was started):\n{found}"


def after_check(target: Target, embedding: bool) -> list[str]:
    """The service still answers, and has nothing running or queued once idle."""
    problems = []
    health = target.client.get("/health", headers=target.headers("/health"))
    if health.status_code != 200:
        problems.append(f"/health answers {health.status_code} after the fuzz: {health.text[:300]}")
    path, body = fuzzing.PROBES["embeddings" if embedding else "completions"]
    reply = target.client.post(path, json=body, headers=target.headers(path))
    if reply.status_code != 200:
        problems.append(f"a normal {path} answers {reply.status_code} after the fuzz: {reply.text[:300]}")
    gauges = ("edgellm_kv_cells_used", "edgellm_running_sequences", "edgellm_queue_depth")
    deadline, busy = time.monotonic() + 15, []
    while time.monotonic() < deadline:
        text = target.client.get("/metrics", headers=target.headers("/metrics")).text
        busy = [line for line in text.splitlines() if line.startswith(gauges) and float(line.split()[-1]) != 0]
        if not busy:
            break
        time.sleep(0.2)
    problems += [f"still busy when idle: {line}" for line in busy]
    return problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", help="a running server (default: start tiny-model servers on loopback)")
    parser.add_argument("--embed-url", help="with --url: the server for /v1/embeddings (default: --url)")
    parser.add_argument("--api-key"), parser.add_argument("--admin-key")
    parser.add_argument("--model", type=Path, help="the chat model of the server it starts (default: tiny)")
    parser.add_argument("--embedding-model", type=Path, help="the embedding model of the server it starts")
    parser.add_argument("--examples", type=int, default=200, help="per route and kind of request (default 200)")
    parser.add_argument("--seconds", type=float, default=600, help="stop starting rounds after this (default 600)")
    parser.add_argument("--chunk", type=int, default=25, help="examples per round (default 25)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-tokens", type=int, default=16, help="the longest reply asked for (default 16)")
    parser.add_argument("--max-body", type=int, default=65536, help="the server's max_body_bytes (default 65536)")
    parser.add_argument("--threads", type=int, default=1, help="n_threads of the servers it starts (default 1)")
    parser.add_argument("--timeout", type=float, default=60, help="seconds a request may take (default 60)")
    parser.add_argument("--routes", default=",".join([*ROUTES, "other", "bundles"]))
    args = parser.parse_args(argv)

    servers: list[loopback.LocalServer] = []
    work: Path | None = None
    status = 1
    try:
        if args.url:
            chat = Target(args.url, args.api_key, args.admin_key, args.timeout)
            embed = Target(args.embed_url, args.api_key, args.admin_key, args.timeout) if args.embed_url else chat
        else:
            work = Path(tempfile.mkdtemp(prefix="edgellm-fuzz-"))
            tiny = loopback.tiny_models(work / "models")
            config = CONFIG.format(n_ctx=256, threads=args.threads, max_body=args.max_body)

            def start(name: str, model: Path) -> str:
                servers.append(loopback.LocalServer(work / f"{name}-{len(servers)}", model=model, config=config))
                print(f"{name} server: {servers[-1].url} (log {servers[-1].log_path})", flush=True)
                return servers[-1].url

            chat_model, embed_model = args.model or tiny["chat"], args.embedding_model or tiny["embed"]
            chat = Target(start("chat", chat_model), None, None, args.timeout, lambda: start("chat", chat_model))
            embed = Target(start("embed", embed_model), None, None, args.timeout, lambda: start("embed", embed_model))
        status = fuzz_all(args, chat, embed)
        return status
    finally:
        for server in servers:
            server.stop()
        if work is not None and status == 0:
            shutil.rmtree(work, ignore_errors=True)
        elif work is not None:
            print(f"the servers' logs are under {work}")


def fuzz_all(args: argparse.Namespace, chat: Target, embed: Target) -> int:
    start = time.monotonic()
    findings: dict[str, str] = {}
    done: dict[str, int] = {}
    plans: dict[str, tuple[Target, fuzzing.Schemas, st.SearchStrategy]] = {}
    wanted = args.routes.split(",")
    built = {"chat": chat.schemas(args.max_tokens), "embed": embed.schemas(args.max_tokens)}  # once each
    for route in wanted:
        if route in ROUTES:
            target = embed if route == "embeddings" else chat
            schemas = built["embed" if route == "embeddings" else "chat"]
            json_route = fuzzing.JsonRoute(*ROUTES[route], schemas, max_body=args.max_body, max_tokens=args.max_tokens)
            for kind in ("valid", *fuzzing.MALFORMED):
                plans[f"{route}/{kind}"] = (target, schemas, json_route.cases(kind))
    if "other" in wanted:
        plans["other"] = (chat, built["chat"], fuzzing.other_cases(chat.models))
    if "bundles" in wanted:
        plans["bundles"] = (chat, built["chat"], fuzzing.bundle_cases())
    round_no = 0
    while time.monotonic() - start < args.seconds:
        todo = [n for n in plans if n not in findings and done.get(n, 0) < args.examples]
        if not todo:
            break
        for name in todo:
            if time.monotonic() - start >= args.seconds:
                break
            target, schemas, cases = plans[name]
            n = min(args.chunk, args.examples - done.get(name, 0))
            found = run_kind(target, schemas, cases, n, args.seed * 1_000_003 + round_no)
            done[name] = done.get(name, 0) + n
            if found:
                findings[name] = survived(target, found)
                print(f"FOUND in {name}:\n{findings[name]}\n", flush=True)
        round_no += 1
        print(f"round {round_no}: {sum(done.values())} examples, {len(findings)} findings, "
              f"{time.monotonic() - start:.0f} s", flush=True)
    problems = after_check(chat, embedding=False) + (after_check(embed, embedding=True) if embed is not chat else [])
    for problem in problems:
        findings[f"after/{len(findings)}"] = problem
        print("FOUND after the fuzz:", problem)
    summary = {"examples": sum(done.values()), "seconds": round(time.monotonic() - start, 1),
               "findings": sorted(findings), "kinds": len(plans)}
    print(json.dumps(summary, indent=1))
    return 1 if findings else 0


if __name__ == "__main__":
    sys.exit(main())
