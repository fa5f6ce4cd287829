"""CPU per request of aiohttp and httpx as the relay's client, the reason the relay uses aiohttp.

    python tools/bench/http_clients.py [--requests 300]

Against the relay benchmark's echo upstream (answers at once), in this process:
the CPU time (user + system) per streamed response of 32 events and per short
non-streamed request, for each client, in turns.
"""

from __future__ import annotations

import argparse
import asyncio
import resource
import subprocess
import sys
from pathlib import Path

import aiohttp
import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from relay import ECHO  # noqa: E402

BODY = {"model": "up", "prompt": "Hello", "max_tokens": 32}


def cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


async def with_aiohttp(url: str, n: int, stream: bool) -> float:
    async with aiohttp.ClientSession() as session:
        start = cpu()
        for _ in range(n):
            async with session.post(url + "/v1/completions", json={**BODY, "stream": stream}) as r:
                while await r.content.readany():
                    pass
        return (cpu() - start) / n


async def with_httpx(url: str, n: int, stream: bool) -> float:
    async with httpx.AsyncClient() as client:
        start = cpu()
        for _ in range(n):
            async with client.stream("POST", url + "/v1/completions", json={**BODY, "stream": stream}) as r:
                async for _ in r.aiter_raw():
                    pass
        return (cpu() - start) / n


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=300)
    args = parser.parse_args()
    echo = subprocess.Popen([sys.executable, "-c", ECHO], stdout=subprocess.PIPE, text=True)
    url = echo.stdout.readline().split("listening on ")[1].strip()
    try:
        for stream in (True, False):
            results = {"aiohttp": [], "httpx": []}
            for _ in range(3):
                results["aiohttp"].append(asyncio.run(with_aiohttp(url, args.requests, stream)))
                results["httpx"].append(asyncio.run(with_httpx(url, args.requests, stream)))
            a, h = (sorted(v)[1] * 1e6 for v in results.values())
            kind = "streamed response (32 events)" if stream else "short request"
            print(f"{kind:32} aiohttp {a:7.0f} us CPU   httpx {h:7.0f} us CPU   aiohttp/httpx {a / h:.2f}")
    finally:
        echo.terminate()


if __name__ == "__main__":
    main()
