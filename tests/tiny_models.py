"""Tiny llama-architecture GGUF files for tests, written with the `gguf` package in milliseconds.

Two kinds:

- random weights: what a real model looks like to llama.cpp, with unpredictable text;
- scripted: attention and feed-forward outputs are zero, so the hidden state at
  each position is just the token's embedding, and the output matrix maps each
  token to a chosen successor. Greedy decoding then follows `script` exactly,
  which lets tests force a stop string across two tokens, or a multi-byte
  character split over byte tokens.

The vocabulary is SentencePiece-style with byte fallback: any character not in
it is spelled as <0xNN> byte tokens.
"""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np

N_EMBD = 64
N_FF = 128
N_HEAD = 4
N_HEAD_KV = 2
N_LAYER = 2
SPACE = "\u2581"  # SentencePiece's word-boundary mark

UNK, BOS, EOS = 0, 1, 2
_SPECIAL = ["<unk>", "<s>", "</s>"]
_BYTES = [f"<0x{b:02X}>" for b in range(256)]
WORDS = ["Hello", "world", "Once", "upon", "a", "time", "euro", "tick", "tock", "the", "cat", "sat",
         "on", "mat", "wor", "ld", "yes", "no", "true", "false", "name", "age", "user", "assistant"]
CHARS = list("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789 .,:;!?'\"{}[]-_\n")
CHATML = "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}" \
         "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"


def vocabulary(extra_special: list[str] = ()) -> list[str]:
    """Special tokens, 256 byte tokens, single characters, and every prefix of every word.

    SentencePiece merges pairs only into pieces the vocabulary has, so each
    word needs its prefixes to be reachable.
    """
    pieces: list[str] = []
    for char in CHARS:
        pieces.append(SPACE if char == " " else char)
    for word in WORDS:
        for form in (SPACE + word, word):
            for n in range(2, len(form) + 1):
                pieces.append(form[:n])
    seen = set(_SPECIAL) | set(_BYTES) | set(extra_special)
    unique = [p for p in dict.fromkeys(pieces) if p not in seen]
    return _SPECIAL + list(extra_special) + _BYTES + unique


def write_model(
    path: Path,
    *,
    seed: int = 0,
    script: dict[str, str] | None = None,
    chat_template: str | None = None,
    pooling: int | None = None,
    n_ctx_train: int = 65536,
    split_max_tensors: int = 0,
    sampling: dict[str, int | float] | None = None,
    embedding_length: float | None = None,
    name: str = "tiny-test",
    special: tuple[str, ...] = (),
) -> Path:
    """Write a tiny llama model; `script` maps a piece to the piece greedy decoding picks next.

    With split_max_tensors, it is written as split files (NAME-00001-of-0000N.gguf)
    and the first part's path is returned. `sampling`: recommended sampling settings
    (general.sampling.temp, top_k, ...). `name`: general.name, which llama.cpp logs whole.
    `embedding_length`: an f32 written where the header's integer belongs (a broken file: NaN, say).
    `special`: more control tokens (a model family's markers: `[TOOL_CALLS]`, `<|python_tag|>`)."""
    extra = (["<|im_start|>", "<|im_end|>"] if chat_template else []) + list(special)
    tokens = vocabulary(extra)
    index = {t: i for i, t in enumerate(tokens)}
    n_vocab = len(tokens)
    rng = np.random.default_rng(seed)

    w = gguf.GGUFWriter(str(path), "llama", split_max_tensors=split_max_tensors)
    w.add_name(name)
    w.add_context_length(n_ctx_train)
    if embedding_length is None:
        w.add_embedding_length(N_EMBD)
    else:
        w.add_float32("llama.embedding_length", embedding_length)
    w.add_block_count(N_LAYER)
    w.add_feed_forward_length(N_FF)
    w.add_head_count(N_HEAD)
    w.add_head_count_kv(N_HEAD_KV)
    w.add_rope_dimension_count(N_EMBD // N_HEAD)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_vocab_size(n_vocab)
    w.add_file_type(gguf.LlamaFileType.MOSTLY_F16)
    if pooling is not None:
        w.add_uint32("llama.pooling_type", pooling)
    for key, value in (sampling or {}).items():  # general.sampling.*: f32 or i32, as the writer's type says
        (w.add_float32 if isinstance(value, float) else w.add_int32)(f"general.sampling.{key}", value)

    w.add_tokenizer_model("llama")
    w.add_token_list(tokens)
    w.add_token_scores([_score(t) for t in tokens])
    w.add_token_types([_type(t, extra) for t in tokens])
    w.add_bos_token_id(BOS)
    w.add_eos_token_id(EOS)
    w.add_unk_token_id(UNK)
    w.add_add_bos_token(True)
    w.add_add_eos_token(False)
    if chat_template:
        w.add_chat_template(chat_template)

    embd = rng.standard_normal((n_vocab, N_EMBD)).astype(np.float32)
    if script is None:
        output = rng.standard_normal((n_vocab, N_EMBD)).astype(np.float32) * 0.5
        zero_out = False
    else:
        # Unit-RMS embeddings pass the final RMS norm unchanged; each successor's
        # output row is its predecessor's embedding, so that logit wins by far.
        embd /= np.sqrt((embd**2).mean(axis=1, keepdims=True))
        output = np.zeros((n_vocab, N_EMBD), dtype=np.float32)
        for current, following in script.items():
            output[index[following]] += embd[index[current]]
        zero_out = True

    w.add_tensor("token_embd.weight", embd.astype(np.float16))
    w.add_tensor("output_norm.weight", np.ones(N_EMBD, dtype=np.float32))
    w.add_tensor("output.weight", output.astype(np.float16))
    head_dim = N_EMBD // N_HEAD
    for layer in range(N_LAYER):
        def mat(rows: int, cols: int, zero: bool = False) -> np.ndarray:
            if zero:
                return np.zeros((rows, cols), dtype=np.float16)
            return (rng.standard_normal((rows, cols)) / np.sqrt(cols)).astype(np.float16)

        p = f"blk.{layer}."
        w.add_tensor(p + "attn_norm.weight", np.ones(N_EMBD, dtype=np.float32))
        w.add_tensor(p + "attn_q.weight", mat(N_EMBD, N_EMBD))
        w.add_tensor(p + "attn_k.weight", mat(N_HEAD_KV * head_dim, N_EMBD))
        w.add_tensor(p + "attn_v.weight", mat(N_HEAD_KV * head_dim, N_EMBD))
        w.add_tensor(p + "attn_output.weight", mat(N_EMBD, N_EMBD, zero_out))
        w.add_tensor(p + "ffn_norm.weight", np.ones(N_EMBD, dtype=np.float32))
        w.add_tensor(p + "ffn_gate.weight", mat(N_FF, N_EMBD))
        w.add_tensor(p + "ffn_up.weight", mat(N_FF, N_EMBD))
        w.add_tensor(p + "ffn_down.weight", mat(N_EMBD, N_FF, zero_out))

    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return w.format_shard_names(path)[0] if split_max_tensors else path


def _score(token: str) -> float:
    # Longer pieces score higher, so SentencePiece prefers whole words.
    return 0.0 if token.startswith("<") else float(len(token))


def _type(token: str, extra_special: list[str]) -> int:
    if token == "<unk>":
        return gguf.TokenType.UNKNOWN
    if token in ("<s>", "</s>") or token in extra_special:
        return gguf.TokenType.CONTROL
    if token in _BYTES:
        return gguf.TokenType.BYTE
    return gguf.TokenType.NORMAL
