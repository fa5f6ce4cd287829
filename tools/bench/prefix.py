#!/usr/bin/env python3
"""Time to first token when prompts are reused: edgellm against llama.cpp's own llama-server.

    python tools/bench/prefix.py --model MODEL.gguf [--tiny] [--rounds 3] [--system-tokens 2000] [--turns 8]

The same method as run.py (README.md beside this file): the same model, context,
threads and 4 slots on both sides, temperature 0, streaming /v1/completions with
explicit text (both servers tokenize the same string), a short reply (--max-tokens,
end-of-generation tokens banned), one server at a time, alternating over --rounds;
medians, and the median of the per-round ratios edgellm / llama-server.

A. A home-assistant-like hub: a ~--system-tokens system prompt (tools and devices)
   and a short user turn per request. TTFT of the first request after start (cold),
   of the next ones (warm), of hub turns each after 3 other clients' unrelated
   requests (interleaved), after an unload and reload, and after a restart of the
   server on the same state. llama-server has no unload: its sleep mode
   (--sleep-idle-seconds) frees the model, KV cache and prompt cache in-process and
   reloads them on the next request, with and without restoring a slot file saved
   with POST /slots/{id}?action=save; after a restart likewise with and without
   that restore.
B. A multi-turn chat: turn k resends the k-1 earlier user/assistant pairs.

Each round has a fresh state dir (edgellm --state-dir, llama-server --slot-save-path),
kept across the restart and deleted after the round. Run on a quiet machine.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import statistics
import sys
import time
import urllib.parse
from collections.abc import Callable
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
import run  # noqa: E402  (run.py beside this file: the llama.cpp build, servers, tiny model, results)
from run import Model, Server  # noqa: E402

# --- the workloads: deterministic text, the same for both servers ---------------------------------

AREAS = ["Kitchen", "Living Room", "Bedroom", "Bathroom", "Hallway", "Office", "Garage", "Garden", "Nursery",
         "Basement", "Dining Room", "Laundry"]
TOOLS = [
    ("HassTurnOn", "Turns on or opens a device or entity", {"name": "string", "area": "area", "domain": "domain"}),
    ("HassTurnOff", "Turns off or closes a device or entity", {"name": "string", "area": "area", "domain": "domain"}),
    ("HassLightSet", "Sets the brightness or color of a light",
     {"name": "string", "area": "area", "brightness": "percent", "color": "string"}),
    ("HassClimateSetTemperature", "Sets the target temperature of a thermostat",
     {"area": "area", "temperature": "number"}),
    ("HassClimateGetTemperature", "Gets the current temperature of a room", {"area": "area", "name": "string"}),
    ("HassSetPosition", "Sets the position of a cover, blind or valve", {"name": "string", "position": "percent"}),
    ("HassMediaPause", "Pauses a media player", {"name": "string", "area": "area"}),
    ("HassMediaUnpause", "Resumes a paused media player", {"name": "string", "area": "area"}),
    ("HassMediaNext", "Skips to the next item on a media player", {"name": "string", "area": "area"}),
    ("HassSetVolume", "Sets the volume of a media player", {"name": "string", "volume_level": "percent"}),
    ("HassVacuumStart", "Starts a vacuum cleaner", {"name": "string", "area": "area"}),
    ("HassVacuumReturnToBase", "Sends a vacuum cleaner back to its dock", {"name": "string"}),
    ("HassLockLock", "Locks a door lock", {"name": "string", "area": "area"}),
    ("HassLockUnlock", "Unlocks a door lock after confirmation", {"name": "string", "code": "string"}),
    ("HassGetState", "Reports the state of a device, sensor or area",
     {"name": "string", "area": "area", "state": "string"}),
    ("HassStartTimer", "Starts a timer", {"hours": "number", "minutes": "number", "name": "string"}),
    ("HassCancelTimer", "Cancels a running timer", {"name": "string"}),
    ("HassListAddItem", "Adds an item to a shopping or to-do list", {"item": "string", "name": "string"}),
    ("HassGetWeather", "Gets the weather forecast", {"name": "string", "days": "number"}),
    ("HassBroadcast", "Announces a message on every speaker", {"message": "string"}),
]
DOMAINS = [("light", ["on", "off"], "brightness {b}%"), ("switch", ["on", "off"], "power {w} W"),
           ("sensor", ["{t} °C"], "battery {b}%"), ("climate", ["heat", "off", "auto"], "target {t} °C"),
           ("cover", ["open", "closed"], "position {b}%"), ("lock", ["locked", "unlocked"], "battery {b}%"),
           ("media_player", ["playing", "paused", "idle"], "volume {b}%"), ("fan", ["on", "off"], "speed {b}%")]
HUB_TURNS = ["Turn off the lights in the {area}.", "What is the temperature in the {area}?",
             "Set the {area} lights to forty percent.", "Is the {area} window open?",
             "Start the vacuum in the {area}.", "Pause the music in the {area}.",
             "Close the blinds in the {area}, please.", "Make the {area} warmer by two degrees."]
TOPICS = ["lighthouses", "volcanoes", "bees", "the moon", "bridges", "tea", "comets", "glaciers", "owls", "maps",
          "clocks", "rivers"]
TRIP = ("I am planning a trip to Lisbon for {n} days next spring with two friends. We like old neighbourhoods, "
        "museums that are not too crowded, small restaurants, and walking rather than taxis. ")
TRIP_MORE = ["One of us is vegetarian and another does not eat fish, which may be hard in Lisbon. ",
             "We arrive on a Thursday evening by train from Porto and leave on the following Tuesday morning. ",
             "Our budget is moderate: we would rather spend on food than on hotels. ",
             "We would like at least one day trip, perhaps to Sintra or to the coast at Cascais. ",
             "Please also tell us which areas are steep, because one of us has a bad knee. ",
             "We have heard about the tram 28 queues and would like to avoid them if possible. ",
             "We enjoy live music in the evening, fado or anything else that is local. "]


def tool_text(i: int) -> str:
    name, what, params = TOOLS[i % len(TOOLS)]
    if i >= len(TOOLS):
        name, what = f"{name}{i // len(TOOLS) + 1}", f"{what} (set {i // len(TOOLS) + 1})"
    kinds = {"area": "string, an area", "domain": "string, a domain", "percent": "integer 0-100"}
    props = ", ".join(f'"{key}": "{kinds.get(kind, kind)}"' for key, kind in params.items())
    return f'- {name}: {what}. Parameters {{{props}}}, required ["{next(iter(params))}"]\n'


def device_text(i: int) -> str:
    domain, states, extra = DOMAINS[i % len(DOMAINS)]
    area = AREAS[(i // len(DOMAINS)) % len(AREAS)]
    b, t, w = (i * 37) % 101, 16 + (i * 7) % 12, (i * 53) % 2000
    state = states[i % len(states)].format(t=t)
    return f"- {domain}.{area.lower().replace(' ', '_')}_{i}: {area}, {state}, {extra.format(b=b, t=t, w=w)}\n"


def system_prompt(n: int) -> str:
    """n items, 40% tools and 60% devices (2 000 Gemma 3 tokens: 29 tools, 42 devices)."""
    tools = (2 * n + 4) // 5
    return ("You are a voice assistant for a smart home. Answer in one short sentence and call a tool when the "
            "user asks to change something. Use only the tools and devices below.\n"
            f"Areas: {', '.join(AREAS)}. Domains: {', '.join(d[0] for d in DOMAINS)}.\n\nTools:\n"
            + "".join(tool_text(i) for i in range(tools))
            + "\nDevices:\n" + "".join(device_text(i) for i in range(n - tools)))


def first_message(n: int) -> str:
    return TRIP.format(n=5) + "".join(TRIP_MORE[i % len(TRIP_MORE)] for i in range(n)) + \
        "What would you suggest for each day?"


def sized(build: Callable[[int], str], count: Callable[[str], int], target: int) -> str:
    """build(n) for the smallest n whose text has at least `target` tokens."""
    hi = 1
    while count(build(hi)) < target and hi < 1 << 16:
        hi *= 2
    lo = hi // 2 + 1 if hi > 1 else 1
    while lo < hi:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if count(build(mid)) >= target else (mid + 1, hi)
    return build(lo)


class Workload:
    def __init__(self, model: Model, args: argparse.Namespace) -> None:
        def count(text: str) -> int:
            return len(model.tokenize(text))

        self.system = sized(system_prompt, count, args.system_tokens)
        self.system_tokens = count(self.system)
        tools, devices = self.system.split("\nDevices:\n")
        self.tools, self.devices = tools.count("\n- "), devices.count("- ")
        self.first = sized(first_message, count, args.first_tokens)
        self.first_tokens = count(self.first)
        self.turns = args.turns

    def hub(self, i: int) -> str:
        turn = HUB_TURNS[i % len(HUB_TURNS)].format(area=AREAS[(i // len(HUB_TURNS)) % len(AREAS)])
        return f"System: {self.system}\nUser: {turn}\nAssistant:"

    @staticmethod
    def other(i: int, client: int) -> str:
        topic = TOPICS[(3 * i + client) % len(TOPICS)]
        return (f"Hello there, this is client {client + 1} again, question {i + 1}. I am writing a short piece for a "
                f"school newsletter and would like three surprising facts about {topic}, each in one sentence, "
                f"suitable for children aged ten.\nAnswer:")

    def chat(self, k: int) -> str:
        """Turn k (0-based): the first message, k earlier exchanges with scripted replies, the new message."""
        parts = []
        for j in range(k + 1):
            user = self.first if j == 0 else (f"Thanks. And for day {j + 1}? Keep it short, with one museum, one "
                                              f"walk and one place to eat.")
            parts.append(f"User: {user}\nAssistant:")
            if j < k:
                parts.append(f" Day {j + 1}: start in Alfama with a walk up to the castle, then the tile museum in "
                             f"the afternoon, and dinner at a small tasca near the cathedral; take the tram back "
                             f"only if your feet ask for it.\n")
        return "".join(parts)

    def describe(self) -> dict:
        return {"system_prompt_tokens": self.system_tokens, "first_message_tokens": self.first_tokens,
                "tools": self.tools, "devices": self.devices,
                "system_prompt": self.system, "first_message": self.first, "hub_example": self.hub(0),
                "other_example": self.other(0, 0), "chat_last_turn": self.chat(self.turns - 1)}


# --- requests ------------------------------------------------------------------------------------

def client(headers: dict[str, str] | None = None) -> httpx.AsyncClient:
    # A fresh connection per request, as in run.py (llama-server closes kept-alive connections).
    return httpx.AsyncClient(timeout=600, headers=headers, limits=httpx.Limits(max_keepalive_connections=0))


async def complete(http: httpx.AsyncClient, url: str, prompt: str, args: argparse.Namespace, ban: dict) -> dict:
    """One streamed completion: TTFT (to the first chunk with text), prompt and cached token counts."""
    body = {"prompt": prompt, "max_tokens": args.max_tokens, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}, "logit_bias": ban}
    first = usage = timings = None
    sent = time.perf_counter()
    async with http.stream("POST", url + "/v1/completions", json=body) as r:
        if r.status_code != 200:
            raise SystemExit(f"{url}: {r.status_code} {(await r.aread())[:500]!r}")
        async for line in r.aiter_lines():
            if not line.startswith("data: {"):
                continue
            chunk = json.loads(line[6:])
            if first is None and chunk.get("choices") and chunk["choices"][0].get("text"):
                first = time.perf_counter()
            usage = chunk.get("usage") or usage
            timings = chunk.get("timings") or timings  # llama-server's own counters
    done = time.perf_counter()
    cached = ((usage or {}).get("prompt_tokens_details") or {}).get("cached_tokens")
    if cached is None and timings:
        cached = timings.get("cache_n")
    return {"ttft_ms": round(((first or done) - sent) * 1000, 2), "total_ms": round((done - sent) * 1000, 2),
            "prompt_tokens": (usage or {}).get("prompt_tokens"), "cached_tokens": cached,
            **({"cache_n": timings.get("cache_n"), "prompt_n": timings.get("prompt_n")} if timings else {})}


def one(server: Server, prompt: str, args: argparse.Namespace, ban: dict,
        headers: dict[str, str] | None = None) -> dict:
    async def go() -> dict:
        async with client(headers) as http:
            return await complete(http, server.url, prompt, args, ban)

    return asyncio.run(go())


def interleaved(server: Server, work: Workload, hub_index: int, i: int, args: argparse.Namespace,
                ban: dict) -> dict:
    """3 other clients' requests at once, then (once they have finished) the hub's turn."""
    async def go() -> dict:
        async with client() as http:
            others = await asyncio.gather(*(complete(http, server.url, work.other(i, c), args, ban)
                                            for c in range(args.others)))
            hub = await complete(http, server.url, work.hub(hub_index), args, ban)
            return {**hub, "others": others}

    return asyncio.run(go())


def timed(method: str, url: str, **kwargs) -> tuple[httpx.Response, float]:
    t0 = time.perf_counter()
    r = httpx.request(method, url, timeout=600, **kwargs)
    if r.status_code >= 300 and r.status_code != 202:
        raise SystemExit(f"{method} {url}: {r.status_code} {r.text[:500]}")
    return r, round((time.perf_counter() - t0) * 1000, 2)


def wait_for(what: str, check: Callable[[], bool], seconds: float) -> float:
    t0 = time.perf_counter()
    while not check():
        if time.perf_counter() - t0 > seconds:
            raise SystemExit(f"timed out waiting for {what}")
        time.sleep(0.05)
    return round((time.perf_counter() - t0) * 1000, 2)


# --- edgellm: unload and reload through the admin API (loopback, no Origin: no admin key needed) --

def edgellm_reload(server: Server) -> dict:
    models = httpx.get(server.url + "/admin/models", timeout=30).json()["data"]
    base = f"{server.url}/admin/models/{urllib.parse.quote(models[0]['id'], safe='')}"

    def state() -> str:
        return httpx.get(server.url + "/admin/models", timeout=30).json()["data"][0]["state"]

    _, unload_ms = timed("POST", base + "/unload")
    unload_ms += wait_for("the unload", lambda: state() == "unloaded", 120)
    r, load_ms = timed("POST", base + "/load")
    if r.json().get("state") != "loaded":
        raise SystemExit(f"edgellm did not reload the model: {r.text[:500]}")
    return {"unload_ms": unload_ms, "load_ms": load_ms}


# --- llama-server: sleep mode, slot files ----------------------------------------------------------

def llama_save_hub_slot(server: Server, hub_prompt_tokens: int) -> dict:
    """Save the slot that ran the latest request (the hub's turn) to hub.bin in --slot-save-path.

    Right after that request its slot still holds the prompt: llama-server moves idle slots
    to its RAM prompt cache (and clears them, with --kv-unified) only when the next
    completion arrives.
    """
    slots = httpx.get(server.url + "/slots", timeout=60).json()
    used = [s for s in slots if s.get("n_prompt_tokens")]
    if not used:
        raise SystemExit("llama-server: no slot holds a prompt to save")
    slot = max(used, key=lambda s: s.get("id_task", -1))
    r, ms = timed("POST", f"{server.url}/slots/{slot['id']}?action=save", json={"filename": "hub.bin"})
    saved = r.json().get("n_saved") or 0
    return {"slot": slot["id"], "save_ms": ms, "n_saved": saved, "holds_hub_prompt": saved >= hub_prompt_tokens}


def llama_restore(server: Server, slot: int) -> dict:
    r, ms = timed("POST", f"{server.url}/slots/{slot}?action=restore", json={"filename": "hub.bin"})
    return {"restore_ms": ms, "n_restored": r.json().get("n_restored")}


def llama_sleep_and_wake(server: Server, args: argparse.Namespace) -> dict:
    """Wait until llama-server's idle timer frees the model (sleep), then wake it with GET /slots."""
    def sleeping() -> bool:
        return bool(httpx.get(server.url + "/props", timeout=30).json().get("is_sleeping"))

    waited = wait_for("llama-server to sleep", sleeping, args.sleep_idle + 30)
    _, wake_ms = timed("GET", server.url + "/slots")  # any request that needs the model wakes it and waits
    if sleeping():
        raise SystemExit("llama-server did not wake up")
    return {"waited_for_sleep_ms": waited, "wake_ms": wake_ms}


def sleeps_in(log: Path) -> int:
    return log.read_text(errors="replace").count("server is entering sleeping state")


# This build's defaults that matter here (llama-server --help), unless --llama-server-arg overrides them.
LLAMA_DEFAULTS = ("--cache-ram 8192: the RAM prompt cache is on; --cache-idle-slots: idle slots go to it; "
                  "--cache-prompt on; --cache-reuse 0; --slot-prompt-similarity 0.10; --ctx-checkpoints 32; "
                  "no --swa-full")


def llama_flags(args: argparse.Namespace, slot_dir: Path) -> list[str]:
    return ["--slot-save-path", str(slot_dir), "--sleep-idle-seconds", str(args.sleep_idle), *args.llama_server_arg]


# --- one server, one round -------------------------------------------------------------------------

def hub_indices(repeats: int) -> dict[str, int | list[int]]:
    """Which hub turn each measurement sends: the same text on both servers."""
    return {"cold": 0, "warm": list(range(1, repeats + 1)), "interleaved": list(range(repeats + 1, 2 * repeats + 1)),
            "reload": 2 * repeats + 1, "reload_restore": 2 * repeats + 2, "restart": 2 * repeats + 3,
            "restart_restore": 2 * repeats + 4}


def dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def run_round(name: str, model: Path, args: argparse.Namespace, bin_dir: Path, out: Path, rnd: int,
              work: Workload, ban: dict) -> dict:
    llama = name == "llama-server"
    state = out / f"{name}-round{rnd + 1}-state"  # fresh per round, kept across the restarts within it
    shutil.rmtree(state, ignore_errors=True)
    state.mkdir()
    port = args.port + (rnd % 2)
    logs: list[Path] = []

    def launch() -> tuple[Server, float]:
        logs.append(out / f"{name}-round{rnd + 1}-{len(logs) + 1}.log")
        t0 = time.perf_counter()
        server = run.start(name, model, port, args, bin_dir, logs[-1], state_dir=state,
                           engine_lines=args.engine_setting, extra_args=llama_flags(args, state) if llama else ())
        return server, round((time.perf_counter() - t0) * 1000, 1)

    idx = hub_indices(args.repeats)
    result: dict = {}
    server: Server | None = None

    def restart() -> float:
        nonlocal server
        if server is not None:
            server.stop()
            server = None
        server, start_ms = launch()
        return start_ms

    try:
        result["start_ms"] = restart()
        result["cold"] = one(server, work.hub(idx["cold"]), args, ban)
        result["warm"] = [one(server, work.hub(i), args, ban) for i in idx["warm"]]
        result["interleaved"] = [interleaved(server, work, h, j, args, ban) for j, h in enumerate(idx["interleaved"])]
        if llama:
            saved = result["slot_save"] = llama_save_hub_slot(server, result["interleaved"][-1]["prompt_tokens"])
            result["reload"] = llama_sleep_and_wake(server, args)
            result["reload"].update(one(server, work.hub(idx["reload"]), args, ban))
            result["reload_restore"] = {**llama_sleep_and_wake(server, args), **llama_restore(server, saved["slot"])}
            result["reload_restore"].update(one(server, work.hub(idx["reload_restore"]), args, ban))
        else:
            result["reload"] = edgellm_reload(server)
            result["reload"].update(one(server, work.hub(idx["reload"]), args, ban))
        result["peak_rss_mib"] = server.peak_rss_mib()
        result["restart"] = {"start_ms": restart(), **one(server, work.hub(idx["restart"]), args, ban)}
        if llama:
            result["restart_restore"] = {"start_ms": restart(), **llama_restore(server, saved["slot"])}
            result["restart_restore"].update(one(server, work.hub(idx["restart_restore"]), args, ban))
        result["chat"] = [one(server, work.chat(k), args, ban) for k in range(args.turns)]
    finally:
        if server is not None:
            server.stop()
    if llama:  # two sleeps asked for, in the first process; any other means an idle gap slept it
        result["unexpected_sleeps"] = sum(sleeps_in(log) for log in logs) - 2
    result["state_dir_bytes"] = dir_bytes(state)
    shutil.rmtree(state)
    return result


# --- report ----------------------------------------------------------------------------------------

def median(values: list[float]) -> float | None:
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def ttft(entry: dict | list) -> float:
    return median([e["ttft_ms"] for e in entry]) if isinstance(entry, list) else entry["ttft_ms"]


def cached(entry: dict | list) -> float | None:
    return median([e["cached_tokens"] for e in entry]) if isinstance(entry, list) else entry["cached_tokens"]


# (label, edgellm's key, llama-server's key)
HUB_ROWS = [("cold (first request after start)", "cold", "cold"),
            ("warm (same process, new user turn)", "warm", "warm"),
            ("warm, after 3 other clients' requests", "interleaved", "interleaved"),
            ("after unload + reload (llama-server: sleep + wake)", "reload", "reload"),
            ("after unload + reload (llama-server: sleep + wake + slot restore)", "reload", "reload_restore"),
            ("after restart (llama-server: no restore)", "restart", "restart"),
            ("after restart (llama-server: + slot restore)", "restart", "restart_restore")]


def compare(ours: list[float], theirs: list[float]) -> dict:
    return {"edgellm": median(ours), "llama_server": median(theirs),
            "ratio": median([a / b for a, b in zip(ours, theirs, strict=True) if b]),
            "difference": median([a - b for a, b in zip(ours, theirs, strict=True)]),
            "edgellm_rounds": ours, "llama_server_rounds": theirs}


def summarise(rounds: list[dict], turns: int) -> dict:
    hub = []
    for label, ours, theirs in HUB_ROWS:
        e = [r["edgellm"] for r in rounds]
        s = [r["llama-server"] for r in rounds]
        row = {"metric": label, "edgellm_key": ours, "llama_server_key": theirs,
               **compare([ttft(r[ours]) for r in e], [ttft(r[theirs]) for r in s]),
               "edgellm_cached": median([cached(r[ours]) for r in e]),
               "llama_server_cached": median([cached(r[theirs]) for r in s]),
               "prompt_tokens": median([(r[ours][0] if isinstance(r[ours], list) else r[ours])["prompt_tokens"]
                                        for r in e]),
               "edgellm_of_cold": median([ttft(r[ours]) / ttft(r["cold"]) for r in e]),
               "llama_server_of_cold": median([ttft(r[theirs]) / ttft(r["cold"]) for r in s])}
        hub.append(row)
    chat = []
    for k in range(turns):
        e = [r["edgellm"]["chat"][k] for r in rounds]
        s = [r["llama-server"]["chat"][k] for r in rounds]
        chat.append({"turn": k + 1, "prompt_tokens": median([x["prompt_tokens"] for x in e]),
                     **compare([x["ttft_ms"] for x in e], [x["ttft_ms"] for x in s]),
                     "edgellm_cached": median([x["cached_tokens"] for x in e]),
                     "llama_server_cached": median([x["cached_tokens"] for x in s])})
    later = [compare([median([c["ttft_ms"] for c in r["edgellm"]["chat"][1:]]) for r in rounds],
                     [median([c["ttft_ms"] for c in r["llama-server"]["chat"][1:]]) for r in rounds])] \
        if turns > 1 else []
    by = {row["edgellm_key"] + "/" + row["llama_server_key"]: row for row in hub}
    def target(label: str, value: float, unit: str, limit: float) -> dict:
        return {"target": label, "value": value, "unit": unit, "limit": limit, "pass": value <= limit}

    targets = [
        target("edgellm after unload + reload: TTFT <= 15% of cold", by["reload/reload"]["edgellm_of_cold"],
               "of cold", 0.15),
        target("edgellm after restart: TTFT <= 15% of cold", by["restart/restart"]["edgellm_of_cold"], "of cold", 0.15),
        target("warm TTFT no worse than llama-server's warm", by["warm/warm"]["ratio"], "edgellm / llama-server", 1.0),
        target("warm TTFT after other clients no worse than llama-server's", by["interleaved/interleaved"]["ratio"],
               "edgellm / llama-server", 1.0),
    ]
    if later:
        targets.append(target("chat turns 2+ TTFT no worse than llama-server's", later[0]["ratio"],
                              "edgellm / llama-server", 1.0))
    side = {}
    for label, who, get in [
            ("start-up to ready, ms", "both", lambda r: r["start_ms"]),
            ("start-up to ready after restart, ms", "both", lambda r: r["restart"]["start_ms"]),
            ("edgellm unload (until unloaded), ms", "edgellm", lambda r: r["reload"]["unload_ms"]),
            ("edgellm load after unload, ms", "edgellm", lambda r: r["reload"]["load_ms"]),
            ("llama-server wake from sleep (GET /slots), ms", "llama-server", lambda r: r["reload"]["wake_ms"]),
            ("llama-server slot save, ms", "llama-server", lambda r: r["slot_save"]["save_ms"]),
            ("llama-server slot restore after wake, ms", "llama-server", lambda r: r["reload_restore"]["restore_ms"]),
            ("llama-server slot restore after restart, ms", "llama-server",
             lambda r: r["restart_restore"]["restore_ms"]),
            ("llama-server slot tokens saved", "llama-server", lambda r: r["slot_save"]["n_saved"]),
            ("state dir after the round, MiB", "both", lambda r: r["state_dir_bytes"] / 2**20),
            ("peak RSS (first process), MiB", "both", lambda r: r["peak_rss_mib"])]:
        side[label] = {n: median([get(r[n]) for r in rounds]) if who in ("both", n) else None
                       for n in ("edgellm", "llama-server")}
    return {"hub": hub, "chat": chat, "chat_turns_2_plus": later[0] if later else None, "targets": targets,
            "side": side}


def fmt(value: float | None, spec: str = ".1f") -> str:
    return "n/a" if value is None else format(value, spec)


def markdown(summary: dict, rounds: list[dict]) -> str:
    lines = ["### A. Home-assistant hub: TTFT ms", "",
             "| measurement | edgellm | llama-server | edgellm / llama-server | difference | cached: edgellm | "
             "cached: llama-server | edgellm / own cold | llama-server / own cold |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in summary["hub"]:
        lines.append(f"| {r['metric']} | {fmt(r['edgellm'])} | {fmt(r['llama_server'])} | {fmt(r['ratio'], '.2f')} | "
                     f"{fmt(r['difference'], '+.1f')} | {fmt(r['edgellm_cached'], '.0f')} | "
                     f"{fmt(r['llama_server_cached'], '.0f')} | {fmt(r['edgellm_of_cold'], '.2f')} | "
                     f"{fmt(r['llama_server_of_cold'], '.2f')} |")
    lines += ["", "### B. Multi-turn chat: TTFT ms per turn", "",
              "| turn | prompt tokens | edgellm | llama-server | edgellm / llama-server | difference | "
              "cached: edgellm | cached: llama-server |", "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in summary["chat"]:
        lines.append(f"| {r['turn']} | {fmt(r['prompt_tokens'], '.0f')} | {fmt(r['edgellm'])} | "
                     f"{fmt(r['llama_server'])} | {fmt(r['ratio'], '.2f')} | {fmt(r['difference'], '+.1f')} | "
                     f"{fmt(r['edgellm_cached'], '.0f')} | {fmt(r['llama_server_cached'], '.0f')} |")
    if summary["chat_turns_2_plus"]:
        c = summary["chat_turns_2_plus"]
        lines.append(f"| 2+ (median) | | {fmt(c['edgellm'])} | {fmt(c['llama_server'])} | {fmt(c['ratio'], '.2f')} | "
                     f"{fmt(c['difference'], '+.1f')} | | |")
    lines += ["", "### Targets", "", "| target | measured | result |", "| --- | ---: | --- |"]
    for t in summary["targets"]:
        lines.append(f"| {t['target']} | {t['value']:.2f} {t['unit']} | {'PASS' if t['pass'] else 'FAIL'} |")
    lines += ["", "### Side costs (medians)", "", "| | edgellm | llama-server |", "| --- | ---: | ---: |"]
    for label, v in summary["side"].items():
        lines.append(f"| {label} | {fmt(v['edgellm'])} | {fmt(v['llama-server'])} |")
    warnings = []
    for i, r in enumerate(rounds):
        s = r["llama-server"]
        if s.get("unexpected_sleeps"):
            warnings.append(f"round {i + 1}: llama-server slept {s['unexpected_sleeps']} more time(s) than asked "
                            f"(an idle gap of --sleep-idle seconds): its figures in that round are suspect")
        if not s["slot_save"]["holds_hub_prompt"]:
            warnings.append(f"round {i + 1}: the saved llama-server slot did not hold the hub's last prompt")
        e = r["edgellm"]
        pairs = [("cold", "cold"), ("restart", "restart")] + [(f"chat {k + 1}", k) for k in range(len(e["chat"]))]
        for label, key in pairs:
            a, b = (e[key], s[key]) if isinstance(key, str) else (e["chat"][key], s["chat"][key])
            if a["prompt_tokens"] != b["prompt_tokens"]:
                warnings.append(f"round {i + 1}, {label}: prompt tokens differ (edgellm {a['prompt_tokens']}, "
                                f"llama-server {b['prompt_tokens']})")
    if warnings:
        lines += ["", "### Warnings", "", *[f"- {w}" for w in warnings]]
    return "\n".join(lines)


def bench_model(model: Path, args: argparse.Namespace, bin_dir: Path, out: Path) -> dict:
    out.mkdir(parents=True)
    vocab = Model(model, vocab_only=True)
    ban = {str(t): -100 for t in vocab.eog_tokens}  # both reply with exactly --max-tokens tokens
    work = Workload(vocab, args)
    vocab.close()
    (out / "prompts.json").write_text(json.dumps(work.describe(), indent=2))
    print(f"{model.name}: system prompt {work.system_tokens} tokens, first chat message {work.first_tokens} tokens")
    rounds = []
    for rnd in range(args.rounds):
        order = ["edgellm", "llama-server"] if rnd % 2 == 0 else ["llama-server", "edgellm"]
        rounds.append({name: run_round(name, model, args, bin_dir, out, rnd, work, ban) for name in order})
        print(f"  round {rnd + 1}: " + ", ".join(
            f"{n} cold {rounds[-1][n]['cold']['ttft_ms']:.1f} warm {ttft(rounds[-1][n]['warm']):.1f} "
            f"reload {rounds[-1][n]['reload']['ttft_ms']:.1f} restart {rounds[-1][n]['restart']['ttft_ms']:.1f} ms"
            for n in order))
    summary = summarise(rounds, args.turns)
    title = (f"{model.name}: {work.system_tokens}-token system prompt ({work.tools} tools, {work.devices} devices), "
             f"{args.turns}-turn chat from a "
             f"{work.first_tokens}-token message; {args.threads} threads, {args.slots} slots, ctx {args.ctx}, "
             f"{args.max_tokens} tokens per reply, {args.rounds} round(s)")
    flags = {"edgellm_engine": [f"n_ctx = {args.ctx}", f"n_threads = {args.threads}", f"parallel = {args.slots}",
                                "max_queue = 64", *args.engine_setting],
             "llama_server_defaults": LLAMA_DEFAULTS,
             "llama_server": ["-c", str(args.ctx), "-t", str(args.threads), "-tb", str(args.threads), "-np",
                              str(args.slots), "--kv-unified", "--no-webui", *llama_flags(args, Path("STATE"))]}
    md = (f"{title}\n\nedgellm [engine]: {'; '.join(flags['edgellm_engine'])}\n\n"
          f"llama-server: {' '.join(flags['llama_server'])}; its defaults otherwise ({LLAMA_DEFAULTS})\n\n"
          f"{markdown(summary, rounds)}\n")
    run.write_results(out, {"model": model.name, "workload": {k: v for k, v in work.describe().items()
                                                              if isinstance(v, int)},
                            "flags": flags, "rounds": rounds, "summary": summary}, md)
    print(md)
    return {"model": model.name, "summary": summary}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, help="GGUF model (with --tiny: also the tiny one)")
    parser.add_argument("--tiny", action="store_true", help="the tiny random model of run.py (after --model, if any)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--system-tokens", type=int, default=2000, help="the hub's system prompt, about")
    parser.add_argument("--turns", type=int, default=8, help="chat turns")
    parser.add_argument("--first-tokens", type=int, default=300, help="the chat's first message, about")
    parser.add_argument("--repeats", type=int, default=3, help="warm and interleaved hub turns per round")
    parser.add_argument("--others", type=int, default=3, help="other clients between interleaved hub turns")
    parser.add_argument("--max-tokens", type=int, default=8, help="reply length")
    parser.add_argument("--sleep-idle", type=int, default=2,
                        help="llama-server --sleep-idle-seconds: how its unload is emulated")
    parser.add_argument("--engine-setting", action="append", default=[], metavar="'KEY = VALUE'",
                        help="a TOML line added to edgellm's [engine] (e.g. prompt_cache_disk); repeatable")
    parser.add_argument("--llama-server-arg", action="append", default=[], metavar="=ARG",
                        help="one more llama-server argument, e.g. --llama-server-arg=--swa-full; repeatable")
    run.server_arguments(parser, 18480)
    args = parser.parse_args()
    if not args.model and not args.tiny:
        parser.error("give --model, --tiny or both")

    load = run.print_load_average()
    bin_dir = run.build_llama_cpp(os.cpu_count() or 1)
    out = run.results_dir(args.out)
    results = []
    if args.model:
        results.append(bench_model(args.model, args, bin_dir, out / f"prefix-{args.model.stem}"))
    if args.tiny:
        out.mkdir(parents=True, exist_ok=True)
        tiny = run.tiny_model(out / "tiny-random.gguf")
        results.append(bench_model(tiny, args, bin_dir, out / "prefix-tiny-random"))
    run.write_summary(out, load, args, results, max_tokens=args.max_tokens)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
