"""Per-request sampler chains and grammars for JSON output.

A chain is built when a request is prepared, so a bad grammar is a 400 before
anything is queued. The generation service owns it: the scheduler thread uses it
until it ends the request's stream, and the service frees it then. Samplers hold
no reference to the llama context, so building one outside that thread is safe.
"""

from __future__ import annotations

import ctypes
import math
from collections.abc import Callable
from dataclasses import dataclass, field

import llama_cpp.llama_cpp as C
import numpy as np

from edgellm.engine.errors import SchemaError
from edgellm.engine.grammar import to_gbnf
from edgellm.engine.json_keys import BANNED, KeyTracker
from edgellm.engine.llama_log import llama_errors, reason
from edgellm.engine.model import Model
from edgellm.engine.tools import CallGrammar, Watch


@dataclass(frozen=True)
class SamplingParams:
    """What shapes the choice of each token. Defaults: OpenAI's for its knobs, llama.cpp's for the rest."""

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 40
    min_p: float = 0.05
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repeat_penalty: float = 1.0
    penalty_last_n: int = 64
    logit_bias: dict[int, float] = field(default_factory=dict)
    ignore_eos: bool = False  # llama-server's extension: generate exactly max_tokens (benchmarks)
    json_schema: dict | None = None  # {} means any JSON object (response_format json_object)


# The last tokens of a JSON reply's max_tokens, in which closing tokens are favoured, and by how
# much per token closer to the end (logits: 1.5 per token, 18 for the last one).
CLOSING_WINDOW = 12
# A temperature this small is greedy decoding in all but arithmetic: logits divided by it overflow
# to infinities, the distribution becomes NaN, and with a grammar llama.cpp then picks a token the
# grammar forbids and aborts the process. So below it, the sampler is greedy.
GREEDY_BELOW = 1e-5
CLOSING_BOOST = 1.5


class Sampler:
    """One request's way of picking tokens; whoever holds it last calls close().

    Greedy decoding without a grammar or penalties skips llama.cpp's sampler
    chain: an argmax over the logits picks the same token without first copying
    the whole vocabulary into a candidate array, a tenth of the time on a
    262k-token vocabulary. Everything else runs a llama_sampler chain.
    """

    def __init__(self, model: Model, params: SamplingParams, *, check: Callable[[], None] | None = None,
                 calls: CallGrammar | None = None, visible: frozenset[int] = frozenset()) -> None:
        """`check`: called while a JSON schema compiles, to give up by raising (see grammar.to_gbnf).
        `calls`: the grammar of the reply's tool calls; `visible`: the control tokens of their syntax."""
        self.ptr = None
        self._calls: _Calls | None = None
        self.n_vocab = model.n_vocab
        self._row = ctypes.c_float * model.n_vocab  # one row of logits, read in place
        # JSON output: near the end of max_tokens, tokens that close the JSON are favoured and commas
        # (another item) disfavoured, so that a reply cut by the budget still ends where the grammar
        # allows it to. What closes depends on whether the reply is inside a string: tracked here.
        self._enders = None
        if params.json_schema is not None:
            quotes, brackets, commas = model.json_enders
            self._enders = (np.array(quotes, dtype=np.int64), np.array(brackets, dtype=np.int64),
                            np.array(commas, dtype=np.int64))
            self._piece = model.piece
            self._keys = KeyTracker(model.json_keys)  # also knows whether the reply is inside a string
        bias = dict(params.logit_bias)
        # With a grammar, the end of the document must stay possible: once the JSON is
        # complete the grammar allows only end tokens, and forbidding those too makes
        # llama.cpp abort the process.
        if params.ignore_eos and params.json_schema is None and calls is None:
            bias.update((token, -math.inf) for token in model.eog_tokens)
        if params.json_schema is not None:
            # The grammar reads a control token as its text (<s>, <unk>, <start_of_image>), which the
            # reply does not show: inside a string it would let through what the schema forbids.
            # (Tool calls keep them out themselves: see _Calls.)
            bias.update((token, -math.inf) for token in model.hidden_tokens)
        penalties = params.repeat_penalty != 1.0 or params.frequency_penalty or params.presence_penalty
        if params.temperature < GREEDY_BELOW and params.json_schema is None and calls is None and not penalties:
            self._bias_ids = np.fromiter(bias, dtype=np.int64, count=len(bias))
            self._bias_values = np.fromiter(bias.values(), dtype=np.float32, count=len(bias))
            self._biased = frozenset(bias)
            return
        self.ptr = C.llama_sampler_chain_init(C.llama_sampler_chain_default_params())
        try:
            self._build(model, params, bias, check)
            if calls is not None:
                remembers = bool(penalties)  # the only samplers of the chain that keep what they accept
                self._calls = _Calls(self.ptr, model, calls, visible, _exactness(params, bias), remembers)
        except BaseException:
            self.close()
            raise

    def sample(self, ctx: C.llama_context_p, index: int, remaining: int | None = None) -> int:
        """The next token from the logits of batch position `index` (the chain accepts it).
        `remaining`: the tokens the reply may still have, this one included."""
        if self._calls is not None:
            return self._calls.sample(ctx, index)
        if self.ptr is not None:
            if self._enders is None:
                return C.llama_sampler_sample(self.ptr, ctx, index)
            if remaining is not None and remaining <= CLOSING_WINDOW:
                self._favour_closing(ctx, index, remaining)
            banned = self._keys.banned()
            if banned:
                self._logits(ctx, index)[np.fromiter(banned, dtype=np.int64, count=len(banned))] += BANNED
            token = C.llama_sampler_sample(self.ptr, ctx, index)
            piece = self._piece(token)
            self._keys.feed(piece)
            return token
        address = ctypes.cast(C.llama_get_logits_ith(ctx, index), ctypes.c_void_p).value
        assert address is not None
        logits = np.frombuffer(self._row.from_address(address), dtype=np.float32)  # type: ignore[call-overload]
        best = int(logits.argmax())  # the first of equal maxima, as llama.cpp's greedy sampler picks
        if not len(self._bias_ids):
            return best
        if best in self._biased:  # rare: the favourite itself is biased; redo the argmax on a copy
            logits = logits.copy()
            logits[self._bias_ids] += self._bias_values
            return int(logits.argmax())
        # The favourite is unbiased, so only a biased token can beat it.
        biased = logits[self._bias_ids] + self._bias_values
        top = int(biased.argmax())
        token, value = int(self._bias_ids[top]), biased[top]
        if value > logits[best] or (value == logits[best] and token < best):
            return token
        return best

    def _favour_closing(self, ctx: C.llama_context_p, index: int, remaining: int) -> None:
        """Raise the logits of what ends the JSON, more as the budget runs out, and lower the commas:
        the grammar still decides what is allowed, this makes ending sooner likelier than going on."""
        assert self._enders is not None
        logits = self._logits(ctx, index)
        quotes, brackets, commas = self._enders
        boost = CLOSING_BOOST * (CLOSING_WINDOW + 1 - remaining)
        if self._keys.in_string:
            logits[quotes] += boost
        else:
            logits[brackets] += boost
            logits[commas] -= boost

    def _logits(self, ctx: C.llama_context_p, index: int) -> np.ndarray:
        """The logits row of batch position `index`, in place: what is changed here the chain sees."""
        address = ctypes.cast(C.llama_get_logits_ith(ctx, index), ctypes.c_void_p).value
        assert address is not None
        return np.frombuffer(self._row.from_address(address), dtype=np.float32)  # type: ignore[call-overload]

    def _add(self, sampler: C.llama_sampler_p) -> None:
        C.llama_sampler_chain_add(self.ptr, sampler)

    def _build(self, model: Model, p: SamplingParams, bias: dict[int, float],
               check: Callable[[], None] | None) -> None:
        if bias:
            biases = (C.llama_logit_bias * len(bias))(
                *(C.llama_logit_bias(token, value) for token, value in bias.items())
            )
            self._add(C.llama_sampler_init_logit_bias(model.n_vocab, len(biases), biases))
        if p.repeat_penalty != 1.0 or p.frequency_penalty or p.presence_penalty:
            self._add(C.llama_sampler_init_penalties(
                model.n_vocab, p.penalty_last_n, p.repeat_penalty, p.frequency_penalty, p.presence_penalty))
        if p.json_schema is not None:
            self._add(_grammar(model, p.json_schema, check))
        if p.temperature < GREEDY_BELOW:
            self._add(C.llama_sampler_init_greedy())
            return
        if p.top_k > 0:
            self._add(C.llama_sampler_init_top_k(p.top_k))
        if p.top_p < 1.0:
            self._add(C.llama_sampler_init_top_p(p.top_p, 1))
        if p.min_p > 0:
            self._add(C.llama_sampler_init_min_p(p.min_p, 1))
        self._add(C.llama_sampler_init_temp(p.temperature))
        seed = C.LLAMA_DEFAULT_SEED if p.seed is None else p.seed & 0xFFFFFFFF
        self._add(C.llama_sampler_init_dist(seed))

    def close(self) -> None:
        if self._calls is not None:
            self._calls.close()
        if self.ptr:
            C.llama_sampler_free(self.ptr)
            self.ptr = None


_CANDIDATE = np.dtype([("id", np.int32), ("logit", np.float32), ("p", np.float32)])  # llama_token_data


class _Calls:
    """Sampling under a tool-call grammar.

    The grammar checks the token the sampler chain picked freely, and only when it refuses
    that token is the whole vocabulary filtered by it and the chain run again (as llama.cpp's
    own server samples): a token the model wanted anyway costs one check, not a pass over
    every candidate.

    When the model may write text first (tool_choice auto), the grammar starts with the first
    trigger the text contains. A token that completes a trigger but goes on with something
    the grammar refuses is replaced by what the grammar allows after the part of the trigger
    already written, so the first trigger in the text is always where the grammar began
    (which is how calls.py finds the calls).
    """

    def __init__(self, chain: C.llama_sampler_p, model: Model, grammar: CallGrammar, visible: frozenset[int],
                 exact: Callable[[np.ndarray, float], bool] | None, remembers: bool) -> None:
        """`remembers`: the chain keeps the tokens it accepts (penalties): it must be told the token
        written, not the one it picked if the grammar refused that."""
        self._chain = chain
        self._exact = exact
        self._remembers = remembers
        # Tokens never written under the grammar (Model.hidden_tokens), as a mask over the vocabulary:
        # not as the chain's logit bias, which on a shortlist costs a search per biased token.
        self._hidden = np.zeros(model.n_vocab, dtype=bool)
        self._hidden[list(model.hidden_tokens - visible)] = True
        self._vocab = model.vocab
        self._model = model
        self._spec = grammar
        self._visible = visible
        self._watch = Watch(grammar)  # fed the pieces as Latin-1: the triggers are ASCII
        self._candidates: np.ndarray | None = None  # the whole vocabulary, when needed (_whole)
        self._ids: np.ndarray | None = None
        # Built here, in the worker thread that prepares the request: a grammar llama.cpp refuses is
        # a 400 now, and the usual start (a trigger at a token's start) costs the runner nothing.
        self._ready: C.llama_sampler_p | None = None
        self._grammar: C.llama_sampler_p | None = None
        self._ready = self._start(0, 0)
        if grammar.forced:
            self._grammar, self._ready = self._ready, None

    def sample(self, ctx: C.llama_context_p, index: int) -> int:
        token = self._sample(ctx, index)
        if self._remembers:
            C.llama_sampler_accept(self._chain, token)
        return token

    def _free_pick(self, ctx: C.llama_context_p, index: int) -> int:
        """The chain's pick, without the grammar."""
        if not self._remembers:
            return C.llama_sampler_sample(self._chain, ctx, index)  # (it accepts the token: no matter)
        token = self._pick(self._whole(ctx, index), grammar=False)
        assert token is not None
        return token

    def _sample(self, ctx: C.llama_context_p, index: int) -> int:
        token = self._free_pick(ctx, index)
        if self._grammar is not None:
            if not self._hidden[token] and self._allows(self._grammar, token):
                C.llama_sampler_accept(self._grammar, token)
                return token
            return self._resample(ctx, index)
        tail = self._watch.tail
        _, start, trigger = self._watch.find(self._model.piece(token, special=token in self._visible).decode("latin-1"))
        if start is None:
            return token
        if start <= len(tail):  # the token goes on from the text so far: does the grammar?
            grammar = self._start(trigger, len(tail) - start)
            if not self._hidden[token] and self._allows(grammar, token):
                C.llama_sampler_accept(grammar, token)
                self._grammar = grammar
                return token
            C.llama_sampler_free(grammar)
        # The trigger the text so far begins (else the one the token wrote), from where it stands.
        partial = self._watch.begun(tail)
        self._grammar = self._start(trigger if partial is None else partial, len(tail))
        return self._resample(ctx, index)

    def _start(self, trigger: int, written: int) -> C.llama_sampler_p:
        if (trigger, written) == (0, 0) and self._ready is not None:
            grammar, self._ready = self._ready, None
            return grammar
        with llama_errors() as errors:
            grammar = C.llama_sampler_init_grammar(self._vocab, self._spec.source(trigger, written), b"root")
        if not grammar:
            raise SchemaError(f"llama.cpp refused the tool-call grammar: {reason(errors, 'unknown')}",
                              param="tools")
        return grammar

    @staticmethod
    def _allows(grammar: C.llama_sampler_p, token: int) -> bool:
        one = (C.llama_token_data * 1)(C.llama_token_data(token, 0.0, 0.0))
        array = C.llama_token_data_array(one, 1, -1, False)
        C.llama_sampler_apply(grammar, ctypes.byref(array))
        return one[0].logit != -math.inf

    def _logits(self, ctx: C.llama_context_p, index: int) -> np.ndarray:
        address = ctypes.cast(C.llama_get_logits_ith(ctx, index), ctypes.c_void_p).value
        assert address is not None
        return np.frombuffer((ctypes.c_float * self._model.n_vocab).from_address(address), dtype=np.float32)  # type: ignore[call-overload]

    def _whole(self, ctx: C.llama_context_p, index: int) -> np.ndarray:
        """Every token with its logit, in id order (the chain sorts and shortens the array it is given:
        it is filled afresh each time)."""
        if self._candidates is None:
            self._candidates = np.zeros(self._model.n_vocab, dtype=_CANDIDATE)
            self._ids = np.arange(self._model.n_vocab, dtype=np.int32)
        candidates = self._candidates
        candidates["id"], candidates["logit"], candidates["p"] = self._ids, self._logits(ctx, index), 0.0
        return candidates

    def _resample(self, ctx: C.llama_context_p, index: int) -> int:
        """The chain's pick among the tokens the grammar allows.

        The grammar first filters the likeliest tokens (SHORTLIST_WINDOWS). When what the chain would
        keep of the whole vocabulary is sure to lie among them (exact(): top_k and min_p cut off
        everything below them), the chain picks from those; else the grammar filters the whole
        vocabulary, which on a 262k-token vocabulary takes longer than a decode step."""
        n_vocab = self._model.n_vocab
        logits = self._logits(ctx, index)
        exact = self._exact
        if exact is not None:
            peak, tried = float(logits.max()), 0
            for window in SHORTLIST_WINDOWS:
                ids = np.flatnonzero(logits >= peak - window)
                if len(ids) > MAX_SHORTLIST:
                    ids = np.argpartition(logits, -MAX_SHORTLIST)[-MAX_SHORTLIST:]
                if len(ids) <= tried or len(ids) >= n_vocab:
                    break  # no more than the last time, or everything
                tried = len(ids)
                short = np.zeros(len(ids), dtype=_CANDIDATE)
                short["id"], short["logit"] = ids, logits[ids]
                floor = float(short["logit"].min())  # every token outside has at most this
                token = self._pick(short, lambda: exact(short, floor))  # noqa: B023 (called at once)
                if token is not None:
                    return token
        token = self._pick(self._whole(ctx, index))
        assert token is not None
        return token

    def _pick(self, candidates: np.ndarray, exact: Callable[[], bool] | None = None, *,
              grammar: bool = True) -> int | None:
        """The chain's pick among `candidates`; with `grammar`, among those the grammar allows (and
        only if exact(), when given, then says the pick is the one the whole vocabulary would give)."""
        data = candidates.ctypes.data_as(C.llama_token_data_p)
        array = C.llama_token_data_array(data, len(candidates), -1, False)
        if grammar:
            C.llama_sampler_apply(self._grammar, ctypes.byref(array))
            candidates["logit"][self._hidden[candidates["id"]]] = -math.inf
            if exact is not None and not exact():
                return None
        C.llama_sampler_apply(self._chain, ctypes.byref(array))
        token = int(data[array.selected].id)
        if grammar:
            C.llama_sampler_accept(self._grammar, token)
        return token

    def close(self) -> None:
        for grammar in (self._grammar, self._ready):
            if grammar is not None:
                C.llama_sampler_free(grammar)
        self._grammar = self._ready = None

# Where a refused token's replacement is looked for first: the tokens within this many logits of
# the likeliest one (at most MAX_SHORTLIST of them), then within the next, then everywhere.
SHORTLIST_WINDOWS = (8.0, 16.0)
MAX_SHORTLIST = 4096


def _exactness(p: SamplingParams, bias: dict[int, float]) -> Callable[[np.ndarray, float], bool] | None:
    """How to tell that picking among a shortlist is what picking among the whole vocabulary would
    do, given the shortlist after the grammar (refused tokens at -inf) and its least logit (every
    token outside it has at most that); None: never (a client's logit bias or penalties may lift
    a token from outside it, or nothing but the grammar bounds the choice)."""
    penalties = p.repeat_penalty != 1.0 or p.frequency_penalty or p.presence_penalty
    if penalties or any(b > -math.inf for b in bias.values()) or (p.temperature >= GREEDY_BELOW and not (
            p.top_k > 0 or p.min_p > 0)):
        return None
    cut = math.log(p.min_p) if p.min_p > 0 else -math.inf

    def exact(candidates: np.ndarray, floor: float) -> bool:
        allowed = candidates["logit"][candidates["logit"] > -math.inf]
        if not len(allowed):
            return False
        if p.temperature < GREEDY_BELOW:
            return True  # the best allowed token is in the shortlist if any allowed one is
        # top_k keeps only allowed tokens above all those outside, or min_p drops all of those (but
        # top_p, before min_p, would weigh what is outside).
        return (p.top_k > 0 and len(allowed) >= p.top_k) or (p.top_p >= 1.0 and floor < float(allowed.max()) + cut)

    return exact


def _grammar(model: Model, schema: dict[str, object], check: Callable[[], None] | None) -> C.llama_sampler_p:
    """A grammar sampler that only lets through JSON matching `schema` ({} = any object)."""
    try:
        gbnf = to_gbnf(schema or {"type": "object"}, check).encode()
    except (RecursionError, TypeError, ValueError) as e:  # a schema shape the checks did not foresee
        raise SchemaError(f"unsupported JSON schema: {e!r}"[:200]) from None
    with llama_errors() as errors:
        sampler = C.llama_sampler_init_grammar(model.vocab, gbnf, b"root")
    if not sampler:
        raise SchemaError(f"llama.cpp refused the grammar made from this JSON schema: {reason(errors, 'unknown')}")
    return sampler
