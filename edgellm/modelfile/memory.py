"""How much memory loading a model will take, from its GGUF header alone.

The parts, as llama.cpp allocates them on the CPU:

- weights: the tensor data, memory-mapped, plus an allowance for the tensors
  the CPU backend repacks into a second, interleaved copy;
- the model's own structures: mostly the vocabulary;
- the KV cache: for every layer, n_ctx cells (padded to 256) of K and V in
  their element types ([engine] cache_type_k/v: f16, or q8_0 and q4_0 blocks of
  32 values in 34 and 18 bytes), n_head_kv x key/value length each. Sliding-window layers count in full,
  because edgellm keeps their cache full-size (swa_full) so that cached
  prefixes stay reusable; with that, n_ctx cells are shared by all sequences;
- the output buffer: one row of logits per sequence;
- what a decode step touches: activations of one micro-batch and the logits of
  its outputs (llama.cpp reserves far more, the logits of every token of a
  micro-batch, but edgellm never asks for those, so the pages stay untouched).

Encoder-only models (BERT and kin) have no KV cache at all.

The constants were measured on x86-64 against RSS after loading and running a
prefill and parallel decode; tools/bench/memory.py repeats the measurement
for any model.
"""

from __future__ import annotations

from dataclasses import dataclass

from edgellm.modelfile.gguf import GGUFFile
from edgellm.units import MiB

# Bytes per element of each KV cache type, as (bytes, per this many elements).
CACHE_TYPE_BYTES = {"f16": (2, 1), "q8_0": (34, 32), "q4_0": (18, 32)}
_CTX_PAD = 256
_REPACK_SHARE = 0.05  # of the weights: the CPU backend's interleaved copies (5.4% measured on Gemma 3 Q4_K_M)
_PER_TOKEN = 160  # bytes per vocabulary entry in the loaded model (text, score, type, maps)
_PER_CELL = 48  # bytes of bookkeeping per KV cell and cache (positions, sequence sets)
_FIXED = 6 * MiB  # the model object, the context, graph metadata, thread pools
_ACTIVATIONS = 12  # bytes per (token, embedding + feed-forward unit) of a micro-batch
# Encoder-only and diffusion architectures: llama.cpp gives them no KV cache.
_NO_KV_CACHE = frozenset({"bert", "jina-bert-v2", "jina-bert-v3", "nomic-bert", "nomic-bert-moe", "neo-bert",
                          "eurobert", "wavtokenizer-dec", "modern-bert", "gemma-embedding", "dream", "llada",
                          "llada-moe", "rnd1"})


@dataclass(frozen=True)
class Estimate:
    weights: int
    kv_cache: int
    compute: int  # the rest: model structures, output buffer, activations, fixed costs

    @property
    def total(self) -> int:
        return self.weights + self.kv_cache + self.compute

    def describe(self) -> str:
        return (f"{self.total / MiB:.0f} MiB (weights {self.weights / MiB:.0f} MiB + KV cache "
                f"{self.kv_cache / MiB:.0f} MiB + buffers {self.compute / MiB:.0f} MiB)")


def kv_bytes_per_cell(parts: list[GGUFFile], type_k: str = "f16", type_v: str = "f16") -> int:
    """Bytes of K and V that one token position takes across all layers."""
    (k_bytes, k_per), (v_bytes, v_per) = CACHE_TYPE_BYTES[type_k], CACHE_TYPE_BYTES[type_v]
    g = parts[0]
    n_layer = g.arch_int("block_count", 0)
    n_embd = g.arch_int("embedding_length", 0)
    n_head = g.arch_ints("attention.head_count", n_layer, 1)
    n_head_kv = g.arch_ints("attention.head_count_kv", n_layer, g.arch("attention.head_count", 1))
    total = 0
    for layer in range(n_layer):
        head_dim = n_embd // max(n_head[layer], 1)
        k = g.arch_int("attention.key_length", head_dim)
        v = g.arch_int("attention.value_length", head_dim)
        total += n_head_kv[layer] * k * k_bytes // k_per + n_head_kv[layer] * v * v_bytes // v_per
    return total


def estimate(parts: list[GGUFFile], *, n_ctx: int, parallel: int, n_ubatch: int, embedding: bool = False,
             type_k: str = "f16", type_v: str = "f16") -> Estimate:
    """Memory a load with these settings will take (bytes), for a model given by its header(s)."""
    g = parts[0]
    n_ctx = min(n_ctx, g.arch_int("context_length", n_ctx) or n_ctx)
    cells = -(-n_ctx // _CTX_PAD) * _CTX_PAD
    tensors = sum(p.tensor_bytes for p in parts)
    weights = int(tensors * (1 + _REPACK_SHARE))
    kv = 0 if g.architecture in _NO_KV_CACHE else cells * kv_bytes_per_cell(parts, type_k, type_v)
    n_vocab = g.n_vocab
    n_embd = g.arch_int("embedding_length", 0)
    n_ff = max(g.arch_ints("feed_forward_length", g.arch_int("block_count", 1) or 1, 0))
    if embedding:  # one input at a time, an embedding for each of its tokens
        outputs = n_ubatch * n_embd * 4
    else:  # the output buffer, and the logits rows of a step
        outputs = n_vocab * 4 * (2 * parallel + 1)
    activations = n_ubatch * (n_embd + n_ff) * _ACTIVATIONS
    caches = 2 if g.arch("attention.sliding_window") else 1
    compute = _FIXED + n_vocab * _PER_TOKEN + cells * _PER_CELL * caches + outputs + activations
    return Estimate(weights, kv, compute)


def largest_context(parts: list[GGUFFile], available: int, *, parallel: int, n_ubatch: int, type_k: str = "f16",
                    type_v: str = "f16") -> int:
    """The largest n_ctx (a multiple of 256) whose estimate fits in `available`, or 0."""
    best, n_ctx = 0, _CTX_PAD
    ceiling = parts[0].arch_int("context_length", 1 << 20) or (1 << 20)
    while n_ctx <= ceiling and estimate(parts, n_ctx=n_ctx, parallel=parallel, n_ubatch=n_ubatch, type_k=type_k,
                                        type_v=type_v).total <= available:
        best, n_ctx = n_ctx, n_ctx * 2
    return best
