"""A loaded GGUF model: weights and vocabulary.

The model is read-only once loaded, so any thread may tokenize with it or read
its metadata. The llama *context* (KV cache, decoding) is different: only the
runner's scheduler thread touches it (see runner.py).
"""

from __future__ import annotations

import ctypes
import functools
import logging
import threading
from pathlib import Path

import llama_cpp.llama_cpp as C

from edgellm.engine.errors import ModelLoadError
from edgellm.engine.grammar import MAX_KEY
from edgellm.engine.json_keys import KeyIndex
from edgellm.engine.llama_log import llama_errors, on_llama_log, reason

log = logging.getLogger("edgellm.engine")
_init_lock = threading.Lock()
_initialized = False


def init_llama() -> None:
    """Process-wide llama.cpp set-up: backends and log routing, once."""
    global _initialized
    with _init_lock:
        if not _initialized:
            C.llama_log_set(on_llama_log, None)
            C.llama_backend_init()
            _initialized = True


def _device(name: str) -> int:
    import llama_cpp._ggml as ggml

    ggml.libggml.ggml_backend_dev_by_name.restype = ctypes.c_void_p
    ggml.libggml.ggml_backend_dev_by_name.argtypes = [ctypes.c_char_p]
    dev = ggml.libggml.ggml_backend_dev_by_name(name.encode())
    if not dev:
        raise ModelLoadError(f"this llama.cpp build has no device {name}")
    return dev


class Model:
    """Weights and vocabulary of one GGUF file, safe to share between threads."""

    def __init__(self, path: str | Path | list[Path], *, n_gpu_layers: int = 0, device: str = "",
                 vocab_only: bool = False) -> None:
        """`path`: a GGUF file, or the parts of a split model in order. `device`: the ggml
        device (CUDA0, Vulkan0) that takes `n_gpu_layers` layers; "" for the CPU alone."""
        init_llama()
        parts = [Path(p) for p in path] if isinstance(path, list) else [Path(path)]
        self.path = parts[0]
        self._pieces: dict[int, bytes] = {}  # token (~token: special) -> bytes, filled as tokens are generated
        params = C.llama_model_default_params()
        # A NULL-terminated list of the devices llama.cpp may use: exactly the chosen one.
        devices = (ctypes.c_void_p * 2)(_device(device) if device else None, None)
        params.devices = ctypes.cast(devices, ctypes.c_void_p)
        params.n_gpu_layers = n_gpu_layers if device else 0
        params.vocab_only = vocab_only  # metadata and tokenizer without the weights
        with llama_errors() as errors:
            if len(parts) == 1:
                ptr = C.llama_model_load_from_file(str(self.path).encode(), params)
            else:
                paths = (ctypes.c_char_p * len(parts))(*(str(p).encode() for p in parts))
                ptr = C.llama_model_load_from_splits(paths, len(parts), params)
        if not ptr:
            raise ModelLoadError(f"llama.cpp could not load {self.path.name}: "
                                 f"{reason(errors, 'see the log for the reason')}")
        self.ptr = ptr
        self.vocab = C.llama_model_get_vocab(ptr)
        self.n_vocab: int = C.llama_vocab_n_tokens(self.vocab)
        self.n_ctx_train: int = C.llama_model_n_ctx_train(ptr)
        self.architecture: str = self.meta("general.architecture") or "unknown"
        self.bos: int = C.llama_vocab_bos(self.vocab)
        self.eos: int = C.llama_vocab_eos(self.vocab)
        self.bos_text: str = self.token_text(self.bos)
        fim = (C.llama_vocab_fim_pre(self.vocab), C.llama_vocab_fim_suf(self.vocab), C.llama_vocab_fim_mid(self.vocab))
        # Fill in the middle: prefix, suffix and middle markers, where the model has all three.
        self.fim: tuple[int, int, int] | None = fim if min(fim) >= 0 else None
        template = C.llama_model_chat_template(ptr, None)
        self.chat_template: str | None = template.decode("utf-8", "replace") if template else None
        pooling = self.meta(f"{self.architecture}.pooling_type")
        if pooling == str(C.LLAMA_POOLING_TYPE_RANK):
            self.close()
            raise ModelLoadError(f"{self.path} is a reranking model; edgellm does not serve those yet")
        # A model that declares a pooling type (mean, cls, last) is an embedding model.
        self.is_embedding: bool = pooling not in (None, str(C.LLAMA_POOLING_TYPE_NONE))

    def meta(self, key: str) -> str | None:
        """A metadata value as a string, or None when the file does not have the key."""
        size = 256
        while True:
            buf = ctypes.create_string_buffer(size)
            n = C.llama_model_meta_val_str(self.ptr, key.encode(), buf, size)
            if n < 0:
                return None
            if n < size:
                return buf.value.decode("utf-8", "replace")
            size = n + 1

    def tokenize(self, text: str, *, add_special: bool = True, parse_special: bool = True) -> list[int]:
        """Tokens for `text`, BOS/EOS added as the model wants; with `parse_special` the text of a
        control token (`<|im_end|>`) becomes that token, else plain characters.

        Text that already starts with the BOS token (chat templates write it)
        gets no second one.
        """
        if add_special and self.bos_text and text.startswith(self.bos_text):
            add_special = False
        data = text.encode("utf-8")
        capacity = len(data) + 8
        buf = (C.llama_token * capacity)()
        n = C.llama_tokenize(self.vocab, data, len(data), buf, capacity, add_special, parse_special)
        if n < 0:
            capacity = -n
            buf = (C.llama_token * capacity)()
            n = C.llama_tokenize(self.vocab, data, len(data), buf, capacity, add_special, parse_special)
        return list(buf[:n])

    def piece(self, token: int, *, special: bool = False) -> bytes:
        """The bytes a generated token contributes to the output (control tokens none, unless
        `special`: the markers of a tool call's syntax are part of what a reply says)."""
        key = ~token if special else token
        piece = self._pieces.get(key)
        if piece is None:
            buf = ctypes.create_string_buffer(64)
            n = C.llama_token_to_piece(self.vocab, token, buf, 64, 0, special)
            if n < 0:
                buf = ctypes.create_string_buffer(-n)
                n = C.llama_token_to_piece(self.vocab, token, buf, -n, 0, special)
            piece = self._pieces[key] = buf.raw[:n]
        return piece

    def token_text(self, token: int) -> str:
        """A token's vocabulary entry, special tokens included (for chat templates)."""
        if token < 0 or token >= self.n_vocab:
            return ""
        return C.llama_vocab_get_text(self.vocab, token).decode("utf-8", "replace")

    def has_token(self, text: str) -> bool:
        """True when `text` is a single token of the vocabulary (used to recognise chat formats)."""
        tokens = self.tokenize(text, add_special=False)
        return len(tokens) == 1 and self.token_text(tokens[0]) == text

    def is_eog(self, token: int) -> bool:
        return bool(C.llama_vocab_is_eog(self.vocab, token))

    @functools.cached_property
    def _unshown(self) -> tuple[frozenset[int], frozenset[int]]:
        """The control tokens and the unknown ones (<unk>): one walk over the vocabulary for both."""
        control: list[int] = []
        unknown: list[int] = []
        for t in range(self.n_vocab):
            attr = C.llama_vocab_get_attr(self.vocab, t)
            if attr & C.LLAMA_TOKEN_ATTR_CONTROL:
                control.append(t)
            elif attr & C.LLAMA_TOKEN_ATTR_UNKNOWN:
                unknown.append(t)
        return frozenset(control), frozenset(unknown)

    @property
    def control_tokens(self) -> frozenset[int]:
        """Tokens that mark structure (turns, roles, BOS/EOS): only a chat template may write them."""
        return self._unshown[0]

    @functools.cached_property
    def hidden_tokens(self) -> frozenset[int]:
        """Tokens whose text a reply does not show (control tokens but the ends, <unk>), though a
        grammar reads them as their text: under a grammar they are never written."""
        control, unknown = self._unshown
        return (control | unknown) - set(self.eog_tokens)

    @functools.cached_property
    def control_initials(self) -> frozenset[str]:
        """The first characters of the control tokens' texts: text without any spells none."""
        return frozenset(text[0] for text in map(self.token_text, self.control_tokens) if text)

    def control_in(self, text: str) -> str | None:
        """The first control token that tokenizing `text` with special parsing would give, or None."""
        if self.control_initials.isdisjoint(text):
            return None
        found = (t for t in self.tokenize(text, add_special=False) if t in self.control_tokens)
        return next((self.token_text(t) for t in found), None)

    @functools.cached_property
    def eog_tokens(self) -> tuple[int, ...]:
        """Every end-of-generation token (a model may have several: <eos>, <end_of_turn>, ...)."""
        return tuple(t for t in range(self.n_vocab) if C.llama_vocab_is_eog(self.vocab, t))

    @functools.cached_property
    def json_enders(self) -> tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]:
        """Tokens that end a JSON string (a quote, maybe with closing brackets after it), tokens that
        only close objects and arrays, and tokens with a comma (which start another item): what a
        JSON reply running out of max_tokens needs, and needs to avoid."""
        closing = frozenset(b'"}] ')
        quotes: list[int] = []
        brackets: list[int] = []
        commas: list[int] = []
        quoted: dict[int, bytes] = {}
        for t, piece in enumerate(self._vocabulary()):
            if b'"' in piece:
                quoted[t] = piece
            if b"," in piece:
                commas.append(t)
            elif piece.strip(b" ") and set(piece) <= closing:
                if piece.lstrip(b" ").startswith(b'"'):
                    quotes.append(t)
                elif b'"' not in piece:
                    brackets.append(t)
        self._quoted = quoted
        return tuple(quotes), tuple(brackets), tuple(commas)

    @functools.cached_property
    def json_keys(self) -> KeyIndex:
        """The tokens that could close a JSON key, for json_keys.KeyTracker (the same walk as json_enders)."""
        _ = self.json_enders  # the walk that fills _quoted
        return KeyIndex.build(self._quoted, MAX_KEY, self._vocabulary)

    def _vocabulary(self) -> list[bytes]:
        """Every token's bytes, in order; not through piece(): its cache would keep the whole vocabulary."""
        buf = ctypes.create_string_buffer(256)
        pieces = []
        for t in range(self.n_vocab):
            n = C.llama_token_to_piece(self.vocab, t, buf, 256, 0, False)
            if n < 0:
                big = ctypes.create_string_buffer(-n)
                n = C.llama_token_to_piece(self.vocab, t, big, -n, 0, False)
                pieces.append(big.raw[:n])
            else:
                pieces.append(buf.raw[:n])
        return pieces

    def close(self) -> None:
        if self.ptr:
            C.llama_model_free(self.ptr)
            self.ptr = None
