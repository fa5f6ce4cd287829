"""The catalog of installed models, crash-safe.

Layout under <state dir>/models:

    catalog.json              every installed model, one entry each
    blobs/sha256-<hex>.gguf   model files, named by the SHA-256 of their content
    tmp/                      files being copied in; anything here after a crash is debris
    tmp/import-ID/            an import's verified files until it commits; import-ID.lock
                              beside it is held (flock) by the import while it runs
    .lock                     held (flock) by whoever changes the catalog and blobs/

The catalog is one JSON file, replaced atomically (write a temporary file,
fsync it, rename it over the old one, fsync the directory): a crash at any
instant leaves the old catalog or the new one. JSON rather than sqlite: the
catalog holds a few entries, changes rarely, and an operator can read it with
`cat` on a box that has nothing else; writers are serialized by the lock.

Order of work makes every crash recoverable: adding copies the files into
place first and changes the catalog last; removing changes the catalog first
and deletes files after. So after a crash there can only be debris (temporary
files, files no entry names), which open() deletes; a model is either fully
installed or not at all.

Readers never take the lock: they read the last catalog committed, so listing
models or serving them never waits for an import or an add in progress.
"""

from __future__ import annotations

import calendar
import contextlib
import fcntl
import hashlib
import json
import os
import queue
import re
import secrets
import shutil
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import IO

from edgellm.errors import EdgeError
from edgellm.files import fsync_dir, write_atomic
from edgellm.modelfile import defaults, gguf, memory
from edgellm.units import MiB, timestamp

CHUNK = 4 << 20  # bytes per read: large enough that per-chunk costs vanish
BUFFERS = 4  # chunks in flight while copying: one being read, one hashed, one written, one spare
WRITEBACK = 16 << 20  # bytes written between starts of writeback: the disk writes while the copy goes on
SYNC_EVERY = 256 << 20  # bytes written between fdatasyncs while copying: bounded dirty memory on a Pi
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}$")

# general.file_type -> the name model hubs use for the quantization.
QUANTIZATIONS = {
    0: "F32", 1: "F16", 2: "Q4_0", 3: "Q4_1", 7: "Q8_0", 8: "Q5_0", 9: "Q5_1", 10: "Q2_K", 11: "Q3_K_S",
    12: "Q3_K_M", 13: "Q3_K_L", 14: "Q4_K_S", 15: "Q4_K_M", 16: "Q5_K_S", 17: "Q5_K_M", 18: "Q6_K",
    19: "IQ2_XXS", 20: "IQ2_XS", 21: "Q2_K_S", 22: "IQ3_XS", 23: "IQ3_XXS", 24: "IQ1_S", 25: "IQ4_NL",
    26: "IQ3_S", 27: "IQ3_M", 28: "IQ2_S", 29: "IQ2_M", 30: "IQ4_XS", 31: "IQ1_M", 32: "BF16", 36: "TQ1_0",
    37: "TQ2_0", 38: "MXFP4",
}
SHA_RE = re.compile(r"^[0-9a-f]{64}$")
TIME_FORMAT = "%Y-%m-%dT%H:%M:%SZ"
# 2: chat_template is the template to use, has_chat_template the file's flag; 3: bundle_created and signer
CATALOG_VERSION = 3
DISK_MARGIN = 64 << 20  # left free on the state dir's filesystem by imports and uploads
UPLOAD_TTL = 24 * 3600.0  # seconds an uploaded file waits to be installed before it is dropped
STAGING = "import-"  # imports' staging directories in tmp/, and their locks
STAGING_RE = re.compile(rf"^{STAGING}\d+-[0-9a-f]{{8}}(\.lock)?$")


class StoreError(EdgeError):
    """A store operation that cannot be done; the message says why, in one line. A fault of the
    box's own store (a damaged catalog) unless the raiser says otherwise."""

    code = "store_error"


@dataclass
class ModelFile:
    name: str  # the file's name when it was added
    sha256: str
    size: int


@dataclass
class Entry:
    id: str
    aliases: list[str]
    files: list[ModelFile]
    size: int
    sha256: str  # of the file, or for split models of the parts' digests joined in order
    architecture: str
    quantization: str
    parameters: int
    context_length: int
    has_chat_template: bool  # the GGUF file carries a chat template
    embedding: bool
    defaults: dict[str, int | float]  # sampling defaults the model recommends, by request field
    source: str
    installed: str
    license: str = ""
    # A chat template to use instead of the file's (a bundle's, for a file without one; the
    # [model] chat_template setting for the --model file): a built-in format's name or Jinja.
    chat_template: str = ""
    # From a bundle: its manifest's `created`, which a bundle replacing this model must exceed, and the
    # id of the key that signed it, which it must be signed by ("" for an unsigned bundle, or a file).
    bundle_created: str = ""
    signer: str = ""
    # Not stored: where the files are (the catalog's blobs, or a file given on the command line).
    paths: list[Path] = field(default_factory=list, compare=False, repr=False)

    def names(self) -> list[str]:
        return [self.id, *self.aliases]

    @property
    def created(self) -> int:
        """The install time as a Unix timestamp (OpenAI's `created`)."""
        return calendar.timegm(time.strptime(self.installed, TIME_FORMAT))

    def record(self) -> dict[str, object]:
        record = asdict(self)
        del record["paths"]
        return record


def describe(parts: list[Path], *, model_id: str, source: str, files: list[ModelFile],
             headers: list[gguf.GGUFFile] | None = None) -> Entry:
    """An entry for a model from its GGUF header(s) (read from `parts` unless given); a StoreError
    names a sampling default in the header that could not be honoured."""
    headers = headers or [gguf.read(p) for p in parts]
    head = headers[0]
    try:
        recommended = defaults.from_gguf(head.metadata)
    except ValueError as e:
        raise StoreError(f"{head.path.name}: its sampling default {e}; fix the file's metadata",
                         status=400, code="invalid_model_file") from None
    arch = head.architecture
    file_type = head.get("general.file_type")
    pooling = head.arch("pooling_type")
    sha = files[0].sha256 if len(files) == 1 else hashlib.sha256("".join(f.sha256 for f in files).encode()).hexdigest()
    return Entry(
        id=model_id,
        aliases=[],
        files=files,
        size=sum(f.size for f in files),
        sha256=sha,
        architecture=arch,
        quantization=QUANTIZATIONS.get(file_type, f"type {file_type}") if isinstance(file_type, int) else "unknown",
        parameters=sum(h.n_params for h in headers),
        context_length=head.arch_int("context_length", 0),
        has_chat_template=head.get("tokenizer.chat_template") is not None,
        embedding=pooling not in (None, 0),
        defaults=recommended,
        source=source,
        installed=time.strftime(TIME_FORMAT, time.gmtime()),
        paths=parts,
    )


def _check_describable(headers: list[gguf.GGUFFile]) -> None:
    """A StoreError when the headers lack or mangle what the server reads to serve the model (an
    f32 NaN where a size belongs): such a file would be installed but never served."""
    try:
        memory.estimate(headers, n_ctx=512, parallel=1, n_ubatch=512)
    except EdgeError as e:
        raise StoreError(e.message, status=400, code="invalid_model_file") from None


def model_id_for(path: Path) -> str:
    """A client-friendly id from a file name: no extension, no split-file suffix."""
    match = gguf.SPLIT_RE.match(path.name)
    return match["prefix"] if match else path.name.removesuffix(".gguf")


def copy_hashing(src: IO[bytes], dst: IO[bytes] | None, progress: Callable[[int], None] | None = None,
                 limit: int | None = None) -> tuple[str, int]:
    """Read src to its end (or `limit` bytes), writing to dst if given; the SHA-256 and the size.

    One pass over the source (a USB stick is read once), as a pipeline over BUFFERS reused
    buffers: this thread reads a chunk into a free buffer while one worker hashes the chunk
    before it and another writes the one before that, so reading, hashing and writing overlap
    (hashlib and file I/O release the GIL), and no chunk is allocated or copied in Python. Each
    buffer passes read -> hashed -> written -> free: the bytes written are the bytes hashed. The
    writer hands the written data to the disk as it goes (writeback started every WRITEBACK
    bytes, fdatasync every SYNC_EVERY: bounded dirty memory on a Pi), so the caller's final
    fsync has little left to wait for."""
    digest = hashlib.sha256()
    free: queue.SimpleQueue[bytearray | None] = queue.SimpleQueue()
    to_hash: queue.SimpleQueue[tuple[bytearray, int] | None] = queue.SimpleQueue()
    to_write: queue.SimpleQueue[tuple[bytearray, int] | None] = queue.SimpleQueue()
    failed: list[BaseException] = []
    for _ in range(BUFFERS if dst is not None else BUFFERS - 1):
        free.put(bytearray(CHUNK))

    def hasher() -> None:
        try:
            while (item := to_hash.get()) is not None:
                buffer, n = item
                digest.update(memoryview(buffer)[:n])
                if dst is None:
                    free.put(buffer)
                else:
                    to_write.put(item)
        except BaseException as e:
            failed.append(e)
            free.put(None)  # the reader stops at its next chunk
        finally:
            to_write.put(None)

    def writer() -> None:
        assert dst is not None
        try:
            fd = dst.fileno()
            written = started = synced = 0
            while (item := to_write.get()) is not None:
                buffer, n = item
                view = memoryview(buffer)[:n]
                while view:
                    view = view[dst.write(view):]
                written += n
                free.put(buffer)
                if written - synced >= SYNC_EVERY:
                    dst.flush()
                    os.fdatasync(fd)
                    started = synced = written
                elif written - started >= WRITEBACK:
                    dst.flush()
                    start_writeback(fd, started, written - started)
                    started = written
        except BaseException as e:
            failed.append(e)
            free.put(None)
            while to_write.get() is not None:  # let the hasher finish
                pass

    workers = [threading.Thread(target=hasher, name="edgellm-hash", daemon=True)]
    if dst is not None:
        workers.append(threading.Thread(target=writer, name="edgellm-write", daemon=True))
    for worker in workers:
        worker.start()
    size = 0
    read = getattr(src, "readinto", None)
    try:
        while (buffer := free.get()) is not None:
            want = CHUNK if limit is None else min(CHUNK, limit - size)
            if read is not None:
                n = read(memoryview(buffer)[:want]) if want else 0
            else:
                chunk = src.read(want) if want else b""
                n = len(chunk)
                buffer[:n] = chunk
            if not n:
                break
            to_hash.put((buffer, n))
            size += n
            if progress:
                progress(n)
    finally:
        to_hash.put(None)
        for worker in workers:
            worker.join()
    if failed:
        raise failed[0]
    return digest.hexdigest(), size


def start_writeback(fd: int, offset: int, length: int) -> None:
    """Start writing these dirty pages to the disk without waiting for it (Linux's
    POSIX_FADV_DONTNEED starts writeback of a dirty range, and drops only pages already clean)."""
    with contextlib.suppress(OSError, AttributeError):
        os.posix_fadvise(fd, offset, length, os.POSIX_FADV_DONTNEED)


class Registry:
    def __init__(self, state_dir: str | Path) -> None:
        self.root = Path(state_dir) / "models"
        self.catalog = self.root / "catalog.json"
        self.blobs = self.root / "blobs"
        self.tmp = self.root / "tmp"

    # --- reading (no lock: the catalog is only ever replaced whole, so it is read as committed) -

    def stamp(self) -> int:
        """Changes whenever the catalog does (for noticing installs by another process)."""
        try:
            return self.catalog.stat().st_mtime_ns
        except FileNotFoundError:
            return 0

    def entries(self) -> list[Entry]:
        try:
            data = json.loads(self.catalog.read_text())
        except FileNotFoundError:
            return []
        except (OSError, ValueError, RecursionError) as e:
            raise StoreError(f"{self.catalog}: unreadable catalog ({e}); it was not written by edgellm") from None
        if not isinstance(data, dict) or not isinstance(data.get("models", []), list) or \
                not isinstance(data.get("version", 1), int) or data.get("version", 1) > CATALOG_VERSION:
            raise StoreError(f"{self.catalog}: not a catalog this edgellm reads (version {data.get('version')!r} "
                             f"of at most {CATALOG_VERSION}, or not a list of models)"
                             if isinstance(data, dict) else f"{self.catalog}: not a catalog (not a JSON object)")
        entries = []
        for i, record in enumerate(data.get("models", [])):
            try:
                entry = _entry(record, data.get("version", 1))
            except (ValueError, TypeError) as e:
                raise StoreError(f"{self.catalog}: models[{i}]: {e}; the catalog was changed by hand or is damaged"
                                 ) from None
            entry.paths = [self.blob(f.sha256) for f in entry.files]
            entries.append(entry)
        return entries

    def find(self, name: str) -> Entry | None:
        return next((e for e in self.entries() if name in e.names()), None)

    def blob(self, sha256: str) -> Path:
        return self.blobs / f"sha256-{sha256}.gguf"

    def upload(self, sha256: str) -> Path:
        """Where a file uploaded for a later install is kept (Ollama's blobs), named by its content."""
        return self.root / "uploads" / f"sha256-{sha256}"

    def has_content(self, sha256: str) -> bool:
        """Whether a file with this SHA-256 is here: installed, or uploaded."""
        return self.blob(sha256).is_file() or self.upload(sha256).is_file()

    # --- changing (under the lock) ------------------------------------------------------------

    def _make_folders(self) -> None:
        for d in (self.root, self.blobs, self.tmp):
            d.mkdir(parents=True, exist_ok=True)

    @contextlib.contextmanager
    def locked(self, *, wait: bool = True) -> Iterator[bool]:
        """Hold the store's lock (yields False when wait=False and another process holds it)."""
        self._make_folders()
        with open(self.root / ".lock", "a+") as lock:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
            except BlockingIOError:
                yield False
                return
            try:
                yield True
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def open(self, *, wait: bool = True) -> Registry:
        """Create the layout if needed and clear away what an interrupted operation left behind.
        With wait=False, when another process is changing the store (a long import), skip the
        clean-up: that process's files are not debris, and the catalog can be read anyway."""
        with self.locked(wait=wait) as held:
            if held:
                self.recover()
        return self

    @contextlib.contextmanager
    def staging(self) -> Iterator[Path]:
        """A directory of this process's own in tmp/ to verify an import's files in before it
        commits, without the store's lock. It is deleted at the end; while it is in use, a lock
        of its own (a file beside it, made first and deleted last) keeps recover() away from it."""
        self._make_folders()
        while True:
            name = f"{STAGING}{os.getpid()}-{secrets.token_hex(4)}"
            lock_path = self.tmp / f"{name}.lock"
            lock = open(lock_path, "x")  # noqa: SIM115 (held until the directory is gone)
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:  # still there once held: a recover() did not take it for debris in the instant before
                if os.stat(lock_path).st_ino == os.fstat(lock.fileno()).st_ino:
                    break
            except FileNotFoundError:
                pass
            lock.close()
        path = self.tmp / name
        try:
            path.mkdir()
            yield path
        finally:
            shutil.rmtree(path, ignore_errors=True)
            if not path.exists():  # else both stay, for the next recover() to delete
                lock_path.unlink()
            lock.close()

    def _clear_staging(self) -> None:
        """Delete the staging directories of imports that ended without doing so (killed, crashed)."""
        for lock_path in self.tmp.glob(f"{STAGING}*.lock"):
            try:
                lock = open(lock_path)  # noqa: SIM115 (closed below, after the deletion)
            except FileNotFoundError:  # its import has just ended
                continue
            with lock:
                try:
                    fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:  # its import is running
                    continue
                with contextlib.suppress(FileNotFoundError):  # none yet when it ended at once
                    shutil.rmtree(self.tmp / lock_path.name.removesuffix(".lock"))
                lock_path.unlink(missing_ok=True)

    def recover(self) -> None:
        """Delete what interrupted operations left: temporary files, staging directories of imports
        no longer running, blobs no entry names (hold the lock)."""
        entries = self.entries()  # raises on a damaged catalog: never delete files then
        self._clear_staging()
        for leftover in [*self.tmp.iterdir(), *self.root.glob("catalog.json.tmp*")]:
            if not STAGING_RE.fullmatch(leftover.name):  # those of running imports are theirs
                leftover.unlink()
        wanted = {self.blob(f.sha256).name for e in entries for f in e.files}
        unwanted = [blob for blob in self.blobs.iterdir() if blob.name not in wanted]
        for blob in unwanted:
            blob.unlink()
        if unwanted:  # the deletions made lasting (nothing to make lasting when there were none)
            fsync_dir(self.blobs)

    def write(self, entries: list[Entry]) -> None:
        """Replace the catalog (hold the lock)."""
        self._write(entries)

    def _write(self, entries: list[Entry]) -> None:
        write_atomic(self.catalog, json.dumps({"version": CATALOG_VERSION, "models": [e.record() for e in entries]},
                                              indent=2))

    def add(self, path: str | Path, *, alias: str | None = None, source: str | None = None,
            progress: Callable[[int], None] | None = None, model_id: str | None = None) -> tuple[Entry, bool]:
        """Install a GGUF file (all parts of a split one); returns the entry and whether it is new.
        `model_id`: its id (else one made from the file's name); a name another model has is refused,
        and the same file installed already gets it as an alias."""
        path = Path(path)
        if model_id is not None and not NAME_RE.fullmatch(model_id):
            raise StoreError(f"model name {model_id!r} may hold only letters, digits and . _ : - (up to 128)",
                             status=400)
        parts = gguf.split_parts(path)
        missing = [str(p) for p in parts if not p.is_file()]
        if missing:
            raise StoreError(f"missing model file(s): {', '.join(missing)}", status=400)
        # Refuse what is not a readable GGUF, or one the server could not describe, before copying a byte.
        headers = [gguf.read(part) for part in parts]
        _check_describable(headers)
        if alias is not None and not NAME_RE.fullmatch(alias):
            raise StoreError(f"alias {alias!r} may hold only letters, digits and . _ : - (up to 128)", status=400)
        with self.locked():
            self.recover()
            files = [self._install(part, progress) for part in parts]
            entries = self.entries()
            entry = describe([self.blob(f.sha256) for f in files], model_id=model_id_for(parts[0]),
                             source=source or f"file:{parts[0].resolve()}", files=files, headers=headers)
            existing = next((e for e in entries if e.sha256 == entry.sha256), None)
            taken = {n for e in entries for n in e.names() if e is not existing}
            if model_id is not None:
                entry.id = model_id
                alias = model_id if existing is not None and model_id != existing.id else alias
            for name in (alias, model_id):
                if name is not None and name in taken:
                    self.recover()  # the files just placed belong to no entry
                    raise StoreError(f"the name {name!r} is already used by another model", status=409)
            if existing is not None:
                if alias and alias not in existing.names():
                    existing.aliases.append(alias)
                    self._write(entries)
                return existing, False
            if entry.id in taken:
                entry.id = f"{entry.id}-{entry.sha256[:8]}"
            if alias:
                entry.aliases.append(alias)
            self._write([*entries, entry])
            return entry, True

    def alias(self, name: str, alias: str) -> Entry:
        """Give the model called `name` another name."""
        if not NAME_RE.fullmatch(alias):
            raise StoreError(f"name {alias!r} may hold only letters, digits and . _ : - (up to 128)", status=400)
        with self.locked():
            entries = self.entries()
            entry = next((e for e in entries if name in e.names()), None)
            if entry is None:
                raise StoreError(f"no installed model is called {name!r}", status=404)
            if alias in entry.names():
                return entry
            if any(alias in e.names() for e in entries):
                raise StoreError(f"the name {alias!r} is already used by another model", status=409)
            entry.aliases.append(alias)
            self._write(entries)
            return entry

    def drop_name(self, name: str) -> Entry:
        """Take one name from a model that has others (Ollama's delete of a copy): an alias goes; the
        id goes to its first alias. remove() is for a model's last name."""
        with self.locked():
            entries = self.entries()
            entry = next((e for e in entries if name in e.names()), None)
            if entry is None:
                raise StoreError(f"no installed model is called {name!r}", status=404)
            if not entry.aliases:
                raise StoreError(f"{name!r} is the only name of model '{entry.id}'", status=400)
            if name in entry.aliases:
                entry.aliases.remove(name)
            else:
                entry.id = entry.aliases.pop(0)
            self._write(entries)
            return entry

    def receive(self, src: IO[bytes], sha256: str, size: int | None = None) -> int:
        """Keep an uploaded file for a later add(), if its content has this SHA-256 (else nothing is
        kept); its size. It is verified in a staging directory, then moved into place whole. Uploads
        never installed are dropped after UPLOAD_TTL; `size` (as announced) is refused up front when
        the disk cannot take it."""
        self._make_folders()
        uploads = self.upload(sha256).parent
        for old in uploads.glob("sha256-*") if uploads.is_dir() else []:
            with contextlib.suppress(FileNotFoundError):
                if time.time() - old.stat().st_mtime > UPLOAD_TTL:
                    old.unlink()
        free = shutil.disk_usage(self.root).free
        if size is not None and size + DISK_MARGIN > free:
            raise StoreError(f"the upload is {size / MiB:.0f} MiB but {free / MiB:.0f} MiB are free (keeping "
                             f"{DISK_MARGIN / MiB:.0f} MiB spare)", status=507, code="insufficient_storage")
        with self.staging() as staging:
            tmp = staging / "upload"
            got, size = self.stage(src, tmp)
            if got != sha256:
                raise StoreError(f"the upload's SHA-256 is {got}, not {sha256}: it was not kept", status=400,
                                 code="digest_mismatch")
            target = self.upload(sha256)
            target.parent.mkdir(exist_ok=True)
            os.replace(tmp, target)
            fsync_dir(target.parent)
        return size

    def _install(self, source: Path, progress: Callable[[int], None] | None) -> ModelFile:
        """Hash and place one file as a blob: a hard link on the same filesystem, else a copy."""
        tmp = self.tmp / f"{source.name}.{os.getpid()}.partial"
        try:
            os.link(source, tmp)
        except OSError:
            with open(source, "rb") as src:
                sha, _ = self.stage(src, tmp, progress)
        else:  # the same inode: make sure its data is on the disk before the catalog names it
            with open(source, "rb") as src:
                sha, _ = copy_hashing(src, None, progress)
                os.fsync(src.fileno())
        self.place(tmp, sha)
        return ModelFile(name=source.name, sha256=sha, size=self.blob(sha).stat().st_size)

    def stage(self, src: IO[bytes], tmp: Path, progress: Callable[[int], None] | None = None,
              limit: int | None = None) -> tuple[str, int]:
        """Copy into a temporary file in the store (under the lock, or in a staging directory),
        hashing in the same pass, and fsync it; returns its SHA-256 and size."""
        with open(tmp, "wb") as dst:
            result = copy_hashing(src, dst, progress, limit)
            dst.flush()
            os.fsync(dst.fileno())
        return result

    def place(self, tmp: Path, sha256: str) -> None:
        """Move a staged file into place as the blob for its content (hold the lock)."""
        if self.blob(sha256).exists():
            tmp.unlink()  # the same content is installed already
        else:
            os.replace(tmp, self.blob(sha256))
            fsync_dir(self.blobs)

    def remove(self, name: str) -> Entry:
        with self.locked():
            entries = self.entries()
            entry = next((e for e in entries if name in e.names()), None)
            if entry is None:
                raise StoreError(f"no installed model is called {name!r}", status=404)
            remaining = [e for e in entries if e is not entry]
            self._write(remaining)
            still_used = {f.sha256 for e in remaining for f in e.files}
            for f in entry.files:
                if f.sha256 not in still_used:
                    self.blob(f.sha256).unlink(missing_ok=True)
            fsync_dir(self.blobs)
            return entry


# The catalog record's fields and their JSON types (Entry's, but for `paths`).
_RECORD = {"id": str, "aliases": list, "files": list, "size": int, "sha256": str, "architecture": str,
           "quantization": str, "parameters": int, "context_length": int, "has_chat_template": bool,
           "embedding": bool, "defaults": dict, "source": str, "installed": str, "license": str,
           "chat_template": str, "bundle_created": str, "signer": str}
_OPTIONAL = {"license", "chat_template", "bundle_created", "signer"}


def _entry(record: object, version: int) -> Entry:
    """A catalog record, checked field by field; ValueError says what is wrong."""
    if not isinstance(record, dict):
        raise ValueError("not an object")
    if version == 1:  # chat_template was the file's flag, template the bundle's template
        record = {**record, "has_chat_template": record.get("chat_template"),
                  "chat_template": record.get("template", "")}
        record.pop("template", None)
    unknown = set(record) - set(_RECORD)
    if unknown:
        raise ValueError(f"unknown fields {sorted(unknown)}")
    for name, kind in _RECORD.items():
        if name not in record and name in _OPTIONAL:
            continue
        value = record.get(name)
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            raise ValueError(f"'{name}' must be a {kind.__name__}, got {type(value).__name__}")
    if not record["id"] or not all(isinstance(a, str) and a for a in record["aliases"]):
        raise ValueError("'id' and 'aliases' must be names")
    files = []
    for f in record["files"]:
        if not (isinstance(f, dict) and set(f) == {"name", "sha256", "size"} and isinstance(f["name"], str)
                and isinstance(f["sha256"], str) and SHA_RE.fullmatch(f["sha256"])
                and isinstance(f["size"], int) and not isinstance(f["size"], bool) and f["size"] >= 0):
            raise ValueError("'files' must list {name, sha256 (64 hex digits), size}")
        files.append(ModelFile(f["name"], f["sha256"], f["size"]))
    if not files:
        raise ValueError("'files' is empty")
    time.strptime(record["installed"], TIME_FORMAT)  # ValueError when it is not a timestamp
    if record.get("bundle_created"):
        timestamp(record["bundle_created"])
    return Entry(**{**record, "files": files, "defaults": defaults.check(record["defaults"])})

