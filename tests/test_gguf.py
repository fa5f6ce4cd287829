"""The GGUF header reader against the `gguf` package's GGUFReader, an oracle we did not write."""

from __future__ import annotations

import io
import tarfile
import time
import tracemalloc
from collections.abc import Callable
from pathlib import Path

import gguf as oracle
import numpy as np
import pytest
from tiny_models import write_model

from edgellm.modelfile import gguf

KEEP = 256  # gguf.py keeps arrays up to this many items, and only counts longer ones


def expected(path: Path) -> dict[str, object]:
    """What GGUFReader says of the fields edgellm reads."""
    reader = oracle.GGUFReader(path)
    metadata: dict[str, object] = {}
    lengths: dict[str, int] = {}
    for name, field in reader.fields.items():
        if name.startswith("GGUF."):  # the reader's own entries for the header's counts
            continue
        if field.types[0] == oracle.GGUFValueType.ARRAY:
            lengths[name] = len(field.data)
            if len(field.data) > KEEP:
                continue
        value = field.contents()
        metadata[name] = value
    return {
        "version": int(reader.fields["GGUF.version"].parts[-1][0]),
        "metadata": metadata,
        "array_lengths": lengths,
        "n_params": sum(int(t.n_elements) for t in reader.tensors),
        "tensor_bytes": path.stat().st_size - reader.data_offset,
    }


def actual(header: gguf.GGUFFile) -> dict[str, object]:
    return {"version": header.version, "metadata": header.metadata, "array_lengths": header.array_lengths,
            "n_params": header.n_params, "tensor_bytes": header.tensor_bytes}


def same(a: object, b: object) -> bool:
    """Equal, floats compared as the f32 they were stored as."""
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, float) or isinstance(b, float):
        return bool(np.float32(a) == np.float32(b))
    return a == b and type(a) is type(b)


def assert_matches(header: gguf.GGUFFile, path: Path) -> None:
    mine, theirs = actual(header), expected(path)
    for key in theirs:
        assert same(mine[key], theirs[key]), key


def large_vocabulary(path: Path, n: int, *, long_token: int = 0) -> Path:
    """A header shaped like a real model's, written by the oracle's writer: a vocabulary of n tokens
    (lengths 0 to 150, so that a few MiB of strings straddle the reader's 1 MiB reads, and one of
    `long_token` bytes), merges, scores, per-layer values and scalars after it."""
    rng = np.random.default_rng(7)
    lengths = rng.integers(0, 150, n)
    tokens = ["x" * int(k) if i % 3 else "é" * (int(k) // 2) for i, k in enumerate(lengths)]
    if long_token:
        tokens[n // 2] = "L" * long_token
    w = oracle.GGUFWriter(str(path), "llama")
    w.add_block_count(2)
    w.add_context_length(4096)
    w.add_embedding_length(8)
    w.add_array("llama.attention.head_count", [2, 4])  # per layer: kept
    w.add_tokenizer_model("gpt2")
    w.add_token_list(tokens)
    w.add_token_merges([f"{t} {t}" for t in tokens[:1000]])
    w.add_token_scores([float(i) for i in range(n)])
    w.add_token_types([1] * n)
    w.add_chat_template("{{ messages }}")
    w.add_string("general.name", "big-vocab")
    w.add_float32("general.sampling.temp", 0.7)
    w.add_tensor("token_embd.weight", np.zeros((16, 8), dtype=np.float16))
    w.add_tensor("output.weight", np.zeros((3, 8), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def _string_array(entries: list[tuple[int, bytes]], count: int | None = None) -> bytes:
    """A vocabulary of (length as written, bytes) entries."""
    key = b"tokenizer.ggml.tokens"
    body = b"".join(n.to_bytes(8, "little") + data for n, data in entries)
    return (len(key).to_bytes(8, "little") + key + (9).to_bytes(4, "little") + (8).to_bytes(4, "little")
            + (len(entries) if count is None else count).to_bytes(8, "little") + body)


def _file(kvs: bytes, n_kv: int = 1) -> bytes:
    return b"GGUF" + (3).to_bytes(4, "little") + (0).to_bytes(8, "little") + n_kv.to_bytes(8, "little") + kvs


def _tail() -> bytes:
    """A string key and one tensor of 6 x 7 elements after the vocabulary: read only if it was stepped over right."""
    key, name = b"general.name", b"after"
    kv = len(key).to_bytes(8, "little") + key + (8).to_bytes(4, "little") + len(name).to_bytes(8, "little") + name
    tensor = (1).to_bytes(8, "little") + b"t" + (2).to_bytes(4, "little") + (6).to_bytes(8, "little") \
        + (7).to_bytes(8, "little") + (0).to_bytes(4, "little") + (0).to_bytes(8, "little")
    return kv + tensor


def _vocabulary_file(entries: list[tuple[int, bytes]]) -> bytes:
    data = b"GGUF" + (3).to_bytes(4, "little") + (1).to_bytes(8, "little") + (2).to_bytes(8, "little") \
        + _string_array(entries) + _tail()
    return data + bytes(-len(data) % 32 + 42 * 4)


def test_the_tiny_models_read_as_the_oracle_reads_them(tmp_path):
    for kind, kwargs in {"plain": {}, "chat": {"chat_template": "{{ x }}"}, "pooling": {"pooling": 1},
                         "sampling": {"sampling": {"temp": 0.6, "top_k": 20}}}.items():
        path = write_model(tmp_path / f"{kind}.gguf", **kwargs)
        assert_matches(gguf.read(path), path)


@pytest.mark.parametrize("long_token", [0, 3 << 20])  # a token longer than a read of the header
def test_a_large_vocabulary_reads_as_the_oracle_reads_it(tmp_path, long_token):
    path = large_vocabulary(tmp_path / "big.gguf", 40_000, long_token=long_token)
    header = gguf.read(path)
    assert header.n_vocab == 40_000
    assert_matches(header, path)


def test_the_demo_model_reads_as_the_oracle_reads_it(demo_model):
    assert_matches(gguf.read(demo_model), demo_model)


def test_strings_split_by_a_read_at_every_byte(tmp_path):
    """The reader reads 1 MiB at a time: a string's length or its bytes may be cut by the end of a
    read at any byte, and what follows the vocabulary must still be read from the right place."""
    start = 4 + 4 + 8 + 8 + 8 + len("tokenizer.ggml.tokens") + 4 + 4 + 8  # where the first string's length is
    for cut in range(-12, 20):  # bytes from the start of the second string's length to the end of the first read
        first = (1 << 20) - start - 8 - cut
        entries = [(first, b"f" * first), (5, b"hello"), *[(3, b"abc")] * 300]
        path = tmp_path / f"cut{cut}.gguf"
        path.write_bytes(_vocabulary_file(entries))
        header = gguf.read(path)
        assert (header.n_vocab, header.get("general.name"), header.n_params) == (302, "after", 42), cut
        assert header.tensor_bytes == 42 * 4, cut


def test_a_tar_member_reads_as_the_file_does(tmp_path):
    """Bundles are read from tars too: a member's stream is read and seeked over like a file."""
    entries = [(7, b"token-7")] * 200_000 + [(3 << 20, b"L" * (3 << 20))] + [(1, b"z")] * 1000
    (tmp_path / "big.gguf").write_bytes(_vocabulary_file(entries))
    with tarfile.open(tmp_path / "b.tar", "w") as tar:
        tar.add(tmp_path / "big.gguf", "files/big.gguf")
    with tarfile.open(tmp_path / "b.tar") as tar:
        member = tar.getmember("files/big.gguf")
        stream = tar.extractfile(member)
        assert stream is not None
        header = gguf.read_from(stream, Path("big.gguf"), member.size)
    assert actual(header) == actual(gguf.read(tmp_path / "big.gguf"))
    assert (header.n_vocab, header.get("general.name"), header.n_params) == (201_001, "after", 42)


def test_the_header_is_read_in_large_pieces_not_a_read_per_value(tmp_path):
    """A 300k-token vocabulary (6 MiB of header) takes a few reads of 1 MiB, not one per value:
    each read of a tar member on a stick is a Python call of its own, or several."""
    path = tmp_path / "big.gguf"
    path.write_bytes(_vocabulary_file([(12, b"token-tokens")] * 300_000))

    class Counting(io.FileIO):
        reads = 0

        def read(self, n: int = -1, /) -> bytes:
            Counting.reads += 1
            return super().read(n)

    with Counting(path) as f:
        header = gguf.read_from(f, path, path.stat().st_size)  # type: ignore[arg-type]
    assert (header.n_vocab, header.get("general.name"), header.n_params) == (300_000, "after", 42)
    assert Counting.reads <= 12


A = (1, b"a")


@pytest.mark.parametrize("name,data", [
    ("a string that runs past the end", _file(_string_array([A] * 300 + [(1 << 40, b"b")]))),
    ("a huge length in a vocabulary", _file(_string_array([A] * 150 + [(1 << 63, b"")] + [A] * 150))),
    ("more strings than the file holds", _file(_string_array([A] * 300, count=1 << 40))),
    ("a vocabulary cut short", _file(_string_array([(3, b"abc")] * 1000))[:-1000]),
])
def test_damaged_vocabularies_are_clean_errors(tmp_path, name, data):
    path = tmp_path / "bad.gguf"
    path.write_bytes(data)
    with pytest.raises(gguf.GGUFError, match="truncated"):
        gguf.read(path)


def _traced(read: Callable[[], object]) -> int:
    """The peak of Python's allocations while `read` runs (it must raise GGUFError)."""
    tracemalloc.start()
    try:
        with pytest.raises(gguf.GGUFError):
            read()
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    return peak


def _kv(key: bytes, kind: int, payload: bytes) -> bytes:
    return len(key).to_bytes(8, "little") + key + kind.to_bytes(4, "little") + payload


@pytest.mark.parametrize("item_kind", [0, 4, 8, 9, 13])  # u8, u32, string, array, an unknown type
def test_a_header_claiming_a_huge_array_is_refused_without_allocating(tmp_path, item_kind):
    """2**40 items of a skipped array, with 64 MiB of zeros after the claim: refused at once."""
    path = tmp_path / "huge.gguf"
    with open(path, "wb") as f:
        f.write(_file(_kv(b"x", 9, item_kind.to_bytes(4, "little") + (1 << 40).to_bytes(8, "little"))))
        f.truncate(64 << 20)
    started = time.monotonic()
    assert _traced(lambda: gguf.read(path)) < 4 << 20
    assert time.monotonic() - started < 2


def test_a_huge_metadata_string_is_refused_before_it_is_read(tmp_path):
    path = tmp_path / "long.gguf"
    with open(path, "wb") as f:
        f.write(_file(_kv(b"general.name", 8, (16 << 20).to_bytes(8, "little"))))
        f.truncate(17 << 20)
    with pytest.raises(gguf.GGUFError, match="a string of 16777216 bytes in the metadata"):
        gguf.read(path)
    assert _traced(lambda: gguf.read(path)) < 4 << 20  # not the string, let alone its copies and its decoding


def test_the_metadata_kept_in_all_is_bounded(tmp_path):
    """Strings each within the bound, but 40 MiB of them: refused once 32 MiB are kept."""
    path = tmp_path / "many.gguf"
    string = b"s" * ((1 << 20) - 64)
    path.write_bytes(_file(b"".join(_kv(b"k%d" % i, 8, len(string).to_bytes(8, "little") + string)
                                    for i in range(40)), n_kv=40) + bytes(32))
    with pytest.raises(gguf.GGUFError, match="more than 32 MiB of metadata"):
        gguf.read(path)
    assert _traced(lambda: gguf.read(path)) < 48 << 20


def test_absurd_counts_of_keys_and_tensors_are_refused_at_once(tmp_path):
    path = tmp_path / "counts.gguf"
    for n_tensors, n_kv in ((0, 1 << 40), (1 << 40, 0)):
        path.write_bytes(b"GGUF" + (3).to_bytes(4, "little") + n_tensors.to_bytes(8, "little")
                         + n_kv.to_bytes(8, "little") + bytes(64))
        with pytest.raises(gguf.GGUFError, match="metadata keys and"):
            gguf.read(path)
