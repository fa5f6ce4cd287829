"""Prometheus metrics, one registry per service (tests run several in one process).

The scheduler thread updates most of them; prometheus-client's instruments
are thread-safe, and each update is a lock and an addition.
"""

from __future__ import annotations

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

OUTCOMES = ("completed", "cancelled", "failed", "rejected", "invalid")
RELAY_REASONS = ("missing", "overflow", "fallback")  # the [relay] policies' names
_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0, 30.0)
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("edgellm_requests", "Requests by outcome: completed, cancelled, failed, "
                                "rejected (queue full or not ready), invalid (4xx)", ["outcome"], registry=r)
        for outcome in OUTCOMES:  # every outcome is in the output from the start, at zero
            self.requests.labels(outcome)
        self.queue_depth = Gauge("edgellm_queue_depth", "Requests waiting for a sequence slot",
                                 ["model"], registry=r)
        self.running = Gauge("edgellm_running_sequences", "Sequences being prefilled or generated",
                             ["model"], registry=r)
        self.kv_cells_used = Gauge("edgellm_kv_cells_used", "KV cache cells held by running sequences",
                                   ["model"], registry=r)
        self.kv_cells_cached = Gauge("edgellm_kv_cells_cached", "KV cache cells kept by idle slots for "
                                     "prefix reuse", ["model"], registry=r)
        self.kv_cells_untracked = Gauge("edgellm_kv_cells_untracked", "KV cache cells llama.cpp holds beyond what "
                                        "the slots account for (a leak: always 0)", ["model"], registry=r)
        self.prompt_tokens = Counter("edgellm_prompt_tokens", "Prompt tokens of admitted requests",
                                     ["model"], registry=r)
        self.cached_tokens = Counter("edgellm_cached_prompt_tokens", "Prompt tokens reused from the KV cache",
                                     ["model"], registry=r)
        self.restored_tokens = Counter("edgellm_prompt_cache_restored_tokens", "Prompt tokens restored from "
                                       "prompt snapshots instead of computed (counted in cached too)", ["model"],
                                       registry=r)
        self.snapshots_saved = Counter("edgellm_prompt_cache_saved", "Prompt snapshots saved", ["model"],
                                       registry=r)
        self.prompt_cache_bytes = Gauge("edgellm_prompt_cache_bytes", "Bytes of prompt snapshots, by tier: "
                                        "memory or disk", ["tier"], registry=r)
        self.generated_tokens = Counter("edgellm_generated_tokens", "Tokens generated", ["model"], registry=r)
        self.ttft = Histogram("edgellm_time_to_first_token_seconds", "From submission to the first token",
                              ["model"], buckets=_LATENCY_BUCKETS, registry=r)
        self.itl = Histogram("edgellm_inter_token_latency_seconds", "Between consecutive tokens of a sequence",
                             ["model"], buckets=_LATENCY_BUCKETS, registry=r)
        self.decode_steps = Counter("edgellm_decode_steps", "llama_decode calls", ["model"], registry=r)
        self.batch_tokens = Histogram("edgellm_batch_tokens", "Tokens per llama_decode call", ["model"],
                                      buckets=_BATCH_BUCKETS, registry=r)

        self.preemptions = Counter("edgellm_preemptions", "Sequences paused because the KV cache was full "
                                   "(recomputed later: n_ctx is small for the load)", ["model"], registry=r)
        self.loads = Counter("edgellm_model_loads", "Models loaded (again: after an unload or a failure)", ["model"],
                             registry=r)
        self.unloads = Counter("edgellm_model_unloads", "Models unloaded, by reason: keep_alive, room (for "
                               "another model), admin, removed, failed (its runner stopped), shutdown",
                               ["model", "reason"], registry=r)

        self.temperature = Gauge("edgellm_temperature_celsius", "Temperature of each thermal zone", ["zone"],
                                 registry=r)
        self.throttled = Gauge("edgellm_throttled", "1 while the board throttles (heat, power), else 0",
                               registry=r)
        self.threads = Gauge("edgellm_threads", "CPU threads each decode step uses", registry=r)
        self.served = Counter("edgellm_served", "API responses by where they were served: local or upstream",
                              ["by"], registry=r)
        self.relayed = Counter("edgellm_relayed", "Requests relayed upstream, by the [relay] policy that sent "
                               "them: missing (not installed here), overflow (local wait over ttft_budget), "
                               "fallback (the local attempt failed)", ["reason"], registry=r)
        for reason in RELAY_REASONS:
            self.relayed.labels(reason)
        self.upstream_tokens = Counter("edgellm_upstream_tokens", "Tokens the upstream reported for relayed "
                                       "requests", ["kind"], registry=r)

    def render(self) -> bytes:
        return generate_latest(self.registry)

    def for_model(self, model_id: str) -> ModelMetrics:
        return ModelMetrics(self, model_id)


class ModelMetrics:
    """The instruments of one model, labels bound once: the scheduler updates them every token."""

    def __init__(self, m: Metrics, model: str) -> None:
        self.requests = {outcome: m.requests.labels(outcome) for outcome in OUTCOMES}
        self.queue_depth = m.queue_depth.labels(model)
        self.running = m.running.labels(model)
        self.kv_cells_used = m.kv_cells_used.labels(model)
        self.kv_cells_cached = m.kv_cells_cached.labels(model)
        self.kv_cells_untracked = m.kv_cells_untracked.labels(model)
        self.prompt_tokens = m.prompt_tokens.labels(model)
        self.cached_tokens = m.cached_tokens.labels(model)
        self.restored_tokens = m.restored_tokens.labels(model)
        self.snapshots_saved = m.snapshots_saved.labels(model)
        self.generated_tokens = m.generated_tokens.labels(model)
        self.ttft = m.ttft.labels(model)
        self.itl = m.itl.labels(model)
        self.decode_steps = m.decode_steps.labels(model)
        self.batch_tokens = m.batch_tokens.labels(model)
        self.preemptions = m.preemptions.labels(model)
