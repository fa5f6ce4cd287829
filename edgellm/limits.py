"""The bounds of every number a request or a model file can hand the engine.

One table, used by the request parsers (protocol/), by the check of the sampling defaults a
GGUF file or a bundle's manifest recommends (modelfile/defaults.py), and written out in
docs/api.md. Every integer has a maximum: llama.cpp takes most of them as a C int32, where
a larger value would wrap silently (a top_k of 2**32 + 5 would become 5). A leaf.
"""

from __future__ import annotations

from dataclasses import dataclass

INT32_MAX = (1 << 31) - 1
MAX_TOKENS = 1 << 20  # max_tokens and friends: no context is longer ([engine] n_ctx's maximum)
MAX_STOPS = 16  # stop strings per request
MAX_STOP_LENGTH = 1024  # characters of one stop string
MAX_LOGIT_BIAS = 4096  # logit_bias entries per request
MAX_EMBEDDING_INPUTS = 2048  # inputs of one embeddings request, as OpenAI's API allows
MAX_TOOLS = 128  # tools of one chat request, as OpenAI's API allows


@dataclass(frozen=True)
class Bound:
    kind: str  # "integer" or "number"
    minimum: float
    maximum: float

    def check(self, value: object) -> str | None:
        """None when `value` is a JSON number of this kind within the bounds, else what is wrong."""
        if isinstance(value, bool) or not isinstance(value, int | float) or (
                self.kind == "integer" and not isinstance(value, int)):
            return f"must be {'an integer' if self.kind == 'integer' else 'a number'}"
        if not self.minimum <= value <= self.maximum:  # NaN fails this too
            return f"must be from {_show(self.minimum)} to {_show(self.maximum)}, got {value!r}"
        return None


def _show(value: float) -> str:
    return str(int(value)) if value == int(value) else str(value)


# The sampling knobs, by their OpenAI/llama-server request names.
SAMPLING: dict[str, Bound] = {
    "temperature": Bound("number", 0, 2),
    "top_p": Bound("number", 0, 1),
    "top_k": Bound("integer", 0, INT32_MAX),
    "min_p": Bound("number", 0, 1),
    "seed": Bound("integer", -(1 << 63), (1 << 64) - 1),  # reduced to 32 bits, as llama.cpp seeds
    "presence_penalty": Bound("number", -2, 2),
    "frequency_penalty": Bound("number", -2, 2),
    "repeat_penalty": Bound("number", 0.01, 10),
    "penalty_last_n": Bound("integer", -1, MAX_TOKENS),  # -1: the whole context
}
