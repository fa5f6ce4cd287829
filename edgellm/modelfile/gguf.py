"""Read a GGUF file's header: its metadata and tensor table, never its weights.

Installing a model, listing it, and deciding whether it fits in memory all
need the architecture, the sizes and the hyperparameters, and reading them
must not cost a load. Large arrays (the vocabulary) are skipped, with only
their length kept. What is kept is bounded whatever the header claims (its
counts, the lengths of its strings, the bytes of metadata in all), and every
bound is checked before anything is read or allocated: a hostile header costs
at most a few MiB, however large the file.
"""

from __future__ import annotations

import re
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from edgellm.errors import InvalidRequest

MAGIC = b"GGUF"
SPLIT_RE = re.compile(r"^(?P<prefix>.*)-(?P<index>\d{5})-of-(?P<count>\d{5})\.gguf$")

# Value types of the GGUF format, and how the fixed-size ones are packed.
_STRING, _ARRAY = 8, 9
_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_KEEP_ARRAY = 256  # arrays up to this many items are kept (per-layer values); longer ones only counted
_MAX_DIMS = 4  # GGML_MAX_DIMS
_MAX_LAYERS = 10_000
_MAX_KV = 1 << 16  # metadata keys: real files have tens
_MAX_TENSORS = 1 << 20  # real files have thousands at most
_MAX_KEY = (1 << 16) - 1  # the GGUF specification's limit on a key
_MAX_STRING = 1 << 20  # a kept string value: chat templates, the largest, are tens of KiB
_MAX_KEPT = 32 << 20  # bytes of metadata kept in all (each value counted at _VALUE_COST at least)
_VALUE_COST = 32  # about what Python spends on one kept value


class GGUFError(InvalidRequest):
    """Not a GGUF file, or a damaged one."""

    code = "invalid_model_file"


@dataclass
class GGUFFile:
    """What one GGUF file (or one part of a split model) says about itself."""

    path: Path
    version: int
    metadata: dict[str, object]
    array_lengths: dict[str, int]  # every array's item count, kept or not
    n_params: int  # elements over all tensors
    tensor_bytes: int  # the data section: what mmap brings into memory

    def get(self, key: str, default: object = None) -> object:
        return self.metadata.get(key, default)

    @property
    def architecture(self) -> str:
        return str(self.get("general.architecture", "unknown"))

    def arch(self, key: str, default: object = None) -> object:
        """A hyperparameter of this file's architecture: arch("context_length") -> llama.context_length."""
        return self.get(f"{self.architecture}.{key}", default)

    def arch_int(self, key: str, default: int) -> int:
        """An integer hyperparameter; a GGUFError when a damaged header holds anything else there."""
        return self._int(key, self.arch(key, default))

    def arch_ints(self, key: str, n_layer: int, default: object) -> list[int]:
        """A hyperparameter given once for all layers or as one value per layer: one per layer."""
        value = self.arch(key, default)
        if not isinstance(value, list):
            return [self._int(key, value)] * n_layer
        values = [self._int(key, v) for v in value]
        return values + [values[-1] if values else 0] * (n_layer - len(values))

    def _int(self, key: str, value: object) -> int:
        if not isinstance(value, int):
            raise GGUFError(f"{self.path}: {self.architecture}.{key} is {value!r}, not an integer")
        return value

    @property
    def n_vocab(self) -> int:
        return self.array_lengths.get("tokenizer.ggml.tokens", 0)


def split_parts(path: Path) -> list[Path]:
    """All parts of a split model, given any of its files; [path] for a single file."""
    match = SPLIT_RE.match(path.name)
    if not match:
        return [path]
    count = int(match["count"])
    if not 0 < int(match["index"]) <= count:
        return [path]  # not a real split name: a file like any other
    return [path.with_name(f"{match['prefix']}-{i:05d}-of-{count:05d}.gguf") for i in range(1, count + 1)]


def read(path: str | Path) -> GGUFFile:
    path = Path(path)
    with open(path, "rb") as f:
        return read_from(f, path, path.stat().st_size)


def read_from(f: IO[bytes], path: Path, size: int) -> GGUFFile:
    """The header of a GGUF file open at its start (a file, or a member of a tar); `path` names it.

    Any file, however hostile, gives a GGUFFile or a GGUFError, in time and memory bounded by
    its size."""
    try:
        return _parse(f, path, size)
    except GGUFError:
        raise
    except (struct.error, ValueError, OverflowError, MemoryError, RecursionError, ZeroDivisionError) as e:
        raise GGUFError(f"{path}: a damaged header ({type(e).__name__})") from None


def _parse(f: IO[bytes], path: Path, size: int) -> GGUFFile:
    reader = _Reader(f, path, size)
    if reader.raw(4) != MAGIC:
        raise GGUFError(f"{path}: not a GGUF file")
    version = reader.u32()
    if version not in (2, 3):
        raise GGUFError(f"{path}: GGUF version {version} is not supported")
    n_tensors, n_kv = reader.u64(), reader.u64()
    if n_kv > _MAX_KV or n_tensors > _MAX_TENSORS:
        raise GGUFError(f"{path}: {n_kv} metadata keys and {n_tensors} tensors (at most {_MAX_KV} and "
                        f"{_MAX_TENSORS})")
    metadata: dict[str, object] = {}
    lengths: dict[str, int] = {}
    for _ in range(n_kv):
        key = reader.string(_MAX_KEY)
        kind = reader.u32()
        if kind == _ARRAY:
            item_kind, count = reader.u32(), reader.u64()
            if count <= _KEEP_ARRAY:
                metadata[key] = [reader.value(item_kind) for _ in range(count)]
            else:
                reader.skip_array(item_kind, count)
            lengths[key] = count
        else:
            metadata[key] = reader.value(kind)
    n_params = 0
    for _ in range(n_tensors):
        reader.skip(reader.u64())  # name
        n_dims = reader.u32()
        if n_dims > _MAX_DIMS:
            raise GGUFError(f"{path}: a tensor with {n_dims} dimensions (at most {_MAX_DIMS})")
        elements = 1
        for _ in range(n_dims):
            elements *= reader.u64()
        reader.skip(4 + 8)  # type, offset
        n_params += elements
    alignment = metadata.get("general.alignment", 32)
    if not isinstance(alignment, int) or not 0 < alignment <= 1 << 20 or alignment & (alignment - 1):
        raise GGUFError(f"{path}: general.alignment {alignment!r} is not a power of two")
    layers = metadata.get(f"{metadata.get('general.architecture')}.block_count", 0)
    if not isinstance(layers, int) or not 0 <= layers <= _MAX_LAYERS:
        raise GGUFError(f"{path}: block_count {layers!r} is implausible")
    data_start = -(-reader.tell() // alignment) * alignment
    if data_start > size:
        raise GGUFError(f"{path}: truncated (the header runs past the end of the file)")
    return GGUFFile(path, version, metadata, lengths, n_params, size - data_start)


_U32, _U64 = struct.Struct("<I"), struct.Struct("<Q")
_PACKED = {kind: struct.Struct(fmt) for kind, fmt in _SCALARS.items()}
_CHUNK = 1 << 20  # bytes read at a time: a vocabulary of 262k tokens is about 4 MiB


class _Reader:
    """The header, read through a buffer of its own: each value is unpacked at an offset in it
    rather than read from the file one call each, and skipped spans are seeked over (a file and
    a tar member both seek). `tell()` is the offset in the file of the next unread byte, however
    far ahead the buffer has read."""

    def __init__(self, f: IO[bytes], path: Path, size: int) -> None:
        self.f = f
        self.path = path
        self.size = size
        self.buffer = b""
        self.at = 0  # the next unread byte in buffer; past its end after a skip not yet seeked over
        self.base = 0  # the file offset of buffer[0]
        self.kept = 0  # bytes of metadata kept so far, against _MAX_KEPT

    def tell(self) -> int:
        return self.base + self.at

    def _truncated(self, what: str = "") -> GGUFError:
        return GGUFError(f"{self.path}: truncated header{what}")

    def _fill(self, n: int) -> None:
        """Make the n bytes at `at` readable in the buffer."""
        if self.tell() + n > self.size:
            raise self._truncated()
        if self.at > len(self.buffer):  # skipped past what was read: seek over the rest
            self.f.seek(self.at - len(self.buffer), 1)
            kept = b""
        else:
            kept = self.buffer[self.at:]
        self.base += self.at
        self.buffer = kept + self.f.read(max(n - len(kept), _CHUNK))
        self.at = 0
        if len(self.buffer) < n:
            raise self._truncated()

    def raw(self, n: int) -> bytes:
        if self.at + n > len(self.buffer):
            self._fill(n)
        data = self.buffer[self.at:self.at + n]
        self.at += n
        return data

    def skip(self, n: int) -> None:
        if self.tell() + n > self.size:
            raise self._truncated()
        self.at += n

    def _unpack(self, packed: struct.Struct) -> int | float:
        if self.at + packed.size > len(self.buffer):
            self._fill(packed.size)
        value = packed.unpack_from(self.buffer, self.at)[0]
        self.at += packed.size
        return value

    def u32(self) -> int:
        return int(self._unpack(_U32))

    def u64(self) -> int:
        return int(self._unpack(_U64))

    def _keep(self, n: int) -> None:
        """Count n more bytes kept, refusing a header that would keep more than _MAX_KEPT."""
        self.kept += max(n, _VALUE_COST)
        if self.kept > _MAX_KEPT:
            raise GGUFError(f"{self.path}: more than {_MAX_KEPT >> 20} MiB of metadata")

    def string(self, limit: int = _MAX_STRING) -> str:
        """A kept string (a key or a value), refused by its length before a byte of it is read."""
        n = self.u64()
        if n > self.size - self.tell():
            raise self._truncated(f" (a string of {n} bytes)")
        if n > limit:
            raise GGUFError(f"{self.path}: a string of {n} bytes in the metadata (at most {limit})")
        self._keep(n)
        return self.raw(n).decode("utf-8", "replace")

    def value(self, kind: int) -> object:
        if kind == _STRING:
            return self.string()
        if kind in _PACKED:
            self._keep(_VALUE_COST)
            return self._unpack(_PACKED[kind])
        if kind == _ARRAY:  # an array inside an array: kept whole only when short
            item_kind, count = self.u32(), self.u64()
            if count > _KEEP_ARRAY or item_kind == _ARRAY:
                raise GGUFError(f"{self.path}: an unsupported nested array")
            return [self.value(item_kind) for _ in range(count)]
        raise GGUFError(f"{self.path}: unknown metadata value type {kind}")

    def skip_array(self, kind: int, count: int) -> None:
        """Step over a long array without keeping or allocating any of it."""
        if kind == _STRING:
            self._skip_strings(count)
        elif kind in _PACKED:
            skip = _PACKED[kind].size * count
            if self.tell() + skip > self.size:
                raise self._truncated(f" (an array of {count} items)")
            self.at += skip
        elif kind == _ARRAY:  # llama.cpp reads no nested arrays, and stepping over one costs a loop per item
            raise GGUFError(f"{self.path}: an unsupported nested array")
        else:
            raise GGUFError(f"{self.path}: unknown metadata value type {kind}")

    def _skip_strings(self, count: int) -> None:
        """Step over `count` length-prefixed strings (a vocabulary): one unpack_from per string,
        and no bounds check of its own: unpack_from fails past the buffer's end, and only then is
        it refilled. This loop is the whole cost of reading a header with a 262k-token vocabulary."""
        if 8 * count > self.size - self.tell():
            raise self._truncated(f" (an array of {count} strings)")
        unpack = _U64.unpack_from
        buffer, at, start, i = self.buffer, self.at, 0, 0
        while True:
            try:
                for i in range(start, count):  # noqa: B007 (i is where a refill resumes)
                    at += 8 + unpack(buffer, at)[0]
                break
            except (struct.error, OverflowError):  # string i's length is not (all) in the buffer
                self.at, start = at, i
                self._fill(8)  # GGUFError when the file ends first
                buffer, at = self.buffer, self.at
        self.at = at
        if self.tell() > self.size:
            raise self._truncated(f" (an array of {count} strings)")
