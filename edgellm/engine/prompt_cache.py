"""The prompt cache: snapshots of prompt prefixes' KV state that outlive unloads and restarts.

On a small board prefill is the slow part, and the LAN's clients resend long prefixes: a
home-automation hub its tools and devices with every request, a chat its whole history.
While a model is loaded its slots keep their cells (scheduler.py), but an unload, an
eviction or a restart throws them away. This cache keeps a *snapshot* of a prefix's KV
state (llama_state_seq_get_data) once the prefix has proved worth it (a second request
reused it; or the cells of a slot that reused one, extended by a hub's or a chat's later
turns, are about to be dropped for another prompt), in RAM and on disk
under the state dir, least recently used first out within [engine] prompt_cache_memory
and prompt_cache_disk. A request whose prompt starts with a snapshot's tokens gets it
restored into its slot (llama_state_seq_set_data) instead of computing them again.

A snapshot fits only the model it came from and contexts with the same KV layout: they are
keyed by the model's SHA-256 and the settings that shape the state (Layout). And it serves
only the clients it came from: each API key's snapshots are a partition of their own (a
Layout of their own), so a prompt that is fast for one key tells nothing of another's. Files are
written atomically and verified on read: a truncated, foreign or damaged file is deleted,
never given to llama.cpp; a model replaced in the store has a new SHA-256, and its old
snapshots are deleted with it (retain()).
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import queue
import struct
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass, replace
from pathlib import Path

from edgellm.files import fsync_dir, write_atomic
from edgellm.metrics import Metrics

log = logging.getLogger("edgellm.engine")

MIN_TOKENS = 128  # a shorter prefix is cheaper to compute again than to keep
_MAGIC = b"EDGELLM-KV\0"
_VERSION = 1
# magic, version, number of tokens, bytes of state, the layout's key, SHA-256 of tokens + state
_HEADER = struct.Struct(f"<{len(_MAGIC)}sIIQ32s32s")
_SUFFIX = ".kv"


def common_prefix(a: list[int], b: list[int]) -> int:
    """How many leading tokens two lists share (slices compare in C: a 4,000-token prompt
    against every slot and snapshot costs microseconds, not a Python loop per token)."""
    n = min(len(a), len(b))
    if a[:n] == b[:n]:
        return n
    lo, hi = 0, n  # a[:lo] == b[:lo] and a[:hi] != b[:hi]
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if a[:mid] == b[:mid]:
            lo = mid
        else:
            hi = mid
    return lo


@dataclass(frozen=True)
class Layout:
    """What a KV state fits: one model, and the context settings that shape its cells."""

    model: str  # the model's SHA-256 (or, for a file outside the store, its path, size and time)
    settings: str  # e.g. "n_ctx=4096 type_k=f16 type_v=f16 flash_attn=auto llama.cpp=0.3.36"
    partition: str = ""  # whose prompts: an API key's id; "" for a box whose keys share them

    @property
    def key(self) -> str:
        partition = f"\npartition={self.partition}" if self.partition else ""
        return hashlib.sha256(f"{self.model}\n{self.settings}{partition}".encode()).hexdigest()[:32]


class Snapshot:
    """The KV state of one sequence holding exactly `tokens`, in RAM (data) or on disk (path), or both."""

    def __init__(self, tokens: list[int], size: int, data: ctypes.Array[ctypes.c_uint8] | None,
                 path: Path | None) -> None:
        self.tokens = tokens
        self.size = size
        self.data = data
        self.path = path
        self.writing = False  # queued for the disk: its state stays in RAM until written
        self.used = time.time()


def _digest(tokens: bytes, data: memoryview | ctypes.Array[ctypes.c_uint8]) -> bytes:
    h = hashlib.sha256(tokens)
    h.update(data)
    return h.digest()


def _model_dir(model: str) -> str:
    """A model's folder: its SHA-256, or a digest of the identity of a file outside the store."""
    return model if len(model) == 64 else hashlib.sha256(model.encode()).hexdigest()


def _unlink(path: Path) -> int:
    """Delete a file; the bytes that freed (0 if it was gone already)."""
    try:
        size = path.stat().st_size
        path.unlink()
    except OSError:
        return 0
    return size


class PromptCache:
    """Every model's snapshots, shared by the runners (which save and restore them) and the
    generation service (which finds the one a prompt can use before it is submitted).
    Thread-safe: one lock over the index and the byte counts; file I/O happens outside it."""

    def __init__(self, directory: Path | None, *, memory: int, disk: int, metrics: Metrics | None = None) -> None:
        """`directory`: where snapshots persist (None, or disk 0: in RAM only)."""
        self.directory = directory if disk > 0 else None
        self.memory_limit = memory
        self.disk_limit = disk if self.directory is not None else 0
        self._metrics = metrics
        self._lock = threading.Lock()
        self._layouts: dict[str, dict[tuple[int, ...], Snapshot]] = {}  # layout key -> tokens -> snapshot
        self._memory = 0  # bytes of state in RAM
        self._disk = 0  # bytes of snapshot files
        self._writes: queue.SimpleQueue[tuple[Layout, Snapshot] | None] = queue.SimpleQueue()
        self._writer: threading.Thread | None = None
        self._idle = threading.Condition(self._lock)  # notified when nothing is queued for the disk

    @property
    def enabled(self) -> bool:
        return self.memory_limit > 0 or self.disk_limit > 0

    def view(self, layout: Layout) -> CacheView:
        """The snapshots of one model and layout; reads what the disk holds for it the first
        time (call it from a worker thread: the model's load)."""
        with self._lock:
            new = layout.key not in self._layouts
            self._layouts.setdefault(layout.key, {})
        if new and self.directory is not None:
            self._scan(layout)
        return CacheView(self, layout)

    # --- finding -----------------------------------------------------------------------------

    def _best(self, layout: Layout, tokens: list[int]) -> Snapshot | None:
        """The snapshot sharing the longest prefix with `tokens`, if that is MIN_TOKENS or more."""
        with self._lock:
            best, best_n = None, MIN_TOKENS - 1
            for snapshot in self._layouts.get(layout.key, {}).values():
                n = common_prefix(snapshot.tokens, tokens)
                if n > best_n:
                    best, best_n = snapshot, n
        return best

    def _covered(self, layout: Layout, tokens: list[int]) -> int:
        with self._lock:
            return max((common_prefix(s.tokens, tokens) for s in self._layouts.get(layout.key, {}).values()),
                       default=0)

    def _data(self, layout: Layout, snapshot: Snapshot) -> ctypes.Array[ctypes.c_uint8] | None:
        """The snapshot's state, read from its file (and verified) if it is not in RAM; None
        (and the snapshot is gone) if the file is damaged."""
        data = snapshot.data
        if data is None and snapshot.path is not None:
            data = self._read(layout, snapshot)
            if data is None:
                self._drop(layout, snapshot)
                return None
            with self._lock:
                if snapshot.data is None and snapshot.size <= self.memory_limit:
                    snapshot.data = data
                    self._memory += snapshot.size
                    self._trim_memory()
        now, last = time.time(), snapshot.used
        snapshot.used = now
        if snapshot.path is not None and now - last > 60:
            try:  # the disk's LRU order across restarts; not on every request, an SD card wears
                os.utime(snapshot.path)
            except OSError:
                pass
        self._gauges()
        return data

    # --- saving ------------------------------------------------------------------------------

    def _add(self, layout: Layout, tokens: list[int], data: ctypes.Array[ctypes.c_uint8]) -> None:
        snapshot = Snapshot(list(tokens), len(data), data, None)
        with self._lock:
            entries = self._layouts.setdefault(layout.key, {})
            for key in [k for k in entries if len(k) <= len(tokens) and list(k) == tokens[:len(k)]]:
                self._forget(entries.pop(key))
            entries[tuple(tokens)] = snapshot
            self._memory += snapshot.size
            if self.directory is not None and snapshot.size <= self.disk_limit:
                snapshot.writing = True
                self._writes.put((layout, snapshot))
                if self._writer is None:
                    self._writer = threading.Thread(target=self._write_loop, name="edgellm-prompt-cache",
                                                    daemon=True)
                    self._writer.start()
            self._trim_memory()
        self._gauges()

    def _trim_memory(self) -> None:
        """Drop the least recently used states from RAM until within the limit (hold the lock);
        one that is not on disk is gone for good. States waiting to be written stay."""
        while self._memory > self.memory_limit:
            in_ram = [(s, key) for key, entries in self._layouts.items() for s in entries.values()
                      if s.data is not None and not s.writing]
            if not in_ram:
                return
            snapshot, key = min(in_ram, key=lambda p: p[0].used)
            snapshot.data = None
            self._memory -= snapshot.size
            if snapshot.path is None:
                del self._layouts[key][tuple(snapshot.tokens)]

    def _write_loop(self) -> None:
        while (item := self._writes.get()) is not None:
            layout, snapshot = item
            try:
                self._write(layout, snapshot)
            except Exception as e:  # a cache never stops the service: the snapshot stays in RAM only
                reason = e.strerror if isinstance(e, OSError) and e.strerror else e
                log.warning("cannot write a prompt snapshot under %s: %s", self.directory, reason)
            with self._idle:
                snapshot.writing = False
                self._trim_memory()
                if not any(s.writing for entries in self._layouts.values() for s in entries.values()):
                    self._idle.notify_all()
            self._gauges()

    def _write(self, layout: Layout, snapshot: Snapshot) -> None:
        data = snapshot.data
        if data is None:  # replaced or dropped before its turn came
            return
        folder = self._folder(layout)
        folder.mkdir(parents=True, exist_ok=True)
        tokens = struct.pack(f"<{len(snapshot.tokens)}i", *snapshot.tokens)
        header = _HEADER.pack(_MAGIC, _VERSION, len(snapshot.tokens), snapshot.size, layout.key.encode(),
                              _digest(tokens, data))
        size = _HEADER.size + len(tokens) + snapshot.size
        self._make_room(size)
        path = folder / (hashlib.sha256(tokens).hexdigest()[:32] + _SUFFIX)
        write_atomic(path, [header, tokens, memoryview(data).cast("B")])
        with self._lock:
            if self._layouts.get(layout.key, {}).get(tuple(snapshot.tokens)) is snapshot:
                snapshot.path = path
                self._disk += size
                return
        _unlink(path)  # replaced or dropped meanwhile: the file goes too

    def _make_room(self, size: int) -> None:
        """Delete the least recently used files until `size` more bytes fit in the disk limit."""
        while True:
            with self._lock:
                if self._disk + size <= self.disk_limit:
                    return
                on_disk = [(s, key) for key, entries in self._layouts.items() for s in entries.values()
                           if s.path is not None]
                if not on_disk:
                    return
                snapshot, key = min(on_disk, key=lambda p: p[0].used)
                path, snapshot.path = snapshot.path, None
                assert path is not None
                if snapshot.data is None:
                    del self._layouts[key][tuple(snapshot.tokens)]
            freed = _unlink(path)
            with self._lock:
                self._disk -= freed

    def flush(self, timeout: float = 30.0) -> bool:
        """Wait until every snapshot saved so far is on disk (a clean shutdown keeps them all)."""
        with self._idle:
            return self._idle.wait_for(
                lambda: not any(s.writing for entries in self._layouts.values() for s in entries.values()),
                timeout)

    # --- the disk ----------------------------------------------------------------------------

    def _folder(self, layout: Layout) -> Path:
        assert self.directory is not None
        return self.directory / _model_dir(layout.model) / layout.key

    def _scan(self, layout: Layout) -> None:
        """Index the files of one layout (headers and tokens only: the state is read when used)."""
        try:
            paths = sorted(self._folder(layout).iterdir())
        except OSError:
            return
        found = []
        for path in paths:
            try:
                if not path.name.endswith(_SUFFIX):
                    raise ValueError("a temp file a power cut left behind")
                with open(path, "rb") as f:
                    magic, version, n, size, key, _ = _HEADER.unpack(f.read(_HEADER.size))
                    if (magic, version, key) != (_MAGIC, _VERSION, layout.key.encode()) or n == 0:
                        raise ValueError("not a snapshot of this model and layout")
                    stat = os.fstat(f.fileno())
                    if stat.st_size != _HEADER.size + 4 * n + size:
                        raise ValueError("truncated")
                    tokens = list(struct.unpack(f"<{n}i", f.read(4 * n)))
            except (OSError, ValueError, struct.error) as e:
                log.warning("discarding prompt snapshot %s: %s", path, e)
                _unlink(path)
                continue
            snapshot = Snapshot(tokens, size, None, path)
            snapshot.used = stat.st_mtime
            found.append((snapshot, stat.st_size))
        with self._lock:
            entries = self._layouts.setdefault(layout.key, {})
            for snapshot, size in found:
                if tuple(snapshot.tokens) not in entries:
                    entries[tuple(snapshot.tokens)] = snapshot
                    self._disk += size
        if found:
            log.info("prompt cache: %d snapshot(s) on disk for this model", len(found))
        self._gauges()

    def _read(self, layout: Layout, snapshot: Snapshot) -> ctypes.Array[ctypes.c_uint8] | None:
        """A snapshot's state from its file, or None if the file is not what its header promised."""
        assert snapshot.path is not None
        try:
            with open(snapshot.path, "rb") as f:
                magic, version, n, size, key, digest = _HEADER.unpack(f.read(_HEADER.size))
                tokens = f.read(4 * n)
                if size != snapshot.size:
                    raise ValueError("its size changed")
                data = (ctypes.c_uint8 * size)()
                got = f.readinto(memoryview(data).cast("B"))
                extra = f.read(1)
        except (OSError, ValueError, struct.error) as e:
            log.warning("discarding prompt snapshot %s: %s", snapshot.path, e)
            return None
        expected = (_MAGIC, _VERSION, len(snapshot.tokens), layout.key.encode())
        if (magic, version, n, key) != expected or got != size or extra \
                or tokens != struct.pack(f"<{n}i", *snapshot.tokens) or _digest(tokens, data) != digest:
            log.warning("discarding prompt snapshot %s: it does not match its checksum", snapshot.path)
            return None
        return data

    def _drop(self, layout: Layout, snapshot: Snapshot) -> None:
        with self._lock:
            entries = self._layouts.get(layout.key, {})
            if entries.get(tuple(snapshot.tokens)) is snapshot:
                del entries[tuple(snapshot.tokens)]
                self._forget(snapshot)
        self._gauges()

    def _forget(self, snapshot: Snapshot) -> None:
        """Release a snapshot's RAM and delete its file (hold the lock)."""
        if snapshot.data is not None:
            self._memory -= snapshot.size
            snapshot.data = None
        if snapshot.path is not None:
            path, snapshot.path = snapshot.path, None
            self._disk -= _unlink(path)

    def retain(self, models: Iterable[str]) -> None:
        """Delete the snapshots of every model but these (the SHA-256s installed now): a model
        removed or replaced in the store takes its snapshots with it. Call it from a worker thread."""
        if self.directory is None or not self.directory.is_dir():
            return
        keep = {_model_dir(m) for m in models}
        for folder in self.directory.iterdir():
            if folder.name in keep:
                continue
            for layout_dir in folder.iterdir() if folder.is_dir() else []:
                with self._lock:
                    for snapshot in self._layouts.pop(layout_dir.name, {}).values():
                        self._forget(snapshot)
                for path in layout_dir.iterdir():
                    _unlink(path)
                layout_dir.rmdir()
            if folder.is_dir():
                folder.rmdir()
            else:
                folder.unlink()
            fsync_dir(self.directory)
        self._gauges()

    def _gauges(self) -> None:
        if self._metrics is not None:
            self._metrics.prompt_cache_bytes.labels("memory").set(self._memory)
            self._metrics.prompt_cache_bytes.labels("disk").set(self._disk)

    def close(self) -> None:
        """Finish writing what is queued (within 30 s), then stop the writer."""
        self.flush()
        if self._writer is not None:
            self._writes.put(None)
            self._writer.join(timeout=30)
            self._writer = None


class CacheView:
    """One model's snapshots in one KV layout: what a runner and the generation service use."""

    def __init__(self, cache: PromptCache, layout: Layout) -> None:
        self.cache = cache
        self.layout = layout
        self._partitions: dict[str, CacheView] = {layout.partition: self}

    def partition(self, name: str) -> CacheView:
        """The snapshots of one partition (an API key's) of this model and layout; the first call
        for a partition reads its files (worker threads: the generation service asks first)."""
        view = self._partitions.get(name)
        if view is None:
            view = self._partitions.setdefault(name, self.cache.view(replace(self.layout, partition=name)))
        return view

    def find(self, tokens: list[int]) -> tuple[list[int], ctypes.Array[ctypes.c_uint8]] | None:
        """The snapshot sharing the longest prefix (at least MIN_TOKENS) with `tokens`, and its
        state, read from disk if need be (worker threads only: it may read tens of MB)."""
        while True:  # a damaged file drops its snapshot: try the next best
            snapshot = self.cache._best(self.layout, tokens)
            if snapshot is None:
                return None
            data = self.cache._data(self.layout, snapshot)
            if data is not None:
                return snapshot.tokens, data

    def covered(self, tokens: list[int]) -> int:
        """How many leading tokens of `tokens` some snapshot already holds."""
        return self.cache._covered(self.layout, tokens)

    def accepts(self, size: int) -> bool:
        """Whether a state of `size` bytes fits the cache's limits at all."""
        return size <= max(self.cache.memory_limit, self.cache.disk_limit)

    def add(self, tokens: list[int], data: ctypes.Array[ctypes.c_uint8]) -> None:
        """Keep a snapshot of a sequence holding exactly `tokens`; snapshots of shorter prefixes
        of them go (restoring this one and cutting it short gives the same state)."""
        self.cache._add(self.layout, tokens, data)
