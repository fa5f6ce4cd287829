"""Continuous batching: what goes into each llama_decode.

Each step builds one batch: first the next token of every generating sequence,
then prompt chunks of admitted sequences in admission order, n_batch tokens at
most in all, so a long prompt delays the others by one chunk per step. One
llama_decode, then every sequence with an output samples its next token with
its own sampler chain.

Sequences run in slots (llama seq_ids) of one context with a unified KV cache.
A finished sequence leaves its tokens in its slot's cells; a new prompt that
starts with the same tokens (a shared system prompt, the next turn of a
conversation) reuses them, copied between slots if need be, instead of
computing them again. A new prompt goes where it saves the most and destroys the
least (_choose): a short unrelated prompt never truncates a long cached prefix for
the few tokens it shares with it. Prefixes worth keeping past an unload or a
restart are saved as prompt snapshots (prompt_cache.py), and restored into a slot
when no slot holds as much. When the cache is full, idle slots give up their cells
first (saved first if they extend a reused prefix), then prefill waits, then the newest sequence is
preempted and later recomputed: llama_decode failing for lack of space never fails
a request.

Everything here runs on the runner's thread, the only one touching the context.
"""

from __future__ import annotations

import ctypes
import logging
import math
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import llama_cpp.llama_cpp as C

from edgellm.engine.errors import EngineError
from edgellm.engine.model import Model
from edgellm.engine.prompt_cache import MIN_TOKENS, CacheView, common_prefix
from edgellm.engine.sampling import Sampler
from edgellm.engine.stream import Finish, Outbox, Stream, Text, Usage
from edgellm.engine.text import TextAssembler
from edgellm.metrics import Metrics

log = logging.getLogger("edgellm.engine")


@dataclass
class Prepared:
    """A tokenized prompt ready to run. The sampler stays its owner's (the generation
    service's): the scheduler only uses it, until it ends the request's stream."""

    prompt: list[int]
    sampler: Sampler
    max_tokens: int | None = None
    stops: tuple[str, ...] = ()
    # The prompt snapshot sharing the longest prefix with the prompt (its tokens and state),
    # found before submission; restored if no slot holds as much when the sequence starts.
    snapshot: tuple[list[int], ctypes.Array[ctypes.c_uint8]] | None = None
    # Whose cached cells it may reuse: an API key's id ("" when every client may share them).
    partition: str = ""
    # Control tokens whose text the reply shows: the markers of its tool calls' syntax.
    visible: frozenset[int] = frozenset()


@dataclass(eq=False)
class Job:
    request: Prepared
    stream: Stream
    submitted: float = field(default_factory=time.perf_counter)


def _shared(slot: Slot, tokens: list[int], partition: str) -> int:
    """The leading tokens of `tokens` whose cells a slot holds and may give to this partition."""
    return common_prefix(slot.tokens, tokens) if slot.partition == partition else 0


class Slot:
    """One llama seq_id, and the tokens its KV cells hold, position by position."""

    def __init__(self, seq_id: int) -> None:
        self.seq_id = seq_id
        self.tokens: list[int] = []
        self.sequence: Sequence | None = None
        self.used_at = 0.0
        self.reused = False  # its last sequence reused MIN_TOKENS or more: its cells are a client's prefix
        self.partition = ""  # whose prompt its cells hold: only that partition's requests reuse them


class Sequence:
    """A request while it runs in a slot."""

    def __init__(self, job: Job, limit: int) -> None:
        self.job = job
        self.stream = job.stream
        self.sampler = job.request.sampler
        self.prompt_len = len(job.request.prompt)
        self.limit = limit  # tokens it may generate: max_tokens, and the context
        self.text = TextAssembler(job.request.stops)
        self.slot: Slot | None = None
        self.resume: list[int] = job.request.prompt  # what to (re)compute when next admitted
        self.pending: list[int] = []  # prompt tokens not decoded yet
        self.next_token: int | None = None  # sampled, to be decoded in the next step
        self.generated = 0
        self.cached = 0
        self.started = 0.0
        self.last_token_at = 0.0


@dataclass
class _Plan:
    """One batch: who has an output at which index, and what each sequence contributes."""

    outputs: list[tuple[Sequence, int]] = field(default_factory=list)
    prefill: list[tuple[Sequence, int]] = field(default_factory=list)  # (sequence, tokens taken)
    generating: list[Sequence] = field(default_factory=list)
    n_tokens: int = 0


def put(batch: C.llama_batch, i: int, token: int, pos: int, seq_id: int, output: bool) -> None:
    """Token `i` of a batch: one token at one position of one sequence."""
    batch.token[i] = token
    batch.pos[i] = pos  # type: ignore[call-overload]  # llama-cpp-python types it one level too deep
    batch.n_seq_id[i] = 1
    batch.seq_id[i][0] = seq_id
    batch.logits[i] = output


class Scheduler:
    def __init__(self, ctx: C.llama_context_p, batch: C.llama_batch, model: Model, *, model_id: str, n_ctx: int,
                 n_batch: int, parallel: int, outbox: Outbox, metrics: Metrics,
                 on_release: Callable[[Job], None], cache: CacheView | None = None) -> None:
        self.ctx = ctx
        self.batch = batch
        self.mem = C.llama_get_memory(ctx)
        self.model = model
        self.n_swa = C.llama_model_n_swa(model.ptr)
        self.model_id = model_id
        self.n_ctx = n_ctx
        self.n_batch = n_batch
        self.slots = [Slot(i) for i in range(parallel)]
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []  # in admission order: prefill is served first come, first served
        self.outbox = outbox
        self.metrics = metrics.for_model(model_id)
        self.on_release = on_release  # the runner's count of what it has accepted
        self.cache = cache  # prompt snapshots; None when [engine] prompt_cache_* are 0
        self.mean_duration = 2.0  # seconds a request runs, smoothed (read by the runner for Retry-After)
        self._gauged: tuple[int, int] | None = None  # the queue the gauges show, and when they were set
        self._gauged_at = 0.0
        self._update_gauges()

    # --- intake -----------------------------------------------------------------------------

    @property
    def busy(self) -> bool:
        return bool(self.waiting or self.running)

    def add(self, job: Job) -> None:
        limit = self.n_ctx - len(job.request.prompt)
        if job.request.max_tokens is not None:
            limit = min(limit, job.request.max_tokens)
        self.waiting.append(Sequence(job, limit))

    # --- one step -----------------------------------------------------------------------------

    def step(self) -> None:
        self._drop_cancelled()
        self._admit()
        if self.running:
            for sequence, index in self._decode():
                self._sample(sequence, index)
        self._update_gauges()

    def abandon(self) -> None:
        """Forget every sequence, running or waiting, without touching the context: the runner
        is stopping, or failed, and ends their streams itself."""
        self.running.clear()
        self.waiting.clear()
        self._update_gauges()

    def _drop_cancelled(self) -> None:
        for sequence in [s for s in self.running if s.stream.cancelled]:
            log.info("generation cancelled after %d tokens", sequence.generated)
            self.metrics.requests["cancelled"].inc()
            self._release(sequence, keep_cache=False)
        for sequence in [s for s in self.waiting if s.stream.cancelled]:
            self.waiting.remove(sequence)
            self.metrics.requests["cancelled"].inc()
            self._release(sequence, keep_cache=False)

    def _admit(self) -> None:
        while self.waiting:
            free = [s for s in self.slots if s.sequence is None]
            if not free:
                return
            sequence = self.waiting.popleft()
            first = not sequence.started  # not a preempted sequence coming back
            kept, restored = self._place(sequence, free)
            if first:
                sequence.started = time.perf_counter()
                sequence.cached = kept
                self.metrics.prompt_tokens.inc(sequence.prompt_len)
                self.metrics.cached_tokens.inc(kept)
                self.metrics.restored_tokens.inc(restored)

    def _place(self, sequence: Sequence, free: list[Slot]) -> tuple[int, int]:
        """Put a sequence in a free slot with the longest cached prefix there is: the slot's
        own cells, another slot's (copied), or a prompt snapshot (restored). Returns the
        tokens kept, and how many of them a snapshot gave."""
        tokens, partition = sequence.resume, sequence.job.request.partition
        limit = len(tokens) - 1  # one token must run for logits
        slot = self._choose(free, tokens, partition)
        keep = min(_shared(slot, tokens, partition), limit)
        self._save_before_loss(slot, keep)
        donor = max(self.slots, key=lambda s: _shared(s, tokens, partition))
        donor_keep = min(_shared(donor, tokens, partition), limit)
        snapshot = sequence.job.request.snapshot
        snapshot_keep = min(common_prefix(snapshot[0], tokens), limit) if snapshot is not None else 0
        restored = 0
        if snapshot is not None and snapshot_keep > max(keep, donor_keep):
            keep = restored = self._restore(slot, snapshot[1], snapshot_keep)
        elif donor is not slot and donor_keep > keep:
            # Another slot (maybe busy) holds a longer prefix: share its cells.
            C.llama_memory_seq_rm(self.mem, slot.seq_id, -1, -1)
            C.llama_memory_seq_cp(self.mem, donor.seq_id, slot.seq_id, 0, donor_keep)
            keep = donor_keep
        elif not C.llama_memory_seq_rm(self.mem, slot.seq_id, keep, -1):
            keep = 0  # this memory cannot cut a sequence short (recurrent state)
        if keep and not self._holds(slot.seq_id, keep):
            keep = restored = 0
        if keep == 0:
            C.llama_memory_seq_rm(self.mem, slot.seq_id, -1, -1)
        slot.tokens = tokens[:keep]
        slot.partition = partition
        slot.reused = keep >= MIN_TOKENS
        if not restored and self._worth_saving(slot, 0):
            self._save(slot)  # a prefix that a second request reused: keep it past an unload
        slot.sequence = sequence
        sequence.slot = slot
        sequence.pending = tokens[keep:]
        self.running.append(sequence)
        return keep, restored

    def _choose(self, free: list[Slot], tokens: list[int], partition: str) -> Slot:
        """The free slot where this prompt saves the most and destroys the least. A slot's cells
        past the shared prefix are lost (unless a snapshot holds them), so a short unrelated
        prompt goes to an empty slot, or the least valuable one, rather than truncate a long
        cached prefix for the few tokens (BOS, a turn marker) it shares with it. Another
        partition's cells share nothing with it, whatever their tokens."""
        limit = len(tokens) - 1

        def value(slot: Slot) -> tuple[int, int, float]:
            reuse = min(_shared(slot, tokens, partition), limit)
            lost = len(slot.tokens) - reuse
            if lost and self.cache is not None:
                lost = len(slot.tokens) - max(reuse, self.cache.partition(slot.partition).covered(slot.tokens))
            return reuse - lost, reuse, -slot.used_at  # among equals, the least recently used

        return max(free, key=value)

    # --- prompt snapshots -------------------------------------------------------------------

    def _worth_saving(self, slot: Slot, reused: int) -> bool:
        """Whether a snapshot of the slot's tokens would hold MIN_TOKENS or more that no snapshot of
        its partition holds (beyond the `reused` ones the next sequence keeps in the slot anyway)."""
        tokens = slot.tokens
        if self.cache is None or len(tokens) - reused < MIN_TOKENS:
            return False
        return len(tokens) - max(reused, self.cache.partition(slot.partition).covered(tokens)) >= MIN_TOKENS

    def _save_before_loss(self, slot: Slot, keep: int) -> None:
        """Save a slot's cells before all but `keep` of them are dropped, if they are worth it: they
        extend a prefix that was reused (a hub's next turn, a chat's history and last reply). A
        one-off request's cells are not saved: most are never asked for again, and saving each
        would cost every request a copy of its KV state and a disk write."""
        if slot.sequence is None and slot.reused and self._worth_saving(slot, keep):
            self._save(slot)

    def _save(self, slot: Slot) -> None:
        """Snapshot what a slot holds (exactly slot.tokens) into the prompt cache."""
        assert self.cache is not None
        size = C.llama_state_seq_get_size(self.ctx, slot.seq_id)
        if not self.cache.accepts(size):
            return
        data = (ctypes.c_uint8 * size)()
        if C.llama_state_seq_get_data(self.ctx, data, size, slot.seq_id) != size:
            log.warning("llama.cpp could not snapshot a %d-token prefix", len(slot.tokens))
            return
        self.cache.partition(slot.partition).add(slot.tokens, data)
        self.metrics.snapshots_saved.inc()

    def _restore(self, slot: Slot, data: ctypes.Array[ctypes.c_uint8], keep: int) -> int:
        """Load a snapshot into a slot, cut to its first `keep` tokens; the tokens kept (0 if
        llama.cpp refused it: no room in the cache, most likely)."""
        C.llama_memory_seq_rm(self.mem, slot.seq_id, -1, -1)
        if C.llama_state_seq_set_data(self.ctx, data, len(data), slot.seq_id) == 0:
            log.warning("could not restore a prompt snapshot; computing its tokens instead")
            return 0
        if not C.llama_memory_seq_rm(self.mem, slot.seq_id, keep, -1):
            return 0
        return keep

    def _holds(self, seq_id: int, keep: int) -> bool:
        """Whether the memory really holds positions [0, keep) of seq_id, as attention will need them.

        Sliding-window layers may have dropped cells older than their window, and a
        recurrent state copied from another slot covers all of that slot's tokens:
        in both cases the cache cannot stand in for the prefix, and it is recomputed.
        """
        if C.llama_memory_seq_pos_max(self.mem, seq_id) != keep - 1:
            return False
        n_swa = self.n_swa
        return not n_swa or C.llama_memory_seq_pos_min(self.mem, seq_id) <= max(0, keep - n_swa)

    # --- the batch ------------------------------------------------------------------------------

    def _plan(self, prefill_budget: int) -> _Plan:
        plan = _Plan()
        batch = self.batch
        n = 0
        for sequence in self.running:
            slot = sequence.slot
            assert slot is not None  # a running sequence has its slot
            if sequence.next_token is not None:
                put(batch, n, sequence.next_token, len(slot.tokens), slot.seq_id, True)
                plan.outputs.append((sequence, n))
                plan.generating.append(sequence)
                n += 1
        limit = min(self.n_batch, n + prefill_budget)
        for sequence in self.running:
            slot = sequence.slot
            assert slot is not None
            if not sequence.pending or n >= limit:
                continue
            take = min(len(sequence.pending), limit - n)
            start = len(slot.tokens)
            seq_id = slot.seq_id
            for j in range(take):
                put(batch, n + j, sequence.pending[j], start + j, seq_id, False)
            n += take
            if take == len(sequence.pending):  # the prompt's last token: its logits give the first token
                batch.logits[n - 1] = 1
                plan.outputs.append((sequence, n - 1))
            plan.prefill.append((sequence, take))
        batch.n_tokens = n
        plan.n_tokens = n
        return plan

    def _decode(self) -> list[tuple[Sequence, int]]:
        """One llama_decode; when the KV cache is full, make room and try again."""
        prefill_budget = self.n_batch
        while self.running:
            plan = self._plan(prefill_budget)
            if plan.n_tokens == 0:
                return []
            status = C.llama_decode(self.ctx, self.batch)
            if status == 0:
                self._commit(plan)
                return plan.outputs
            if status != 1:
                self._fail([*plan.generating, *(s for s, _ in plan.prefill)],
                           EngineError(f"llama_decode failed with status {status}"))
                continue
            # No room in the KV cache (llama.cpp left it as it was): degrade, never fail.
            if self._evict_idle_cache():
                continue
            if plan.prefill and plan.generating:
                # Smaller prompt chunks first; at 0, prompts wait until generation frees cells.
                prefill_budget = sum(take for _, take in plan.prefill) // 2
                continue
            if len(self.running) > 1:
                self._preempt(self.running[-1])
                continue
            self._fail(self.running[:], EngineError("the KV cache is full (raise n_ctx)"))
        return []

    def _commit(self, plan: _Plan) -> None:
        for sequence in plan.generating:
            assert sequence.slot is not None and sequence.next_token is not None
            sequence.slot.tokens.append(sequence.next_token)
            sequence.next_token = None
        for sequence, take in plan.prefill:
            assert sequence.slot is not None
            sequence.slot.tokens.extend(sequence.pending[:take])
            sequence.pending = sequence.pending[take:]
        self.metrics.decode_steps.inc()
        self.metrics.batch_tokens.observe(plan.n_tokens)

    def _evict_idle_cache(self) -> bool:
        idle = [s for s in self.slots if s.sequence is None and s.tokens]
        if not idle:
            return False
        slot = min(idle, key=lambda s: s.used_at)
        self._save_before_loss(slot, 0)
        C.llama_memory_seq_rm(self.mem, slot.seq_id, -1, -1)
        slot.tokens = []
        return True

    def _preempt(self, sequence: Sequence) -> None:
        """Free a running sequence's cells and queue it first, to recompute them later."""
        log.info("KV cache full: pausing a sequence after %d tokens; it resumes when there is room",
                 sequence.generated)
        self.metrics.preemptions.inc()
        slot = sequence.slot
        assert slot is not None
        sequence.resume = slot.tokens + ([sequence.next_token] if sequence.next_token is not None else []) \
            + sequence.pending
        sequence.next_token = None
        sequence.pending = []
        C.llama_memory_seq_rm(self.mem, slot.seq_id, -1, -1)
        slot.tokens = []
        slot.sequence = None
        sequence.slot = None
        self.running.remove(sequence)
        self.waiting.appendleft(sequence)

    # --- sampling -------------------------------------------------------------------------------

    def _sample(self, sequence: Sequence, index: int) -> None:
        token = sequence.sampler.sample(self.ctx, index, sequence.limit - sequence.generated)
        now = time.perf_counter()
        if not sequence.last_token_at:
            self.metrics.ttft.observe(now - sequence.job.submitted)
        if self.model.is_eog(token):
            self._finish(sequence, "stop")
            return
        if sequence.last_token_at:
            self.metrics.itl.observe(now - sequence.last_token_at)
        sequence.last_token_at = now
        sequence.generated += 1
        self.metrics.generated_tokens.inc()
        text = sequence.text.feed(self.model.piece(token, special=token in sequence.job.request.visible))
        if text:
            self.outbox.put(sequence.stream, Text(text))
        if sequence.text.stopped:
            self._finish(sequence, "stop")
        elif sequence.generated >= sequence.limit:
            self._finish(sequence, "length")
        else:
            sequence.next_token = token

    def _finish(self, sequence: Sequence, reason: str) -> None:
        usage = Usage(sequence.prompt_len, sequence.generated, sequence.cached)
        text = sequence.text.finish()
        if text:
            self.outbox.put(sequence.stream, Text(text))
        self.outbox.put(sequence.stream, Finish(reason, usage))
        self.metrics.requests["completed"].inc()
        now = time.perf_counter()
        self.mean_duration += 0.2 * (now - sequence.started - self.mean_duration)
        elapsed = now - sequence.job.submitted
        log.info("generated %d tokens in %.2f s (%.1f tok/s) after a %d-token prompt (%d cached); finish: %s",
                 sequence.generated, elapsed, sequence.generated / elapsed if elapsed > 0 else math.inf,
                 sequence.prompt_len, sequence.cached, reason)
        self._release(sequence, keep_cache=True)

    def _fail(self, sequences: list[Sequence], error: EngineError) -> None:
        log.error("%s; ending %d request(s)", error, len(sequences))
        for sequence in sequences:
            self.outbox.put(sequence.stream, error)
            self.metrics.requests["failed"].inc()
            self._release(sequence, keep_cache=False)

    def _release(self, sequence: Sequence, *, keep_cache: bool) -> None:
        """End a sequence: its stream and its slot (whose cells stay as cache if kept)."""
        slot = sequence.slot
        if slot is not None:
            if not keep_cache:
                C.llama_memory_seq_rm(self.mem, slot.seq_id, -1, -1)
                slot.tokens = []
            slot.sequence = None
            slot.used_at = time.perf_counter()
            sequence.slot = None
        if sequence in self.running:
            self.running.remove(sequence)
        self.outbox.end(sequence.stream)
        self.on_release(sequence.job)

    def _update_gauges(self) -> None:
        # Called every step: the cell counts change with every token, and are read every few
        # seconds at most, so they are refreshed four times a second, the queue's at once.
        now = time.monotonic()
        queue = (len(self.waiting), len(self.running))
        if queue == self._gauged and now - self._gauged_at < 0.25:
            return
        self._gauged, self._gauged_at = queue, now
        m = self.metrics
        m.queue_depth.set(len(self.waiting))
        m.running.set(len(self.running))
        m.kv_cells_used.set(sum(len(s.slot.tokens) for s in self.running if s.slot is not None))
        m.kv_cells_cached.set(sum(len(s.tokens) for s in self.slots if s.sequence is None))
        # Asked of llama.cpp itself, not of the bookkeeping above: a slot whose cells outlive its
        # tokens (a sequence ended without its cells removed) shows here.
        m.kv_cells_untracked.set(sum(max(0, C.llama_memory_seq_pos_max(self.mem, s.seq_id) + 1 - len(s.tokens))
                                     for s in self.slots))
