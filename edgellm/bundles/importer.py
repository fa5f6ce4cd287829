"""Verify a bundle and install its models into the store, never losing or half-installing one.

The order of work:

1. read the manifest and check its signature against the trusted keys (or
   the policy allows unsigned bundles), then the source's layout: every
   hostile or damaged input is refused here, before a byte is written;
2. under the store's lock, check the free disk space and that each model can
   ever load on this box (its memory estimate at the smallest context);
3. copy each file not installed yet into the store's tmp/, hashing in the
   same pass, fsync; a file whose SHA-256 or size differs from the manifest's
   ends the import;
4. only when every file is in tmp/ and correct: rename each into blobs/,
   fsync the directory, then replace the catalog (registry.py).

A crash before 4 leaves debris in tmp/ that the next start deletes; during 4,
blobs that no entry names yet, deleted the same way; the catalog is replaced
atomically. So a model is either fully installed or absent, and running the
import again finishes the job. The running service notices the new catalog
within a second.
"""

from __future__ import annotations

import os
import shutil
import tarfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from edgellm import __version__
from edgellm.bundles import signing
from edgellm.bundles.manifest import (
    SIGNATURE,
    BundleFile,
    BundleModel,
    Manifest,
    ManifestError,
    parse,
    version_tuple,
)
from edgellm.bundles.reader import BundleError, DirectorySource, StreamSource, TarSource
from edgellm.config import Config, EngineConfig
from edgellm.modelfile import gguf, memory
from edgellm.progress import Progress
from edgellm.store.registry import Entry, ModelFile, Registry, StoreError, copy_hashing, describe
from edgellm.units import MiB, parse_size

DISK_MARGIN = 64 * MiB  # left free on the state dir's filesystem

Source = DirectorySource | TarSource | StreamSource


@dataclass
class Policy:
    keys: list[signing.PublicKey]
    require_signature: bool
    skipped: list[str] = field(default_factory=list)  # why each unusable trusted-keys file was skipped

    @classmethod
    def from_config(cls, config: Config) -> Policy:
        keys, skipped = signing.trusted_keys(config.trusted_keys_dir)
        return cls(keys, require_signature=config.bundles.policy == "require-signature", skipped=skipped)


def memory_limit(config: Config) -> int:
    """The most memory models may ever have here: the budget, or all the RAM but the reserve."""
    if config.models.memory_budget:
        return parse_size(config.models.memory_budget)
    # All the RAM (MemTotal, what psutil.virtual_memory().total says), without importing psutil.
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return total - parse_size(config.models.memory_reserve or "0")


@dataclass
class Outcome:
    model: str
    status: str  # installed, replaced, unchanged


def verify(source: Source, policy: Policy) -> tuple[Manifest, str]:
    """The manifest, once its signature and the source's layout check out; and who signed it."""
    data, signature = source.manifest()
    try:
        manifest = parse(data, f"{source.name}: manifest.json")
    except ManifestError as e:
        raise BundleError(str(e)) from None
    if signature is None:
        if policy.require_signature:
            raise BundleError(f"{source.name}: not signed ({SIGNATURE} is missing), and the policy requires a "
                              "signature (set [bundles] policy = \"allow-unsigned\" only for development)")
        signer = "unsigned"
    else:
        try:
            key, _ = signing.verify(data, signature, policy.keys, source=f"{source.name}: {SIGNATURE}")
        except signing.SignatureError as e:
            raise BundleError(str(e)) from None
        signer = f"key {key.id}"
    for model in manifest.models:
        if version_tuple(model.min_edgellm_version) > version_tuple(__version__):
            raise BundleError(f"{source.name}: model {model.id} needs edgellm {model.min_edgellm_version} or newer; "
                              f"this is {__version__}")
    source.check(manifest)
    return manifest, signer


def import_bundle(source: Source, registry: Registry, policy: Policy, *, engine: EngineConfig, memory_limit: int,
                  progress: Progress | None = None, wait: bool = True) -> list[Outcome]:
    """Verify and install; `wait=False` refuses at once when the store is busy (HTTP uploads)."""
    manifest, signer = verify(source, policy)
    staged: list[tuple[Path, str]] = []
    with registry.locked(wait=wait) as held:
        if not held:
            raise BundleError(f"{source.name}: another import or model change is in progress; try again "
                              "when it has finished")
        try:
            registry.recover()
            outcomes = _import(source, manifest, signer, registry, staged, engine, memory_limit, progress)
        except tarfile.TarError as e:
            registry.recover()  # whatever was staged or placed goes; the catalog is as it was
            raise BundleError(f"{source.name}: a damaged or truncated tar ({e})") from None
        except BaseException:
            registry.recover()
            raise
    return outcomes


def _import(source: Source, manifest: Manifest, signer: str, registry: Registry, staged: list[tuple[Path, str]],
            engine: EngineConfig, memory_limit: int, progress: Progress | None) -> list[Outcome]:
    entries = registry.entries()
    by_id = {e.id: e for e in entries}
    unchanged = {m.id for m in manifest.models if m.id in by_id
                 and [f.sha256 for f in by_id[m.id].files] == [f.sha256 for f in m.files]}
    replacing = {m.id for m in manifest.models} - unchanged
    taken = {n: e.id for e in entries if e.id not in replacing for n in e.names()}
    for model in manifest.models:
        if model.id in unchanged:
            continue
        for name in [model.id, *model.aliases]:
            if name in taken and taken[name] != model.id:
                raise BundleError(f"{source.name}: the name {name!r} of model {model.id} is already used by "
                                  f"installed model {taken[name]}")

    wanted = {f.sha256: f for m in manifest.models if m.id not in unchanged for f in m.files
              if not registry.blob(f.sha256).exists()}
    need = sum(f.size for f in wanted.values())
    free = shutil.disk_usage(registry.root).free
    if need + DISK_MARGIN > free:
        raise BundleError(f"{source.name}: needs {need / MiB:.0f} MiB of disk for its files, but only "
                          f"{free / MiB:.0f} MiB are free (keeping {DISK_MARGIN / MiB:.0f} MiB spare)")
    headers: dict[str, list[gguf.GGUFFile]] = {}
    new: list[Entry] = []
    if source.seekable:  # every header is read, and every model checked, before a byte is copied
        for model in manifest.models:
            if model.id not in unchanged:
                headers[model.id] = [_header(source, f) for f in model.files]
                _check_memory(source, model, headers[model.id], engine, memory_limit)
        new = [_entry(m, registry, source, signer, headers[m.id]) for m in manifest.models if m.id not in unchanged]

    total = sum(f.size for f in wanted.values())
    done = 0

    def advance(name: str) -> Callable[[int], None]:
        def step(n: int) -> None:
            nonlocal done
            done += n
            if progress:
                progress("importing", name, done, total)
        return step

    files = source.files(manifest) if isinstance(source, StreamSource) else (
        (f.name, None) for f in manifest.files())
    expected = {f.name: f for f in manifest.files()}
    for name, stream in files:
        f = expected[name]
        if f.sha256 not in wanted or any(sha == f.sha256 for _, sha in staged):
            continue  # installed already (or listed twice with the same content): not copied again
        tmp = registry.tmp / f"{name}.{os.getpid()}.partial"
        staged.append((tmp, f.sha256))
        if stream is not None:
            reader = stream
        else:
            assert not isinstance(source, StreamSource)  # whose files() gives each file with its stream
            reader = source.open(name)
        try:
            sha, size = registry.stage(reader, tmp, advance(name), limit=f.size)
        finally:
            if stream is None:
                reader.close()
        if size != f.size:
            raise BundleError(f"{source.name}: files/{name} is truncated ({size} of {f.size} bytes)")
        if sha != f.sha256:
            raise BundleError(f"{source.name}: files/{name} does not match the manifest's SHA-256 (it was "
                              f"changed or damaged): expected {f.sha256}, got {sha}")
    if not source.seekable:  # only now can a streamed model's header be read
        paths = {sha: tmp for tmp, sha in staged}
        for model in manifest.models:
            if model.id not in unchanged:
                headers[model.id] = [gguf.read(paths.get(f.sha256, registry.blob(f.sha256))) for f in model.files]
                _check_memory(source, model, headers[model.id], engine, memory_limit)
        new = [_entry(m, registry, source, signer, headers[m.id]) for m in manifest.models if m.id not in unchanged]

    for tmp, sha in staged:
        registry.place(tmp, sha)
    registry.write([e for e in entries if e.id not in replacing] + new)
    registry.recover()  # the files of replaced models that nothing uses any more
    return [Outcome(m.id, "unchanged" if m.id in unchanged else "replaced" if m.id in by_id else "installed")
            for m in manifest.models]


def _header(source: DirectorySource | TarSource, f: BundleFile) -> gguf.GGUFFile:
    with source.open(f.name) as stream:
        try:
            return gguf.read_from(stream, Path(f.name), f.size)
        except gguf.GGUFError as e:
            raise BundleError(f"{source.name}: files/{e}") from None


def _check_memory(source: Source, model: BundleModel, headers: list[gguf.GGUFFile], engine: EngineConfig,
                  limit: int) -> None:
    """Refuse a model that could never load here: not even at the smallest context with nothing else loaded."""
    n_ubatch = min(engine.n_ubatch, engine.n_batch)
    if memory.largest_context(headers, limit, parallel=engine.parallel, n_ubatch=n_ubatch):
        return
    smallest = memory.estimate(headers, n_ctx=256, parallel=engine.parallel, n_ubatch=n_ubatch)
    raise BundleError(f"{source.name}: model {model.id} can never load on this box: it needs about "
                      f"{smallest.describe()} even with n_ctx 256, and at most {limit / MiB:.0f} MiB can be "
                      "made free for models here")


def _entry(model: BundleModel, registry: Registry, source: Source, signer: str,
           headers: list[gguf.GGUFFile]) -> Entry:
    files = [ModelFile(f.name, f.sha256, f.size) for f in model.files]
    try:
        entry = describe([registry.blob(f.sha256) for f in model.files], model_id=model.id,
                         source=f"bundle {Path(source.name).name} ({signer})", files=files, headers=headers)
    except StoreError as e:  # a sampling default the file recommends that cannot be honoured
        raise BundleError(f"{source.name}: model {model.id}: {e}") from None
    entry.aliases = list(model.aliases)
    entry.license = model.license
    entry.chat_template = model.chat_template or ""
    entry.defaults.update(model.defaults)
    return entry


def verify_files(source: DirectorySource | TarSource, manifest: Manifest, progress: Progress | None = None) -> None:
    """Hash every file against the manifest (`edgellm bundle verify`); BundleError names the first bad one."""
    total = sum(f.size for f in manifest.files())
    done = 0
    for f in manifest.files():
        def step(n: int, name: str = f.name) -> None:
            nonlocal done
            done += n
            if progress:
                progress("importing", name, done, total)
        with source.open(f.name) as stream:
            sha, size = copy_hashing(stream, None, step, limit=f.size)
        if size != f.size or sha != f.sha256:
            raise BundleError(f"{source.name}: files/{f.name} does not match the manifest's SHA-256 (it was "
                              f"changed or damaged)")
