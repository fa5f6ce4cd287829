"""Compare edgellm's memory estimate with the RSS a load and its work really add.

    python tools/bench/memory.py MODEL.gguf [--n-ctx N] [--parallel P]

Prints one JSON object: the estimate, the measured RSS growth and the error.
Run it once per model: each run is a fresh process, so nothing an earlier
model left in the allocator hides what this one takes. RSS is read before the
load and after the model has loaded, prefilled a prompt longer than a
micro-batch and decoded `parallel` sequences at once: the most a loaded model
holds. The tests run it for the tiny models and Gemma 3 270M (test_pool.py).
"""

from __future__ import annotations

import argparse
import asyncio
import json
from pathlib import Path

import psutil

from edgellm.config import EngineConfig
from edgellm.engine.model import Model, init_llama
from edgellm.engine.runner import Runner
from edgellm.engine.sampling import Sampler, SamplingParams
from edgellm.engine.scheduler import Prepared
from edgellm.modelfile import gguf, memory


async def work(model: Model, runner: Runner, parallel: int) -> None:
    """A long prompt in several micro-batches, then `parallel` sequences decoding together."""
    async def generate(prompt: list[int], n: int) -> None:
        request = Prepared(prompt, Sampler(model, SamplingParams(temperature=1.0, seed=1)), max_tokens=n)
        stream = runner.submit(request)
        stream.when_finished(request.sampler.close)  # the caller owns the sampler, as the service does
        async for _ in stream:
            pass

    await generate([model.bos] + [5] * (runner.n_batch + 100), 4)
    await asyncio.gather(*(generate([model.bos, 5 + i] * 50, 16) for i in range(parallel)))


def measure(path: Path, n_ctx: int, parallel: int) -> dict:
    parts = gguf.split_parts(path)
    headers = [gguf.read(p) for p in parts]
    settings = EngineConfig(n_ctx=n_ctx, parallel=parallel)
    embedding = headers[0].arch("pooling_type") not in (None, 0)
    estimate = memory.estimate(headers, n_ctx=n_ctx, parallel=parallel, n_ubatch=settings.n_ubatch,
                               embedding=embedding).total
    init_llama()
    process = psutil.Process()
    before = process.memory_info().rss
    model = Model(parts)
    runner = Runner(model, settings)
    if model.is_embedding:
        asyncio.run(runner.embed([[5] * min(runner.n_batch, 500)] * 2))
    else:
        asyncio.run(work(model, runner, runner.parallel))
    grown = process.memory_info().rss - before
    runner.close()
    model.close()
    return {"model": path.name, "n_ctx": n_ctx, "parallel": parallel, "estimate_bytes": estimate,
            "measured_bytes": grown, "error": estimate / grown - 1}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", type=Path)
    parser.add_argument("--n-ctx", type=int, default=4096)
    parser.add_argument("--parallel", type=int, default=4)
    args = parser.parse_args()
    print(json.dumps(measure(args.model, args.n_ctx, args.parallel)))


if __name__ == "__main__":
    main()
