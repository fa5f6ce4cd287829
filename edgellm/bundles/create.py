"""Make a bundle from installed models or GGUF files: a directory (the format for USB sticks)
or, when OUT ends with .tar, an uncompressed tar (for uploads)."""

from __future__ import annotations

import hashlib
import io
import os
import shutil
import socket
import tarfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from edgellm import __version__
from edgellm.bundles import signing
from edgellm.bundles.manifest import (
    FILE_RE,
    FILES,
    MANIFEST,
    MAX_FILE,
    SIGNATURE,
    BundleFile,
    BundleModel,
    Manifest,
)
from edgellm.bundles.reader import BundleError, Readable
from edgellm.modelfile import gguf
from edgellm.progress import Progress
from edgellm.store.registry import Registry, copy_hashing, describe, model_id_for


@dataclass
class Part:
    name: str  # in the bundle
    path: Path  # where it is read from
    size: int
    sha256: str = ""  # known for installed models; hashed first for files given by path


def create(names: list[str], out: Path, *, registry: Registry, key: signing.SecretKey | None = None,
           license: str = "", progress: Progress | None = None) -> Manifest:
    if out.exists() or out.is_symlink():
        raise BundleError(f"{out}: already exists")
    resolved = [_resolve(name, registry, license) for name in names]
    parts = [part for _, model_parts in resolved for part in model_parts]
    seen = set()
    for part in parts:
        if part.name.lower() in seen:
            raise BundleError(f"two files are called {part.name}: bundle them separately")
        seen.add(part.name.lower())
    hash_parts(parts, progress)
    for model, model_parts in resolved:  # now that every hash is known
        model.files = [BundleFile(p.name, p.size, p.sha256) for p in model_parts]
    manifest = Manifest(creator=f"edgellm {__version__} on {socket.gethostname()}",
                        created=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                        models=[model for model, _ in resolved])
    data = manifest.dumps()
    signature = key.sign(data, f"edgellm bundle {out.name}, {manifest.created}") if key else None
    write(out, data, signature, parts, progress)
    return manifest


def hash_parts(parts: list[Part], progress: Progress | None) -> None:
    """The SHA-256 of each part not known yet, read from its file."""
    total = sum(p.size for p in parts if not p.sha256)
    done = 0
    for part in parts:
        if not part.sha256:
            with open(part.path, "rb") as f:
                def step(n: int, name: str = part.name) -> None:
                    nonlocal done
                    done += n
                    if progress:
                        progress("hashing", name, done, total)
                part.sha256, _ = copy_hashing(f, None, step)


def write(out: Path, manifest: bytes, signature: str | None, parts: list[Part], progress: Progress | None) -> None:
    """The bundle at `out`, a directory or (OUT.tar) a tar, made beside it and renamed into place:
    a cut-off write never leaves what looks like a whole bundle."""
    partial = out.with_name(out.name + ".partial")
    if partial.exists():
        shutil.rmtree(partial) if partial.is_dir() else partial.unlink()
    writer = _write_tar if out.name.endswith(".tar") else _write_dir
    writer(partial, manifest, signature, parts, progress)
    os.replace(partial, out)


def _resolve(name: str, registry: Registry, license: str) -> tuple[BundleModel, list[Part]]:
    """An installed model (by id or alias) or a GGUF file, as a manifest entry and its files."""
    entry = registry.find(name)
    if entry is not None:
        paths, file_names = entry.paths, [f.name for f in entry.files]
        shas = [f.sha256 for f in entry.files]
    else:
        path = Path(name)
        if not path.is_file():
            raise BundleError(f"{name}: neither an installed model nor a GGUF file")
        paths = gguf.split_parts(path)
        missing = [str(p) for p in paths if not p.is_file()]
        if missing:
            raise BundleError(f"missing model file(s): {', '.join(missing)}")
        try:
            entry = describe(paths, model_id=model_id_for(paths[0]), source="", files=[])
        except gguf.GGUFError as e:
            raise BundleError(str(e)) from None
        file_names, shas = [p.name for p in paths], [""] * len(paths)
    parts = []
    for path, file_name, sha in zip(paths, file_names, shas, strict=True):
        size = path.stat().st_size
        if size > MAX_FILE:
            raise BundleError(f"{file_name} is {size} bytes, over FAT32's 4 GiB limit: split it first "
                              f"(llama-gguf-split --split --split-max-size 4000M {file_name} PREFIX) and bundle "
                              "the first part")
        if not FILE_RE.fullmatch(file_name):
            raise BundleError(f"{file_name}: a bundle's file names are letters, digits and . _ - ending in .gguf")
        parts.append(Part(file_name, path, size, sha))
    template = entry.chat_template if not entry.has_chat_template and entry.chat_template else None
    # The entry's files: create() lists them once every hash is known.
    model = BundleModel(id=entry.id, files=[], aliases=list(entry.aliases), architecture=entry.architecture,
                        quantization=entry.quantization, context_length=entry.context_length,
                        parameters=entry.parameters, defaults=dict(entry.defaults), chat_template=template,
                        license=license or entry.license, min_edgellm_version=__version__)
    return model, parts


class _Hashing(io.RawIOBase):
    """Reads a file for the copy and checks, in the same pass, that it still has its hash."""

    def __init__(self, f: BinaryIO, part: Part, step: Callable[[int], None]) -> None:
        self.f, self.part, self.step = f, part, step
        self.digest = hashlib.sha256()

    def readable(self) -> bool:
        return True

    def read(self, n: int = -1) -> bytes:
        data = self.f.read(n)
        self.digest.update(data)
        self.step(len(data))
        return data

    def check(self) -> None:
        if self.digest.hexdigest() != self.part.sha256:
            raise BundleError(f"{self.part.path}: changed while it was being bundled (its SHA-256 differs)")


def _copy_parts(parts: list[Part], progress: Progress | None, write: Callable[[Part, _Hashing], None]) -> None:
    total = sum(p.size for p in parts)
    done = 0

    def step(n: int) -> None:
        nonlocal done
        done += n
        if progress:
            progress("copying", part.name, done, total)

    for part in parts:
        with open(part.path, "rb") as f:
            reader = _Hashing(f, part, step)
            write(part, reader)
            reader.check()


def _write_dir(out: Path, manifest: bytes, signature: str | None, parts: list[Part],
               progress: Progress | None) -> None:
    (out / FILES).mkdir(parents=True)

    def write(part: Part, reader: _Hashing) -> None:
        with open(out / FILES / part.name, "wb") as dst:
            shutil.copyfileobj(reader, dst, 1 << 20)
            dst.flush()
            os.fsync(dst.fileno())

    _copy_parts(parts, progress, write)
    (out / MANIFEST).write_bytes(manifest)
    if signature:
        (out / SIGNATURE).write_text(signature)


def _write_tar(out: Path, manifest: bytes, signature: str | None, parts: list[Part],
               progress: Progress | None) -> None:
    """The manifest first, its signature next, then the files in the manifest's order: a reader
    of the stream can check each file before it reads it."""
    now = int(time.time())
    with tarfile.open(out, "w", format=tarfile.PAX_FORMAT) as tar:
        def add(name: str, size: int, data: Readable) -> None:
            info = tarfile.TarInfo(name)
            info.size, info.mode, info.mtime = size, 0o644, now
            tar.addfile(info, data)

        add(MANIFEST, len(manifest), io.BytesIO(manifest))
        if signature:
            add(SIGNATURE, len(signature.encode()), io.BytesIO(signature.encode()))
        _copy_parts(parts, progress, lambda part, reader: add(f"{FILES}/{part.name}", part.size, reader))
    with open(out, "rb+") as f:
        os.fsync(f.fileno())
