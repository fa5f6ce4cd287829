"""The engine without HTTP: the runner, its scheduler and the pool, in-process, against the tiny
models. A scheduler or pool bug fails one of these fast, specific tests."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from edgellm.config import EngineConfig, ModelsConfig
from edgellm.engine import loader
from edgellm.engine.errors import QueueFull
from edgellm.engine.model import Model
from edgellm.engine.pool import Pool
from edgellm.engine.runner import Runner
from edgellm.engine.sampling import Sampler, SamplingParams
from edgellm.engine.scheduler import Prepared
from edgellm.engine.stream import Finish, Stream
from edgellm.hardware.plan import Plan, Step
from edgellm.metrics import Metrics
from edgellm.store.registry import Entry, ModelFile, describe

CPU = Plan([Step("cpu", "", 0, True)], threads=1, flash_attn="auto", reasons=[])


@pytest.fixture(scope="module")
def model(models):
    m = Model(models["scripted"])
    yield m
    m.close()


def request(model: Model, prompt: str, max_tokens: int | None = None, stops: tuple[str, ...] = ()
            ) -> Prepared:
    return Prepared(model.tokenize(prompt), Sampler(model, SamplingParams(temperature=0)), max_tokens, stops)


async def collect(runner: Runner, wanted: Prepared) -> tuple[str, Finish]:
    stream = runner.submit(wanted)
    stream.when_finished(wanted.sampler.close)
    parts = []
    async for event in stream:
        if isinstance(event, Finish):
            return "".join(parts), event
        parts.append(event.text)
    raise AssertionError("the stream ended without a Finish")


def run_with(model: Model, scenario, **settings):
    """The scenario's result, and a reader of the runner's metrics (name, **labels) -> value."""
    metrics = Metrics()
    runner = Runner(model, EngineConfig(n_threads=1, **settings), metrics=metrics, model_id="m")
    try:
        result = asyncio.run(scenario(runner))
    finally:
        runner.close()
    return result, lambda name, **labels: metrics.registry.get_sample_value(name, labels or {"model": "m"}) or 0


def test_concurrent_sequences_share_decode_steps_and_equal_one_by_one(model):
    prompts = [" Hello", " tick", " euro", " tock"]

    async def alone(runner: Runner) -> list[str]:
        return [(await collect(runner, request(model, p, 12)))[0] for p in prompts]

    async def together(runner: Runner) -> list[str]:
        results = await asyncio.gather(*(collect(runner, request(model, p, 12)) for p in prompts))
        return [text for text, _ in results]

    one_by_one, alone_metrics = run_with(model, alone, parallel=4)
    batched, together_metrics = run_with(model, together, parallel=4)
    assert batched == one_by_one and one_by_one[0] == " world!" and one_by_one[2] == "€"
    assert together_metrics("edgellm_decode_steps_total") < 0.6 * alone_metrics("edgellm_decode_steps_total")


def test_a_stop_string_ends_the_reply_and_never_reaches_the_client(model):
    async def scenario(runner: Runner) -> tuple[str, Finish]:
        return await collect(runner, request(model, " Hello", 10, stops=("ld",)))

    (text, finish), _ = run_with(model, scenario)
    assert text == " wor" and finish.reason == "stop"


def test_a_shared_prefix_is_reused_from_the_cache(model):
    async def scenario(runner: Runner) -> tuple[Finish, Finish]:
        _, cold = await collect(runner, request(model, " tick tock tick tock tick", 2))
        _, warm = await collect(runner, request(model, " tick tock tick tock tick", 2))
        return cold, warm

    (cold, warm), _ = run_with(model, scenario)
    assert cold.usage.cached_tokens == 0
    assert warm.usage.cached_tokens == warm.usage.prompt_tokens - 1  # all but the one that must run for logits


def test_a_cancelled_sequence_frees_its_place_for_the_next(model):
    async def scenario(runner: Runner) -> str:
        long = request(model, " tick", 30000)
        stream: Stream = runner.submit(long)
        stream.when_finished(long.sampler.close)
        await anext(stream)
        stream.cancel()
        async for _ in stream:  # it ends at the next step, without a Finish
            pass
        assert runner.estimated_wait() == 0  # the one place is free again
        return (await collect(runner, request(model, " Hello", 8)))[0]

    text, metrics = run_with(model, scenario, parallel=1, n_ctx=32768)
    assert text == " world!" and metrics("edgellm_requests_total", outcome="cancelled") == 1


def test_past_the_queue_a_submission_is_refused_with_a_retry_estimate(model):
    async def scenario(runner: Runner) -> QueueFull:
        held = [request(model, " tick", 30000) for _ in range(2)]  # one runs, one waits
        streams = [runner.submit(r) for r in held]
        for stream, r in zip(streams, held, strict=True):
            stream.when_finished(r.sampler.close)
        refused = request(model, " Hello", 8)
        with pytest.raises(QueueFull) as caught:
            runner.submit(refused)
        refused.sampler.close()
        for stream in streams:
            stream.cancel()
            async for _ in stream:
                pass
        return caught.value

    error, _ = run_with(model, scenario, parallel=1, max_queue=1, n_ctx=32768)
    assert error.status == 429 and error.retry_after is not None and error.retry_after >= 1
    assert "1 requests are already waiting" in error.message


def test_a_full_kv_cache_pauses_and_recomputes_instead_of_failing(model):
    async def scenario(runner: Runner) -> list[str]:
        results = await asyncio.gather(*(collect(runner, request(model, " tick", 120)) for _ in range(4)))
        return [finish.reason for _, finish in results]

    reasons, metrics = run_with(model, scenario, parallel=4, n_ctx=256, n_batch=64)
    assert reasons == ["length"] * 4
    assert metrics("edgellm_preemptions_total") >= 1


# --- the pool ------------------------------------------------------------------------------------

def entry_for(path: Path, name: str) -> Entry:
    return describe([path], model_id=name, source="test", files=[ModelFile(path.name, "", path.stat().st_size)])


def test_concurrent_first_leases_share_one_load(models, monkeypatch):
    loads = []
    real = loader.load
    monkeypatch.setattr(loader, "load", lambda *a, **k: loads.append(1) or real(*a, **k))

    async def scenario() -> set[str]:
        pool = Pool(EngineConfig(n_threads=1, n_ctx=256), ModelsConfig(), plan=lambda: CPU,
                    extra=[entry_for(models["scripted"], "a")])
        await pool.start()
        leases = await asyncio.gather(*(pool.acquire("a") for _ in range(8)))
        try:
            return {lease.loaded.id for lease in leases}
        finally:
            for lease in leases:
                lease.release()
            await pool.close()

    assert asyncio.run(scenario()) == {"a"} and loads == [1]


def test_a_load_waiting_for_room_holds_nothing_up(models):
    """max_loaded 2, both places busy: a third model's load waits, and meanwhile the admin API
    and the catalog answer at once (they used to queue behind the load's lock)."""
    async def scenario() -> None:
        pool = Pool(EngineConfig(n_threads=1, n_ctx=256), ModelsConfig(max_loaded=2, load_timeout="30s"),
                    plan=lambda: CPU, extra=[entry_for(models["scripted"], n) for n in ("a", "b")]
                    + [entry_for(models["random"], "c")])
        await pool.start()
        a, b = await pool.acquire("a"), await pool.acquire("b")
        c = asyncio.ensure_future(pool.acquire("c"))

        async def waiting() -> None:
            while not pool.find("c").waiting:
                await asyncio.sleep(0.01)

        await asyncio.wait_for(waiting(), 10)
        assert "busy model(s) a, b" in pool.find("c").waiting
        assert await asyncio.wait_for(pool.unload("b"), 1) is False  # in use: it unloads when released
        await asyncio.wait_for(pool.refresh(), 1)
        assert not c.done()
        b.release()  # b unloads (the admin asked), and c gets its place
        lease_c = await asyncio.wait_for(c, 30)
        assert {s.known.id: s.phase for s in pool.states()} == {"a": "loaded", "b": "unloaded", "c": "loaded"}
        lease_c.release()
        a.release()
        await pool.close()

    asyncio.run(scenario())


def test_a_replaced_model_in_use_still_counts_until_it_is_unloaded(models, tmp_path):
    """Replaced under the same name while a request holds it: the new file is served next, but the
    old one's memory and place count until it is unloaded (max_loaded = 1 here)."""
    import shutil

    from edgellm.store.registry import Registry

    registry = Registry(tmp_path / "state").open()
    shutil.copy(models["scripted"], tmp_path / "m.gguf")
    registry.add(tmp_path / "m.gguf")

    async def scenario() -> None:
        pool = Pool(EngineConfig(n_threads=1, n_ctx=256), ModelsConfig(max_loaded=1, load_timeout="30s"),
                    plan=lambda: CPU, registry=registry)
        await pool.start()
        old = await pool.acquire("m")
        before = pool.find("m").known.entry.sha256
        registry.remove("m")
        shutil.copy(models["random"], tmp_path / "m.gguf")
        registry.add(tmp_path / "m.gguf")
        await pool.refresh()
        assert pool.find("m").phase == "unloaded" and pool.find("m").known.entry.sha256 != before
        new = asyncio.ensure_future(pool.acquire("m"))
        done, _ = await asyncio.wait({new}, timeout=0.5)
        assert not done and "busy model(s) m" in pool.find("m").waiting  # the old one still holds the place
        old.release()  # now it unloads, and the new file loads
        lease = await asyncio.wait_for(new, 30)
        assert lease.loaded.model.path.name == f"sha256-{pool.find('m').known.entry.sha256}.gguf"
        lease.release()
        await pool.close()

    asyncio.run(scenario())


def test_text_already_waiting_reaches_a_reader_as_one_piece():
    """A reader that fell behind gets the pieces waiting for it joined (one response write, not one
    per token), never joined across the Finish or an error."""
    from edgellm.engine.errors import EngineError
    from edgellm.engine.stream import Outbox, Text, Usage

    async def scenario() -> list[object]:
        stream, outbox = Stream(), Outbox()
        for piece in ("Hel", "lo", " world"):
            outbox.put(stream, Text(piece))
        outbox.put(stream, Finish("stop", Usage(3, 3)))
        outbox.end(stream)
        outbox.flush()
        first = await anext(stream)  # the reader keeps up from here: each piece on its own
        later = Stream()
        reader = asyncio.ensure_future(anext(later))
        await asyncio.sleep(0)
        outbox.put(later, Text("a"))
        outbox.flush()
        one = await reader
        outbox.put(later, Text("b"))
        outbox.put(later, EngineError("boom"))
        outbox.flush()
        two = await anext(later)
        with pytest.raises(EngineError):
            await anext(later)
        return [first, [e async for e in stream], one, two]

    first, rest, one, two = asyncio.run(scenario())
    assert first == Text("Hello world")
    assert rest == [Finish("stop", Usage(3, 3))]
    assert (one, two) == (Text("a"), Text("b"))
